#include "runtime/model_config.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <numbers>

#include "gtest/gtest.h"
#include "runtime/rope.h"

namespace scout::runtime {
namespace {

// Llama-3.1-8B's config.json as Hugging Face publishes it (classic rope_scaling form).
constexpr char kLlama31_8B[] = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})";

TEST(ModelConfigTest, ParsesLlama31Config) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kLlama31_8B, "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 128);  // derived: hidden / heads
  EXPECT_EQ(c->rope.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c->rope.factor, 8.0);
  EXPECT_EQ(c->rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_FALSE(c->tie_word_embeddings);
}

TEST(ModelConfigTest, ParsesTransformers5RopeParameters) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 258, "hidden_size": 384,
    "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
    "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 2048},
    "eos_token_id": 257, "bos_token_id": 256})", "t5.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
  EXPECT_EQ(c->rope.original_max_position_embeddings, 2048);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>{257});
}

TEST(ModelConfigTest, ErrorsNameTheFileAndField) {
  struct Case {
    const char* json;
    absl::StatusCode code;
    const char* needle;
  };
  const Case cases[] = {
      {"{not json", absl::StatusCode::kInvalidArgument, "not valid JSON"},
      {R"({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})", absl::StatusCode::kUnimplemented,
       "GPT2LMHeadModel"},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10})", absl::StatusCode::kInvalidArgument,
       "\"hidden_size\""},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": "big"})",
       absl::StatusCode::kInvalidArgument, "\"hidden_size\" must be an integer"},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 12, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2,
          "max_position_embeddings": 8})", absl::StatusCode::kInvalidArgument, "not a multiple"},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "rope_scaling": {"rope_type": "longrope", "factor": 4}})", absl::StatusCode::kUnimplemented,
       "\"rope_scaling\": rope_type \"longrope\""},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "rope_parameters": {"rope_type": "su", "rope_theta": 10000.0}})", absl::StatusCode::kUnimplemented,
       "\"rope_parameters\": rope_type \"su\""},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "rope_scaling": {"type": "dynamic", "factor": 2.0}})", absl::StatusCode::kUnimplemented, "\"dynamic\""},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "rope_scaling": {"rope_type": "linear"}})", absl::StatusCode::kInvalidArgument, "lacks \"factor\""},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "partial_rotary_factor": 0.5})", absl::StatusCode::kUnimplemented, "\"partial_rotary_factor\": 0.5"},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}})",
       absl::StatusCode::kUnimplemented, "per layer type"},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "mlp_bias": true})", absl::StatusCode::kUnimplemented, "\"mlp_bias\""},
      {R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen3", "vocab_size": 10, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8})",
       absl::StatusCode::kUnimplemented, "model_type \"qwen3\""},
      {R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 8,
          "use_sliding_window": true, "sliding_window": 4,
          "layer_types": ["full_attention", "chunked_attention"]})", absl::StatusCode::kUnimplemented,
       "\"layer_types\"[1]: \"chunked_attention\""},
      {R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 8,
          "use_sliding_window": false, "sliding_window": null,
          "layer_types": ["full_attention", "sliding_attention"]})", absl::StatusCode::kInvalidArgument,
       "no \"sliding_window\" is in effect"},
      {R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 8,
          "layer_types": ["full_attention"]})", absl::StatusCode::kInvalidArgument, "\"layer_types\" must list"},
      {R"({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 10, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "sliding_window": -3})", absl::StatusCode::kInvalidArgument, "\"sliding_window\" must be positive"},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "rope_scaling": {"rope_type": "yarn", "factor": 4, "truncate": "yes"}})", absl::StatusCode::kInvalidArgument,
       "\"truncate\""},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "attention_bias": null})", absl::StatusCode::kInvalidArgument, "malformed field"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ModelConfig> r = ParseModelConfig(c.json, "dir/config.json");
    ASSERT_FALSE(r.ok()) << c.json;
    EXPECT_EQ(r.status().code(), c.code) << r.status();
    EXPECT_NE(r.status().message().find("dir/config.json"), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find(c.needle), std::string::npos) << r.status();
  }
}

TEST(ModelConfigTest, MissingConfigFileIsNotFound) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig("/nonexistent/scout-model");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find("/nonexistent/scout-model/config.json"), std::string::npos);
}

// Qwen2.5-7B-Instruct's config.json as published (transformers 4 form): q/k/v biases implied,
// the sliding window off (use_sliding_window false), no rope scaling.
constexpr char kQwen25_7B[] = R"({
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
  "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
  "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
  "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 152064})";

