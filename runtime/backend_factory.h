// The backend a user names: `--device cpu|cuda|cuda:N`, a tensor-parallel target over several
// GPUs, the CUDA backend's host KV tier. What every subcommand (and the cluster's workers) loads
// models through; builds without CUDA or NCCL say so by name.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/backend.h"

namespace scout::runtime {

// The CUDA backend's host KV tier (--host-kv-gb, --gpu-kv-cache-gb, --host-kv-memory).
struct HostTierChoice {
  double host_gb = 0;        // the store: this many GB of the whole model's KV; 0: no tier
  double gpu_cache_gb = 0;   // the GPU block cache per GPU; 0: what fits
  std::string host_memory = "hugepages";
};

// The tier's sizes for the model in `dir`: tokens the store holds and units of the GPU cache
// (zeros without a tier). InvalidArgument when the cache holds less than a block per layer.
struct HostTierSizes {
  int64_t host_kv_tokens = 0;
  int64_t gpu_cache_units = 0;
};
absl::StatusOr<HostTierSizes> HostTierSizesFor(const std::string& dir, const HostTierChoice& tier);

// A model on the backend `device` names: "cpu", "cuda" or "cuda:N"; kv_tokens the KV pool (0:
// the backend's default). InvalidArgument for another device or a tier on the CPU; Unavailable
// for CUDA in a build without it.
absl::StatusOr<std::unique_ptr<ModelBackend>> LoadBackend(const std::string& dir, const std::string& device,
                                                          int64_t kv_tokens, const HostTierChoice& tier = {});

// The target split over GPUs (a TensorParallelModel): `size` GPUs 0..size-1, or the indices in
// `devices` ("0,1,..."; their count must be `size` when size > 1). Unavailable without NCCL.
absl::StatusOr<std::unique_ptr<ModelBackend>> LoadTensorParallel(const std::string& dir, int size,
                                                                 const std::string& devices, int64_t kv_tokens,
                                                                 const HostTierChoice& tier = {});

}  // namespace scout::runtime
