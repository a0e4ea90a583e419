// CUDA SANTA (ctest label gpu): the fused kernel against SantaRef with the plan's splits and the
// same seed, over awkward shapes; unbiased over seeds; exact as S grows.
#include <cuda_runtime.h>

#include <cmath>

#include "gtest/gtest.h"
#include "kernels/cuda_test_util.h"
#include "kernels/gpu_test_util.h"
#include "kernels/santa.cuh"
#include "kernels/sparse_decode_problem.h"
#include "kernels/test_util.h"

namespace scout::kernels {
namespace {

using testing::RelL2;

// A problem on the device with its SANTA plan and workspace; Run returns the bf16 output.
class DeviceSanta {
 public:
  explicit DeviceSanta(DecodeProblem& pr) : pr_(pr) {
    int sms = 0;
    EXPECT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
    d_ = pr.params();
    d_.q = Dev(pr.q);
    d_.out = Dev(pr.out);
    d_.q_indptr = Dev(pr.q_indptr);
    d_.seq_lens = Dev(pr.seq_lens);
    d_.block_table = Dev(pr.block_table);
    if (pr.shape.keep_fraction >= 0) {
      d_.sel_indptr = Dev(pr.sel_indptr);
      d_.sel_blocks = Dev(pr.sel_blocks);
    }
    if (!pr.sel_slots.empty()) {
      d_.kv = Dev(pr.unit_kv);
      d_.sel_slots = Dev(pr.sel_slots);
    } else {
      d_.kv = Dev(pr.kv);
    }
    plan_ = PlanSanta(d_.num_seqs, d_.num_heads, d_.num_kv_heads, pr.max_q_tokens(), pr.max_list_blocks(),
                      pr.total_q_rows(), d_.head_dim, sms, 0);
    EXPECT_EQ(cudaMalloc(&ws_, plan_.workspace_bytes), cudaSuccess);
    owned_.push_back(ws_);
  }
  ~DeviceSanta() {
    for (void* p : owned_) cudaFree(p);
  }
  const SantaPlan& plan() const { return plan_; }

