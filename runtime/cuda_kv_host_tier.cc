// The host KV tier: every sequence's KV in a host store (pinned, device-mapped), the GPU a cache
// of units (one layer, KV head and 16-token block each) filled by each step's prefetch. A step
// plans on the host which units its lists name that the cache lacks, moves them layer by layer
// on a copy stream (each layer's attention waits for its own), writes its new rows into cache
// units and flushes them to the store. Lists longer than a layer's share of the cache are
// attended in segments whose outputs are merged by their log-sum-exp.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include "absl/strings/cord.h"
#include "kernels/model_ops.cuh"
#include "kernels/sparse_decode.cuh"
#include "kvstore/block_cache.h"
#include "kvstore/copy_engine.cuh"
#include "kvstore/host_store.h"
#include "kvstore/prefetch_planner.h"
#include "runtime/cuda_buffers.h"
#include "runtime/cuda_kv_placement.h"

namespace scout::runtime::cuda {
namespace {

// 1 GiB chunks the host store keeps allocated ahead of the next free slab's, in a background
// thread, so a growing sequence does not wait for pinning (kvstore::HostStoreOptions).
constexpr int kHostChunksAhead = 2;

absl::Status CacheFull(std::string message) {
  absl::Status full = absl::ResourceExhaustedError(std::move(message));
  full.SetPayload(kGpuBlockCacheFullPayload, absl::Cord("1"));
  return full;
}

class HostTierKv final : public KvPlacement {
 public:
  ~HostTierKv() override {
    if (step_done_ != nullptr) cudaEventSynchronize(step_done_);
    copier_.reset();
    for (SegmentSlot& slot : segment_slots_) {
      if (slot.done != nullptr) cudaEventDestroy(slot.done);
    }
    for (cudaEvent_t e : {main_done_, step_done_, xfer_begin_, xfer_end_, fetch_done_}) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  }

  absl::Status Init(const KvShape& s, const CudaModelOptions& o);

