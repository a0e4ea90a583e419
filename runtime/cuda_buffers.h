// Internal to the CUDA backend: CUDA errors as absl::Status, and device and pinned host buffers
// that free themselves. Included by the backend's .cc files only.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace scout::runtime::cuda {

// Out of memory -> ResourceExhausted, no usable device -> Unavailable, the rest Internal.
inline absl::Status CudaStatus(cudaError_t e, absl::string_view what) {
  if (e == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": GPU out of memory (", cudaGetErrorString(e), ")"));
  }
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice) {
    return absl::UnavailableError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
  }
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

#define SCOUT_RETURN_IF_CUDA(expr, what)                                                        \
  do {                                                                                          \
    if (cudaError_t e_ = (expr); e_ != cudaSuccess) return ::scout::runtime::cuda::CudaStatus(e_, what); \
  } while (0)

#define SCOUT_RETURN_IF_ERROR(expr)                    \
  do {                                                 \
    if (absl::Status s_ = (expr); !s_.ok()) return s_; \
  } while (0)

// Device memory; Reserve grows it on demand (contents are not kept).
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr); }
  absl::Status Reserve(size_t n, absl::string_view what) {
    if (n <= bytes) return absl::OkStatus();
    cudaFree(ptr);
    ptr = nullptr;
    bytes = 0;
    SCOUT_RETURN_IF_CUDA(cudaMalloc(&ptr, n), what);
    bytes = n;
    return absl::OkStatus();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

// Page-locked host memory (for asynchronous uploads); Reserve grows it, contents not kept.
struct PinnedBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { cudaFreeHost(ptr); }
  absl::Status Reserve(size_t n) {
    if (n <= bytes) return absl::OkStatus();
    cudaFreeHost(ptr);
    ptr = nullptr;
    bytes = 0;
    SCOUT_RETURN_IF_CUDA(cudaHostAlloc(&ptr, n, cudaHostAllocDefault), "pinned staging buffer");
    bytes = n;
    return absl::OkStatus();
  }
};

}  // namespace scout::runtime::cuda
