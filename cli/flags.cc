#include "cli/flags.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "yaml-cpp/yaml.h"

namespace scout::cli {

Flags::Flags(std::vector<FlagSpec> specs) : specs_(std::move(specs)) {
  specs_.push_back({"config", "", "YAML file of flag values (keys as the flags, kebab or snake case)"});
  for (const FlagSpec& s : specs_) values_[s.name] = s.default_value;
}

const FlagSpec* Flags::Find(const std::string& name) const {
  std::string n = absl::StrReplaceAll(name, {{"_", "-"}});
  for (const FlagSpec& s : specs_) {
    if (s.name == n) return &s;
  }
  return nullptr;
}

absl::Status Flags::Parse(int argc, char** argv) {
  std::map<std::string, std::string> cli;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) return absl::InvalidArgumentError(absl::StrCat("unexpected argument \"", arg, "\""));
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const FlagSpec* spec = Find(name);
    if (spec == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    if (!has_value) {
      if (spec->is_bool) {
        value = "true";
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      }
    }
    cli[spec->name] = value;
  }
  if (auto it = cli.find("config"); it != cli.end() && !it->second.empty()) {
    YAML::Node root;
    try {
      root = YAML::LoadFile(it->second);
    } catch (const YAML::Exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(it->second, ": ", e.what()));
    }
    if (!root.IsMap()) return absl::InvalidArgumentError(absl::StrCat(it->second, ": top level must be a mapping"));
    for (const auto& kv : root) {
      std::string key = kv.first.as<std::string>();
      const FlagSpec* spec = Find(key);
      if (spec == nullptr) return absl::InvalidArgumentError(absl::StrCat(it->second, ": unknown key \"", key, "\""));
      if (!kv.second.IsScalar()) return absl::InvalidArgumentError(absl::StrCat(it->second, ": \"", key, "\" must be a scalar"));
      values_[spec->name] = kv.second.as<std::string>();
      set_[spec->name] = true;
    }
  }
  for (auto& [k, v] : cli) {
    values_[k] = v;
    set_[k] = true;
  }
  return absl::OkStatus();
}

std::string Flags::Get(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? "" : it->second;
}

absl::StatusOr<int64_t> Flags::GetInt(const std::string& name) const {
  int64_t v;
  if (!absl::SimpleAtoi(Get(name), &v)) return absl::InvalidArgumentError(absl::StrCat("--", name, " must be an integer, got \"", Get(name), "\""));
  return v;
}

absl::StatusOr<double> Flags::GetDouble(const std::string& name) const {
  double v;
  if (!absl::SimpleAtod(Get(name), &v)) return absl::InvalidArgumentError(absl::StrCat("--", name, " must be a number, got \"", Get(name), "\""));
  return v;
}

bool Flags::GetBool(const std::string& name) const {
  std::string v = Get(name);
  return v == "true" || v == "1" || v == "yes";
}

std::string Flags::Help() const {
  std::string out;
  for (const FlagSpec& s : specs_) {
    absl::StrAppend(&out, "  --", s.name, s.is_bool ? "" : " VALUE", "\n      ", s.help,
                    s.default_value.empty() ? "" : absl::StrCat(" (default: ", s.default_value, ")"), "\n");
  }
  return out;
}

}  // namespace scout::cli
