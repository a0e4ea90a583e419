// CUDA block selection against the C++ reference (ctest label gpu).
#include <cuda_runtime.h>

#include <set>

#include "gtest/gtest.h"
#include "kernels/block_select.cuh"
#include "kernels/block_select_problem.h"
#include "kernels/cuda_test_util.h"
#include "kernels/gpu_test_util.h"

namespace scout::kernels {
namespace {

using testing::Upload;

TEST(BlockSelectGpuTest, SameListsAsReference) {
  struct Case {
    std::vector<int32_t> nb;
    int positions, draft_heads, units, budget, sinks, window;
    bool quantized;
  };
  const std::vector<Case> cases = {
      {{1}, 1, 1, 1, 4, 1, 4, false},
      {{17}, 4, 8, 3, 5, 1, 4, true},
      {{1000, 37, 8195}, 5, 32, 16, 100, 1, 4, false},
      {{8192}, 4, 64, 32, 820, 1, 4, true},     // ties everywhere
      {{4096, 4096}, 2, 16, 8, 4096, 1, 4, false},  // budget = whole context
      {{65536}, 4, 16, 4, 6554, 1, 4, false},   // 1M tokens
      // Register-key kernel (max_blocks % 4 == 0, up to 8192): each chunk size, lists ending
      // inside a float4 chunk, a one-block sequence, ties, a budget of every block.
      {{1, 4}, 4, 8, 5, 3, 1, 4, false},
      {{2048, 5, 701}, 3, 16, 6, 70, 2, 4, true},
      {{8000, 4001, 3}, 4, 64, 12, 800, 1, 4, false},
      {{8192}, 4, 64, 32, 820, 1, 4, true},
      {{3000, 3072}, 1, 4, 4, 3072, 1, 4, false},
  };
  uint32_t seed = 11;
  for (const Case& c : cases) {
    SelectProblem pr = MakeSelectProblem(c.nb, c.positions, c.draft_heads, c.units, c.budget, c.sinks, c.window, 4,
                                         c.quantized, seed++);
    std::vector<int32_t> gpu_out(pr.out_blocks.size(), -7);
    std::vector<void*> owned;
    BlockSelectParams d = pr.p;
    d.mass = Upload(pr.mass, &owned);
    d.num_blocks = Upload(pr.num_blocks, &owned);
    d.map_indptr = Upload(pr.map_indptr, &owned);
    d.map_heads = Upload(pr.map_heads, &owned);
    d.out_indptr = Upload(pr.out_indptr, &owned);
    d.out_blocks = Upload(gpu_out, &owned);  // poisoned with -7
    void* scratch = nullptr;
    ASSERT_EQ(cudaMalloc(&scratch, BlockSelectScratchBytes(d)), cudaSuccess);
    ASSERT_EQ(BlockSelect(d, scratch, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(gpu_out.data(), d.out_blocks, gpu_out.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    BlockSelectRef(pr.p);
    // Same float operations in the same order: the lists must be identical, ties included.
    for (size_t list = 0; list + 1 < pr.out_indptr.size(); ++list) {
      std::vector<int32_t> g(gpu_out.begin() + pr.out_indptr[list], gpu_out.begin() + pr.out_indptr[list + 1]);
      std::vector<int32_t> r(pr.out_blocks.begin() + pr.out_indptr[list], pr.out_blocks.begin() + pr.out_indptr[list + 1]);
      ASSERT_EQ(std::set<int32_t>(g.begin(), g.end()), std::set<int32_t>(r.begin(), r.end()))
          << "list " << list << " of case with nb " << c.nb[0];
      ASSERT_TRUE(std::is_sorted(g.begin(), g.end()));
    }
    cudaFree(scratch);
    for (void* p : owned) cudaFree(p);
  }
}

}  // namespace
}  // namespace scout::kernels
