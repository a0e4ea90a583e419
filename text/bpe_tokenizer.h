// Byte-level BPE from a Hugging Face tokenizer.json: the Llama-3, Qwen2 and GPT-2 families.
//
// Supported components (anything else is rejected at load with Unimplemented naming the field):
//   model          BPE (vocab, merges as "a b" strings or [a, b] pairs, ignore_merges); no dropout,
//                  unk_token, byte_fallback or subword prefixes/suffixes
//   added_tokens   special or not, normalized or not; no lstrip/rstrip/single_word
//   normalizer     null, NFC, NFD, NFKC, NFKD (ICU), Sequence of these
//   pre_tokenizer  ByteLevel (use_regex, add_prefix_space), Split (Regex or String pattern,
//                  behavior Isolated or Removed, not inverted), Sequence of these; a ByteLevel
//                  step is required
//   post_processor null, TemplateProcessing, ByteLevel, RobertaProcessing/BertProcessing, Sequence
//   decoder        ByteLevel
// Regexes run on PCRE2 (UTF + UCP, JIT); tokenizers runs them on Oniguruma, and the two agree on the
// patterns these families use.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json_fwd.hpp"
#include "text/tokenizer.h"

namespace scout::text {

class BpeTokenizer final : public Tokenizer {
 public:
  // InvalidArgument for malformed JSON or fields of the wrong shape, Unimplemented for components
  // outside the list above; the message names `origin` (a file name) and the field.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> FromJson(absl::string_view json, absl::string_view origin);
  // As FromJson; NotFound when the file is missing.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> FromFile(const std::filesystem::path& path);
  ~BpeTokenizer() override;
  BpeTokenizer(const BpeTokenizer&) = delete;
  BpeTokenizer& operator=(const BpeTokenizer&) = delete;

  // With add_bos the post-processor's single-sequence template is applied (tokenizers'
  // add_special_tokens=True; for Llama-3 that prepends <|begin_of_text|>). Added and special tokens
  // written literally in the text are recognised (leftmost, then longest). Text that is not valid
  // UTF-8 is encoded byte by byte where the regexes cannot split it. Thread-safe.
  std::vector<int32_t> Encode(absl::string_view text, bool add_bos) const override;
  // The Tokenizer contract: the raw bytes of the tokens (one token may end inside a UTF-8
  // character), special tokens decoding to nothing.
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids) const override;
  // What tokenizers' decode(ids, skip_special_tokens) returns: valid UTF-8 with U+FFFD for each
  // ill-formed sequence; special tokens decode to their content unless skipped.
  absl::StatusOr<std::string> DecodeText(std::span<const int32_t> ids, bool skip_special_tokens) const;

  int64_t vocab_size() const override;
  int32_t bos_id() const override;
  std::vector<int32_t> eos_ids() const override;

  std::optional<int32_t> TokenToId(absl::string_view token) const;  // vocabulary or added token
  bool IsSpecial(int32_t id) const;
  // tokenizer.json does not say which token ends a turn; LoadTokenizer sets it from
  // tokenizer_config.json / generation_config.json. Not thread-safe against concurrent calls.
  void set_eos_ids(std::vector<int32_t> ids);
  // For folders whose post-processor does not add BOS but whose config asks for it (add_bos_token).
  void set_bos_id(int32_t id);

 private:
  struct Impl;
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> FromParsedJson(const nlohmann::json& j, absl::string_view origin);
  explicit BpeTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace scout::text
