#include "runtime/llama_weights.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"

namespace scout::runtime {
namespace {

// Appends the tensor `name`, which must have exactly `shape`, to *out as float32.
absl::Status Append(const TensorStore& store, const std::string& name, std::vector<int64_t> shape,
                    std::vector<float>* out) {
  absl::StatusOr<const TensorView*> t = store.Get(name);
  if (!t.ok()) return t.status();
  const TensorView& v = **t;
  if (v.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(v.file, ": tensor \"", name, "\" has shape [",
                                                   absl::StrJoin(v.shape, ", "), "] but config.json implies [",
                                                   absl::StrJoin(shape, ", "), "]"));
  }
  size_t at = out->size();
  out->resize(at + v.numel());
  absl::Status s = ToFloat32(v, std::span<float>(out->data() + at, v.numel()));
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\": ", s.message()));
  return absl::OkStatus();
}

// A missing bias tensor: say why it was expected.
absl::Status WhyBias(const absl::Status& s, const ModelConfig& c) {
  if (!absl::IsNotFound(s)) return s;
  return absl::NotFoundError(absl::StrCat(s.message(), " (", c.architecture,
                                          c.architecture == "Qwen2ForCausalLM" ? " has attention biases)"
                                                                               : " with \"attention_bias\": true)"));
}

}  // namespace

absl::StatusOr<LlamaWeights> LoadLlamaWeights(const ModelConfig& c, const TensorStore& store) {
  const int64_t d = c.hidden_size, hd = c.head_dim, nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  // A checkpoint with more layers than the config is a mismatch, not something to ignore.
  for (const std::string& name : store.Names()) {
    if (!absl::StartsWith(name, "model.layers.")) continue;
    absl::string_view rest = absl::string_view(name).substr(13);
    int64_t layer = 0;
    if (absl::SimpleAtoi(rest.substr(0, rest.find('.')), &layer) && layer >= c.num_hidden_layers) {
      absl::StatusOr<const TensorView*> t = store.Get(name);
      return absl::InvalidArgumentError(absl::StrCat((*t)->file, ": tensor \"", name, "\" belongs to layer ", layer,
                                                     " but config.json has num_hidden_layers = ", c.num_hidden_layers));
    }
  }
  LlamaWeights w;
  absl::Status s;
  if (!(s = Append(store, "model.embed_tokens.weight", {c.vocab_size, d}, &w.embed)).ok()) return s;
  w.layers.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LlamaLayerWeights& l = w.layers[i];
    struct Part {
      const char* name;
      std::vector<int64_t> shape;
      std::vector<float>* dst;
    };
    const Part parts[] = {
        {"input_layernorm.weight", {d}, &l.attn_norm},
        {"self_attn.q_proj.weight", {nh * hd, d}, &l.wqkv},
        {"self_attn.k_proj.weight", {nkv * hd, d}, &l.wqkv},
        {"self_attn.v_proj.weight", {nkv * hd, d}, &l.wqkv},
        {"self_attn.o_proj.weight", {d, nh * hd}, &l.wo},
        {"post_attention_layernorm.weight", {d}, &l.mlp_norm},
        {"mlp.gate_proj.weight", {c.intermediate_size, d}, &l.w_gate_up},
        {"mlp.up_proj.weight", {c.intermediate_size, d}, &l.w_gate_up},
        {"mlp.down_proj.weight", {d, c.intermediate_size}, &l.w_down},
    };
    for (const Part& part : parts) {
      if (!(s = Append(store, p + part.name, part.shape, part.dst)).ok()) return s;
    }
    if (c.qkv_bias) {
      const Part biases[] = {{"self_attn.q_proj.bias", {nh * hd}, &l.bqkv},
                             {"self_attn.k_proj.bias", {nkv * hd}, &l.bqkv},
                             {"self_attn.v_proj.bias", {nkv * hd}, &l.bqkv}};
      for (const Part& part : biases) {
        if (!(s = Append(store, p + part.name, part.shape, part.dst)).ok()) return WhyBias(s, c);
      }
    }
    if (c.o_bias && !(s = Append(store, p + "self_attn.o_proj.bias", {d}, &l.bo)).ok()) return WhyBias(s, c);
  }
  if (!(s = Append(store, "model.norm.weight", {d}, &w.norm)).ok()) return s;
  if (!c.tie_word_embeddings) {
    if (!(s = Append(store, "lm_head.weight", {c.vocab_size, d}, &w.lm_head)).ok()) return s;
  }
  return w;
}

absl::StatusOr<Checkpoint> LoadCheckpoint(const std::filesystem::path& model_dir) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir);
  if (!config.ok()) return config.status();
  absl::StatusOr<TensorStore> store = TensorStore::OpenDir(model_dir);
  if (!store.ok()) return store.status();
  absl::StatusOr<LlamaWeights> weights = LoadLlamaWeights(*config, *store);
  if (!weights.ok()) return weights.status();
  return Checkpoint{std::move(*config), std::move(*weights)};
}

}  // namespace scout::runtime
