// CUDA decode attention against the C++ reference (ctest label gpu: runs on the GPU machine).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/cuda_test_util.h"
#include "kernels/gpu_test_util.h"
#include "kernels/sparse_decode.cuh"
#include "kernels/sparse_decode_problem.h"

namespace scout::kernels {
namespace {

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(expr)

// An empty vector stays nullptr (an absent optional array).
template <typename T>
T* ToDevice(const std::vector<T>& v, std::vector<void*>* owned) {
  return v.empty() ? nullptr : testing::Upload(v, owned);
}

// Kernel knobs (SparseDecodePlan); stages 0 keeps all of the plan's choices.
struct Tune {
  int stages = 0;
  SparseDecodeMerge merge = SparseDecodeMerge::kKernel;
  bool evict_first = false;
};
// Every non-default path the decode kernel has, run on every case beside the default.
std::vector<Tune> AllTunes() {
  std::vector<Tune> t;
  for (int stages : {2, 3, 4}) {
    for (SparseDecodeMerge m : {SparseDecodeMerge::kKernel, SparseDecodeMerge::kKernelPdl, SparseDecodeMerge::kInKernel}) {
      t.push_back({stages, m, false});
    }
  }
  return t;
}

// Runs the kernel on the problem; returns its bf16 output (and, if lse is given, each row's
// log-sum-exp). The workspace starts as garbage (0xff bytes): the kernel must need no contents.
// With launches > 1 the outputs are poisoned (NaN) again before each launch, so every launch
// must write them; `graph` captures one launch on a stream of its own and replays it.
// keep_counters passes SparseDecode a counters buffer zeroed once, checked zero again at the end.
// stamps: if given, the plan's timeline is set and its stamps of the last launch returned.
std::vector<uint16_t> RunGpu(DecodeProblem& pr, int num_splits, int rows_per_cta = 0, Tune tune = {},
                             std::vector<float>* lse = nullptr, int launches = 1, bool graph = false,
                             bool keep_counters = false, std::vector<unsigned long long>* stamps = nullptr) {
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
  const int rows = rows_per_cta > 0 ? rows_per_cta : SparseDecodeRowsPerCta();
  const int ctas = SparseDecodeCtasPerSm(p.head_dim, rows, tune.stages);
  EXPECT_GT(ctas, 0);
  SparseDecodePlan plan = PlanSparseDecode(p.num_seqs, p.num_heads, p.num_kv_heads, pr.max_q_tokens(),
                                           pr.max_list_blocks(), pr.total_q_rows(), p.head_dim, sms, ctas, num_splits,
                                           rows);
  if (tune.stages > 0) {
    plan.stages = tune.stages;
    plan.merge = tune.merge;
    plan.kv_evict_first = tune.evict_first;
  }
  if (lse != nullptr) {
    lse->assign(static_cast<size_t>(pr.total_q_rows()) * p.num_heads, 0.0f);
    p.lse = ToDevice(*lse, &owned);
  }
  unsigned long long* timeline = nullptr;
  const size_t grid_ctas = static_cast<size_t>(plan.row_groups) * plan.num_splits * p.num_seqs * p.num_kv_heads;
  if (stamps != nullptr) {
    EXPECT_EQ(cudaMalloc(&timeline, grid_ctas * kTimelineStamps * 8), cudaSuccess);
    EXPECT_EQ(cudaMemset(timeline, 0, grid_ctas * kTimelineStamps * 8), cudaSuccess);
    owned.push_back(timeline);
    plan.timeline = timeline;
  }
  void* ws = nullptr;
  EXPECT_EQ(cudaMalloc(&ws, std::max<size_t>(plan.workspace_bytes, 4)), cudaSuccess);
  EXPECT_EQ(cudaMemset(ws, 0xff, std::max<size_t>(plan.workspace_bytes, 4)), cudaSuccess);
  unsigned int* counters = nullptr;
  const size_t num_counters = std::max(plan.num_counters, 1);
  if (keep_counters) {
    EXPECT_EQ(cudaMalloc(&counters, num_counters * sizeof(unsigned int)), cudaSuccess);
    EXPECT_EQ(cudaMemset(counters, 0, num_counters * sizeof(unsigned int)), cudaSuccess);
  }
  cudaStream_t stream = nullptr;
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    EXPECT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    cudaGraph_t g = nullptr;
    EXPECT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    EXPECT_EQ(SparseDecode(p, plan, ws, stream, counters), cudaSuccess);
    EXPECT_EQ(cudaStreamEndCapture(stream, &g), cudaSuccess);
    EXPECT_EQ(cudaGraphInstantiate(&exec, g, 0), cudaSuccess);
    cudaGraphDestroy(g);
  }
  for (int i = 0; i < launches; ++i) {
    if (i > 0) {
      EXPECT_EQ(cudaMemsetAsync(p.out, 0xff, pr.out.size() * 2, stream), cudaSuccess);
      if (lse != nullptr) {
        EXPECT_EQ(cudaMemsetAsync(p.lse, 0xff, lse->size() * 4, stream), cudaSuccess);
      }
    }
    EXPECT_EQ(graph ? cudaGraphLaunch(exec, stream) : SparseDecode(p, plan, ws, stream, counters), cudaSuccess);
  }
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (graph) {
    cudaGraphExecDestroy(exec);
    cudaStreamDestroy(stream);
  }
  std::vector<uint16_t> out(pr.out.size());
  EXPECT_EQ(cudaMemcpy(out.data(), p.out, out.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  if (lse != nullptr) {
    EXPECT_EQ(cudaMemcpy(lse->data(), p.lse, lse->size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  }
  if (stamps != nullptr) {
    stamps->assign(grid_ctas * kTimelineStamps, 0);
    EXPECT_EQ(cudaMemcpy(stamps->data(), timeline, stamps->size() * 8, cudaMemcpyDeviceToHost), cudaSuccess);
  }
  if (keep_counters) {
    std::vector<unsigned int> left(num_counters, 1);
    EXPECT_EQ(cudaMemcpy(left.data(), counters, left.size() * sizeof(unsigned int), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(std::count(left.begin(), left.end(), 0u), static_cast<long>(left.size())) << "counters left non-zero";
    cudaFree(counters);
  }
  cudaFree(ws);
  for (void* d : owned) cudaFree(d);
  return out;
}

struct Case {
  DecodeShape shape;
  int num_splits;  // 0: planner's choice
};

std::vector<Case> AwkwardCases() {
  return {
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
}

// Each case of AwkwardCases on the tensor-core kernel with each tune and, where it applies, the
// CUDA-core kernel; outputs against the reference.
void CheckAwkwardCases(const std::vector<Tune>& tunes, bool cuda_core, Tune cuda_core_tune = {}) {
  uint32_t seed = 7;
  for (const Case& c : AwkwardCases()) {
    DecodeProblem pr = MakeDecodeProblem(c.shape, seed++);
    std::vector<float> ref(pr.out.size()), ref_abs(pr.out.size());
    DecodeProblem ref_pr = pr;
    SparseDecodeRef(ref_pr.params(), ref.data(), ref_abs.data());
    const int cc = SparseDecodeCudaCoreRows(c.shape.num_heads, c.shape.num_kv_heads, pr.max_q_tokens());
    std::vector<std::pair<int, Tune>> variants;
    for (const Tune& t : tunes) variants.push_back({t.stages > 0 ? 16 : 0, t});
    if (cuda_core && cc > 0) variants.push_back({cc, cuda_core_tune});
    for (const auto& [rows, tune] : variants) {
    std::vector<uint16_t> got = RunGpu(pr, c.num_splits, rows, tune);
    int bad = 0;
    const double worst = testing::CheckAttentionOutput(got, ref, ref_abs, Bf16ToFloat, &bad);
    std::printf("case %zu seqs, first len %d, rows/cta %d, stages %d merge %d evict %d: worst error %.2f of its bound\n",
                c.shape.seq_lens.size(), c.shape.seq_lens[0], rows, tune.stages, static_cast<int>(tune.merge),
                tune.evict_first, worst);
    EXPECT_EQ(bad, 0) << "seqs " << c.shape.seq_lens.size() << " first len " << c.shape.seq_lens[0] << " rows/cta "
                      << rows << " stages " << tune.stages << " merge " << static_cast<int>(tune.merge);
    }
  }
}

TEST(SparseDecodeGpuTest, MatchesReferenceOnAwkwardShapes) {
  std::vector<Tune> tunes = {Tune{}};
  for (const Tune& t : AllTunes()) tunes.push_back(t);
  CheckAwkwardCases(tunes, /*cuda_core=*/true);
}

// L2 evict-first loads (ld.global.cs into registers) on both kernels. Kept apart from the
// others: the earlier cp.async cache-policy form died of an illegal instruction, which poisons
// the CUDA context of every later test in the process.
TEST(SparseDecodeGpuTest, EvictFirstMatchesReference) {
  CheckAwkwardCases({{2, SparseDecodeMerge::kKernel, true}, {2, SparseDecodeMerge::kInKernel, true},
                     {2, SparseDecodeMerge::kKernelPdl, true}},
                    /*cuda_core=*/true, {2, SparseDecodeMerge::kKernel, true});
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
    for (const Tune& tune : {Tune{}, Tune{3, SparseDecodeMerge::kInKernel, false}}) {
      std::vector<uint16_t> got = RunGpu(pr, 0, 0, tune);
      for (size_t i = 0; i < got.size(); ++i) {
        const double bound = 1e-5 + std::abs(ref[i]) * 0x1p-7 + ref_abs[i] * 0x1p-8;
        ASSERT_LE(std::abs(Bf16ToFloat(got[i]) - ref[i]), bound) << "element " << i << " stages " << tune.stages;
      }
    }
  }
}

// The in-kernel merge writes the same log-sum-exp as the merge kernel, and its arrival counters
// work launch after launch on one workspace (each launch zeroes them first).
TEST(SparseDecodeGpuTest, InKernelMergeLseAndRepeatedLaunches) {
  const DecodeShape shapes[] = {
      {.seq_lens = {20000, 1, 16}, .q_tokens = {1, 1, 1}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128,
       .keep_fraction = 0.1},
      {.seq_lens = {4096, 33}, .q_tokens = {5, 2}, .num_heads = 8, .num_kv_heads = 1, .head_dim = 64},
  };
  uint32_t seed = 90;
  for (const DecodeShape& shape : shapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, seed++);
    std::vector<float> lse_kernel, lse_in;
    const std::vector<uint16_t> a = RunGpu(pr, 0, 16, {2, SparseDecodeMerge::kKernel, false}, &lse_kernel);
    const std::vector<uint16_t> b = RunGpu(pr, 0, 16, {2, SparseDecodeMerge::kInKernel, false}, &lse_in, 3);
    // Counters kept by the caller, zeroed once: each launch leaves them zero for the next.
    std::vector<float> lse_kept;
    const std::vector<uint16_t> c =
        RunGpu(pr, 0, 16, {2, SparseDecodeMerge::kInKernel, false}, &lse_kept, 4, false, /*keep_counters=*/true);
    ASSERT_EQ(b, c);
    ASSERT_EQ(lse_in, lse_kept);
    ASSERT_EQ(lse_kernel.size(), lse_in.size());
    for (size_t i = 0; i < lse_in.size(); ++i) {
      if (std::isinf(lse_kernel[i]) && lse_kernel[i] == lse_in[i]) continue;  // a row that sees no key
      // Same partials merged in another order: float rounding only.
      ASSERT_NEAR(lse_in[i], lse_kernel[i], 1e-4 * (1.0 + std::abs(lse_kernel[i]))) << "row x head " << i;
    }
    for (size_t i = 0; i < a.size(); ++i) {
      // One bf16 rounding step apart at most (the two merges round the same float sums).
      ASSERT_LE(std::abs(Bf16ToFloat(a[i]) - Bf16ToFloat(b[i])), 1e-5 + std::abs(Bf16ToFloat(a[i])) * 0x1p-7)
          << "element " << i;
    }
  }
}

// Both merges (the last split CTA's, and the merge kernel as a programmatic dependent launch)
// captured in a CUDA graph on a stream of their own and replayed give what a plain launch gives.
TEST(SparseDecodeGpuTest, BothMergesReplayInACudaGraph) {
  const DecodeShape shapes[] = {
      {.seq_lens = {20000, 1, 16}, .q_tokens = {1, 1, 1}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128,
       .keep_fraction = 0.1},
      {.seq_lens = {4096, 33}, .q_tokens = {5, 2}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128},
  };
  uint32_t seed = 120;
  for (const DecodeShape& shape : shapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, seed++);
    for (SparseDecodeMerge merge : {SparseDecodeMerge::kInKernel, SparseDecodeMerge::kKernelPdl, SparseDecodeMerge::kKernel}) {
      const Tune tune{2, merge, false};
      const std::vector<uint16_t> plain = RunGpu(pr, 0, 16, tune);
      const std::vector<uint16_t> replayed = RunGpu(pr, 0, 16, tune, nullptr, 3, /*graph=*/true);
      ASSERT_EQ(plain, replayed) << "merge " << static_cast<int>(merge);
      const std::vector<uint16_t> kept = RunGpu(pr, 0, 16, tune, nullptr, 3, /*graph=*/true, /*keep_counters=*/true);
      ASSERT_EQ(plain, kept) << "merge " << static_cast<int>(merge) << ", counters kept by the caller";
    }
  }
}

// One split: each CTA writes the output and the log-sum-exp itself, including a second row
// group with 4 of its 16 rows (q = 5 at GQA group 4) and head dim 64 and 128.
TEST(SparseDecodeGpuTest, OneSplitWritesOutputAndLse) {
  const DecodeShape shapes[] = {
      {.seq_lens = {3000, 17, 999, 16}, .q_tokens = {5, 1, 5, 2}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128},
      {.seq_lens = {2049, 100, 33}, .q_tokens = {5, 1, 3}, .num_heads = 8, .num_kv_heads = 2, .head_dim = 64,
       .keep_fraction = 0.3},
  };
  uint32_t seed = 170;
  for (const DecodeShape& shape : shapes) {
    DecodeProblem pr = MakeDecodeProblem(shape, seed++);
    std::vector<float> ref(pr.out.size()), ref_abs(pr.out.size());
    DecodeProblem ref_pr = pr;
    std::vector<float> ref_lse(static_cast<size_t>(pr.total_q_rows()) * shape.num_heads);
    SparseDecodeParams rp = ref_pr.params();
    rp.lse = ref_lse.data();
    SparseDecodeRef(rp, ref.data(), ref_abs.data());
    std::vector<float> lse;
    const std::vector<uint16_t> got = RunGpu(pr, /*num_splits=*/1, 16, {}, &lse, 2);
    for (size_t i = 0; i < got.size(); ++i) {
      const double bound = 1e-5 + std::abs(ref[i]) * 0x1p-7 + ref_abs[i] * 0x1p-8;  // as in the awkward cases
      ASSERT_LE(std::abs(Bf16ToFloat(got[i]) - ref[i]), bound) << "element " << i;
    }
    ASSERT_EQ(lse.size(), ref_lse.size());
    for (size_t i = 0; i < lse.size(); ++i) {
      if (std::isinf(ref_lse[i]) && lse[i] == ref_lse[i]) continue;
      // float sums in another order and base-2 exponentials: rounding only.
      ASSERT_NEAR(lse[i], ref_lse[i], 1e-4 * (1.0 + std::abs(ref_lse[i]))) << "row x head " << i;
    }
  }
}

// The timeline (instrumentation) changes nothing in the output, and every CTA with rows stamps
// its steps in order; CTAs past their group's rows (a short sequence beside a long one) stamp none.
TEST(SparseDecodeGpuTest, TimelineStampsInOrderAndLeaveOutputUnchanged) {
  DecodeProblem pr = MakeDecodeProblem({.seq_lens = {20000, 40}, .q_tokens = {1, 5}, .num_heads = 32, .num_kv_heads = 8,
                                        .head_dim = 128, .keep_fraction = 0.1},
                                       190);
  for (SparseDecodeMerge merge : {SparseDecodeMerge::kInKernel, SparseDecodeMerge::kKernelPdl}) {
    const Tune tune{2, merge, false};
    const std::vector<uint16_t> plain = RunGpu(pr, 0, 16, tune);
    std::vector<unsigned long long> st;
    const std::vector<uint16_t> stamped = RunGpu(pr, 0, 16, tune, nullptr, 1, false, false, &st);
    ASSERT_EQ(plain, stamped) << "merge " << static_cast<int>(merge);
    int stamped_ctas = 0, empty_ctas = 0;
    for (size_t c = 0; c * kTimelineStamps < st.size(); ++c) {
      const unsigned long long* t = st.data() + c * kTimelineStamps;
      if (t[0] == 0) {
        ++empty_ctas;
        continue;
      }
      ++stamped_ctas;
      // entry <= loop end of warp 0 <= all warps <= merged <= stored (<= arrived <= merge end)
      EXPECT_LE(t[0], t[2]);
      EXPECT_LE(t[2], t[3]);
      EXPECT_LE(t[3], t[4]);
      EXPECT_LE(t[4], t[5]);
      if (t[6] != 0) {
        EXPECT_LE(t[5], t[6]);
      }
      if (t[7] != 0) {
        EXPECT_LE(t[6], t[7]);
      }
    }
    EXPECT_GT(stamped_ctas, 0);
    EXPECT_GT(empty_ctas, 0) << "the q = 1 sequence's second row group should be empty";
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