  const kvstore::BlockTableManager& tables() const override { return store_->tables(); }
  absl::Status AddSequence(SequenceId seq) override { return store_->AddSession(seq); }
  absl::Status ReleaseSequence(SequenceId seq) override {
    if (store_->Find(seq) == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
    SCOUT_RETURN_IF_ERROR(FinishStep());  // its units may be pinned by the last step
    for (auto& cache : caches_) SCOUT_RETURN_IF_ERROR(cache->EraseSession(seq));
    return store_->ReleaseSession(seq);
  }
  // Cached units of dropped blocks stay: their rows past the end are never read, and a later
  // append rewrites the unit and flushes it whole.
  absl::Status TruncateSequence(SequenceId seq, int64_t n) override { return store_->Truncate(seq, n); }

  absl::Status Check(const StepDemands& d) override {
    if (d.capture) {
      return absl::UnimplementedError("steps of the host KV tier are planned on the host: they cannot be captured");
    }
    if (d.device_lists) {
      return absl::UnimplementedError(
          "the host KV tier plans its prefetch from host selections (SequenceInput::selection), not device ones");
    }
    if (d.block_mass) return absl::UnimplementedError("block mass (the draft's output) with the host KV tier");
    return FinishStep();
  }
  bool needs_host_lists() const override { return true; }
  bool graphs_allowed() const override { return false; }
  absl::Status TakeLists(std::span<const SequenceInput> batch, const BatchShape& shape, bool santa,
                         kvstore::Selection* lists, int* max_list) override;
  bool fills_slots() const override { return true; }
  size_t IndexInts(int64_t total_tokens) const override {
    return static_cast<size_t>(num_layers() * total_tokens * num_kv_heads());
  }
  absl::Status Prepare(std::span<const SequenceInput> batch, const BatchShape& shape, kvstore::Selection* lists,
                       int32_t* index) override;
  absl::Status BeginTransfers(cudaStream_t stream) override;
  absl::StatusOr<LayerKv> Layer(int layer, const int32_t* index, cudaStream_t stream) override {
    // This layer's units (and the partial blocks the new rows extend) must have arrived; later
    // layers' are still moving. Segments move their own.
    if (seg_blocks_ == 0) SCOUT_RETURN_IF_ERROR(copier_->WaitLayer(stream, layer));
    return LayerKv{.kv = pool_.as<uint16_t>(),
                   .unit_slots = index + static_cast<int64_t>(layer) * step_rows_ * num_kv_heads()};
  }
  absl::Status Attend(int layer, const kernels::SparseDecodeParams& ap, const AttendFn& attend,
                      cudaStream_t stream) override {
    return seg_blocks_ > 0 ? SegmentedAttention(layer, ap, attend, stream) : attend(ap);
  }
  absl::Status EndStep(cudaStream_t stream) override {
    // The new tokens' units back to the store once every layer has written them.
    SCOUT_RETURN_IF_CUDA(cudaEventRecord(main_done_, stream), "event");
    SCOUT_RETURN_IF_CUDA(cudaStreamWaitEvent(copier_->stream(), main_done_, 0), "flush wait");
    SCOUT_RETURN_IF_ERROR(copier_->Flush(plan_.append));
    SCOUT_RETURN_IF_CUDA(cudaEventRecord(step_done_, copier_->stream()), "event");
    return absl::OkStatus();
  }
  void Abort(std::span<const SequenceInput> batch, const BatchShape& shape, cudaStream_t stream) override {
    // Claimed slots may never be filled: wait for what did run, unpin, forget the batch's cached
    // units (the host store has their bytes) and give the reserved tokens back.
    cudaStreamSynchronize(stream);
    cudaStreamSynchronize(copier_->stream());
    for (auto& cache : caches_) cache->ReleaseStep(step_id_);
    for (SegmentSlot& slot : segment_slots_) ReleaseSegment(slot, /*wait=*/false).IgnoreError();
    step_pending_ = false;
    for (size_t i = 0; i < batch.size(); ++i) {
      for (auto& cache : caches_) cache->EraseSession(batch[i].seq).IgnoreError();
      store_->Truncate(batch[i].seq, shape.start[i]).IgnoreError();
    }
  }

  absl::Status ExportKv(SequenceId seq, int64_t first_block, int64_t num_blocks, std::byte* out,
                        cudaStream_t) override {
    SCOUT_RETURN_IF_ERROR(FinishStep());  // the last step's rows are flushed to the store
    const std::vector<int32_t>& slabs = store_->Find(seq)->blocks;
    const size_t slab = store_->layout().slab_bytes();
    for (int64_t b = first_block; b < first_block + num_blocks; ++b) {
      // A slab is [layer][kv_head][K|V][16][head_dim]: the export order of one block.
      std::memcpy(out, store_->unit(slabs[b], 0, 0), slab);
      out += slab;
    }
    return absl::OkStatus();
  }
  absl::Status ImportKv(SequenceId seq, int64_t num_tokens, const std::byte* data, cudaStream_t) override {
    SCOUT_RETURN_IF_ERROR(FinishStep());
    for (auto& cache : caches_) SCOUT_RETURN_IF_ERROR(cache->EraseSession(seq));
    SCOUT_RETURN_IF_ERROR(store_->Reserve(seq, num_tokens));
    if (data == nullptr) return absl::OkStatus();  // filled unit by unit later (WriteKvUnits)
    const size_t slab = store_->layout().slab_bytes();
    for (int32_t s : store_->Find(seq)->blocks) {
      std::memcpy(store_->unit(s, 0, 0), data, slab);
      data += slab;
    }
    return absl::OkStatus();
  }
  absl::Status WriteKvUnits(SequenceId seq, std::span<const KvUnitRef> units, const std::byte* data,
                            cudaStream_t) override {
    // Into the host store; a GPU copy of the unit, if the cache has one, is stale now.
    SCOUT_RETURN_IF_ERROR(FinishStep());
    const std::vector<int32_t>& slabs = store_->Find(seq)->blocks;
    for (size_t i = 0; i < units.size(); ++i) {
      const KvUnitRef& u = units[i];
      std::memcpy(store_->unit(slabs[u.block], u.layer, u.head), data + i * unit_bytes_, unit_bytes_);
      caches_[u.layer]->Invalidate({seq, u.layer, u.head, u.block}).IgnoreError();
    }
    return absl::OkStatus();
  }
  absl::Status WriteContext(SequenceId seq, int64_t num_tokens, const KvStretchWriter& write,
                            cudaStream_t stream) override {
    // The slabs are written in place (mapped host memory), and the cache forgets the sequence.
    const int64_t before = store_->Find(seq)->num_tokens;
    SCOUT_RETURN_IF_ERROR(FinishStep());
    for (auto& cache : caches_) SCOUT_RETURN_IF_ERROR(cache->EraseSession(seq));
    SCOUT_RETURN_IF_ERROR(store_->Reserve(seq, num_tokens));
    const std::vector<int32_t>& slabs = store_->Find(seq)->blocks;
    const int64_t slab_elems = static_cast<int64_t>(store_->layout().slab_bytes() / 2);
    for (size_t i = static_cast<size_t>(before / kvstore::kBlockSize); i < slabs.size(); ++i) {
      SCOUT_RETURN_IF_ERROR(
          write(reinterpret_cast<uint16_t*>(store_->unit(slabs[i], 0, 0)), slab_elems, slabs[i], stream));
    }
    SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(stream), "context write");
    return absl::OkStatus();
  }

