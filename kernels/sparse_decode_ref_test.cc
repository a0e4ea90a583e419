#include <cmath>

#include "gtest/gtest.h"
#include "kernels/model_ops.h"
#include "kernels/sparse_decode.h"
#include "kernels/sparse_decode_problem.h"

namespace scout::kernels {
namespace {

// The naive formula in double precision over the same inputs: the ground truth for the reference.
std::vector<double> NaiveF64(DecodeProblem& pr) {
  SparseDecodeParams p = pr.params();
  const int hd = p.head_dim, group = p.num_heads / p.num_kv_heads;
  std::vector<double> out(pr.out.size(), 0.0);
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q0 = p.q_indptr[s], nq = p.q_indptr[s + 1] - q0, len = p.seq_lens[s];
    for (int h = 0; h < p.num_heads; ++h) {
      const int kvh = h / group;
      std::vector<int> blocks;
      if (p.sel_indptr) {
        int sh = s * p.num_kv_heads + kvh;
        blocks.assign(p.sel_blocks + p.sel_indptr[sh], p.sel_blocks + p.sel_indptr[sh + 1]);
      } else {
        for (int b = 0; b * kKvBlockSize < len; ++b) blocks.push_back(b);
      }
      for (int t = 0; t < nq; ++t) {
        const int qpos = len - nq + t;
        const uint16_t* q = p.q + (static_cast<int64_t>(q0 + t) * p.num_heads + h) * hd;
        std::vector<double> w;
        std::vector<const uint16_t*> vrows;
        for (int b : blocks) {
          const uint16_t* base = p.kv + (static_cast<int64_t>(p.block_table[s * p.max_blocks_per_seq + b]) * p.num_kv_heads + kvh) * 2 * kKvBlockSize * hd;
          for (int i = 0; i < kKvBlockSize; ++i) {
            const int pos = b * kKvBlockSize + i;
            if (pos >= len || pos > qpos) continue;
            double dot = 0;
            for (int d = 0; d < hd; ++d) dot += double{Bf16ToFloat(q[d])} * Bf16ToFloat(base[i * hd + d]);
            w.push_back(dot * p.scale);
            vrows.push_back(base + (kKvBlockSize + i) * hd);
          }
        }
        if (w.empty()) continue;
        const double mx = *std::max_element(w.begin(), w.end());
        double sum = 0;
        for (double& x : w) sum += (x = std::exp(x - mx));
        double* o = out.data() + (static_cast<int64_t>(q0 + t) * p.num_heads + h) * hd;
        for (size_t j = 0; j < w.size(); ++j) {
          for (int d = 0; d < hd; ++d) o[d] += w[j] / sum * Bf16ToFloat(vrows[j][d]);
        }
      }
    }
  }
  return out;
}

TEST(SparseDecodeRefTest, MatchesFloat64FormulaDenseAndSparse) {
  const DecodeShape shapes[] = {
      {.seq_lens = {1}, .q_tokens = {1}, .num_heads = 1, .num_kv_heads = 1, .head_dim = 64},
      {.seq_lens = {17}, .q_tokens = {17}, .num_heads = 4, .num_kv_heads = 1, .head_dim = 64},
      {.seq_lens = {32, 33, 300}, .q_tokens = {1, 5, 3}, .num_heads = 8, .num_kv_heads = 2, .head_dim = 128},
      {.seq_lens = {1000, 48}, .q_tokens = {5, 1}, .num_heads = 16, .num_kv_heads = 2, .head_dim = 128, .keep_fraction = 0.1},
      {.seq_lens = {700}, .q_tokens = {2}, .num_heads = 3, .num_kv_heads = 3, .head_dim = 64, .keep_fraction = 0.3,
       .always_keep_last = false},
  };
  uint32_t seed = 100;
  for (const DecodeShape& shape : shapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, seed++);
    std::vector<float> f32(pr.out.size());
    SparseDecodeRef(pr.params(), f32.data());
    std::vector<double> want = NaiveF64(pr);
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_TRUE(std::isfinite(f32[i]));
      ASSERT_FALSE(std::isnan(Bf16ToFloat(pr.out[i]))) << "output " << i << " not written";
      // bf16 output: within one bf16 rounding of the float result.
      ASSERT_NEAR(Bf16ToFloat(pr.out[i]), f32[i], std::abs(f32[i]) * 0x1p-8 + 1e-30);
      num += (f32[i] - want[i]) * (f32[i] - want[i]);
      den += want[i] * want[i];
    }
    // float32 accumulation over up to ~1000 keys: ~1e-6.
    EXPECT_LT(std::sqrt(num / den), 1e-5) << "seqs " << shape.seq_lens.size() << " heads " << shape.num_heads;
  }
}

}  // namespace
}  // namespace scout::kernels

