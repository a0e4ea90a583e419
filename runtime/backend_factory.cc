#include "runtime/backend_factory.h"

#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kvstore/block_table.h"
#include "runtime/cpu_model.h"
#include "runtime/model_config.h"
#ifdef SCOUT_HAVE_CUDA
#include "runtime/cuda_model.h"
#endif
#ifdef SCOUT_HAVE_NCCL
#include "runtime/tensor_parallel.h"
#endif

namespace scout::runtime {

// The store holds host_gb of the whole model's KV in tokens (a tensor-parallel shard stores only
// its KV heads of those tokens); the GPU cache gpu_cache_gb per GPU.
absl::StatusOr<HostTierSizes> HostTierSizesFor(const std::string& dir, const HostTierChoice& tier) {
  if (tier.host_gb <= 0) return HostTierSizes{};
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir);
  if (!c.ok()) return c.status();
  const double unit = 2.0 * kvstore::kBlockSize * static_cast<double>(c->head_dim) * 2;
  const double per_token = static_cast<double>(c->num_hidden_layers * c->num_key_value_heads) * unit / kvstore::kBlockSize;
  HostTierSizes t;
  t.host_kv_tokens = std::max<int64_t>(kvstore::kBlockSize, static_cast<int64_t>(tier.host_gb * 1e9 / per_token));
  t.gpu_cache_units = static_cast<int64_t>(tier.gpu_cache_gb * 1e9 / unit);
  if (tier.gpu_cache_gb > 0 && t.gpu_cache_units < c->num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("--gpu-kv-cache-gb ", tier.gpu_cache_gb,
                                                   " holds less than one block per layer"));
  }
  return t;
}

absl::StatusOr<std::unique_ptr<ModelBackend>> LoadBackend(const std::string& dir, const std::string& device,
                                                          int64_t kv_tokens, const HostTierChoice& tier) {
  if (tier.host_gb > 0 && device == "cpu") {
    return absl::InvalidArgumentError("--host-kv-gb is the CUDA backend's host KV tier: it needs --device cuda");
  }
  if (device == "cpu") {
    absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(dir, {.kv_budget_tokens = kv_tokens});
    if (!m.ok()) return m.status();
    return std::unique_ptr<ModelBackend>(std::move(*m));
  }
  int index = 0;
  if (device != "cuda" && !(device.rfind("cuda:", 0) == 0 && absl::SimpleAtoi(device.substr(5), &index) && index >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat("device must be cpu, cuda or cuda:N, got \"", device, "\""));
  }
#ifdef SCOUT_HAVE_CUDA
  absl::StatusOr<HostTierSizes> sizes = HostTierSizesFor(dir, tier);
  if (!sizes.ok()) return sizes.status();
  absl::StatusOr<std::unique_ptr<CudaModel>> m = CudaModel::Load(
      dir, {.device = index, .kv_budget_tokens = kv_tokens, .host_kv_tokens = sizes->host_kv_tokens,
            .gpu_cache_units = sizes->gpu_cache_units, .host_kv_memory = tier.host_memory});
  if (!m.ok()) return m.status();
  return std::unique_ptr<ModelBackend>(std::move(*m));
#else
  return absl::UnavailableError("this scout was built without CUDA (SCOUT_CUDA=OFF or no nvcc): use --device cpu");
#endif
}

absl::StatusOr<std::unique_ptr<ModelBackend>> LoadTensorParallel(const std::string& dir, int size,
                                                                 const std::string& devices, int64_t kv_tokens,
                                                                 const HostTierChoice& tier) {
  std::vector<int> ids;
  if (devices.empty()) {
    for (int i = 0; i < size; ++i) ids.push_back(i);
  } else {
    for (absl::string_view v : absl::StrSplit(devices, ',')) {
      int x = 0;
      if (!absl::SimpleAtoi(v, &x) || x < 0) {
        return absl::InvalidArgumentError(absl::StrCat("--target-devices: \"", devices, "\" is not a list of GPU indices"));
      }
      ids.push_back(x);
    }
    if (size > 1 && static_cast<int>(ids.size()) != size) {
      return absl::InvalidArgumentError("--target-devices names a different number of GPUs than --tensor-parallel-size");
    }
  }
#ifdef SCOUT_HAVE_NCCL
  absl::StatusOr<HostTierSizes> sizes = HostTierSizesFor(dir, tier);
  if (!sizes.ok()) return sizes.status();
  absl::StatusOr<std::unique_ptr<TensorParallelModel>> m = TensorParallelModel::Load(
      dir, {.devices = ids, .kv_budget_tokens = kv_tokens, .host_kv_tokens = sizes->host_kv_tokens,
            .gpu_cache_units = sizes->gpu_cache_units, .host_kv_memory = tier.host_memory});
  if (!m.ok()) return m.status();
  return std::unique_ptr<ModelBackend>(std::move(*m));
#else
  (void)kv_tokens;
  (void)tier;
  return absl::UnavailableError("tensor parallelism needs a CUDA build with NCCL");
#endif
}

}  // namespace scout::runtime
