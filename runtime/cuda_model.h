// The CUDA backend: a Llama-family model with bf16 weights and a paged bf16 KV cache on one GPU.
// Same seam as the CPU backend (ModelBackend); activations are bf16 into the GEMMs (cuBLAS,
// float32 accumulation) and float32 in the residual stream, attention runs the kernels of
// kernels/sparse_decode.cuh over dense or selected blocks.
//
// Beyond the seam, a step can stay entirely on the device (EnqueueForward): selections made
// on the GPU by the STS block selection, the draft's attention mass written where the selection
// kernel reads it, greedy tokens picked on the GPU, and the whole step captured in a CUDA graph.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kvstore/block_table.h"
#include "kvstore/selection.h"
#include "runtime/backend.h"
#include "runtime/llama_weights.h"

namespace scout::runtime {

struct CudaModelOptions {
  int device = 0;
  // Tokens the GPU KV pool holds over all sequences (rounded up to whole blocks). 0: room for
  // four sequences of max_position_embeddings.
  int64_t kv_budget_tokens = 0;
  // Tensor parallelism (TensorParallelModel sets these): this model is shard tp_rank of tp_size,
  // holding heads, KV heads and MLP columns [rank * n / size, (rank + 1) * n / size) and summing
  // the attention output and MLP projections over the shards through nccl_comm (an ncclComm_t).
  int tp_rank = 0;
  int tp_size = 1;
  void* nccl_comm = nullptr;
  // The host KV tier (kvstore/): > 0 keeps every sequence's KV in a host-memory store of this
  // many tokens (pinned, device-mapped, taken in 1 GiB chunks as sequences grow, two kept
  // allocated ahead by a background thread) and gives the
  // GPU only a cache of gpu_cache_units units, one (layer, KV head, 16-token block) each. Every
  // step plans on the host which units its lists name that the cache lacks (PlanPrefetch), moves
  // them layer by layer on a copy stream (each layer's attention waits for its own units only),
  // writes its new tokens' keys and values into cache units and flushes those back to the store.
  // Attention then runs over lists (STS selections; a step without one reads every block, so
  // the cache must hold the whole context of that step). kv_budget_tokens is unused.
  int64_t host_kv_tokens = 0;
  // Units of the GPU cache; 0: what fits in 90% of the GPU memory left after the weights.
  int64_t gpu_cache_units = 0;
  // The store's memory: "hugepages" (2 MiB pages, cudaHostRegister'd: faster to pin) or
  // "pinned" (cudaHostAlloc). kvstore::HostAllocatorNamed.
  std::string host_kv_memory = "hugepages";
  // true: one gather a step whose layers are waited for through memory counters
  // (CudaCopyEngine::LaunchSignalled); false: one gather and one event per layer.
  bool signalled_prefetch = true;
};


// Where a pass writes its attention mass per block (see kernels::BlockMassParams; with a
// selection only the listed blocks are written, their masses relative to the listed set), for layer L:
// mass + L * layer_stride, heads offset by L * layer_head_offset. The STS layout
// [seqs][positions][draft layers * heads][max_blocks] at position p is base + p * heads_total *
// max_blocks, seq_stride = positions * heads_total * max_blocks, head_stride = max_blocks,
// layer_stride 0, layer_head_offset = heads.
struct DeviceBlockMass {
  float* mass = nullptr;
  int64_t seq_stride = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
  int64_t layer_stride = 0;
  int layer_head_offset = 0;
};

struct DeviceStepOptions {
  // Lists made on the device for the whole batch (kernels::BlockSelect writes them), a view of
  // device memory over the whole model's layers and KV heads: ascending logical blocks that
  // include the blocks of each sequence's new tokens (BlockSelect with a window at least that
  // wide writes exactly this). Overrides every input's host selection.
  const kvstore::SelectionView* selection = nullptr;
  // The batch's lists in host memory, one Selection for the whole batch (the whole model's
  // layers and KV heads): in place of the inputs' own selections, without splitting them per
  // sequence. The host KV tier plans its prefetch from these; with neither, dense.
  const kvstore::Selection* host_lists = nullptr;
  const DeviceBlockMass* block_mass = nullptr;
  int32_t* argmax = nullptr;  // device [logit rows]: greedy tokens
  // Device [total new tokens]: token ids read on the device instead of the inputs' (for feeding
  // one step's argmax to the next without the host). The inputs' tokens still give the shapes.
  const int32_t* device_tokens = nullptr;
  // SANTA: > 0 samples S value rows per (sequence, KV head, 16-row group) from the softmax
  // instead of summing all of them (kernels/santa.h); the seed is mixed with the layer.
  int santa_samples = 0;
  uint64_t santa_seed = 0;
  // Run the step through a CUDA graph kept for its shape (every size and pointer a launch bakes
  // in): the first step of a shape is captured and run, later ones refill the graph's index
  // arrays and replay it, which saves the launch gaps of a few hundred kernels. The block table
  // and the attention plan are sized to the next 16 blocks so that consecutive steps share a
  // shape. Ignored (a plain step) with the host KV tier, SANTA, or host selections or logits.
  bool use_graph = false;
  // Benchmarks only: leave the attention out (its output buffer keeps whatever it held), so that
  // the time of a step with and without it gives the attention's share.
  bool skip_attention = false;
};

class CudaModel final : public ModelBackend {
 public:
  // As CpuModel::Load, then the weights go to the GPU as bf16 (the checkpoints' own type).
  // Unavailable when no CUDA device is usable; ResourceExhausted when the GPU cannot hold the
  // weights or the KV pool.
  static absl::StatusOr<std::unique_ptr<CudaModel>> Load(const std::filesystem::path& model_dir,
                                                         const CudaModelOptions& options = {});
  static absl::StatusOr<std::unique_ptr<CudaModel>> Create(const ModelConfig& config, const LlamaWeights& weights,
                                                           const CudaModelOptions& options = {});
  // One weight tensor as it lies on the GPU (this shard's), for CreateWith: `elements` values at
  // `data`, bf16 for embeddings and matrices, float32 for norms and biases. fan_in: the
  // inputs each output sums over (a random initialisation's scale).
  struct WeightTensor {
    enum class Kind { kEmbedding, kLmHead, kFinalNorm, kQkvBias, kOutBias, kAttentionNorm, kMlpNorm, kQkv, kOut,
                      kGateUp, kDown };
    Kind kind = Kind::kEmbedding;
    int layer = -1;  // -1 for the model-wide tensors
    void* data = nullptr;
    int64_t elements = 0;
    bool bf16 = true;
    int64_t fan_in = 1;
  };
  // Fills one tensor, on `stream` (a cudaStream_t) or synchronously.
  using WeightWriter = std::function<absl::Status(const WeightTensor& tensor, void* stream)>;
  // Weights written in place by `write` (bench/: random weights at production shapes, drawn on
  // the GPU, where the values do not matter and no checkpoint exists).
  static absl::StatusOr<std::unique_ptr<CudaModel>> CreateWith(const ModelConfig& config, const WeightWriter& write,
                                                               const CudaModelOptions& options = {});
  ~CudaModel() override;
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const ModelConfig& config() const override;
  absl::Status AddSequence(SequenceId seq) override;
  absl::Status ReleaseSequence(SequenceId seq) override;
  absl::Status TruncateSequence(SequenceId seq, int64_t num_tokens) override;
  absl::StatusOr<int64_t> SequenceLength(SequenceId seq) const override;
  // Synchronous. Supports host selections and block_mass; Quest-style selection is CPU-only
  // (Unimplemented here).
  absl::Status Forward(std::span<const SequenceInput> batch, std::vector<float>* logits) override;

