// The prefill pacer against a simulated model whose steps cost base + c * work.
#include "scheduler/prefill_pacer.h"

#include <algorithm>
#include <random>

#include "gtest/gtest.h"

namespace scout::scheduler {
namespace {

runtime::ModelConfig Llama8B() {
  runtime::ModelConfig c;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  return c;
}

TEST(PrefillPacerTest, GemmTokensOfLlama8B) {
  // (4096 * 48 * 128 + 32 * 128 * 4096 + 3 * 4096 * 14336) / (2 * 32 * 128)
  EXPECT_NEAR(PrefillPacer::GemmTokens(Llama8B()), 26624.0, 1.0);
}

TEST(PrefillPacerTest, WithoutTheTimeBoundChunksFillTheTokenBudgetInOrder) {
  PrefillPacer pacer(/*max_slowdown=*/0, 1000);
  const std::vector<PrefillPacer::Prompt> prompts = {{.start = 0, .left = 300}, {.start = 50, .left = 900},
                                                     {.start = 0, .left = 10}};
  EXPECT_EQ(pacer.Plan(prompts, 1000), (std::vector<int64_t>{300, 700, 0}));
  EXPECT_EQ(pacer.Plan(prompts, 5000), (std::vector<int64_t>{300, 900, 10}));
  EXPECT_EQ(pacer.Plan(prompts, 0), (std::vector<int64_t>{0, 0, 0}));
}

TEST(PrefillPacerTest, MeasuresTheDecodeStepThenProbes) {
  PrefillPacer pacer(1.5, 1000);
  const std::vector<PrefillPacer::Prompt> prompts = {{.start = 0, .left = 5000}, {.start = 0, .left = 5000}};
  EXPECT_EQ(pacer.Plan(prompts, 2048), (std::vector<int64_t>{0, 0}));  // no decode-only step timed yet
  pacer.ObserveDecodeStep(0.010);
  EXPECT_EQ(pacer.Plan(prompts, 2048), (std::vector<int64_t>{PrefillPacer::kMinChunk, 0}));
  const std::vector<PrefillPacer::Prompt> short_prompt = {{.start = 0, .left = 3}};
  EXPECT_EQ(pacer.Plan(short_prompt, 2048), (std::vector<int64_t>{3}));
  pacer.ObserveMixedStep(pacer.Work(0, PrefillPacer::kMinChunk), 0.011);
  EXPECT_GT(pacer.seconds_per_work(), 0);
}

// A model whose step takes base + c * work (work as the pacer counts it) with 5% noise: while a
// 128k prompt prefills beside the decoders, no step after the probe goes over max_slowdown
// times the base by more than the noise, except where the minimum chunk alone does (none here),
// the prompt completes, and chunks shrink as the prompt deepens.
TEST(PrefillPacerTest, KeepsSimulatedStepsUnderTheSlowdownWhileALongPromptPrefills) {
  const double gemm = PrefillPacer::GemmTokens(Llama8B());
  const double base = 0.010;
  // 0.3 ms a token at 128k: c * (gemm + 131072) = 3e-4.
  const double c = 3e-4 / (gemm + 131072);
  PrefillPacer pacer(1.5, gemm);
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> noise(0.95, 1.05);
  for (int i = 0; i < 5; ++i) pacer.ObserveDecodeStep(base * noise(rng));
  const int64_t prompt = 131072;
  int64_t done = 0, steps = 0, first_chunk = 0, last_chunk = 0;
  double worst = 0;
  while (done < prompt) {
    const std::vector<PrefillPacer::Prompt> p = {{.start = done, .left = prompt - done}};
    const std::vector<int64_t> n = pacer.Plan(p, 2048 - 8);
    ASSERT_EQ(n.size(), 1u);
    ASSERT_GE(n[0], 1);
    ASSERT_LE(n[0], 2040);
    const double work = pacer.Work(done, n[0]);
    const double t = (base + c * work) * noise(rng);
    if (steps > 3) worst = std::max(worst, t / base);
    pacer.ObserveMixedStep(work, t);
    if (steps == 5) first_chunk = n[0];
    last_chunk = n[0];
    done += n[0];
    ++steps;
    ASSERT_LT(steps, 100000);
  }
  EXPECT_LE(worst, 1.5 * 1.1 * 1.05);
  EXPECT_GT(first_chunk, 4 * last_chunk);
  // Work over the whole prompt is fixed; each step may add half a base of it: the step count is
  // near total / (0.5 * base / c).
  const double total_work = pacer.Work(0, prompt);
  EXPECT_LT(steps, 1.4 * total_work * c / (0.5 * base));
}

TEST(PrefillPacerTest, ChunksOfSeveralPromptsShareTheTime) {
  PrefillPacer pacer(2.0, 1000);
  pacer.ObserveDecodeStep(0.010);
  pacer.ObserveMixedStep(1e6, 0.010 + 1e6 * 1e-8);  // 1e-8 s per unit of work
  // (2 - 1) * 0.010 / 1e-8 = 1e6 units of work to share.
  const std::vector<PrefillPacer::Prompt> prompts = {{.start = 0, .left = 400}, {.start = 0, .left = 100000},
                                                     {.start = 0, .left = 100000}};
  const std::vector<int64_t> n = pacer.Plan(prompts, 1 << 20);
  EXPECT_EQ(n[0], 400);
  double work = 0;
  for (size_t i = 0; i < n.size(); ++i) work += pacer.Work(0, n[i]);
  EXPECT_LE(work, 1e6);
  EXPECT_GT(work, 0.99e6);
  EXPECT_GT(n[1], 0);
  // The token budget still binds.
  EXPECT_EQ(pacer.Plan(prompts, 100), (std::vector<int64_t>{100, 0, 0}));
  // A deep prompt gets at least the minimum chunk, though its work alone is over the bound.
  const std::vector<PrefillPacer::Prompt> deep = {{.start = int64_t{1} << 40, .left = 1000}};
  EXPECT_EQ(pacer.Plan(deep, 2048), (std::vector<int64_t>{PrefillPacer::kMinChunk}));
}

}  // namespace
}  // namespace scout::scheduler
