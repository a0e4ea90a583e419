// CUDA helpers shared by the GPU tests and benchmarks.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

// For benchmark programs: abort with the failing call and CUDA's message.
#define SCOUT_CUDA_CHECK(expr)                                                                    \
  do {                                                                                            \
    cudaError_t e_ = (expr);                                                                      \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_));   \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

namespace scout::kernels::testing {

// Copies v to new device memory recorded in *owned (free them with cudaFree); nullptr and
// cudaErrorMemoryAllocation-style failures are reported through *error.
template <typename T>
T* ToDevice(const std::vector<T>& v, std::vector<void*>* owned, cudaError_t* error) {
  void* d = nullptr;
  cudaError_t e = cudaMalloc(&d, std::max<size_t>(4, v.size() * sizeof(T)));
  if (e == cudaSuccess && !v.empty()) e = cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  if (e != cudaSuccess) *error = e;
  if (d != nullptr) owned->push_back(d);
  return static_cast<T*>(d);
}

}  // namespace scout::kernels::testing
