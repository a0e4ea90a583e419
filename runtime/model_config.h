// A Llama-family model's shape, read from a Hugging Face config.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace scout::runtime {

struct RopeConfig {
  std::string type = "default";  // "default" or "llama3"
  double theta = 10000.0;
  // llama3 scaling (used when type == "llama3").
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture;  // e.g. "LlamaForCausalLM"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
};

// Parses config.json text. Reads both the classic fields (rope_theta, rope_scaling) and the
// transformers 5 form (rope_parameters). Returns InvalidArgument for malformed JSON or a missing
// or inconsistent field, Unimplemented for an architecture or feature Scout does not run, each
// message naming `source` and the field.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text, absl::string_view source);

// Reads <model_dir>/config.json. NotFound if it is missing.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::filesystem::path& model_dir);

// Reads a whole file. NotFound / PermissionDenied / Internal naming the path.
absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path);

}  // namespace scout::runtime
