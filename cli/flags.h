// Command-line flags of a `scout` subcommand: --kebab-case NAME VALUE or --name=value, with
// values also settable from a YAML file (--config FILE; the command line wins).
//
// Why not absl flags or CLI11: absl flags live in one process-wide registry, so every subcommand
// would accept (and `--help` would list) every other subcommand's flags, and two subcommands
// could not give one flag name different defaults (`--santa-samples` is 0 for serve, 64 for
// eval); CLI11 (Debian's libcli11-dev) has per-subcommand flags but reads config files as TOML
// or INI, while vLLM's users pass `--config` YAML. This parser is the ~100 lines both need.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace scout::cli {

struct FlagSpec {
  std::string name;     // without dashes, e.g. "max-tokens"
  std::string default_value;
  std::string help;
  bool is_bool = false;  // takes no value: --flag sets "true"
};

class Flags {
 public:
  explicit Flags(std::vector<FlagSpec> specs);
  // Parses argv after the subcommand. InvalidArgument naming an unknown flag, a missing value,
  // or a YAML file that cannot be read or holds unknown keys.
  absl::Status Parse(int argc, char** argv);
  std::string Get(const std::string& name) const;
  absl::StatusOr<int64_t> GetInt(const std::string& name) const;
  absl::StatusOr<double> GetDouble(const std::string& name) const;
  bool GetBool(const std::string& name) const;
  bool IsSet(const std::string& name) const { return set_.contains(name); }
  std::string Help() const;

 private:
  const FlagSpec* Find(const std::string& name) const;

  std::vector<FlagSpec> specs_;
  std::map<std::string, std::string> values_;
  std::map<std::string, bool> set_;
};

}  // namespace scout::cli
