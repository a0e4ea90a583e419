// Internal to the CUDA backend: where a model's KV lives, and what each step does to read and
// write it there. Two placements: the KV resident in a GPU pool (MakeResidentKv), and the host
// KV tier, whose store holds every sequence while the GPU keeps a cache of units that each step
// fills by prefetch (MakeHostTierKv). The step runner (cuda_model.cc) and the layer loop
// (cuda_layers.cc) see only this interface.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/sparse_decode.h"
#include "kvstore/block_table.h"
#include "kvstore/selection.h"
#include "runtime/backend.h"
#include "runtime/batch_check.h"
#include "runtime/cuda_model.h"
#include "runtime/model_config.h"

namespace scout::runtime::cuda {

// What a step asks beyond reading and writing its KV: placements refuse what they cannot do.
struct StepDemands {
  bool capture = false;       // recorded into a CUDA graph (CaptureForward)
  bool device_lists = false;  // DeviceStepOptions::selection: lists made on the GPU
  bool block_mass = false;    // the draft's attention mass written by the pass
};

// One layer's KV as the kernels address it.
struct LayerKv {
  uint16_t* kv = nullptr;                // the layer's pool (resident) or the unit cache (host tier)
  const int32_t* unit_slots = nullptr;   // host tier: [rows][kv heads] unit each new row goes to
};

// Layer `layer`'s lists of `v` (KV heads from head_offset: a tensor-parallel shard's) as an
// attention kernel's list parameters.
inline void SetLists(kernels::SparseDecodeParams& ap, const kvstore::SelectionView& v, int layer, int head_offset) {
  ap.sel_indptr = v.layer_indptr(layer, head_offset);
  ap.sel_blocks = v.blocks;
  ap.sel_slots = v.slots;
  ap.sel_seq_stride = v.seq_stride();
}

// Writes one stretch of a sequence's KV in place (bf16, device-accessible) for CudaModel::
// WriteContext; `key` is the same for the same stretch of the same sequence.
using KvStretchWriter = CudaModel::KvStretchWriter;

// The per-step calls, in order: Check; TakeLists (the runner built the step's host lists, when
// it has any); IndexInts; Prepare, which commits (tables grow, units are pinned) and comes after
// every other check; then on the model's stream BeginTransfers, per layer Layer and Attend,
// EndStep. Abort undoes a prepared step whose enqueueing failed. Not thread-safe: the model
// runs one step at a time.
class KvPlacement {
 public:
  virtual ~KvPlacement() = default;

  virtual const kvstore::BlockTableManager& tables() const = 0;
  virtual absl::Status AddSequence(SequenceId seq) = 0;
  virtual absl::Status ReleaseSequence(SequenceId seq) = 0;
  virtual absl::Status TruncateSequence(SequenceId seq, int64_t num_tokens) = 0;

  // Unimplemented for a demand this placement cannot meet. Waits for what the last step still
  // holds (the host tier's pinned units and flush).
  virtual absl::Status Check(const StepDemands& demands) = 0;
  // Every step attends over host lists (a dense input lists all its blocks).
  virtual bool needs_host_lists() const = 0;
  // Steps may be captured into CUDA graphs and replayed.
  virtual bool graphs_allowed() const = 0;
  // Last say over the step's host lists (this shard's heads) before they are staged: the host
  // tier takes lists too long for a layer's share of its cache, to attend them in segments (the
  // staged lists are then empty and *max_list a segment's blocks). `santa`: the step samples.
  virtual absl::Status TakeLists(std::span<const SequenceInput> batch, const BatchShape& shape, bool santa,
                                 kvstore::Selection* lists, int* max_list) = 0;
  // Prepare fills the lists' slots (the units of a cache the blocks are read from).
  virtual bool fills_slots() const = 0;
  // int32 entries this step adds to the staged index arrays.
  virtual size_t IndexInts(int64_t total_tokens) const = 0;
  // Commits the step: the sequences grow by their new tokens (the host tier: reserves them in
  // the store, pins every unit the step reads or writes, plans its transfers, fills
  // lists->slots) and its index entries are written at `index`. All or nothing.
  virtual absl::Status Prepare(std::span<const SequenceInput> batch, const BatchShape& shape,
                               kvstore::Selection* lists, int32_t* index) = 0;
  // On `stream`, before the first layer (the host tier starts its copies).
  virtual absl::Status BeginTransfers(cudaStream_t stream) = 0;
  // The layer's KV; `index` is the device copy of the entries Prepare wrote. Makes `stream`
  // wait for the layer's units where they are still moving.
  virtual absl::StatusOr<LayerKv> Layer(int layer, const int32_t* index, cudaStream_t stream) = 0;
  // Runs the layer's attention `ap` through `attend` (the kernel the runner chose), once, or
  // segment by segment with their outputs merged into ap.out.
  using AttendFn = std::function<absl::Status(const kernels::SparseDecodeParams&)>;
  virtual absl::Status Attend(int layer, const kernels::SparseDecodeParams& ap, const AttendFn& attend,
                              cudaStream_t stream) = 0;
  // After the last layer (the host tier flushes the new rows to the store).
  virtual absl::Status EndStep(cudaStream_t stream) = 0;
  // The prepared step failed to enqueue: waits for what ran, forgets what it claimed.
  virtual void Abort(std::span<const SequenceInput> batch, const BatchShape& shape, cudaStream_t stream) = 0;

  // ModelBackend's KV transfer, over this placement's memory (see CudaModel).
  virtual absl::Status ExportKv(SequenceId seq, int64_t first_block, int64_t num_blocks, std::byte* out,
                                cudaStream_t stream) = 0;
  virtual absl::Status ImportKv(SequenceId seq, int64_t num_tokens, const std::byte* data, cudaStream_t stream) = 0;
  virtual absl::Status WriteKvUnits(SequenceId seq, std::span<const KvUnitRef> units, const std::byte* data,
                                    cudaStream_t stream) = 0;
  // CudaModel::WriteContext.
  virtual absl::Status WriteContext(SequenceId seq, int64_t num_tokens, const KvStretchWriter& write,
                                    cudaStream_t stream) = 0;

  virtual HostKvTierStats stats() const = 0;
  // Blocks of the block tables' allocator in use (the resident pool, or the host store).
  ModelBackend::KvCacheUsage usage() const {
    const kvstore::BlockAllocator& a = tables().allocator();
    return {.used_blocks = a.capacity() - a.num_free(), .total_blocks = a.capacity()};
  }
};

// The shard's shape (heads and KV heads of this shard) and the model's, for the placements.
struct KvShape {
  const ModelConfig* model = nullptr;  // the whole model (positions, checks)
  const ModelConfig* shard = nullptr;  // this shard's heads
};

// Every layer's KV in a GPU pool of o.kv_budget_tokens (0: what 90% of the free memory holds,
// at most four sequences of max_position_embeddings).
absl::StatusOr<std::unique_ptr<KvPlacement>> MakeResidentKv(const KvShape& shape, const CudaModelOptions& o);
// The host KV tier of o.host_kv_tokens with a GPU cache of o.gpu_cache_units (CudaModelOptions).
absl::StatusOr<std::unique_ptr<KvPlacement>> MakeHostTierKv(const KvShape& shape, const CudaModelOptions& o);

}  // namespace scout::runtime::cuda
