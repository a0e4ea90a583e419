// The KV resident on the GPU: one pool a layer, [blocks][kv heads][K|V][16][head_dim] bf16,
// indexed by the block tables. Steps read it in place; nothing moves.
#include <algorithm>
#include <cstring>

#include "kvstore/block_table.h"
#include "runtime/cuda_buffers.h"
#include "runtime/cuda_kv_placement.h"

namespace scout::runtime::cuda {
namespace {

class ResidentKv final : public KvPlacement {
 public:
  absl::Status Init(const KvShape& s, const CudaModelOptions& o) {
    c_ = s.model;
    lc_ = s.shard;
    const int64_t per_block = BlockElems() * static_cast<int64_t>(sizeof(uint16_t));
    const int64_t tokens = o.kv_budget_tokens > 0 ? o.kv_budget_tokens : 4 * c_->max_position_embeddings;
    int64_t blocks = kvstore::BlocksFor(tokens);
    if (o.kv_budget_tokens == 0) {
      // The default stays within 90% of what the GPU has free, as vLLM's gpu_memory_utilization.
      size_t free_bytes = 0, total_bytes = 0;
      SCOUT_RETURN_IF_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
      const int64_t fit =
          static_cast<int64_t>(0.9 * static_cast<double>(free_bytes)) / (per_block * c_->num_hidden_layers);
      blocks = std::max<int64_t>(1, std::min(blocks, fit - 64));
    }
    if (blocks > INT32_MAX) return absl::InvalidArgumentError("KV pool of more than 2^31 blocks");
    kv_ = std::vector<DeviceBuffer>(c_->num_hidden_layers);
    for (DeviceBuffer& k : kv_) {
      SCOUT_RETURN_IF_ERROR(
          k.Reserve(blocks * per_block, absl::StrCat("KV pool of ", blocks * kvstore::kBlockSize, " tokens")));
      // Slots past a sequence's end are read (weighted by zero): they must hold finite values.
      SCOUT_RETURN_IF_CUDA(cudaMemset(k.ptr, 0, k.bytes), "KV pool clear");
    }
    tables_ = std::make_unique<kvstore::BlockTableManager>(static_cast<int32_t>(blocks));
    return absl::OkStatus();
  }

  const kvstore::BlockTableManager& tables() const override { return *tables_; }
  absl::Status AddSequence(SequenceId seq) override { return tables_->AddSequence(seq); }
  absl::Status ReleaseSequence(SequenceId seq) override { return tables_->Release(seq); }
  absl::Status TruncateSequence(SequenceId seq, int64_t n) override { return tables_->Truncate(seq, n); }

  absl::Status Check(const StepDemands&) override { return absl::OkStatus(); }
  bool needs_host_lists() const override { return false; }
  bool graphs_allowed() const override { return true; }
  absl::Status TakeLists(std::span<const SequenceInput>, const BatchShape&, bool, kvstore::Selection*,
                         int*) override {
    return absl::OkStatus();
  }
  bool fills_slots() const override { return false; }
  size_t IndexInts(int64_t) const override { return 0; }
  absl::Status Prepare(std::span<const SequenceInput> batch, const BatchShape& shape, kvstore::Selection*,
                       int32_t*) override {
    return GrowForBatch(*tables_, batch, shape);
  }
  absl::Status BeginTransfers(cudaStream_t) override { return absl::OkStatus(); }
  absl::StatusOr<LayerKv> Layer(int layer, const int32_t*, cudaStream_t) override {
    return LayerKv{.kv = kv_[layer].as<uint16_t>()};
  }
  absl::Status Attend(int, const kernels::SparseDecodeParams& ap, const AttendFn& attend, cudaStream_t) override {
    return attend(ap);
  }
  absl::Status EndStep(cudaStream_t) override { return absl::OkStatus(); }
  void Abort(std::span<const SequenceInput>, const BatchShape&, cudaStream_t) override {}