namespace scout::kernels {
namespace {

// Reading the listed blocks from a unit pool (the GPU block cache layout) computes the same
// function as reading them through the block table.
TEST(SparseDecodeRefTest, UnitPoolLayoutMatchesPagedLayout) {
  DecodeProblem pr = MakeDecodeProblem({.seq_lens = {500, 77}, .q_tokens = {3, 1}, .num_heads = 8, .num_kv_heads = 2,
                                        .head_dim = 64, .keep_fraction = 0.3}, 5);
  std::vector<float> paged(pr.out.size()), units(pr.out.size());
  DecodeProblem a = pr;
  SparseDecodeRef(a.params(), paged.data());
  MakeUnitPool(pr, 9);
  SparseDecodeRef(pr.params(), units.data());
  EXPECT_EQ(paged, units);
}

// Attention over a long context in segments (the host KV tier's way past a GPU cache too small
// for one layer's context): each segment's lists give an output and a log2-sum-exp, and merging
// them (MergeAttentionRef) gives the attention over the whole list. Three segments of a sliding
// and a causal problem with several new tokens; a segment some rows see nothing of (the window).
TEST(SparseDecodeRefTest, SegmentsMergedByLogSumExpEqualTheWhole) {
  for (int window : {0, 100}) {
    SCOPED_TRACE(window);
    DecodeProblem pr = MakeDecodeProblem({.seq_lens = {700, 333}, .q_tokens = {37, 5}, .num_heads = 8,
                                          .num_kv_heads = 2, .head_dim = 64, .keep_fraction = 1.0,
                                          .sliding_window = window}, 11);
    std::vector<float> whole(pr.out.size());
    SparseDecodeRef(pr.params(), whole.data());
    const int rows = pr.total_q_rows() * pr.shape.num_heads, hd = pr.shape.head_dim;
    std::vector<float> acc(static_cast<size_t>(rows) * hd), acc_lse(rows), lse(rows);
    std::vector<uint16_t> merged(acc.size());
    const std::vector<std::pair<int, int>> segments = {{0, 9}, {9, 30}, {30, 1 << 20}};
    for (size_t k = 0; k < segments.size(); ++k) {
      std::vector<int32_t> indptr = {0}, blocks;
      for (size_t list = 0; list + 1 < pr.sel_indptr.size(); ++list) {
        for (int32_t i = pr.sel_indptr[list]; i < pr.sel_indptr[list + 1]; ++i) {
          if (pr.sel_blocks[i] >= segments[k].first && pr.sel_blocks[i] < segments[k].second) {
            blocks.push_back(pr.sel_blocks[i]);
          }
        }
        indptr.push_back(static_cast<int32_t>(blocks.size()));
      }
      SparseDecodeParams p = pr.params();
      p.sel_indptr = indptr.data();
      p.sel_blocks = blocks.data();
      p.lse = lse.data();
      std::vector<uint16_t> part(pr.out.size());
      p.out = part.data();
      SparseDecodeRef(p);
      MergeAttentionRef({.part = part.data(), .part_lse = lse.data(), .acc = acc.data(), .acc_lse = acc_lse.data(),
                         .out = k + 1 == segments.size() ? merged.data() : nullptr, .rows = rows, .head_dim = hd,
                         .first = k == 0});
    }
    // Each segment's output is rounded to bf16 before the merge: a few bf16 units of the values.
    double err = 0, norm = 0;
    for (size_t i = 0; i < whole.size(); ++i) {
      err += (Bf16ToFloat(merged[i]) - whole[i]) * (Bf16ToFloat(merged[i]) - whole[i]);
      norm += whole[i] * whole[i];
    }
    EXPECT_LT(std::sqrt(err / norm), 1e-2);
  }
}

}  // namespace
}  // namespace scout::kernels
