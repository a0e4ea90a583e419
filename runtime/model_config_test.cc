#include "runtime/model_config.h"

#include <cmath>
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
          "rope_scaling": {"rope_type": "yarn", "factor": 4}})", absl::StatusCode::kUnimplemented, "yarn"},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
          "attention_bias": true})", absl::StatusCode::kUnimplemented, "attention_bias"},
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
