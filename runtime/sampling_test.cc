#include "runtime/sampling.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

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

}  // namespace
}  // namespace scout::runtime
