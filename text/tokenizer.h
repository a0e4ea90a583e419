// Text <-> token ids. The byte-level tokenizer serves the fixture models; Hugging Face
// tokenizer.json (BPE) plugs in behind the same interface.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace scout::text {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Never fails: every byte string has an encoding. Prepends BOS when add_bos and the model has one.
  virtual std::vector<int32_t> Encode(absl::string_view text, bool add_bos) const = 0;
  // Special tokens (BOS, EOS, ...) decode to nothing. InvalidArgument for an id outside the vocabulary.
  virtual absl::StatusOr<std::string> Decode(std::span<const int32_t> ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 if none
  virtual std::vector<int32_t> eos_ids() const = 0;
};

// Ids 0..255 are the bytes themselves; the ids above are special tokens.
class ByteTokenizer final : public Tokenizer {
 public:
  ByteTokenizer(int64_t vocab_size, int32_t bos_id, int32_t eos_id)
      : vocab_size_(vocab_size), bos_id_(bos_id), eos_id_(eos_id) {}
  std::vector<int32_t> Encode(absl::string_view text, bool add_bos) const override;
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  int32_t bos_id() const override { return bos_id_; }
  std::vector<int32_t> eos_ids() const override;

 private:
  int64_t vocab_size_;
  int32_t bos_id_;
  int32_t eos_id_;
};

// Turns ids that arrive one at a time into text that never ends inside a UTF-8 character: the
// bytes of an unfinished character wait for the token that completes it, and ill-formed bytes
// become U+FFFD. The concatenation of every Add and Finish is the UTF-8-repaired Decode of all the
// ids. One per sequence; not thread-safe; the tokenizer must outlive it.
class StreamingDecoder {
 public:
  explicit StreamingDecoder(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}
  // InvalidArgument for an id outside the vocabulary (nothing is consumed then).
  absl::StatusOr<std::string> Add(int32_t id);
  // The bytes still held back (an unfinished character), as U+FFFD; resets the decoder.
  std::string Finish();

 private:
  const Tokenizer& tokenizer_;
  std::string pending_;
};

// Picks the tokenizer a model folder declares: scout_tokenizer.json {"type": "bytes", ...} for
// the fixtures, else a Hugging Face tokenizer.json (BpeTokenizer, bpe_tokenizer.h) with its end
// tokens from tokenizer_config.json's eos_token and generation_config.json's eos_token_id, and a
// BOS from tokenizer_config.json when the post-processor adds none but add_bos_token is true. A
// folder with neither file gets NotFound naming the files looked for; a tokenizer.json the BPE
// tokenizer cannot run gets its InvalidArgument or Unimplemented.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::filesystem::path& model_dir);

}  // namespace scout::text