  HostKvTierStats stats() const override {
    HostKvTierStats s = stats_;
    s.enabled = true;
    for (const auto& cache : caches_) {
      s.cache_units_used += cache->num_used();
      s.cache_units_total += cache->num_slots();
    }
    return s;
  }

 private:
  // Segmented attention: each segment's lists go through one of two slots, reused once the
  // attention of the segment before last has run; a slot's segment keeps its units pinned
  // (under its own pin id, in its layer's cache) until then.
  struct SegmentSlot {
    cudaEvent_t done = nullptr;  // the segment's attention and merge have run
    PinnedBuffer stage;
    DeviceBuffer index;  // [indptr | blocks | slots] of the segment
    uint64_t step = 0;   // its pins; 0: none held
    int layer = 0;
  };
  // Pin ids of segments: apart from the steps' own (step_id_).
  static constexpr uint64_t kSegmentStepBit = uint64_t{1} << 63;

  int num_layers() const { return static_cast<int>(lc_->num_hidden_layers); }
  int num_kv_heads() const { return static_cast<int>(lc_->num_key_value_heads); }

  // Waits for the last step (its flush included) and unpins its units.
  absl::Status FinishStep() {
    if (!step_pending_) return absl::OkStatus();
    SCOUT_RETURN_IF_CUDA(cudaEventSynchronize(step_done_), "host KV tier step");
    float ms = 0;
    if (cudaEventElapsedTime(&ms, xfer_begin_, xfer_end_) == cudaSuccess) stats_.prefetch_seconds += ms * 1e-3;
    for (auto& cache : caches_) cache->ReleaseStep(step_id_);
    for (SegmentSlot& slot : segment_slots_) SCOUT_RETURN_IF_ERROR(ReleaseSegment(slot));
    step_pending_ = false;
    return absl::OkStatus();
  }
  // Waits for the slot's segment and unpins its units (wait = false: the caller synchronised
  // the streams already, as the error path has; the pins go whatever the event says).
  absl::Status ReleaseSegment(SegmentSlot& slot, bool wait = true) {
    if (slot.step == 0) return absl::OkStatus();
    if (wait) SCOUT_RETURN_IF_CUDA(cudaEventSynchronize(slot.done), "segment wait");
    caches_[slot.layer]->ReleaseStep(slot.step);
    slot.step = 0;
    return absl::OkStatus();
  }
  // Blocks a segment may span so that, per layer, the units the new tokens write and two
  // segments fit the layer's share of the cache: 0 when every layer's lists fit at once.
  absl::StatusOr<int64_t> SegmentBlocks(std::span<const SequenceInput> batch, const BatchShape& shape,
                                        const std::vector<int32_t>& indptr) const;
  absl::Status SegmentedAttention(int layer, kernels::SparseDecodeParams ap, const AttendFn& attend,
                                  cudaStream_t stream);
  // Plans one layer of the step on its own cache (PlanStep runs the layers on several threads).
  struct LayerPlan {
    absl::Status status;
    std::vector<kvstore::Transfer> transfers, fetch, flush;
    int64_t hits = 0, misses = 0;
  };
  void PlanLayer(int l, std::span<const SequenceInput> batch, const BatchShape& shape,
                 const std::vector<int64_t>& first_row, kvstore::Selection& lists, int32_t* unit_slots,
                 LayerPlan* out);
  void UndoPlan(std::span<const SequenceInput> batch, const BatchShape& shape, const kvstore::Selection& lists);