  std::vector<uint16_t> Run(int samples, uint64_t seed) {
    std::vector<uint16_t> out(pr_.out.size());
    EXPECT_EQ(cudaMemset(d_.out, 0xff, out.size() * 2), cudaSuccess);  // NaN poison
    EXPECT_EQ(Santa({.attn = d_, .samples = samples, .seed = seed}, plan_, ws_, nullptr), cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(out.data(), d_.out, out.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < out.size(); ++i) {
      if (std::isnan(Bf16ToFloat(out[i]))) {
        ADD_FAILURE() << "element " << i << " not written or NaN";
        break;
      }
    }
    return out;
  }

 private:
  template <typename T>
  T* Dev(const std::vector<T>& v) {
    return testing::Upload(v, &owned_);
  }
  DecodeProblem& pr_;
  SparseDecodeParams d_;
  SantaPlan plan_;
  void* ws_ = nullptr;
  std::vector<void*> owned_;
};

std::vector<double> ToDouble(const std::vector<uint16_t>& v) {
  std::vector<double> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = Bf16ToFloat(v[i]);
  return o;
}

// Awkward shapes: 1 and 17 tokens, block-boundary lengths, sequences of different lengths,
// 1 to 8 query heads per KV head, head dims 64 and 128, q = 1 and 5 (causal among the new
// tokens: the early rows see no key of the last split), dense lists, given lists and pool slots.
struct Case {
  DecodeShape shape;
  bool unit_pool = false;
};
const Case kCases[] = {
    {{.seq_lens = {1}, .q_tokens = {1}, .num_heads = 4, .num_kv_heads = 1, .head_dim = 64}},
    {{.seq_lens = {17}, .q_tokens = {5}, .num_heads = 8, .num_kv_heads = 1, .head_dim = 128}},
    {{.seq_lens = {16, 32, 48}, .q_tokens = {1, 5, 1}, .num_heads = 2, .num_kv_heads = 2, .head_dim = 64}},
    {{.seq_lens = {2000}, .q_tokens = {1}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128}},
    {{.seq_lens = {4096, 33, 1025}, .q_tokens = {5, 2, 1}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128}},
    {{.seq_lens = {3000, 100}, .q_tokens = {5, 2}, .num_heads = 8, .num_kv_heads = 2, .head_dim = 64,
      .keep_fraction = 0.2}},
    {{.seq_lens = {5000, 700}, .q_tokens = {1, 5}, .num_heads = 16, .num_kv_heads = 2, .head_dim = 128,
      .keep_fraction = 0.3}},
    {{.seq_lens = {1500}, .q_tokens = {5}, .num_heads = 24, .num_kv_heads = 8, .head_dim = 64, .keep_fraction = 0.5},
     true},
};

// Kernel and reference agree on the same seed. They differ only where a systematic point falls
// within float rounding of a boundary of q's cumulative distribution (float32 tensor-core scores
// and float q in the kernel, double in the reference): such a row moves one point to the
// neighbouring key. Allowed: 1% of the rows (at least one) off by more than bf16 rounding.
TEST(SantaGpuTest, MatchesReferenceOnAwkwardShapes) {
  uint32_t seed = 11;
  for (const Case& c : kCases) {
    DecodeProblem pr = MakeDecodeProblem(c.shape, seed++);
    if (c.unit_pool) MakeUnitPool(pr, seed++);
    DeviceSanta dev(pr);
    for (int samples : {1, 64, 1000}) {
      const std::vector<uint16_t> got = dev.Run(samples, 42 + samples);
      DecodeProblem ref = pr;
      std::vector<float> want(pr.out.size());
      SantaRef({.attn = ref.params(), .samples = samples, .seed = uint64_t(42 + samples)}, dev.plan().splits(),
               want.data());
      const int hd = c.shape.head_dim, nrows = static_cast<int>(want.size()) / hd;
      int off = 0;
      for (int r = 0; r < nrows; ++r) {
        double num = 0, den = 0;
        for (int d = 0; d < hd; ++d) {
          const double a = Bf16ToFloat(got[size_t(r) * hd + d]), b = want[size_t(r) * hd + d];
          num += (a - b) * (a - b);
          den += b * b;
        }
        // bf16 output rounding (2^-9 relative) and float accumulation; the absolute term covers
        // rows whose output is all but zero.
        off += std::sqrt(num) > 0x1p-6 * std::sqrt(den) + 1e-4;
      }
      std::printf("%zu seqs, hd %d, %d splits of %d blocks, S=%d: %d of %d rows off\n", c.shape.seq_lens.size(), hd,
                  dev.plan().split.num_splits, dev.plan().split.blocks_per_split, samples, off, nrows);
      EXPECT_LE(off, std::max(1, nrows / 100)) << "S=" << samples;
    }
  }
}

TEST(SantaGpuTest, UnbiasedAndExactForLargeS) {
  const DecodeShape shapes[] = {
      {.seq_lens = {2000}, .q_tokens = {1}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128},
      {.seq_lens = {3000, 100}, .q_tokens = {5, 2}, .num_heads = 8, .num_kv_heads = 2, .head_dim = 64,
       .keep_fraction = 0.2},
  };
  for (const DecodeShape& shape : shapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, 3);
    std::vector<float> exact(pr.out.size());
    DecodeProblem ex = pr;
    SparseDecodeRef(ex.params(), exact.data());
    DeviceSanta dev(pr);
    const int kSeeds = 200;
    std::vector<double> mean(exact.size(), 0.0);
    double single = 0;
    for (int seed = 0; seed < kSeeds; ++seed) {
      const std::vector<double> o = ToDouble(dev.Run(64, 1000 + seed));
      single += RelL2(o, exact) / kSeeds;
      for (size_t i = 0; i < o.size(); ++i) mean[i] += o[i] / kSeeds;
    }
    const double mean_err = RelL2(mean, exact);
    std::printf("S=64 over %d splits: one draw %.3f relative L2, mean of %d draws %.4f\n",
                dev.plan().split.num_splits, single, kSeeds, mean_err);
    EXPECT_GT(single, 0.02);
    // 1/sqrt(200) = 0.071 for independent draws; 2x for their spread, plus bf16 rounding of the
    // 200 outputs averaged (2^-9 relative each).
    EXPECT_LT(mean_err, 2.0 * single / std::sqrt(double(kSeeds)) + 0x1p-9);
    // Many more points than keys in every split: exact up to bf16 output rounding and float32 scores.
    const double big = RelL2(ToDouble(dev.Run(1 << 24, 7)), exact);
    std::printf("S=2^24: relative L2 %.2e\n", big);
    EXPECT_LT(big, 0x1p-7);
  }
}

}  // namespace
}  // namespace scout::kernels
