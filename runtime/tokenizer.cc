#include "runtime/tokenizer.h"

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "runtime/model_config.h"

namespace scout::runtime {

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

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::filesystem::path& model_dir) {
  const std::filesystem::path scout_file = model_dir / "scout_tokenizer.json";
  std::error_code ec;
  if (std::filesystem::exists(scout_file, ec)) {
    absl::StatusOr<std::string> text = ReadFile(scout_file);
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
  if (std::filesystem::exists(model_dir / "tokenizer.json", ec)) {
    return absl::UnimplementedError(absl::StrCat((model_dir / "tokenizer.json").string(),
                                                 ": Hugging Face BPE tokenizers are not supported yet"));
  }
  return absl::NotFoundError(absl::StrCat(model_dir.string(), ": no scout_tokenizer.json or tokenizer.json"));
}

}  // namespace scout::runtime