  const ModelConfig* lc_ = nullptr;
  std::unique_ptr<kvstore::HostKvStore> store_;
  DeviceBuffer pool_;  // [units][2][16][head_dim] bf16
  size_t unit_bytes_ = 0;
  // One cache per layer over its own share of the pool (slots [layer * layer_units_, ...)), so
  // that the layers of a step are planned on several threads at once.
  std::vector<std::unique_ptr<kvstore::BlockCache>> caches_;
  int32_t layer_units_ = 0;
  std::unique_ptr<kvstore::CudaCopyEngine> copier_;  // after pool_: destroyed before it
  cudaEvent_t main_done_ = nullptr, step_done_ = nullptr, fetch_done_ = nullptr;
  cudaEvent_t xfer_begin_ = nullptr, xfer_end_ = nullptr;  // timing the step's transfers
  HostKvTierStats stats_;

  // The step in flight.
  uint64_t step_id_ = 0;
  bool step_pending_ = false;  // step_id_'s units are pinned until step_done_
  struct {
    kvstore::PrefetchPlan prefetch;
    kvstore::AppendPlan append;  // fetch and flush only
  } plan_;
  int64_t step_rows_ = 0;      // the step's new rows
  int64_t seg_blocks_ = 0;     // > 0: the step attends in segments of this many blocks
  kvstore::Selection seg_lists_;  // the lists the segments walk
  std::vector<SequenceId> seg_seqs_;
  SegmentSlot segment_slots_[2];
  int64_t segments_run_ = 0;  // over the placement's life: picks the slot and the pin id
  DeviceBuffer seg_out_, seg_lse_, seg_acc_, seg_acc_lse_;
};

absl::Status HostTierKv::Init(const KvShape& s, const CudaModelOptions& o) {
  lc_ = s.shard;
  const kvstore::KvLayout layout{.num_layers = num_layers(), .num_kv_heads = num_kv_heads(),
                                 .head_dim = static_cast<int>(lc_->head_dim), .elem_bytes = 2};
  unit_bytes_ = layout.unit_bytes();
  if (unit_bytes_ % 512 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("the host KV tier needs head_dim a multiple of 8, not ", lc_->head_dim));
  }
  const int64_t blocks = kvstore::BlocksFor(o.host_kv_tokens);
  if (blocks > INT32_MAX) return absl::InvalidArgumentError("host KV store of more than 2^31 blocks");
  absl::StatusOr<kvstore::HostAllocator> memory = kvstore::HostAllocatorNamed(o.host_kv_memory);
  if (!memory.ok()) return memory.status();
  absl::StatusOr<std::unique_ptr<kvstore::HostKvStore>> st =
      kvstore::HostKvStore::Create(layout, static_cast<int32_t>(blocks), *memory, {.chunks_ahead = kHostChunksAhead});
  if (!st.ok()) return st.status();
  store_ = std::move(*st);
  int64_t units = o.gpu_cache_units;
  if (units <= 0) {
    size_t free_bytes = 0, total_bytes = 0;
    SCOUT_RETURN_IF_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    units = static_cast<int64_t>(0.9 * static_cast<double>(free_bytes)) / static_cast<int64_t>(unit_bytes_) - 4096;
  }
  units -= units % layout.num_layers;
  if (units < layout.num_layers || units > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("GPU block cache of ", units, " units for ", layout.num_layers,
                                                   " layers"));
  }
  SCOUT_RETURN_IF_ERROR(pool_.Reserve(static_cast<size_t>(units) * unit_bytes_,
                                      absl::StrCat("GPU block cache of ", units, " units")));
  // Units are read past a sequence's end (weighted by zero): they must hold finite values.
  SCOUT_RETURN_IF_CUDA(cudaMemset(pool_.ptr, 0, pool_.bytes), "GPU block cache clear");
  layer_units_ = static_cast<int32_t>(units / layout.num_layers);
  for (int l = 0; l < layout.num_layers; ++l) {
    caches_.push_back(std::make_unique<kvstore::BlockCache>(layer_units_, layout.num_layers, layout.num_kv_heads));
  }
  absl::StatusOr<std::unique_ptr<kvstore::CudaCopyEngine>> e = kvstore::CudaCopyEngine::Create(
      static_cast<std::byte*>(pool_.ptr), unit_bytes_, layout.num_layers, static_cast<int>(units));
  if (!e.ok()) return e.status();
  copier_ = std::move(*e);
  copier_->set_signal(o.signalled_prefetch);
  for (cudaEvent_t* ev : {&main_done_, &step_done_, &fetch_done_, &segment_slots_[0].done, &segment_slots_[1].done}) {
    SCOUT_RETURN_IF_CUDA(cudaEventCreateWithFlags(ev, cudaEventDisableTiming), "event");
  }
  for (cudaEvent_t* ev : {&xfer_begin_, &xfer_end_}) SCOUT_RETURN_IF_CUDA(cudaEventCreate(ev), "event");
  return absl::OkStatus();
}

