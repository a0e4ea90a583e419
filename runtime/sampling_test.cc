#include "runtime/sampling.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/sampling.h"

namespace scout::runtime {
namespace {

const std::vector<float> kLogits = {1.0f, 3.0f, 2.0f, 0.5f, 2.9f};

TEST(SamplingTest, GreedyAndDegenerateFiltersPickTheArgmax) {
  EXPECT_EQ(Sampler({}).Sample(kLogits), 1);
  EXPECT_EQ(Sampler({.temperature = 1.0f, .top_k = 1, .seed = 3}).Sample(kLogits), 1);
  EXPECT_EQ(Sampler({.temperature = 1.0f, .top_p = 1e-6f, .seed = 3}).Sample(kLogits), 1);
  EXPECT_EQ(ArgMax(std::vector<float>{2, 5, 5}), 1);  // lowest index wins ties
}

TEST(SamplingTest, SeededSamplersRepeat) {
  Sampler a({.temperature = 1.0f, .seed = 99}), b({.temperature = 1.0f, .seed = 99}), c({.temperature = 1.0f, .seed = 100});
  std::vector<int32_t> sa, sb, sc;
  for (int i = 0; i < 200; ++i) {
    sa.push_back(a.Sample(kLogits));
    sb.push_back(b.Sample(kLogits));
    sc.push_back(c.Sample(kLogits));
  }
  EXPECT_EQ(sa, sb);
  EXPECT_NE(sa, sc);
}

TEST(SamplingTest, FrequenciesFollowTheFilteredSoftmax) {
  // temperature 0.7, top-k 4 (drops logit 0.5), top-p 0.9.
  SamplingParams p{.temperature = 0.7f, .top_k = 4, .top_p = 0.9f, .seed = 5};
  std::vector<double> w(5, 0.0);
  for (int i : {0, 1, 2, 4}) w[i] = std::exp(kLogits[i] / 0.7);
  double z = w[0] + w[1] + w[2] + w[4];
  // Sorted: 1 (3.0), 4 (2.9), 2 (2.0), 0 (1.0). Cumulative mass decides the nucleus.
  std::vector<int> order = {1, 4, 2, 0};
  double acc = 0;
  std::vector<double> want(5, 0.0);
  double kept = 0;
  for (int i : order) {
    kept += w[i];
    want[i] = w[i];
    acc += w[i] / z;
    if (acc >= 0.9) break;
  }
  for (double& x : want) x /= kept;
  std::vector<float> probs(5);
  Sampler s(p);
  s.Distribution(kLogits, probs);
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(probs[i], want[i], 1e-6) << i;
  const int kDraws = 200000;
  std::vector<int> count(5, 0);
  for (int i = 0; i < kDraws; ++i) ++count[s.Sample(kLogits)];
  for (int i = 0; i < 5; ++i) {
    // 5 standard deviations of a binomial proportion: fails by chance ~1e-6 of the time.
    double sd = std::sqrt(want[i] * (1 - want[i]) / kDraws);
    EXPECT_NEAR(count[i] / double(kDraws), want[i], 5 * sd + 1e-9) << i;
  }
  EXPECT_EQ(count[3], 0);
}

TEST(SamplingTest, ValidationNamesTheField) {
  EXPECT_NE(ValidateSamplingParams({.temperature = -1}).message().find("temperature"), std::string::npos);
  EXPECT_NE(ValidateSamplingParams({.top_k = -2}).message().find("top_k"), std::string::npos);
  EXPECT_NE(ValidateSamplingParams({.top_p = 0}).message().find("top_p"), std::string::npos);
  EXPECT_NE(ValidateSamplingParams({.top_p = 1.5f}).message().find("top_p"), std::string::npos);
  EXPECT_TRUE(ValidateSamplingParams({.temperature = 0.8f, .top_k = 40, .top_p = 0.95f}).ok());
}

// Log-probabilities after temperature: they match the float64 log-softmax, sum to one in
// probability, the sampled token's is its own row entry, and the alternatives come most likely
// first with ties to the lower id.
TEST(SamplingTest, LogprobsAreTheLogSoftmaxAfterTemperature) {
  const std::vector<float> logits = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f};
  for (float t : {0.0f, 0.7f, 2.0f}) {
    SCOPED_TRACE(t);
    const double s = t > 0 ? t : 1.0;
    double z = 0;
    for (float x : logits) z += std::exp(x / s);
    const TokenLogprobs lp = LogprobsOf(logits, 4, 3, t);
    EXPECT_EQ(lp.chosen.token, 4);
    EXPECT_NEAR(lp.chosen.logprob, 0.5 / s - std::log(z), 1e-6);
    ASSERT_EQ(lp.top.size(), 3u);
    EXPECT_EQ(lp.top[0].token, 1);
    EXPECT_EQ(lp.top[1].token, 3);
    EXPECT_EQ(lp.top[2].token, 0);
    EXPECT_NEAR(lp.top[2].logprob, 1.0 / s - std::log(z), 1e-6);
    double mass = 0;
    for (size_t i = 0; i < logits.size(); ++i) mass += std::exp(LogprobsOf(logits, static_cast<int32_t>(i), 0, t).chosen.logprob);
    EXPECT_NEAR(mass, 1.0, 1e-6);
  }
  EXPECT_EQ(LogprobsOf(logits, 0, 99, 1.0f).top.size(), logits.size());
  EXPECT_TRUE(LogprobsOf(logits, 0, 0, 1.0f).top.empty());
}

// Penalties as OpenAI and vLLM define them: frequency by count, presence once, repetition over
// prompt and output tokens (dividing positive logits, multiplying negative ones) before them.
TEST(SamplingTest, PenaltiesFollowTheirDefinitions) {
  std::vector<float> logits = {2.0f, -1.0f, 0.5f, 3.0f};
  const std::vector<std::pair<int32_t, int32_t>> counts = {{0, 3}, {2, 1}};
  const std::vector<int32_t> seen = {0, 1, 2};
  ApplyPenalties({.presence = 0.5f, .frequency = 0.25f, .repetition = 2.0f}, counts, seen, logits);
  EXPECT_FLOAT_EQ(logits[0], 2.0f / 2 - 0.25f * 3 - 0.5f);
  EXPECT_FLOAT_EQ(logits[1], -1.0f * 2);
  EXPECT_FLOAT_EQ(logits[2], 0.5f / 2 - 0.25f - 0.5f);
  EXPECT_FLOAT_EQ(logits[3], 3.0f);
  EXPECT_FALSE(Penalties{}.any());
  EXPECT_TRUE(ValidatePenalties({.presence = 2.0f, .frequency = -2.0f, .repetition = 1.3f}).ok());
  EXPECT_NE(ValidatePenalties({.presence = 2.5f}).message().find("presence_penalty"), std::string::npos);
  EXPECT_NE(ValidatePenalties({.frequency = -3.0f}).message().find("frequency_penalty"), std::string::npos);
  EXPECT_NE(ValidatePenalties({.repetition = 0.0f}).message().find("repetition_penalty"), std::string::npos);
}

}  // namespace
}  // namespace scout::runtime

