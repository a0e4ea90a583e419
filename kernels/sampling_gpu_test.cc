// GPU token sampling against its C++ reference (ctest label gpu).
#include <cuda_runtime.h>

#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda_test_util.h"
#include "kernels/gpu_test_util.h"
#include "kernels/sampling.cuh"

namespace scout::kernels {
namespace {

using testing::Upload;

// Every parameter combination over awkward vocabularies, with ties planted at the top-k and top-p
// boundaries (repeated logits, a flat row): the kernel picks exactly the reference's token.
TEST(SampleGpu, MatchesReferenceWithTiesAtTheBoundaries) {
  std::mt19937 rng(7);
  for (int vocab : {1, 2, 7, 1000, 4099, 128256}) {
    std::vector<SampleRowParams> params;
    for (float t : {0.0f, 0.3f, 1.0f, 2.5f}) {
      for (int k : {0, 1, 2, 5, 50, vocab}) {
        for (float top_p : {1.0f, 0.9f, 0.5f, 0.05f}) {
          params.push_back({.temperature = t, .top_k = k, .top_p = top_p, .seed = rng()});
        }
      }
    }
    const int rows = static_cast<int>(params.size());
    std::vector<float> logits(static_cast<size_t>(rows) * vocab);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    for (int r = 0; r < rows; ++r) {
      float* x = logits.data() + static_cast<size_t>(r) * vocab;
      for (int i = 0; i < vocab; ++i) x[i] = normal(rng);
      if (r % 5 == 1) {  // coarse values: many ties everywhere
        for (int i = 0; i < vocab; ++i) x[i] = std::round(x[i]);
      } else if (r % 5 == 2) {  // the top few repeated
        for (int i = 0; i < vocab; i += 3) x[i] = 9.0f;
      } else if (r % 5 == 3) {  // flat
        for (int i = 0; i < vocab; ++i) x[i] = 0.5f;
      } else if (r % 10 == 4) {  // flat at signed zeros: -0 and +0 tie (the lower index first)
        for (int i = 0; i < vocab; ++i) x[i] = i % 2 == 1 ? 0.0f : -0.0f;
      }
    }
    std::vector<int32_t> want(rows, -1);
    SampleRef({.logits = logits.data(), .row = params.data(), .out = want.data(), .rows = rows, .vocab = vocab});
    std::vector<void*> owned;
    int32_t* out = Upload(std::vector<int32_t>(rows, -7), &owned);
    ASSERT_EQ(Sample({.logits = Upload(logits, &owned), .row = Upload(params, &owned), .out = out, .rows = rows, .vocab = vocab},
                     nullptr),
              cudaSuccess);
    std::vector<int32_t> got(rows);
    ASSERT_EQ(cudaMemcpy(got.data(), out, rows * sizeof(int32_t), cudaMemcpyDeviceToHost), cudaSuccess);
    for (void* p : owned) cudaFree(p);
    for (int r = 0; r < rows; ++r) {
      EXPECT_EQ(got[r], want[r]) << "vocab " << vocab << " row " << r << " (T " << params[r].temperature << ", top_k "
                                 << params[r].top_k << ", top_p " << params[r].top_p << ")";
    }
  }
}

}  // namespace
}  // namespace scout::kernels