  // Checks and grows the batch as Forward does, then enqueues the step on the model's stream
  // and returns without waiting. Logits stay on the device (logits_device()). Inputs' host
  // selections and block_mass are ignored; options give their device forms.
  absl::Status EnqueueForward(std::span<const SequenceInput> batch, const DeviceStepOptions& options);
  // Same, captured into a CUDA graph instead of run; returns its id. Replay(id) runs it again
  // with the same shapes, positions and device pointers: the host-side tables grow once, at
  // capture (truncate the sequences back to replay a step at the same length). A later step
  // that needs larger buffers makes earlier captures stale (Replay: FailedPrecondition).
  absl::StatusOr<int> CaptureForward(std::span<const SequenceInput> batch, const DeviceStepOptions& options);
  absl::Status Replay(int graph);
  absl::Status Synchronize();

  const float* logits_device() const;
  // The CUDA device the model runs on.
  int device() const;
  // True for another single-device CudaModel on another GPU.
  bool concurrent_with(const ModelBackend& other) const override;
  // The model's CUDA stream (a cudaStream_t), for callers that enqueue their own kernels
  // between steps.
  void* stream() const;
  // Grows the sequence to num_tokens positions without running the model, handing each new
  // stretch of its KV (bf16, device-accessible: the GPU pool, or the host store's mapped slabs)
  // to `write` with a key that is the same for the same stretch; waits for the writes. For
  // benchmarks' long contexts without a prefill (bench/random_model.h).
  using KvStretchWriter =
      std::function<absl::Status(uint16_t* data, int64_t elements, uint64_t key, void* stream)>;
  absl::Status WriteContext(SequenceId seq, int64_t num_tokens, const KvStretchWriter& write);

  HostKvTierStats host_tier_stats() const override;
  // Steps run through use_graph: graphs captured, and steps that replayed one.
  struct StepGraphStats {
    int64_t captures = 0;
    int64_t replays = 0;
  };
  StepGraphStats step_graph_stats() const;
  // The step as Forward, then kernels::Sample over its logits: greedy, temperature, top-k and
  // top-p on the GPU; only the tokens are copied back.
  bool samples_on_device() const override { return true; }
  absl::Status ForwardSampled(std::span<const SequenceInput> batch, std::span<const kernels::SampleRowParams> rows,
                              std::vector<int32_t>* tokens) override;
  absl::Status LastLogitRows(std::span<const int64_t> rows, std::vector<float>* out) const override;
  bool keeps_logit_rows() const override { return true; }
  bool host_tier() const;
  // bf16 units: from the GPU pool, or with the host tier from the host store (after the last
  // step's flush). A tensor-parallel shard holds only its KV heads: Unimplemented there.
  size_t kv_unit_bytes() const override;
  absl::Status ExportKv(SequenceId seq, int64_t first_block, int64_t num_blocks, std::byte* out) const override;
  absl::Status ImportKv(SequenceId seq, int64_t num_tokens, const std::byte* data) override;
  absl::Status WriteKvUnits(SequenceId seq, std::span<const KvUnitRef> units, const std::byte* data) override;
  KvCacheUsage kv_cache_usage() const override;
  const kvstore::BlockTableManager& block_tables() const;
  size_t weight_bytes() const;
  size_t kv_bytes_per_token() const;

  struct Impl;

 private:
  explicit CudaModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace scout::runtime