absl::Status HostTierKv::TakeLists(std::span<const SequenceInput> batch, const BatchShape& shape, bool santa,
                                   kvstore::Selection* lists, int* max_list) {
  // A layer's lists too long for its share of the GPU block cache (a prompt chunk deep into a
  // context longer than the GPU holds) are attended in segments; the step's own index arrays
  // then carry no lists.
  absl::StatusOr<int64_t> sb = SegmentBlocks(batch, shape, lists->indptr);
  if (!sb.ok()) return sb.status();
  seg_blocks_ = *sb;
  seg_seqs_.clear();
  if (seg_blocks_ == 0) return absl::OkStatus();
  if (santa) return absl::UnimplementedError("SANTA over lists longer than the GPU block cache holds at once");
  for (const SequenceInput& in : batch) seg_seqs_.push_back(in.seq);
  seg_lists_ = std::move(*lists);
  *lists = {.num_seqs = seg_lists_.num_seqs, .num_layers = seg_lists_.num_layers,
            .num_kv_heads = seg_lists_.num_kv_heads};
  lists->indptr.assign(seg_lists_.indptr.size(), 0);
  *max_list = static_cast<int>(seg_blocks_);
  const int64_t rows = shape.total_tokens * lc_->num_attention_heads;
  SCOUT_RETURN_IF_ERROR(seg_out_.Reserve(rows * lc_->head_dim * 2, "segment attention"));
  SCOUT_RETURN_IF_ERROR(seg_lse_.Reserve(rows * 4, "segment attention"));
  SCOUT_RETURN_IF_ERROR(seg_acc_.Reserve(rows * lc_->head_dim * 4, "segment attention"));
  SCOUT_RETURN_IF_ERROR(seg_acc_lse_.Reserve(rows * 4, "segment attention"));
  return absl::OkStatus();
}

absl::StatusOr<int64_t> HostTierKv::SegmentBlocks(std::span<const SequenceInput> batch, const BatchShape& shape,
                                                  const std::vector<int32_t>& indptr) const {
  const int64_t L = num_layers(), nkv = num_kv_heads();
  const int64_t B = static_cast<int64_t>(batch.size());
  int64_t most = 0;
  for (int64_t l = 0; l < L; ++l) {
    int64_t units = 0;
    for (int64_t i = 0; i < B; ++i) units += indptr[(i * L + l + 1) * nkv] - indptr[(i * L + l) * nkv];
    most = std::max(most, units);
  }
  if (most <= layer_units_) return 0;
  int64_t written = 0;  // units the new tokens write, pinned for the whole step
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
    written += nkv * (kvstore::BlocksFor(shape.start[i] + n) - shape.start[i] / kvstore::kBlockSize);
  }
  const int64_t seg = (layer_units_ - written) / (2 * B * nkv);
  if (seg < 1) {
    return CacheFull(absl::StrCat("the GPU block cache (", layer_units_, " units per layer) cannot hold this step's ",
                                  written, " new units and two segments of its lists (", 2 * B * nkv,
                                  " units a block of context); run fewer tokens a step"));
  }
  return seg;
}

void HostTierKv::PlanLayer(int l, std::span<const SequenceInput> batch, const BatchShape& shape,
                           const std::vector<int64_t>& first_row, kvstore::Selection& lists, int32_t* unit_slots,
                           LayerPlan* o) {
  const int nkv = num_kv_heads();
  const int64_t T = shape.total_tokens;
  const int32_t base = l * layer_units_;
  for (size_t i = 0; i < batch.size() && o->status.ok(); ++i) {
    const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
    absl::StatusOr<kvstore::AppendPlan> a =
        kvstore::PlanAppendLayers(batch[i].seq, shape.start[i], n, *store_, *caches_[l], step_id_, l, l + 1);
    if (!a.ok()) {
      o->status = a.status();
      return;
    }
    for (int64_t t = 0; t < n; ++t) {
      const int32_t b = static_cast<int32_t>((shape.start[i] + t) / kvstore::kBlockSize) - a->first_block;
      for (int head = 0; head < nkv; ++head) {
        unit_slots[(static_cast<size_t>(l) * T + first_row[i] + t) * nkv + head] =
            base + a->slots[static_cast<size_t>(head) * a->num_blocks + b];
      }
    }
    for (kvstore::Transfer x : a->fetch) o->fetch.push_back({x.src, base + x.slot});
    for (kvstore::Transfer x : a->flush) o->flush.push_back({x.src, base + x.slot});
    absl::StatusOr<kvstore::PrefetchPlan> p = kvstore::PlanPrefetchLayers(
        lists, static_cast<int>(i), batch[i].seq, *store_, *caches_[l], step_id_, l, l + 1);
    if (!p.ok()) {
      o->status = p.status();
      return;
    }
    const size_t entry0 = lists.indptr[lists.List(static_cast<int>(i), l, 0)];
    for (size_t k = 0; k < p->slots.size(); ++k) lists.slots[entry0 + k] = base + p->slots[k];
    for (kvstore::Transfer x : p->transfers) o->transfers.push_back({x.src, base + x.slot});
    o->hits += p->hits;
    o->misses += p->misses;
  }
}

