// Benchmark setup on the CUDA backend: a model with random weights at a production shape, and
// long contexts of random keys and values, without a checkpoint or a prefill. Through the
// product's own seams (CudaModel::CreateWith, CudaModel::WriteContext): what is timed afterwards
// is the code a user runs.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "runtime/cuda_model.h"

namespace scout::bench {

// Weights drawn on the GPU (uniform, scaled by 1/sqrt(fan-in); norms 1, biases 0), each
// matrix seeded by `seed` and its place in CudaModel's writing order.
absl::StatusOr<std::unique_ptr<runtime::CudaModel>> CreateRandomCudaModel(const runtime::ModelConfig& config,
                                                                          uint64_t seed,
                                                                          const runtime::CudaModelOptions& options = {});

// Writes random bf16 keys and values into the sequence's positions up to num_tokens and grows
// it to that length: a long context for benchmarks without a prefill.
absl::Status FillRandomContext(runtime::CudaModel& model, runtime::SequenceId seq, int64_t num_tokens, uint64_t seed);

}  // namespace scout::bench
