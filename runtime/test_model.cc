#include "runtime/test_model.h"

#include <cstring>
#include <fstream>
#include <map>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/safetensors.h"

namespace scout::runtime::testing {

ModelConfig TinyConfig() {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = 40;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  c.rope.theta = 10000;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

std::string ConfigJson(const ModelConfig& c) {
  nlohmann::json j = {
      {"architectures", {c.architecture}}, {"model_type", "llama"}, {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers}, {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads}, {"head_dim", c.head_dim},
      {"max_position_embeddings", c.max_position_embeddings}, {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope.theta}, {"tie_word_embeddings", c.tie_word_embeddings},
      {"bos_token_id", c.bos_token_id}, {"eos_token_id", c.eos_token_ids}, {"hidden_act", "silu"},
      {"torch_dtype", "bfloat16"}};
  if (c.rope.type == "llama3") {
    j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", c.rope.factor},
                         {"low_freq_factor", c.rope.low_freq_factor}, {"high_freq_factor", c.rope.high_freq_factor},
                         {"original_max_position_embeddings", c.rope.original_max_position_embeddings}};
  }
  return j.dump(2);
}

void WriteRandomModel(const std::filesystem::path& dir, const ModelConfig& c, uint32_t seed, int shards) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << ConfigJson(c);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.2f);
  std::map<std::string, TensorData> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, bool norm) {
    TensorData t{.dtype = DType::kBF16, .shape = shape, .data = {}};
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    t.data.resize(n * 2);
    for (int64_t i = 0; i < n; ++i) {
      uint16_t b = FloatToBf16(norm ? 1.0f + normal(rng) : normal(rng));
      std::memcpy(t.data.data() + i * 2, &b, 2);
    }
    tensors[name] = std::move(t);
  };
  const int64_t d = c.hidden_size, hd = c.head_dim;
  add("model.embed_tokens.weight", {c.vocab_size, d}, false);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    std::string p = absl::StrCat("model.layers.", l, ".");
    add(p + "input_layernorm.weight", {d}, true);
    add(p + "self_attn.q_proj.weight", {c.num_attention_heads * hd, d}, false);
    add(p + "self_attn.k_proj.weight", {c.num_key_value_heads * hd, d}, false);
    add(p + "self_attn.v_proj.weight", {c.num_key_value_heads * hd, d}, false);
    add(p + "self_attn.o_proj.weight", {d, c.num_attention_heads * hd}, false);
    add(p + "post_attention_layernorm.weight", {d}, true);
    add(p + "mlp.gate_proj.weight", {c.intermediate_size, d}, false);
    add(p + "mlp.up_proj.weight", {c.intermediate_size, d}, false);
    add(p + "mlp.down_proj.weight", {d, c.intermediate_size}, false);
  }
  add("model.norm.weight", {d}, true);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, d}, false);
  if (shards <= 1) {
    ASSERT_TRUE(WriteSafetensors(dir / "model.safetensors", tensors).ok());
    return;
  }
  std::vector<std::map<std::string, TensorData>> parts(shards);
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", nlohmann::json::object()}};
  int i = 0;
  for (auto& [name, t] : tensors) {
    int s = (i++) % shards;
    std::string file = absl::StrCat("model-0000", s + 1, "-of-0000", shards, ".safetensors");
    index["weight_map"][name] = file;
    parts[s][name] = std::move(t);
  }
  for (int s = 0; s < shards; ++s) {
    std::string file = absl::StrCat("model-0000", s + 1, "-of-0000", shards, ".safetensors");
    ASSERT_TRUE(WriteSafetensors(dir / file, parts[s]).ok());
  }
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(2);
}

std::filesystem::path FreshDir(const std::string& name) {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / "scout_test" /
                              absl::StrCat(info->test_suite_name(), ".", info->name()) / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

std::vector<int32_t> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = std::uniform_int_distribution<int32_t>(0, vocab - 1)(rng);
  return t;
}

}  // namespace scout::runtime::testing