void HostTierKv::UndoPlan(std::span<const SequenceInput> batch, const BatchShape& shape,
                          const kvstore::Selection& lists) {
  // Unpin, forget every unit the plans touched (a claimed slot holds nothing valid yet; dropping
  // hits too only costs a later miss), give the reserved tokens back.
  const int L = num_layers(), nkv = num_kv_heads();
  for (auto& cache : caches_) cache->ReleaseStep(step_id_);
  for (size_t i = 0; i < batch.size(); ++i) {
    const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
    const int32_t b0 = static_cast<int32_t>(shape.start[i] / kvstore::kBlockSize);
    const int32_t b1 = static_cast<int32_t>(kvstore::BlocksFor(shape.start[i] + n));
    for (int layer = 0; layer < L; ++layer) {
      for (int head = 0; head < nkv; ++head) {
        for (int32_t b = b0; b < b1; ++b) caches_[layer]->Invalidate({batch[i].seq, layer, head, b}).IgnoreError();
        const int list = lists.List(static_cast<int>(i), layer, head);
        for (int32_t k = lists.indptr[list]; k < lists.indptr[list + 1]; ++k) {
          caches_[layer]->Invalidate({batch[i].seq, layer, head, lists.blocks[k]}).IgnoreError();
        }
      }
    }
    store_->Truncate(batch[i].seq, shape.start[i]).IgnoreError();
  }
}

absl::Status HostTierKv::Prepare(std::span<const SequenceInput> batch, const BatchShape& shape,
                                 kvstore::Selection* lists, int32_t* index) {
  const auto t0 = std::chrono::steady_clock::now();
  const int L = num_layers();
  const size_t B = batch.size();
  ++step_id_;
  step_rows_ = shape.total_tokens;
  // The new tokens' room in the store first (serially: it may allocate host memory).
  for (size_t i = 0; i < B; ++i) {
    if (absl::Status st = store_->Reserve(batch[i].seq, shape.start[i] + static_cast<int64_t>(batch[i].tokens.size()));
        !st.ok()) {
      for (size_t j = 0; j < i; ++j) store_->Truncate(batch[j].seq, shape.start[j]).IgnoreError();
      return st;
    }
  }
  std::vector<int64_t> first_row(B + 1, 0);
  for (size_t i = 0; i < B; ++i) first_row[i + 1] = first_row[i] + static_cast<int64_t>(batch[i].tokens.size());
  lists->slots.assign(lists->blocks.size(), 0);
  int32_t* unit_slots = index;
  // Each layer on its own cache: planned on several threads, writing the slot arrays in place.
  std::vector<LayerPlan> out(L);
  auto plan = [&](int l) { PlanLayer(l, batch, shape, first_row, *lists, unit_slots, &out[l]); };
  const int threads = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, std::min(L, 16));
  if (threads == 1) {
    for (int l = 0; l < L; ++l) plan(l);
  } else {
    std::vector<std::thread> pool_threads;
    for (int t = 0; t < threads; ++t) {
      pool_threads.emplace_back([&, t] {
        for (int l = t; l < L; l += threads) plan(l);
      });
    }
    for (std::thread& th : pool_threads) th.join();
  }
  for (int l = 0; l < L; ++l) {
    if (out[l].status.ok()) continue;
    UndoPlan(batch, shape, *lists);
    const absl::Status& st = out[l].status;
    if (st.code() == absl::StatusCode::kResourceExhausted) {
      return CacheFull(absl::StrCat("the GPU block cache (", layer_units_, " units per layer) cannot hold this step's ",
                                    "lists of layer ", l, ": ", st.message()));
    }
    return st;
  }
  step_pending_ = true;  // pinned until the step is done
  plan_.prefetch = {};
  plan_.append = {};
  plan_.prefetch.layer_begin.assign(1, 0);
  for (int l = 0; l < L; ++l) {
    LayerPlan& o = out[l];
    plan_.prefetch.transfers.insert(plan_.prefetch.transfers.end(), o.transfers.begin(), o.transfers.end());
    plan_.prefetch.layer_begin.push_back(static_cast<int32_t>(plan_.prefetch.transfers.size()));
    plan_.append.fetch.insert(plan_.append.fetch.end(), o.fetch.begin(), o.fetch.end());
    plan_.append.flush.insert(plan_.append.flush.end(), o.flush.begin(), o.flush.end());
    stats_.bytes_prefetched += static_cast<int64_t>(o.fetch.size() * unit_bytes_);  // partial blocks appended to
    stats_.unit_hits += o.hits;
    stats_.unit_misses += o.misses;
    stats_.bytes_prefetched += o.misses * static_cast<int64_t>(unit_bytes_);
    stats_.bytes_flushed += static_cast<int64_t>(o.flush.size() * unit_bytes_);
  }
  ++stats_.steps;
  stats_.plan_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return absl::OkStatus();
}

