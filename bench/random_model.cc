#include "bench/random_model.h"

#include <cuda_runtime.h>

#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/model_ops.cuh"

namespace scout::bench {
namespace {

absl::Status Cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<runtime::CudaModel>> CreateRandomCudaModel(const runtime::ModelConfig& config,
                                                                          uint64_t seed,
                                                                          const runtime::CudaModelOptions& options) {
  using Kind = runtime::CudaModel::WeightTensor::Kind;
  uint64_t next = seed;
  auto write = [&](const runtime::CudaModel::WeightTensor& t, void* stream) -> absl::Status {
    if (t.bf16) {
      return Cuda(kernels::RandomFill({.out = static_cast<uint16_t*>(t.data), .n = t.elements, .seed = next++,
                                       .scale = 1.0f / std::sqrt(static_cast<float>(t.fan_in))},
                                      static_cast<cudaStream_t>(stream)),
                  "random weights");
    }
    if (t.kind == Kind::kQkvBias || t.kind == Kind::kOutBias) {
      return Cuda(cudaMemset(t.data, 0, t.elements * sizeof(float)), "biases");
    }
    const std::vector<float> ones(t.elements, 1.0f);  // norms
    return Cuda(cudaMemcpy(t.data, ones.data(), ones.size() * sizeof(float), cudaMemcpyHostToDevice), "norm weights");
  };
  return runtime::CudaModel::CreateWith(config, write, options);
}

absl::Status FillRandomContext(runtime::CudaModel& model, runtime::SequenceId seq, int64_t num_tokens, uint64_t seed) {
  return model.WriteContext(seq, num_tokens, [&](uint16_t* data, int64_t elements, uint64_t key, void* stream) {
    return Cuda(kernels::RandomFill({.out = data, .n = elements, .seed = seed * 1315423911ull + key},
                                    static_cast<cudaStream_t>(stream)),
                "random context");
  });
}

}  // namespace scout::bench