namespace scout::runtime {
namespace {

// The GPU sampler's reference (kernels/sampling.h) draws from exactly the host Sampler's
// distribution: over many seeds its frequencies match Distribution() (chi-square), it never picks
// a token Distribution() gives zero, and greedy is ArgMax.
TEST(SamplingTest, GpuSamplerReferenceFollowsTheHostDistribution) {
  const std::vector<float> logits = {1.0f, 2.5f, 2.5f, 0.2f, -1.0f, 3.0f, 2.5f, 0.0f};
  const int vocab = static_cast<int>(logits.size());
  for (SamplingParams sp : {SamplingParams{.temperature = 1.0f}, SamplingParams{.temperature = 0.7f, .top_k = 3},
                            SamplingParams{.temperature = 1.3f, .top_p = 0.6f},
                            SamplingParams{.temperature = 1.0f, .top_k = 5, .top_p = 0.8f},
                            SamplingParams{.temperature = 0.0f}}) {
    std::vector<float> probs(vocab);
    Sampler(sp).Distribution(logits, probs);
    const int draws = 40000;
    std::vector<kernels::SampleRowParams> rows(draws);
    std::vector<float> all(static_cast<size_t>(draws) * vocab);
    for (int d = 0; d < draws; ++d) {
      rows[d] = {.temperature = sp.temperature, .top_k = sp.top_k, .top_p = sp.top_p, .seed = 1000 + static_cast<uint64_t>(d)};
      std::copy(logits.begin(), logits.end(), all.begin() + static_cast<size_t>(d) * vocab);
    }
    std::vector<int32_t> out(draws);
    kernels::SampleRef({.logits = all.data(), .row = rows.data(), .out = out.data(), .rows = draws, .vocab = vocab});
    std::vector<int> count(vocab);
    for (int32_t t : out) ++count[t];
    double chi2 = 0;
    int dof = -1;
    for (int i = 0; i < vocab; ++i) {
      if (probs[i] == 0.0f) {
        EXPECT_EQ(count[i], 0) << "token " << i << " is outside the host's kept set (T " << sp.temperature << ")";
        continue;
      }
      const double expect = probs[i] * draws;
      chi2 += (count[i] - expect) * (count[i] - expect) / expect;
      ++dof;
    }
    // 99.9% quantile of chi-square with at most 7 degrees of freedom is 24.3.
    if (dof > 0) {
      EXPECT_LT(chi2, 24.3) << "T " << sp.temperature << " top_k " << sp.top_k << " top_p " << sp.top_p;
    }
    if (sp.temperature == 0.0f) {
      EXPECT_EQ(count[ArgMax(logits)], draws);
    }
  }
}

}  // namespace
}  // namespace scout::runtime