  absl::Status ExportKv(SequenceId seq, int64_t first_block, int64_t num_blocks, std::byte* out,
                        cudaStream_t stream) override {
    const kvstore::BlockTable* t = tables_->Find(seq);
    SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(stream), "export KV");
    const size_t layer_block = BlockBytes();
    for (int64_t b = first_block; b < first_block + num_blocks; ++b) {
      for (const DeviceBuffer& k : kv_) {
        // A layer's pool holds [blocks][kv_heads][2][16][head_dim]: one block's heads together.
        SCOUT_RETURN_IF_CUDA(cudaMemcpy(out, k.as<std::byte>() + t->blocks[b] * layer_block, layer_block,
                                        cudaMemcpyDeviceToHost),
                             "export KV");
        out += layer_block;
      }
    }
    return absl::OkStatus();
  }

  absl::Status ImportKv(SequenceId seq, int64_t num_tokens, const std::byte* data, cudaStream_t stream) override {
    SCOUT_RETURN_IF_ERROR(tables_->Grow(seq, num_tokens));
    if (data == nullptr) return absl::OkStatus();
    SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(stream), "import KV");
    const size_t layer_block = BlockBytes();
    for (int32_t block : tables_->Find(seq)->blocks) {
      for (DeviceBuffer& k : kv_) {
        const cudaError_t e = cudaMemcpy(k.as<std::byte>() + block * layer_block, data, layer_block, cudaMemcpyHostToDevice);
        if (e != cudaSuccess) {
          (void)tables_->Truncate(seq, 0);
          SCOUT_RETURN_IF_CUDA(e, "import KV");
        }
        data += layer_block;
      }
    }
    return absl::OkStatus();
  }

  absl::Status WriteKvUnits(SequenceId seq, std::span<const KvUnitRef> units, const std::byte* data,
                            cudaStream_t stream) override {
    const kvstore::BlockTable* t = tables_->Find(seq);
    const size_t unit = BlockBytes() / lc_->num_key_value_heads;
    SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(stream), "write KV units");
    for (size_t i = 0; i < units.size(); ++i) {
      const KvUnitRef& u = units[i];
      SCOUT_RETURN_IF_CUDA(cudaMemcpy(kv_[u.layer].as<std::byte>() + (t->blocks[u.block] * lc_->num_key_value_heads + u.head) * unit,
                                      data + i * unit, unit, cudaMemcpyHostToDevice),
                           "write KV units");
    }
    return absl::OkStatus();
  }

  absl::Status WriteContext(SequenceId seq, int64_t num_tokens, const KvStretchWriter& write,
                            cudaStream_t stream) override {
    const int64_t before = tables_->Find(seq)->num_tokens;
    SCOUT_RETURN_IF_ERROR(tables_->Grow(seq, num_tokens));
    const std::vector<int32_t>& blocks = tables_->Find(seq)->blocks;
    const int64_t per_block = BlockElems();
    // Runs of consecutive physical blocks, one stretch each.
    const size_t first = static_cast<size_t>(before / kvstore::kBlockSize);
    for (int64_t layer = 0; layer < c_->num_hidden_layers; ++layer) {
      for (size_t i = first; i < blocks.size();) {
        size_t j = i + 1;
        while (j < blocks.size() && blocks[j] == blocks[j - 1] + 1) ++j;
        SCOUT_RETURN_IF_ERROR(write(kv_[layer].as<uint16_t>() + blocks[i] * per_block,
                                    static_cast<int64_t>(j - i) * per_block, layer * 7919ull + blocks[i], stream));
        i = j;
      }
    }
    SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(stream), "context write");
    return absl::OkStatus();
  }

  HostKvTierStats stats() const override { return {}; }

 private:
  // bf16 elements of one block of one layer: every KV head of this shard, keys and values.
  int64_t BlockElems() const { return lc_->num_key_value_heads * 2 * kvstore::kBlockSize * lc_->head_dim; }
  size_t BlockBytes() const { return static_cast<size_t>(BlockElems()) * sizeof(uint16_t); }

  const ModelConfig* c_ = nullptr;
  const ModelConfig* lc_ = nullptr;
  std::vector<DeviceBuffer> kv_;
  std::unique_ptr<kvstore::BlockTableManager> tables_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<KvPlacement>> MakeResidentKv(const KvShape& shape, const CudaModelOptions& o) {
  auto kv = std::make_unique<ResidentKv>();
  SCOUT_RETURN_IF_ERROR(kv->Init(shape, o));
  return kv;
}

}  // namespace scout::runtime::cuda
