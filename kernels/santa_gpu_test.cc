// CUDA SANTA against exact attention (ctest label gpu): unbiased over seeds, exact as S grows.
#include <cuda_runtime.h>

#include <cmath>

#include "gtest/gtest.h"
#include "kernels/santa.cuh"
#include "kernels/cuda_test_util.h"
#include "kernels/sparse_decode_problem.h"
#include "kernels/test_util.h"

namespace scout::kernels {
namespace {

template <typename T>
T* Dev(const std::vector<T>& v, std::vector<void*>* owned) {
  cudaError_t e = cudaSuccess;
  T* d = testing::ToDevice(v, owned, &e);
  EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
  return d;
}

using testing::RelL2;

TEST(SantaGpuTest, UnbiasedAndExactForLargeS) {
  const DecodeShape shapes[] = {
      {.seq_lens = {2000}, .q_tokens = {1}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128},
      {.seq_lens = {3000, 100}, .q_tokens = {5, 2}, .num_heads = 8, .num_kv_heads = 2, .head_dim = 64,
       .keep_fraction = 0.2},
  };
  int sms = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  for (const DecodeShape& shape : shapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, 3);
    std::vector<float> exact(pr.out.size());
    DecodeProblem ex = pr;
    SparseDecodeRef(ex.params(), exact.data());
    std::vector<void*> owned;
    SparseDecodeParams d = pr.params();
    d.q = Dev(pr.q, &owned);
    d.out = Dev(pr.out, &owned);
    d.kv = Dev(pr.kv, &owned);
    d.q_indptr = Dev(pr.q_indptr, &owned);
    d.seq_lens = Dev(pr.seq_lens, &owned);
    d.block_table = Dev(pr.block_table, &owned);
    if (shape.keep_fraction >= 0) {
      d.sel_indptr = Dev(pr.sel_indptr, &owned);
      d.sel_blocks = Dev(pr.sel_blocks, &owned);
    }
    SantaPlan plan = PlanSanta(d.num_seqs, d.num_heads, d.num_kv_heads, pr.max_q_tokens(), pr.max_list_blocks(),
                               pr.total_q_rows(), d.head_dim, sms, SparseDecodeCtasPerSm(d.head_dim, 16));
    void* ws = nullptr;
    ASSERT_EQ(cudaMalloc(&ws, plan.workspace_bytes), cudaSuccess);
    std::vector<uint16_t> out(pr.out.size());
    auto run = [&](int samples, uint64_t seed) {
      EXPECT_EQ(cudaMemset(const_cast<uint16_t*>(d.out), 0xff, out.size() * 2), cudaSuccess);  // NaN poison
      EXPECT_EQ(Santa({.attn = d, .samples = samples, .seed = seed}, plan, ws, nullptr), cudaSuccess);
      EXPECT_EQ(cudaMemcpy(out.data(), d.out, out.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
      std::vector<double> o(out.size());
      for (size_t i = 0; i < out.size(); ++i) {
        o[i] = Bf16ToFloat(out[i]);
        EXPECT_FALSE(std::isnan(o[i])) << "element " << i << " not written";
      }
      return o;
    };
    const int kSeeds = 200;
    std::vector<double> mean(exact.size(), 0.0);
    double single = 0;
    for (int seed = 0; seed < kSeeds; ++seed) {
      std::vector<double> o = run(64, 1000 + seed);
      single += RelL2(o, exact) / kSeeds;
      for (size_t i = 0; i < o.size(); ++i) mean[i] += o[i] / kSeeds;
    }
    const double mean_err = RelL2(mean, exact);
    std::printf("S=64: one draw %.3f relative L2, mean of %d draws %.4f\n", single, kSeeds, mean_err);
    EXPECT_GT(single, 0.02);
    // 1/sqrt(200) = 0.071 for independent draws; 2x for their spread, plus bf16 rounding of the
    // 200 outputs averaged (2^-9 relative each).
    EXPECT_LT(mean_err, 2.0 * single / std::sqrt(double(kSeeds)) + 0x1p-9);
    // Many more points than keys: exact up to bf16 output rounding and float32 scores.
    const double big = RelL2(run(1 << 20, 7), exact);
    std::printf("S=2^20: relative L2 %.2e\n", big);
    EXPECT_LT(big, 0x1p-7);
    cudaFree(ws);
    for (void* p : owned) cudaFree(p);
  }
}

}  // namespace
}  // namespace scout::kernels
