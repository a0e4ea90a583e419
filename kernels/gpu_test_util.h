// GoogleTest helpers shared by the GPU tests (the benchmarks use cuda_test_util.h alone).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda_test_util.h"

namespace scout::kernels::testing {

// ToDevice, a failed allocation or copy reported as a test failure (the pointer may then be
// null): the device copy of v, recorded in *owned for the caller to cudaFree.
template <typename T>
T* Upload(const std::vector<T>& v, std::vector<void*>* owned) {
  cudaError_t e = cudaSuccess;
  T* d = ToDevice(v, owned, &e);
  EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
  return d;
}

// Compares a kernel's bf16 attention output with the reference's float output: no element NaN
// (every one written), each within 1e-5 + 2^-7 |ref| (the output's rounding and a different
// summation order, exp2f) + 2^-8 sum_j p_j |v_j| (abs_ref: the weights rounded to bf16 before
// P V, allowed twice). Reports up to 5 failing elements; returns the worst error as a fraction
// of its bound, and the number over it in *bad.
template <typename ToFloat>
double CheckAttentionOutput(const std::vector<uint16_t>& got, const std::vector<float>& ref,
                            const std::vector<float>& abs_ref, ToFloat to_float, int* bad) {
  *bad = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float g = to_float(got[i]);
    if (std::isnan(g)) {
      ADD_FAILURE() << "element " << i << " not written or NaN";
      ++*bad;
      return worst;
    }
    const double bound = 1e-5 + std::abs(ref[i]) * 0x1p-7 + abs_ref[i] * 0x1p-8;
    const double err = std::abs(g - ref[i]);
    worst = std::max(worst, err / bound);
    if (err > bound && ++*bad <= 5) {
      ADD_FAILURE() << "element " << i << ": gpu " << g << " ref " << ref[i] << " bound " << bound;
    }
  }
  return worst;
}

}  // namespace scout::kernels::testing
