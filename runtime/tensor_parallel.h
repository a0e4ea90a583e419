// A tensor-parallel target: one CudaModel shard per GPU (attention heads, KV heads and MLP columns
// split, the attention output and MLP projections all-reduced over NCCL), driven as one
// ModelBackend. Each shard keeps the KV of its own KV heads and attends only to its heads' lists
// of a Selection.
#pragma once

#include <filesystem>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/cuda_model.h"

namespace scout::runtime {

struct TensorParallelOptions {
  std::vector<int> devices = {0};  // shard i on devices[i]; the size is the tensor-parallel size
  int64_t kv_budget_tokens = 0;    // per shard, as CudaModelOptions
  // The host KV tier, per shard (each keeps its own KV heads' units in its own host store and
  // GPU block cache), as CudaModelOptions.
  int64_t host_kv_tokens = 0;
  int64_t gpu_cache_units = 0;
  std::string host_kv_memory = "hugepages";
};

class TensorParallelModel final : public ModelBackend {
 public:
  // InvalidArgument when the size does not divide the heads, KV heads and MLP width (naming the
  // field) or devices repeat; Unavailable without enough GPUs; Unimplemented without NCCL.
  static absl::StatusOr<std::unique_ptr<TensorParallelModel>> Load(const std::filesystem::path& model_dir,
                                                                   const TensorParallelOptions& options);
  static absl::StatusOr<std::unique_ptr<TensorParallelModel>> Create(const ModelConfig& config,
                                                                     const LlamaWeights& weights,
                                                                     const TensorParallelOptions& options);
  ~TensorParallelModel() override;

  const ModelConfig& config() const override { return shards_.front()->config(); }
  absl::Status AddSequence(SequenceId seq) override;
  absl::Status ReleaseSequence(SequenceId seq) override;
  absl::Status TruncateSequence(SequenceId seq, int64_t num_tokens) override;
  absl::StatusOr<int64_t> SequenceLength(SequenceId seq) const override { return shards_.front()->SequenceLength(seq); }
  // Every shard runs the pass on its own thread (their all-reduces meet); logits from shard 0.
  absl::Status Forward(std::span<const SequenceInput> batch, std::vector<float>* logits) override;
  KvCacheUsage kv_cache_usage() const override { return shards_.front()->kv_cache_usage(); }
  // Summed over the shards (each moves its own KV heads' units).
  HostKvTierStats host_tier_stats() const override;

  int size() const { return static_cast<int>(shards_.size()); }

 private:
  TensorParallelModel() = default;
  // Applies op to every shard; the shards hold identical tables, so they fail alike.
  template <typename Op>
  absl::Status ForEachShard(Op op);

  std::vector<std::unique_ptr<CudaModel>> shards_;
  std::vector<void*> comms_;  // ncclComm_t per shard
};

}  // namespace scout::runtime
