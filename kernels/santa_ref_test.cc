#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/santa.h"
#include "kernels/sparse_decode_problem.h"
#include "kernels/test_util.h"

namespace scout::kernels {
namespace {

using testing::RelL2;

// Exact attention by the textbook formula in double precision, straight from the problem's
// buffers (independent of SparseDecodeRef and SantaRef): out = sum_j softmax(q k_j * scale) v_j
// over the listed keys each row sees.
std::vector<double> NaiveAttention(DecodeProblem& pr) {
  const SparseDecodeParams p = pr.params();
  const int hd = p.head_dim, group = p.num_heads / p.num_kv_heads;
  std::vector<double> out(pr.out.size(), 0.0);
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q0 = p.q_indptr[s], nq = p.q_indptr[s + 1] - q0, len = p.seq_lens[s];
    for (int kvh = 0; kvh < p.num_kv_heads; ++kvh) {
      std::vector<int> blocks;
      if (p.sel_indptr != nullptr) {
        for (int i = p.sel_indptr[s * p.num_kv_heads + kvh]; i < p.sel_indptr[s * p.num_kv_heads + kvh + 1]; ++i) {
          blocks.push_back(p.sel_blocks[i]);
        }
      } else {
        for (int b = 0; b * kKvBlockSize < len; ++b) blocks.push_back(b);
      }
      for (int t = 0; t < nq; ++t) {
        for (int g = 0; g < group; ++g) {
          const int h = kvh * group + g, qpos = len - nq + t;
          const uint16_t* q = p.q + (int64_t{q0 + t} * p.num_heads + h) * hd;
          std::vector<double> logit;
          std::vector<const uint16_t*> vrow;
          for (int b : blocks) {
            const uint16_t* unit =
                p.kv + (int64_t{p.block_table[s * p.max_blocks_per_seq + b]} * p.num_kv_heads + kvh) * 2 * kKvBlockSize * hd;
            for (int i = 0; i < kKvBlockSize; ++i) {
              const int pos = b * kKvBlockSize + i;
              if (pos >= len || !KeyVisible(pos, qpos, p.sliding_window)) continue;
              double dot = 0;
              for (int d = 0; d < hd; ++d) dot += double{Bf16ToFloat(q[d])} * Bf16ToFloat(unit[i * hd + d]);
              logit.push_back(dot * p.scale);
              vrow.push_back(unit + (kKvBlockSize + i) * hd);
            }
          }
          if (logit.empty()) continue;
          const double mx = *std::max_element(logit.begin(), logit.end());
          double sum = 0;
          for (double& x : logit) sum += (x = std::exp(x - mx));
          double* o = out.data() + (int64_t{q0 + t} * p.num_heads + h) * hd;
          for (size_t j = 0; j < logit.size(); ++j) {
            for (int d = 0; d < hd; ++d) o[d] += logit[j] / sum * Bf16ToFloat(vrow[j][d]);
          }
        }
      }
    }
  }
  return out;
}

const DecodeShape kShapes[] = {
    {.seq_lens = {300}, .q_tokens = {2}, .num_heads = 4, .num_kv_heads = 2, .head_dim = 64},
    {.seq_lens = {700, 40}, .q_tokens = {5, 1}, .num_heads = 8, .num_kv_heads = 2, .head_dim = 64,
     .keep_fraction = 0.3},  // 20 rows: two row groups; a sparse list
    {.seq_lens = {17, 1, 32}, .q_tokens = {5, 1, 3}, .num_heads = 8, .num_kv_heads = 1, .head_dim = 64},
};
// The GPU plan's kinds of cut: whole list, a few splits, one block per split (masked splits for
// the early rows of q = 5), and more splits than blocks.
const SantaSplits kSplits[] = {{1, 1 << 30}, {3, 16}, {48, 1}, {64, 3}};

// The estimator is unbiased for every cut: the mean over many seeds converges to the exact
// output at the rate of independent draws, while single draws stay visibly off.
TEST(SantaRefTest, UnbiasedForEverySplitPlan) {
  for (const DecodeShape& shape : kShapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, 77);
    const std::vector<double> exact = NaiveAttention(pr);
    for (const SantaSplits& splits : kSplits) {
      const int kSeeds = 300;
      std::vector<double> mean(exact.size(), 0.0);
      std::vector<float> one(exact.size());
      double single = 0;
      for (int seed = 0; seed < kSeeds; ++seed) {
        // 32 points per split at most, and at least 1: spread thin over 48 or 64 splits.
        SantaParams sp{.attn = pr.params(), .samples = 32, .seed = static_cast<uint64_t>(seed) * 7919 + 1};
        SantaRef(sp, splits, one.data());
        single += RelL2(std::vector<double>(one.begin(), one.end()), exact) / kSeeds;
        for (size_t i = 0; i < one.size(); ++i) mean[i] += double{one[i]} / kSeeds;
      }
      const double mean_err = RelL2(mean, exact);
      std::printf("%zu seqs, %d splits of %d: one draw %.3f relative L2, mean of %d draws %.4f\n",
                  shape.seq_lens.size(), splits.num_splits, splits.blocks_per_split, single, kSeeds, mean_err);
      EXPECT_GT(single, 0.02) << "no sampling noise: is it sampling at all?";
      // Independent draws shrink the error by sqrt(300) = 17; allow 2x for the draws' spread.
      EXPECT_LT(mean_err, 2.0 * single / std::sqrt(double(kSeeds)));
    }
  }
}

// With far more points than keys in every split, each key gets n q(j) points up to one: exact up
// to 1/n.
TEST(SantaRefTest, HugeSReproducesExactAttention) {
  for (const DecodeShape& shape : kShapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, 78);
    const std::vector<double> exact = NaiveAttention(pr);
    for (const SantaSplits& splits : kSplits) {
      std::vector<float> out(exact.size());
      SantaRef({.attn = pr.params(), .samples = 1 << 24, .seed = 5}, splits, out.data());
      EXPECT_LT(RelL2(out, exact), 1e-4) << splits.num_splits << " splits";
      // The bf16 output: rounded once.
      std::vector<double> rounded(pr.out.size());
      for (size_t i = 0; i < rounded.size(); ++i) rounded[i] = Bf16ToFloat(pr.out[i]);
      EXPECT_LT(RelL2(rounded, exact), 0x1p-8);
    }
  }
}

// A key that holds all of a split's mass for every row gets all n points: one key per split
// (one block per split, each row seeing one token of it) makes every split exact at any S.
TEST(SantaRefTest, ExactWhenEachSplitHasOneVisibleKey) {
  DecodeShape shape{.seq_lens = {1}, .q_tokens = {1}, .num_heads = 4, .num_kv_heads = 1, .head_dim = 64};
  DecodeProblem pr = MakeDecodeProblem(shape, 79);
  const std::vector<double> exact = NaiveAttention(pr);
  std::vector<float> out(exact.size());
  SantaRef({.attn = pr.params(), .samples = 1, .seed = 9}, SantaSplits{4, 1}, out.data());
  EXPECT_LT(RelL2(out, exact), 1e-6);
}

}  // namespace
}  // namespace scout::kernels
