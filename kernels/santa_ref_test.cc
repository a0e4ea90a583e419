#include <cmath>

#include "gtest/gtest.h"
#include "kernels/santa.h"
#include "kernels/sparse_decode_problem.h"
#include "kernels/test_util.h"

namespace scout::kernels {
namespace {

using testing::RelL2;

// The estimator is unbiased: the mean over many seeds converges to the exact output at the rate
// of independent draws, while single draws stay visibly off. With S far above the number of
// keys it is exact up to 1/S.
TEST(SantaRefTest, UnbiasedAndConvergesToExactAttention) {
  const DecodeShape shapes[] = {
      {.seq_lens = {300}, .q_tokens = {2}, .num_heads = 4, .num_kv_heads = 2, .head_dim = 64},
      {.seq_lens = {700, 40}, .q_tokens = {5, 1}, .num_heads = 8, .num_kv_heads = 2, .head_dim = 64,
       .keep_fraction = 0.3},  // 20 rows: two row groups; a sparse list
  };
  for (const DecodeShape& shape : shapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, 77);
    std::vector<float> exact(pr.out.size());
    DecodeProblem ex = pr;
    SparseDecodeRef(ex.params(), exact.data());

    const int kSeeds = 400;
    std::vector<double> mean(exact.size(), 0.0);
    std::vector<float> one(exact.size());
    double single = 0;
    for (int seed = 0; seed < kSeeds; ++seed) {
      SantaParams sp{.attn = pr.params(), .samples = 32, .seed = static_cast<uint64_t>(seed) * 7919 + 1};
      SantaRef(sp, one.data());
      single += RelL2(std::vector<double>(one.begin(), one.end()), exact) / kSeeds;
      for (size_t i = 0; i < one.size(); ++i) mean[i] += double{one[i]} / kSeeds;
    }
    const double mean_err = RelL2(mean, exact);
    std::printf("S=32: one draw %.3f relative L2, mean of %d draws %.4f\n", single, kSeeds, mean_err);
    EXPECT_GT(single, 0.02) << "no sampling noise: is it sampling at all?";
    // Independent draws shrink the error by sqrt(400) = 20; allow 2x for the draws' spread.
    EXPECT_LT(mean_err, 2.0 * single / std::sqrt(double(kSeeds)));

    SantaParams big{.attn = pr.params(), .samples = 1 << 22, .seed = 5};
    SantaRef(big, one.data());
    EXPECT_LT(RelL2(std::vector<double>(one.begin(), one.end()), exact), 1e-4);
  }
}

}  // namespace
}  // namespace scout::kernels
