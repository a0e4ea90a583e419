// Tiny random-weight Qwen2, Mistral and Llama-YaRN checkpoints against the logits transformers
// computes for them (tools/make_arch_goldens.py, models/arch_goldens/): q/k/v biases, sliding
// windows (every layer, and Qwen2's per-layer ones), YaRN with attention_bias.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "gtest/gtest.h"
#include "kernels/test_util.h"
#include "nlohmann/json.hpp"
#include "runtime/cpu_model.h"
#include "runtime/rope.h"

namespace scout::runtime {
namespace {

const std::filesystem::path kGoldens = std::filesystem::path(SCOUT_SOURCE_DIR) / "models" / "arch_goldens";

struct Golden {
  std::vector<int32_t> ids;
  std::vector<float> logits;  // [ids.size()][vocab]
  nlohmann::json info;
};

Golden ReadGolden(const std::string& name) {
  Golden g;
  absl::StatusOr<std::string> text = ReadFile(kGoldens / name / "golden.json");
  EXPECT_TRUE(text.ok()) << text.status();
  if (!text.ok()) return g;
  g.info = nlohmann::json::parse(*text);
  for (const auto& id : g.info.at("input_ids")) g.ids.push_back(id.get<int32_t>());
  for (const auto& x : g.info.at("logits")) g.logits.push_back(x.get<float>());
  g.info.erase("logits");
  return g;
}

// max |a - b| / max |b|: the worst single logit, relative to the logits' scale.
double MaxRel(std::span<const float> a, std::span<const float> b) {
  double worst = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::abs(double{a[i]} - b[i]));
    scale = std::max(scale, std::abs(double{b[i]}));
  }
  return worst / scale;
}

class ArchGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ArchGoldenTest, LogitsMatchTransformers) {
  const std::string name = GetParam();
  if (!std::filesystem::exists(kGoldens / name / "golden.json")) {
    GTEST_SKIP() << "no " << (kGoldens / name).string() << " (run tools/make_arch_goldens.py)";
  }
  absl::StatusOr<std::unique_ptr<CpuModel>> loaded = CpuModel::Load(kGoldens / name);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  CpuModel& m = **loaded;
  const ModelConfig& c = m.config();
  Golden g = ReadGolden(name);
  const int64_t vocab = c.vocab_size, n = static_cast<int64_t>(g.ids.size());
  ASSERT_EQ(static_cast<int64_t>(g.logits.size()), n * vocab);

  // The model's RoPE as transformers built it.
  if (g.info.contains("rope") && g.info["rope"].is_object()) {
    std::vector<float> want = g.info["rope"]["inv_freq"].get<std::vector<float>>();
    EXPECT_LT(MaxRel(RopeInvFreq(c.rope, c.head_dim), want), 1e-6);
    EXPECT_NEAR(RopeAttentionScaling(c.rope), g.info["rope"]["attention_scaling"].get<double>(), 1e-6);
  }

  // One pass over the whole prompt.
  ASSERT_TRUE(m.AddSequence(1).ok());
  std::vector<float> full;
  SequenceInput in{.seq = 1, .tokens = g.ids, .all_logits = true};
  ASSERT_TRUE(m.Forward({&in, 1}, &full).ok());
  ASSERT_TRUE(m.ReleaseSequence(1).ok());
  const double rel_l2 = kernels::testing::RelL2(full, g.logits), max_rel = MaxRel(full, g.logits);
  std::printf("[%s] %lld tokens (sliding window %lld on %zu layers, rope %s): relative L2 %.3g, max |err| / max |logit| %.3g "
              "(transformers float32 vs float64: %s)\n",
              name.c_str(), static_cast<long long>(n), static_cast<long long>(c.sliding_window),
              static_cast<size_t>(std::count(c.sliding_layers.begin(), c.sliding_layers.end(), true)),
              c.rope.type.c_str(), rel_l2, max_rel, g.info.value("fp32_vs_fp64_rel_l2", nlohmann::json()).dump().c_str());
  RecordProperty("rel_l2", std::to_string(rel_l2));
  RecordProperty("max_rel", std::to_string(max_rel));
  EXPECT_LE(rel_l2, 1e-3);
  EXPECT_LE(max_rel, 1e-3);

  // Prefill of 13 tokens, then one token at a time over the paged cache: crosses 16-token blocks
  // and the window's edge while the oldest keys drop out of it.
  ASSERT_TRUE(m.AddSequence(2).ok());
  std::vector<float> paged, logits;
  for (int64_t at = 0; at < n;) {
    const int64_t step = at == 0 ? 13 : 1;
    SequenceInput part{.seq = 2, .tokens = std::span<const int32_t>(g.ids).subspan(at, step), .all_logits = true};
    ASSERT_TRUE(m.Forward({&part, 1}, &logits).ok());
    paged.insert(paged.end(), logits.begin(), logits.end());
    at += step;
  }
  ASSERT_TRUE(m.ReleaseSequence(2).ok());
  // float32 with different summation grouping (BLAS blocking by row count): ~1e-6.
  EXPECT_LT(kernels::testing::RelL2(paged, full), 1e-5);
  EXPECT_LE(kernels::testing::RelL2(paged, g.logits), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(Transformers, ArchGoldenTest, ::testing::Values("qwen2", "qwen2_swa", "mistral", "llama_yarn"));

// RoPE settings (YaRN with and without its optional fields, linear, llama3) as config.json text
// that transformers wrote, with the inverse frequencies and attention scaling its
// LlamaRotaryEmbedding computed from them.
TEST(ArchGoldenRopeTest, RopeCasesMatchTransformers) {
  if (!std::filesystem::exists(kGoldens / "llama_yarn" / "golden.json")) GTEST_SKIP() << "no goldens yet";
  Golden g = ReadGolden("llama_yarn");
  ASSERT_TRUE(g.info.contains("rope_cases"));
  int checked = 0;
  for (const nlohmann::json& rc : g.info["rope_cases"]) {
    if (rc.contains("error")) {
      ADD_FAILURE() << "transformers could not build case " << rc.dump();
      continue;
    }
    const std::string text = rc["config_json"].get<std::string>();
    absl::StatusOr<ModelConfig> c = ParseModelConfig(text, "rope case");
    ASSERT_TRUE(c.ok()) << c.status() << "\n" << rc["scaling"].dump();
    std::vector<float> want = rc["inv_freq"].get<std::vector<float>>();
    std::vector<float> got = RopeInvFreq(c->rope, c->head_dim);
    ASSERT_EQ(got.size(), want.size()) << rc["scaling"].dump();
    // Both in float32 from the same formula; pow and the ramp may round an ulp apart.
    EXPECT_LT(MaxRel(got, want), 1e-6) << rc["scaling"].dump();
    for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 4e-7 * std::abs(want[i]) + 1e-12) << i << " " << rc["scaling"].dump();
    EXPECT_NEAR(RopeAttentionScaling(c->rope), rc["attention_scaling"].get<double>(), 1e-6) << rc["scaling"].dump();
    ++checked;
  }
  EXPECT_GE(checked, 8);
}

}  // namespace
}  // namespace scout::runtime
