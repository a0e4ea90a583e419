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

// Rotary position embedding, as transformers 5 computes it (modeling_rope_utils.py).
struct RopeConfig {
  std::string type = "default";  // "default", "linear", "llama3" or "yarn"
  double theta = 10000.0;
  // linear: inverse frequencies divided by factor. llama3 and yarn: the context extension factor.
  double factor = 1.0;
  // llama3 scaling (used when type == "llama3").
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  // llama3 and yarn: the pretraining context length.
  int64_t original_max_position_embeddings = 8192;
  // yarn (type == "yarn"): the ramp between interpolated and extrapolated frequencies and the
  // factor cos and sin are multiplied by (see RopeAttentionScaling in rope.h).
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  bool truncate = true;  // round the ramp's ends to whole dimensions
  double mscale = 0.0;   // 0: absent
  double mscale_all_dim = 0.0;
  double attention_factor = 0.0;  // 0: absent, derived from factor (and mscale, mscale_all_dim)
};

struct ModelConfig {
  std::string architecture;  // "LlamaForCausalLM", "Qwen2ForCausalLM" or "MistralForCausalLM"
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

  // The q, k and v projections carry biases (Qwen2 always; Llama with "attention_bias": true).
  bool qkv_bias = false;
  // The output projection carries a bias (Llama with "attention_bias": true; never Qwen2).
  bool o_bias = false;

  // Sliding-window attention (Mistral's "sliding_window"; Qwen2's "use_sliding_window" with
  // "max_window_layers" or "layer_types"). On a sliding layer the query at position p sees the
  // keys at positions k with p - sliding_window < k <= p: sliding_window keys, its own included,
  // as transformers' sliding_window_overlay masks them.
  int64_t sliding_window = 0;        // > 0 where some layer slides
  std::vector<bool> sliding_layers;  // [num_hidden_layers] when sliding_window > 0, else empty

  // The window of `layer`, 0 for full causal attention.
  int64_t SlidingWindow(int64_t layer) const {
    return !sliding_layers.empty() && sliding_layers[layer] ? sliding_window : 0;
  }
};

// Parses config.json text of LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM. Reads both
// the classic fields (rope_theta, rope_scaling) and the transformers 5 form (rope_parameters,
// layer_types). Returns InvalidArgument for malformed JSON or a missing or inconsistent field,
// Unimplemented for an architecture or feature Scout does not run (another rope type, mlp_bias,
// partial_rotary_factor, ...), each message naming `source` and the field.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text, absl::string_view source);

// Reads <model_dir>/config.json. NotFound if it is missing.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::filesystem::path& model_dir);

// Reads a whole file. NotFound / PermissionDenied / Internal naming the path.
absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path);

}  // namespace scout::runtime