absl::Status HostTierKv::BeginTransfers(cudaStream_t stream) {
  // The copy stream: partial blocks the new tokens extend, then every layer's misses.
  SCOUT_RETURN_IF_CUDA(cudaEventRecord(xfer_begin_, copier_->stream()), "event");
  SCOUT_RETURN_IF_ERROR(copier_->Fetch(plan_.append));
  if (seg_blocks_ > 0) {  // the segments move their own units; every layer waits for the fetch
    SCOUT_RETURN_IF_CUDA(cudaEventRecord(fetch_done_, copier_->stream()), "event");
    SCOUT_RETURN_IF_CUDA(cudaStreamWaitEvent(stream, fetch_done_, 0), "fetch wait");
  } else {
    SCOUT_RETURN_IF_ERROR(copier_->Upload(plan_.prefetch));
    SCOUT_RETURN_IF_ERROR(copier_->Launch(plan_.prefetch));
  }
  SCOUT_RETURN_IF_CUDA(cudaEventRecord(xfer_end_, copier_->stream()), "event");
  return absl::OkStatus();
}

absl::Status HostTierKv::SegmentedAttention(int layer, kernels::SparseDecodeParams ap, const AttendFn& attend,
                                            cudaStream_t stream) {
  const int L = num_layers(), nkv = num_kv_heads();
  const int nh = static_cast<int>(lc_->num_attention_heads), hd = static_cast<int>(lc_->head_dim);
  const int B = static_cast<int>(seg_seqs_.size());
  const kvstore::Selection& lists = seg_lists_;
  uint16_t* const out = ap.out;
  // Each (sequence, head) list of this layer is ascending: a cursor walks it segment by segment.
  std::vector<int32_t> cursor(static_cast<size_t>(B) * nkv);
  int32_t last_block = 0;
  for (int i = 0; i < B; ++i) {
    for (int h = 0; h < nkv; ++h) {
      const int list = lists.List(i, layer, h);
      cursor[i * nkv + h] = lists.indptr[list];
      if (lists.indptr[list + 1] > lists.indptr[list]) last_block = std::max(last_block, lists.blocks[lists.indptr[list + 1] - 1]);
    }
  }
  const int32_t base = layer * layer_units_;
  bool first = true;
  for (int64_t k = 0; k * seg_blocks_ <= last_block; ++k) {
    const int64_t end_block = (k + 1) * seg_blocks_;
    // This segment's lists: the batch's, this layer's only (the others empty).
    kvstore::Selection seg{.num_seqs = B, .num_layers = L, .num_kv_heads = nkv};
    seg.indptr.reserve(seg.num_lists() + 1);
    seg.indptr.push_back(0);
    for (int i = 0; i < B; ++i) {
      for (int l = 0; l < L; ++l) {
        for (int h = 0; h < nkv; ++h) {
          if (l == layer) {
            const int32_t list_end = lists.indptr[lists.List(i, layer, h) + 1];
            for (int32_t& c = cursor[i * nkv + h]; c < list_end && lists.blocks[c] < end_block; ++c) {
              seg.blocks.push_back(lists.blocks[c]);
            }
          }
          seg.indptr.push_back(static_cast<int32_t>(seg.blocks.size()));
        }
      }
    }
    if (seg.blocks.empty()) continue;
    // The slot of the segment before last: its attention must be done before its units go.
    SegmentSlot& slot = segment_slots_[segments_run_ % 2];
    SCOUT_RETURN_IF_ERROR(ReleaseSegment(slot));
    slot.step = kSegmentStepBit | static_cast<uint64_t>(++segments_run_);
    slot.layer = layer;
    kvstore::PrefetchPlan moves;
    moves.layer_begin.assign(L + 1, 0);
    seg.slots.resize(seg.blocks.size());
    for (int i = 0; i < B; ++i) {
      absl::StatusOr<kvstore::PrefetchPlan> p =
          kvstore::PlanPrefetchLayers(seg, i, seg_seqs_[i], *store_, *caches_[layer], slot.step, layer, layer + 1);
      if (!p.ok()) return p.status();
      const int32_t entry0 = seg.indptr[seg.List(i, layer, 0)];
      for (size_t x = 0; x < p->slots.size(); ++x) seg.slots[entry0 + x] = base + p->slots[x];
      for (kvstore::Transfer x : p->transfers) moves.transfers.push_back({x.src, base + x.slot});
      stats_.unit_hits += p->hits;
      stats_.unit_misses += p->misses;
      stats_.bytes_prefetched += p->misses * static_cast<int64_t>(unit_bytes_);
    }
    for (int l = layer + 1; l <= L; ++l) moves.layer_begin[l] = static_cast<int32_t>(moves.transfers.size());
    if (!moves.transfers.empty()) {
      SCOUT_RETURN_IF_ERROR(copier_->Upload(moves));
      SCOUT_RETURN_IF_ERROR(copier_->LaunchLayer(moves, layer));
      SCOUT_RETURN_IF_CUDA(cudaStreamWaitEvent(stream, copier_->layer_done(layer), 0), "segment wait");
    }
    // [indptr | blocks | slots] to the device, and the kernel's lists from their view there.
    const size_t n_indptr = seg.indptr.size(), n = seg.blocks.size(), total = n_indptr + 2 * n;
    SCOUT_RETURN_IF_ERROR(slot.stage.Reserve(total * 4));
    SCOUT_RETURN_IF_ERROR(slot.index.Reserve(total * 4, "segment lists"));
    int32_t* st = static_cast<int32_t*>(slot.stage.ptr);
    std::copy(seg.indptr.begin(), seg.indptr.end(), st);
    std::copy(seg.blocks.begin(), seg.blocks.end(), st + n_indptr);
    std::copy(seg.slots.begin(), seg.slots.end(), st + n_indptr + n);
    SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(slot.index.ptr, st, total * 4, cudaMemcpyHostToDevice, stream), "segment upload");
    const int32_t* di = slot.index.as<int32_t>();
    SetLists(ap, {.indptr = di, .blocks = di + n_indptr, .slots = di + n_indptr + n, .num_seqs = B, .num_layers = L,
                  .num_kv_heads = nkv},
             layer, 0);
    ap.out = seg_out_.as<uint16_t>();
    ap.lse = seg_lse_.as<float>();
    SCOUT_RETURN_IF_ERROR(attend(ap));
    // Every merge writes the bf16 rows: the last one's are the layer's output.
    SCOUT_RETURN_IF_CUDA(kernels::MergeAttention({.part = seg_out_.as<uint16_t>(), .part_lse = seg_lse_.as<float>(),
                                                  .acc = seg_acc_.as<float>(), .acc_lse = seg_acc_lse_.as<float>(),
                                                  .out = out, .rows = static_cast<int>(step_rows_ * nh),
                                                  .head_dim = hd, .first = first},
                                                 stream),
                         "segment merge");
    SCOUT_RETURN_IF_CUDA(cudaEventRecord(slot.done, stream), "event");
    first = false;
  }
  if (first) return absl::InternalError("segmented attention over empty lists");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvPlacement>> MakeHostTierKv(const KvShape& shape, const CudaModelOptions& o) {
  auto kv = std::make_unique<HostTierKv>();
  SCOUT_RETURN_IF_ERROR(kv->Init(shape, o));
  return kv;
}

}  // namespace scout::runtime::cuda