TEST(ModelConfigTest, ParsesQwen25Config) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kQwen25_7B, "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "Qwen2ForCausalLM");
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_TRUE(c->qkv_bias);
  EXPECT_FALSE(c->o_bias);
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_TRUE(c->sliding_layers.empty());
  EXPECT_EQ(c->SlidingWindow(27), 0);
  EXPECT_EQ(c->rope.type, "default");
  EXPECT_DOUBLE_EQ(c->rope.theta, 1e6);

  // The YaRN block Qwen2.5's model card tells users to add for long context (classic "type" key).
  std::string yarn = kQwen25_7B;
  yarn.insert(yarn.rfind('}'), R"(, "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"})");
  c = ParseModelConfig(yarn, "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.type, "yarn");
  EXPECT_DOUBLE_EQ(c->rope.factor, 4.0);  // as given (transformers 5), not max/original = 1
  EXPECT_EQ(c->rope.original_max_position_embeddings, 32768);
  EXPECT_DOUBLE_EQ(c->rope.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(c->rope.beta_slow, 1.0);
  EXPECT_TRUE(c->rope.truncate);
  EXPECT_FLOAT_EQ(RopeAttentionScaling(c->rope), static_cast<float>(0.1 * std::log(4.0) + 1.0));
}

// What transformers 5 writes for Qwen2 with its window on: rope_parameters and layer_types.
TEST(ModelConfigTest, ParsesQwen2Transformers5LayerTypes) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(R"({
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-06, "tie_word_embeddings": true,
    "use_sliding_window": true, "sliding_window": 20, "max_window_layers": 1,
    "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}})", "q5.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->sliding_window, 20);
  EXPECT_EQ(c->sliding_layers, (std::vector<bool>{false, true, true}));
  EXPECT_EQ(c->SlidingWindow(0), 0);
  EXPECT_EQ(c->SlidingWindow(2), 20);
  EXPECT_DOUBLE_EQ(c->rope.theta, 1e6);

  // transformers 4 had no layer_types: layers from max_window_layers on slide.
  c = ParseModelConfig(R"({
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 512,
    "use_sliding_window": true, "sliding_window": 32, "max_window_layers": 2})", "q4.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_layers, (std::vector<bool>{false, false, true, true}));
  EXPECT_EQ(c->sliding_window, 32);

  // transformers 5 with the window off: layer_types all full, sliding_window null.
  c = ParseModelConfig(R"({
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512,
    "use_sliding_window": false, "sliding_window": null, "max_window_layers": 28,
    "layer_types": ["full_attention", "full_attention"]})", "q5.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_TRUE(c->sliding_layers.empty());
}

TEST(ModelConfigTest, ParsesMistralSlidingWindow) {
  // Mistral-7B-v0.1: a 4096-token window on every layer.
  constexpr char kMistral7B[] = R"({
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000})";
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kMistral7B, "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_window, 4096);
  ASSERT_EQ(c->sliding_layers.size(), 32u);
  for (int l = 0; l < 32; ++l) EXPECT_EQ(c->SlidingWindow(l), 4096);
  EXPECT_FALSE(c->qkv_bias);
  EXPECT_FALSE(c->o_bias);

  // Mistral-7B-Instruct-v0.3 turned the window off ("sliding_window": null); head_dim may be null.
  std::string v03 = kMistral7B;
  v03.replace(v03.find("\"sliding_window\": 4096"), 22, "\"sliding_window\": null, \"head_dim\": null");
  c = ParseModelConfig(v03, "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_EQ(c->SlidingWindow(3), 0);
  EXPECT_EQ(c->head_dim, 128);
}

TEST(ModelConfigTest, LlamaAttentionBiasCoversOutputProjection) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10, "hidden_size": 8,
    "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
    "attention_bias": true, "sliding_window": 4})", "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->qkv_bias);
  EXPECT_TRUE(c->o_bias);
  EXPECT_EQ(c->sliding_window, 0);  // Llama has no window, whatever the file says
}

