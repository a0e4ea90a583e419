// CUDA decode attention against the C++ reference (ctest label gpu: runs on the GPU machine).
#include <cuda_runtime.h>

#include <cmath>

#include "gtest/gtest.h"
#include "kernels/cuda_test_util.h"
#include "kernels/sparse_decode.cuh"
#include "kernels/sparse_decode_problem.h"

namespace scout::kernels {
namespace {

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(expr)

template <typename T>
T* ToDevice(const std::vector<T>& v, std::vector<void*>* owned) {
  if (v.empty()) return nullptr;
  cudaError_t e = cudaSuccess;
  T* d = testing::ToDevice(v, owned, &e);
  EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
  return d;
}

// Runs the kernel on the problem; returns its bf16 output.
std::vector<uint16_t> RunGpu(DecodeProblem& pr, int num_splits, int rows_per_cta = 0) {
  std::vector<void*> owned;
  SparseDecodeParams p = pr.params();
  p.q = ToDevice(pr.q, &owned);
  p.out = ToDevice(pr.out, &owned);  // poisoned (NaN) copy
  p.kv = ToDevice(pr.kv, &owned);
  p.q_indptr = ToDevice(pr.q_indptr, &owned);
  p.seq_lens = ToDevice(pr.seq_lens, &owned);
  p.block_table = ToDevice(pr.block_table, &owned);
  if (pr.shape.keep_fraction >= 0) {
    p.sel_indptr = ToDevice(pr.sel_indptr, &owned);
    p.sel_blocks = ToDevice(pr.sel_blocks, &owned);
  }
  if (!pr.sel_slots.empty()) {
    p.kv = ToDevice(pr.unit_kv, &owned);
    p.sel_slots = ToDevice(pr.sel_slots, &owned);
  }
  int sms = 0;
  EXPECT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  const int rows = rows_per_cta > 0 ? rows_per_cta : SparseDecodeRowsPerCta(p.num_heads, p.num_kv_heads, pr.max_q_tokens());
  const int ctas = SparseDecodeCtasPerSm(p.head_dim, rows);
  EXPECT_GT(ctas, 0);
  SparseDecodePlan plan = PlanSparseDecode(p.num_seqs, p.num_heads, p.num_kv_heads, pr.max_q_tokens(),
                                           pr.max_list_blocks(), pr.total_q_rows(), p.head_dim, sms, ctas, num_splits,
                                           rows);
  void* ws = nullptr;
  EXPECT_EQ(cudaMalloc(&ws, std::max<size_t>(plan.workspace_bytes, 4)), cudaSuccess);
  EXPECT_EQ(SparseDecode(p, plan, ws, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint16_t> out(pr.out.size());
  EXPECT_EQ(cudaMemcpy(out.data(), p.out, out.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(ws);
  for (void* d : owned) cudaFree(d);
  return out;
}

struct Case {
  DecodeShape shape;
  int num_splits;  // 0: planner's choice
};

TEST(SparseDecodeGpuTest, MatchesReferenceOnAwkwardShapes) {
  std::vector<Case> cases = {
      {{.seq_lens = {1}, .q_tokens = {1}, .num_heads = 1, .num_kv_heads = 1, .head_dim = 64}, 0},
      {{.seq_lens = {17}, .q_tokens = {17}, .num_heads = 4, .num_kv_heads = 4, .head_dim = 128}, 0},
      {{.seq_lens = {16, 32, 48}, .q_tokens = {1, 1, 1}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128}, 0},
      {{.seq_lens = {33, 300, 4097}, .q_tokens = {5, 3, 5}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128}, 0},
      {{.seq_lens = {5000}, .q_tokens = {1}, .num_heads = 8, .num_kv_heads = 1, .head_dim = 128}, 7},
      {{.seq_lens = {2049, 100}, .q_tokens = {2, 1}, .num_heads = 6, .num_kv_heads = 2, .head_dim = 64}, 0},
      {{.seq_lens = {20000}, .q_tokens = {5}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128, .keep_fraction = 0.1}, 0},
      {{.seq_lens = {3000, 17, 999}, .q_tokens = {1, 1, 4}, .num_heads = 12, .num_kv_heads = 2, .head_dim = 64,
        .keep_fraction = 0.05, .always_keep_last = false}, 0},
      {{.seq_lens = {8192, 8192, 8192, 8192}, .q_tokens = {1, 2, 3, 4}, .num_heads = 16, .num_kv_heads = 2,
        .head_dim = 128, .keep_fraction = 0.2}, 3},
      {{.seq_lens = {40, 1234}, .q_tokens = {5, 5}, .num_heads = 64, .num_kv_heads = 8, .head_dim = 128}, 0},
      {{.seq_lens = {16, 1}, .q_tokens = {16, 1}, .num_heads = 2, .num_kv_heads = 1, .head_dim = 64}, 0},
      // Sliding windows (Mistral, Qwen2): not block-aligned, prefill rows with their own windows.
      {{.seq_lens = {300, 77, 40}, .q_tokens = {5, 1, 40}, .num_heads = 6, .num_kv_heads = 2, .head_dim = 64,
        .sliding_window = 37}, 0},
      {{.seq_lens = {4097}, .q_tokens = {3}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128, .keep_fraction = 0.3,
        .sliding_window = 1000}, 5},
  };
  uint32_t seed = 7;
  for (const Case& c : cases) {
    DecodeProblem pr = MakeDecodeProblem(c.shape, seed++);
    std::vector<float> ref(pr.out.size()), ref_abs(pr.out.size());
    DecodeProblem ref_pr = pr;
    SparseDecodeRef(ref_pr.params(), ref.data(), ref_abs.data());
    // Each case on the default (tensor-core) kernel and, where it applies, the CUDA-core one.
    const int cc = SparseDecodeCudaCoreRows(c.shape.num_heads, c.shape.num_kv_heads, pr.max_q_tokens());
    std::vector<int> variants = {0};
    if (cc > 0) variants.push_back(cc);
    for (int rows : variants) {
    std::vector<uint16_t> got = RunGpu(pr, c.num_splits, rows);
    int bad = 0;
    double worst = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const float g = Bf16ToFloat(got[i]);
      ASSERT_FALSE(std::isnan(g)) << "element " << i << " not written or NaN";
      // Rounding, not slack: the output is bf16 (2^-9 relative) and the kernel sums in another
      // order with exp2f, so one bf16 epsilon (2^-7) of |ref|; the tensor-core kernel also rounds
      // each weight p_j to bf16 (2^-9 relative) before P·V, an error of at most 2^-9 · Σ p_j|v_j|,
      // allowed twice (2^-8). 1e-5 absolute for outputs near zero.
      const double bound = 1e-5 + std::abs(ref[i]) * 0x1p-7 + ref_abs[i] * 0x1p-8;
      const double err = std::abs(g - ref[i]);
      worst = std::max(worst, err / bound);
      if (err > bound && ++bad <= 5) {
        ADD_FAILURE() << "element " << i << ": gpu " << g << " ref " << ref[i] << " bound " << bound;
      }
    }
    std::printf("case %zu seqs, first len %d, rows/cta %d: worst error %.2f of its bound\n", c.shape.seq_lens.size(),
                c.shape.seq_lens[0], rows, worst);
    EXPECT_EQ(bad, 0) << "seqs " << c.shape.seq_lens.size() << " first len " << c.shape.seq_lens[0] << " rows/cta "
                      << rows;
    }
  }
}

// The same sparse problems with the blocks read from a unit pool (the GPU block cache layout):
// the output must equal the paged layout's reference.
TEST(SparseDecodeGpuTest, UnitPoolMatchesPagedReference) {
  const DecodeShape shapes[] = {
      {.seq_lens = {3000, 17}, .q_tokens = {5, 1}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128, .keep_fraction = 0.1},
      {.seq_lens = {999}, .q_tokens = {1}, .num_heads = 6, .num_kv_heads = 2, .head_dim = 64, .keep_fraction = 0.3},
  };
  uint32_t seed = 40;
  for (const DecodeShape& shape : shapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, seed++);
    std::vector<float> ref(pr.out.size()), ref_abs(pr.out.size());
    DecodeProblem paged = pr;
    SparseDecodeRef(paged.params(), ref.data(), ref_abs.data());
    MakeUnitPool(pr, seed);
    std::vector<float> ref_units(pr.out.size());
    DecodeProblem units = pr;
    SparseDecodeRef(units.params(), ref_units.data());
    EXPECT_EQ(ref_units, ref) << "the reference disagrees with itself across layouts";
    std::vector<uint16_t> got = RunGpu(pr, 0);
    for (size_t i = 0; i < got.size(); ++i) {
      const double bound = 1e-5 + std::abs(ref[i]) * 0x1p-7 + ref_abs[i] * 0x1p-8;
      ASSERT_LE(std::abs(Bf16ToFloat(got[i]) - ref[i]), bound) << "element " << i;
    }
  }
}

TEST(SparseDecodeGpuTest, RejectsUnsupportedHeadDim) {
  DecodeProblem pr = MakeDecodeProblem({.seq_lens = {16}, .q_tokens = {1}, .num_heads = 1, .num_kv_heads = 1, .head_dim = 96}, 1);
  SparseDecodeParams p = pr.params();
  SparseDecodePlan plan = PlanSparseDecode(1, 1, 1, 1, 1, 1, 96, 132, 4);
  EXPECT_EQ(SparseDecode(p, plan, nullptr, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace scout::kernels
