// CUDA prefill attention against the C++ reference, SparseDecodeRef (ctest label gpu: runs on the
// GPU machine).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "gtest/gtest.h"
#include "kernels/gpu_test_util.h"
#include "kernels/prefill_attention.cuh"
#include "kernels/sparse_decode_problem.h"

namespace scout::kernels {
namespace {

// Runs the kernel; returns its bf16 output and each row's log-sum-exp. Outputs start poisoned
// (NaN) so that every row must be written.
std::vector<uint16_t> RunGpu(DecodeProblem& pr, PrefillKernel kernel, std::vector<float>* lse) {
  std::vector<void*> owned;
  SparseDecodeParams p = pr.params();
  p.q = testing::Upload(pr.q, &owned);
  p.out = testing::Upload(pr.out, &owned);
  p.kv = testing::Upload(pr.kv, &owned);
  p.q_indptr = testing::Upload(pr.q_indptr, &owned);
  p.seq_lens = testing::Upload(pr.seq_lens, &owned);
  p.block_table = testing::Upload(pr.block_table, &owned);
  lse->assign(static_cast<size_t>(pr.total_q_rows()) * p.num_heads, std::nanf(""));
  p.lse = testing::Upload(*lse, &owned);
  EXPECT_TRUE(PrefillAttentionSupports(p));
  EXPECT_EQ(PrefillAttention(p, pr.total_q_rows(), nullptr, kernel), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint16_t> out(pr.out.size());
  EXPECT_EQ(cudaMemcpy(out.data(), p.out, out.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(lse->data(), p.lse, lse->size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  for (void* d : owned) cudaFree(d);
  return out;
}

DecodeShape Prefill(std::vector<int> lens, std::vector<int> q, int heads, int kv_heads, int hd, int window = 0) {
  return {.seq_lens = std::move(lens), .q_tokens = std::move(q), .num_heads = heads, .num_kv_heads = kv_heads,
          .head_dim = hd, .sliding_window = window};
}

TEST(PrefillAttentionGpuTest, MatchesReferenceOnAwkwardShapes) {
  const DecodeShape shapes[] = {
      Prefill({1}, {1}, 1, 1, 64),
      Prefill({17}, {17}, 4, 4, 128),                   // GQA group 1, a partial block
      Prefill({300}, {300}, 32, 8, 128),                // Llama-3.1-8B heads, a whole prompt
      Prefill({1000, 77, 5}, {200, 77, 5}, 6, 2, 64),   // group 3: tiles straddle tokens; a chunk at an offset
      Prefill({4097}, {129}, 8, 1, 128),                // group 8, one token past a tile of rows
      Prefill({1200, 64}, {400, 1}, 32, 8, 128),        // a chunk beside a decode row
      Prefill({300, 77, 40}, {250, 1, 40}, 6, 2, 64, 37),  // sliding windows, not block-aligned
      Prefill({700}, {700}, 32, 8, 128, 100),
      Prefill({513, 130}, {513, 2}, 12, 4, 128, 64),    // a window of exactly one tile
      Prefill({150}, {150}, 5, 5, 128),
  };
  uint32_t seed = 11;
  for (const DecodeShape& shape : shapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, seed++);
    std::vector<float> ref(pr.out.size()), ref_abs(pr.out.size());
    std::vector<float> ref_lse(static_cast<size_t>(pr.total_q_rows()) * shape.num_heads);
    DecodeProblem ref_pr = pr;
    SparseDecodeParams rp = ref_pr.params();
    rp.lse = ref_lse.data();
    SparseDecodeRef(rp, ref.data(), ref_abs.data());
    std::vector<PrefillKernel> kernels = {PrefillKernel::kAuto, PrefillKernel::kWgmmaOverlap, PrefillKernel::kWgmmaPingPong,
                                          PrefillKernel::kWgmma, PrefillKernel::kMma64};
    if (shape.head_dim == 128) kernels.push_back(PrefillKernel::kMma32);
    for (PrefillKernel kernel : kernels) {
      const int k = static_cast<int>(kernel);
      std::vector<float> lse;
      std::vector<uint16_t> got = RunGpu(pr, kernel, &lse);
      int bad = 0;
      const double worst = testing::CheckAttentionOutput(got, ref, ref_abs, Bf16ToFloat, &bad);
      for (size_t i = 0; i < lse.size(); ++i) {
        if (std::isinf(ref_lse[i])) {
          EXPECT_TRUE(std::isinf(lse[i]) && lse[i] < 0) << "row x head " << i;
        } else {
          EXPECT_NEAR(lse[i], ref_lse[i], 1e-3 * std::max(1.0f, std::abs(ref_lse[i]))) << "row x head " << i;
        }
      }
      std::printf("prefill case %zu seqs, first len %d q %d, hd %d, window %d, kernel %d: worst %.2f of bound\n",
                  shape.seq_lens.size(), shape.seq_lens[0], shape.q_tokens[0], shape.head_dim,
                  shape.sliding_window, k, worst);
      EXPECT_EQ(bad, 0) << "first len " << shape.seq_lens[0] << " kernel " << k;
    }
  }
}

TEST(PrefillAttentionGpuTest, RefusesWhatItDoesNotRun) {
  DecodeProblem pr = MakeDecodeProblem(Prefill({40}, {40}, 4, 2, 96), 3, /*fill_values=*/false);
  SparseDecodeParams p = pr.params();
  EXPECT_FALSE(PrefillAttentionSupports(p));  // head dim 96
  EXPECT_EQ(PrefillAttention(p, pr.total_q_rows(), nullptr), cudaErrorInvalidValue);
  p.head_dim = 128;
  int32_t indptr[2] = {0, 1};
  p.sel_indptr = indptr;  // a Selection: the decode kernel's work
  EXPECT_FALSE(PrefillAttentionSupports(p));
  p.sel_indptr = nullptr;
  EXPECT_TRUE(PrefillAttentionSupports(p));
  p.head_dim = 64;
  EXPECT_EQ(PrefillAttention(p, pr.total_q_rows(), nullptr, PrefillKernel::kMma32), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace scout::kernels