TEST(ModelConfigTest, ParsesYarnFields) {
  const char* base = R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
    "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 512,
    "rope_parameters": ROPE})";
  auto parse = [&](const std::string& rope) {
    std::string j = base;
    j.replace(j.find("ROPE"), 4, rope);
    return ParseModelConfig(j, "config.json");
  };
  absl::StatusOr<ModelConfig> c = parse(R"({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
      "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2, "mscale": 1.0,
      "mscale_all_dim": 0.5, "truncate": false})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.type, "yarn");
  EXPECT_DOUBLE_EQ(c->rope.factor, 8.0);
  EXPECT_EQ(c->rope.original_max_position_embeddings, 64);
  EXPECT_DOUBLE_EQ(c->rope.beta_fast, 16.0);
  EXPECT_DOUBLE_EQ(c->rope.beta_slow, 2.0);
  EXPECT_FALSE(c->rope.truncate);
  EXPECT_FLOAT_EQ(RopeAttentionScaling(c->rope),
                  static_cast<float>((0.1 * std::log(8.0) + 1) / (0.05 * std::log(8.0) + 1)));
  // original_max_position_embeddings defaults to max_position_embeddings; a missing factor is
  // their ratio; an explicit attention_factor wins.
  c = parse(R"({"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.25})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.original_max_position_embeddings, 512);
  EXPECT_FLOAT_EQ(RopeAttentionScaling(c->rope), 1.25f);
  c = parse(R"({"rope_type": "yarn", "original_max_position_embeddings": 128})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rope.factor, 4.0);
  c = parse(R"({"rope_type": "linear", "factor": 2.0})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.type, "linear");
  EXPECT_FLOAT_EQ(RopeAttentionScaling(c->rope), 1.0f);
}

// llama3 scaling, written out in double precision from Meta's formula.
TEST(RopeTest, Llama3ScalingMatchesFormula) {
  RopeConfig r{.type = "llama3", .theta = 500000, .factor = 8, .low_freq_factor = 1, .high_freq_factor = 4,
               .original_max_position_embeddings = 8192};
  std::vector<float> inv = RopeInvFreq(r, 128);
  ASSERT_EQ(inv.size(), 64u);
  for (int i = 0; i < 64; ++i) {
    double f = 1.0 / std::pow(500000.0, 2.0 * i / 128.0);
    double wavelen = 2 * std::numbers::pi / f;
    double want;
    if (wavelen < 8192.0 / 4) {
      want = f;
    } else if (wavelen > 8192.0) {
      want = f / 8;
    } else {
      double smooth = (8192.0 / wavelen - 1) / 3;
      want = (1 - smooth) * f / 8 + smooth * f;
    }
    EXPECT_NEAR(inv[i], want, 1e-5 * want) << i;
  }
}

// YaRN as the paper and transformers' _compute_yarn_parameters define it, in double precision.
TEST(RopeTest, YarnMatchesFormula) {
  for (bool truncate : {true, false}) {
    RopeConfig r{.type = "yarn", .theta = 10000, .factor = 4, .original_max_position_embeddings = 64,
                 .beta_fast = 32, .beta_slow = 1, .truncate = truncate};
    const int dim = 16;
    std::vector<float> inv = RopeInvFreq(r, dim);
    ASSERT_EQ(inv.size(), 8u);
    auto correction = [&](double rot) { return dim * std::log(64 / (rot * 2 * std::numbers::pi)) / (2 * std::log(10000.0)); };
    double low = correction(32), high = correction(1);
    if (truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, dim - 1.0);
    for (int i = 0; i < 8; ++i) {
      const double extrapolation = 1.0 / std::pow(10000.0, 2.0 * i / dim);
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double want = extrapolation / 4 * ramp + extrapolation * (1 - ramp);
      EXPECT_NEAR(inv[i], want, 2e-6 * want) << i << " truncate " << truncate;
    }
    EXPECT_EQ(inv[0], 1.0f);                                              // fastest dimension kept
    EXPECT_NEAR(inv[7], 1.0 / std::pow(10000.0, 14.0 / 16) / 4, 1e-9);  // slowest interpolated
  }
}

TEST(RopeTest, LinearDividesFrequenciesAndScalingMultipliesCosSin) {
  RopeConfig plain, linear{.type = "linear", .factor = 4};
  std::vector<float> a = RopeInvFreq(plain, 8), b = RopeInvFreq(linear, 8);
  for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(b[i], a[i] / 4);
  float x[4] = {1, 2, 3, 4}, y[4] = {1, 2, 3, 4};
  ApplyRope(x, 1, 4, 7, a);
  ApplyRope(y, 1, 4, 7, a, 1.5f);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y[i], 1.5f * x[i], 1e-5);
  float z[4] = {1, 2, 3, 4}, w[4] = {1, 2, 3, 4};
  ApplyRope(z, 1, 4, 7, a);
  ApplyRope(w, 1, 4, 7, a, 1.0f);
  EXPECT_EQ(std::memcmp(z, w, sizeof(z)), 0);  // scaling 1 changes nothing
}

TEST(RopeTest, RotationPreservesNormAndPairsHalves) {
  RopeConfig r;
  std::vector<float> inv = RopeInvFreq(r, 4);  // freqs 1 and 0.01
  float x[4] = {1, 2, 3, 4};
  ApplyRope(x, 1, 4, 1, inv);
  EXPECT_NEAR(x[0], 1 * std::cos(1.0) - 3 * std::sin(1.0), 1e-6);
  EXPECT_NEAR(x[2], 3 * std::cos(1.0) + 1 * std::sin(1.0), 1e-6);
  EXPECT_NEAR(x[1], 2 * std::cos(0.01) - 4 * std::sin(0.01), 1e-6);
  EXPECT_NEAR(x[0] * x[0] + x[1] * x[1] + x[2] * x[2] + x[3] * x[3], 30.0, 1e-4);
}

}  // namespace
}  // namespace scout::runtime
