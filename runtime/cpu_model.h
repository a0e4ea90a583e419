// The CPU backend: a Llama-family model (Llama, Qwen2, Mistral) in float32 over a paged KV cache
// in host memory.
#pragma once

#include <filesystem>
#include <memory>

#include "absl/status/statusor.h"
#include "kvstore/block_table.h"
#include "kvstore/kv_pool.h"
#include "runtime/backend.h"
#include "runtime/llama_weights.h"

namespace scout::runtime {

struct CpuModelOptions {
  // Tokens the KV pool holds over all sequences (rounded up to whole blocks). 0: room for four
  // sequences of max_position_embeddings.
  int64_t kv_budget_tokens = 0;
};

class CpuModel final : public ModelBackend {
 public:
  // Loads config.json and the safetensors weights of a Hugging Face model folder. Errors name
  // the file and the cause (see LoadModelConfig, TensorStore::OpenDir, LoadLlamaWeights).
  static absl::StatusOr<std::unique_ptr<CpuModel>> Load(const std::filesystem::path& model_dir,
                                                        const CpuModelOptions& options = {});
  static absl::StatusOr<std::unique_ptr<CpuModel>> Create(const ModelConfig& config, LlamaWeights weights,
                                                          const CpuModelOptions& options = {});

  const ModelConfig& config() const override { return config_; }
  absl::Status AddSequence(SequenceId seq) override { return tables_.AddSequence(seq); }
  absl::Status ReleaseSequence(SequenceId seq) override { return tables_.Release(seq); }
  absl::Status TruncateSequence(SequenceId seq, int64_t num_tokens) override {
    return tables_.Truncate(seq, num_tokens);
  }
  absl::StatusOr<int64_t> SequenceLength(SequenceId seq) const override;
  absl::Status Forward(std::span<const SequenceInput> batch, std::vector<float>* logits) override;

  KvCacheUsage kv_cache_usage() const override {
    return {.used_blocks = tables_.allocator().capacity() - tables_.allocator().num_free(),
            .total_blocks = tables_.allocator().capacity()};
  }
  // float32 units straight from the KV pool.
  size_t kv_unit_bytes() const override;
  absl::Status ExportKv(SequenceId seq, int64_t first_block, int64_t num_blocks, std::byte* out) const override;
  absl::Status ImportKv(SequenceId seq, int64_t num_tokens, const std::byte* data) override;
  absl::Status WriteKvUnits(SequenceId seq, std::span<const KvUnitRef> units, const std::byte* data) override;
  const kvstore::BlockTableManager& block_tables() const { return tables_; }
  // Bytes of float32 weights.
  size_t weight_bytes() const;

 private:
  CpuModel(const ModelConfig& config, LlamaWeights weights, std::unique_ptr<kvstore::KvPool> pool);

  ModelConfig config_;
  LlamaWeights weights_;
  std::vector<float> inv_freq_;
  float rope_scaling_;  // RopeAttentionScaling: multiplies cos and sin
  std::unique_ptr<kvstore::KvPool> pool_;
  kvstore::BlockTableManager tables_;
};

}  // namespace scout::runtime
