// Llama-family weights read from a Hugging Face checkpoint into float32.
#pragma once

#include <filesystem>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model_config.h"
#include "runtime/safetensors.h"

namespace scout::runtime {

// Matrices are row-major [out][in], as Hugging Face stores nn.Linear weights.
struct LlamaLayerWeights {
  std::vector<float> attn_norm;  // [hidden]
  std::vector<float> wqkv;       // [(heads + 2 * kv_heads) * head_dim][hidden]: q, k, v rows stacked
  std::vector<float> bqkv;       // [(heads + 2 * kv_heads) * head_dim] q, k, v biases stacked; empty without
  std::vector<float> wo;         // [hidden][heads * head_dim]
  std::vector<float> bo;         // [hidden] output projection bias; empty without
  std::vector<float> mlp_norm;   // [hidden]
  std::vector<float> w_gate_up;  // [2 * intermediate][hidden]: gate rows, then up rows
  std::vector<float> w_down;     // [hidden][intermediate]
};

struct LlamaWeights {
  std::vector<float> embed;    // [vocab][hidden]
  std::vector<LlamaLayerWeights> layers;
  std::vector<float> norm;     // [hidden]
  std::vector<float> lm_head;  // [vocab][hidden]; empty when tied to embed
};

// Reads every tensor the config implies and checks its shape: the q/k/v biases when
// config.qkv_bias, the output projection's when config.o_bias (tensors the config does not call
// for are ignored, as transformers ignores them). Errors name the file and tensor: NotFound for
// a missing tensor, InvalidArgument for a shape that contradicts config.json or
// for layers beyond num_hidden_layers, DataLoss passed through from a corrupt shard.
absl::StatusOr<LlamaWeights> LoadLlamaWeights(const ModelConfig& config, const TensorStore& store);

// A Hugging Face model folder read whole: config.json and its safetensors weights. Errors as
// LoadModelConfig, TensorStore::OpenDir and LoadLlamaWeights give them.
struct Checkpoint {
  ModelConfig config;
  LlamaWeights weights;
};
absl::StatusOr<Checkpoint> LoadCheckpoint(const std::filesystem::path& model_dir);

}  // namespace scout::runtime
