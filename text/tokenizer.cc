#include "text/tokenizer.h"

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "text/bpe_tokenizer.h"
#include "runtime/model_config.h"
#include "text/utf8.h"

namespace scout::text {

std::vector<int32_t> ByteTokenizer::Encode(absl::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() + 1);
  if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);
  for (char c : text) ids.push_back(static_cast<unsigned char>(c));
  return ids;
}

absl::StatusOr<std::string> ByteTokenizer::Decode(std::span<const int32_t> ids) const {
  std::string out;
  out.reserve(ids.size());
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size_) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " outside vocabulary of ", vocab_size_));
    }
    if (id < 256) out.push_back(static_cast<char>(id));
  }
  return out;
}

std::vector<int32_t> ByteTokenizer::eos_ids() const {
  if (eos_id_ < 0) return {};
  return {eos_id_};
}

absl::StatusOr<std::string> StreamingDecoder::Add(int32_t id) {
  absl::StatusOr<std::string> bytes = tokenizer_.Decode({&id, 1});
  if (!bytes.ok()) return bytes.status();
  pending_ += *bytes;
  const size_t complete = Utf8CompletePrefix(pending_);
  std::string out;
  AppendUtf8Lossy(absl::string_view(pending_).substr(0, complete), &out);
  pending_.erase(0, complete);
  return out;
}

std::string StreamingDecoder::Finish() {
  std::string out;
  AppendUtf8Lossy(pending_, &out);
  pending_.clear();
  return out;
}

namespace {

// A token named in a Hugging Face config: "<s>" or {"content": "<s>", ...}.
std::optional<std::string> ConfigToken(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) return (*it)["content"].get<std::string>();
  return std::nullopt;
}

// A JSON file of the folder, or an empty object when it is absent; InvalidArgument when malformed.
absl::StatusOr<nlohmann::json> OptionalJsonFile(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return nlohmann::json::object();
  absl::StatusOr<std::string> text = runtime::ReadFile(path);
  if (!text.ok()) return text.status();
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
  return j;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHuggingFaceTokenizer(const std::filesystem::path& model_dir) {
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tok = BpeTokenizer::FromFile(model_dir / "tokenizer.json");
  if (!tok.ok()) return tok.status();
  absl::StatusOr<nlohmann::json> tcfg = OptionalJsonFile(model_dir / "tokenizer_config.json");
  if (!tcfg.ok()) return tcfg.status();
  absl::StatusOr<nlohmann::json> gcfg = OptionalJsonFile(model_dir / "generation_config.json");
  if (!gcfg.ok()) return gcfg.status();
  std::vector<int32_t> eos;
  auto add_eos = [&](int32_t id) {
    if (id >= 0 && id < (*tok)->vocab_size() && std::find(eos.begin(), eos.end(), id) == eos.end()) eos.push_back(id);
  };
  if (std::optional<std::string> t = ConfigToken(*tcfg, "eos_token")) {
    if (std::optional<int32_t> id = (*tok)->TokenToId(*t)) add_eos(*id);
  }
  if (auto it = gcfg->find("eos_token_id"); it != gcfg->end()) {
    if (it->is_number_integer()) add_eos(it->get<int32_t>());
    if (it->is_array()) {
      for (const nlohmann::json& e : *it) {
        if (e.is_number_integer()) add_eos(e.get<int32_t>());
      }
    }
  }
  (*tok)->set_eos_ids(std::move(eos));
  const auto add_bos = tcfg->find("add_bos_token");
  if ((*tok)->bos_id() < 0 && add_bos != tcfg->end() && add_bos->is_boolean() && add_bos->get<bool>()) {
    if (std::optional<std::string> t = ConfigToken(*tcfg, "bos_token")) {
      if (std::optional<int32_t> id = (*tok)->TokenToId(*t)) (*tok)->set_bos_id(*id);
    }
  }
  return std::unique_ptr<Tokenizer>(*std::move(tok));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::filesystem::path& model_dir) {
  const std::filesystem::path scout_file = model_dir / "scout_tokenizer.json";
  std::error_code ec;
  if (std::filesystem::exists(scout_file, ec)) {
    absl::StatusOr<std::string> text = runtime::ReadFile(scout_file);
    if (!text.ok()) return text.status();
    nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(scout_file.string(), ": not a JSON object"));
    }
    auto int_field = [&](const char* key, int64_t dflt) -> int64_t {
      auto it = j.find(key);
      return it != j.end() && it->is_number_integer() ? it->get<int64_t>() : dflt;
    };
    auto type = j.find("type");
    if (type == j.end() || !type->is_string() || type->get<std::string>() != "bytes") {
      return absl::UnimplementedError(absl::StrCat(scout_file.string(), ": tokenizer \"type\" must be \"bytes\""));
    }
    int64_t vocab = int_field("vocab_size", 256);
    if (vocab < 256) return absl::InvalidArgumentError(absl::StrCat(scout_file.string(), ": vocab_size ", vocab, " < 256"));
    return std::make_unique<ByteTokenizer>(vocab, static_cast<int32_t>(int_field("bos_token_id", -1)),
                                           static_cast<int32_t>(int_field("eos_token_id", -1)));
  }
  if (std::filesystem::exists(model_dir / "tokenizer.json", ec)) return LoadHuggingFaceTokenizer(model_dir);
  return absl::NotFoundError(absl::StrCat(model_dir.string(), ": no scout_tokenizer.json or tokenizer.json"));
}

}  // namespace scout::text
