// GoogleTest helpers shared by the GPU tests (the benchmarks use cuda_test_util.h alone).
#pragma once

#include <cuda_runtime.h>

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

}  // namespace scout::kernels::testing
