#include "runtime/cuda_model.h"

#include <cstring>

#include <cublas_v2.h>
#ifdef SCOUT_HAVE_NCCL
#include <nccl.h>
#endif
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "kernels/bf16.h"
#include "kernels/model_ops.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/sampling.cuh"
#include "kernels/santa.cuh"
#include "kernels/sparse_decode.cuh"
#include "kvstore/block_cache.h"
#include "kvstore/copy_engine.cuh"
#include "kvstore/host_store.h"
#include "kvstore/prefetch_planner.h"
#include "runtime/batch_check.h"
#include "runtime/rope.h"

namespace scout::runtime {
namespace {

absl::Status CudaStatus(cudaError_t e, absl::string_view what) {
  if (e == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": GPU out of memory (", cudaGetErrorString(e), ")"));
  }
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice) {
    return absl::UnavailableError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
  }
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

#define SCOUT_RETURN_IF_CUDA(expr, what)                               \
  do {                                                                 \
    if (cudaError_t e_ = (expr); e_ != cudaSuccess) return CudaStatus(e_, what); \
  } while (0)

#define SCOUT_RETURN_IF_ERROR(expr)                \
  do {                                             \
    if (absl::Status s_ = (expr); !s_.ok()) return s_; \
  } while (0)

absl::Status BlasStatus(cublasStatus_t s, absl::string_view what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  if (s == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(absl::StrCat(what, ": cuBLAS out of memory"));
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(s)));
}

// Device memory that frees itself; grows on demand (contents are not kept).
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr); }
  absl::Status Reserve(size_t n, absl::string_view what) {
    if (n <= bytes) return absl::OkStatus();
    cudaFree(ptr);
    ptr = nullptr;
    bytes = 0;
    SCOUT_RETURN_IF_CUDA(cudaMalloc(&ptr, n), what);
    bytes = n;
    return absl::OkStatus();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

struct PinnedBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { cudaFreeHost(ptr); }
  absl::Status Reserve(size_t n) {
    if (n <= bytes) return absl::OkStatus();
    cudaFreeHost(ptr);
    ptr = nullptr;
    bytes = 0;
    SCOUT_RETURN_IF_CUDA(cudaHostAlloc(&ptr, n, cudaHostAllocDefault), "pinned staging buffer");
    bytes = n;
    return absl::OkStatus();
  }
};

struct LayerWeights {
  DeviceBuffer attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down;  // norms float32, matrices bf16
  DeviceBuffer bqkv, bo;  // float32 biases where the config has them (Qwen2: bqkv)
};

// Offsets (in int32 elements) of one step's index arrays inside the staging buffer.
struct StepLayout {
  size_t tokens = 0, positions = 0, phys = 0, q_indptr = 0, seq_lens = 0, block_table = 0, sel_indptr = 0,
         sel_blocks = 0, sel_slots = 0, unit_slots = 0, total = 0;
};

}  // namespace

struct CudaModel::Impl {
  ModelConfig c;   // the whole model's shape (what config() returns)
  ModelConfig lc;  // this shard's: heads, KV heads and MLP width divided by tp_size
  int tp_rank = 0, tp_size = 1;
#ifdef SCOUT_HAVE_NCCL
  ncclComm_t comm = nullptr;  // owned by the caller (TensorParallelModel)
#endif
  DeviceBuffer partial;  // tensor parallel: a projection's partial sum before the all-reduce
  float rope_scaling = 1.0f;  // RopeAttentionScaling (YaRN)
  int device = 0;
  int sms = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  DeviceBuffer blas_workspace;
  DeviceBuffer embed, lm_head, norm, inv_freq;
  std::vector<LayerWeights> layers;
  std::vector<DeviceBuffer> kv;  // per layer: [blocks][kv_heads][2][16][head_dim] bf16
  std::unique_ptr<kvstore::BlockTableManager> tables;  // GPU-resident KV (no host tier)
  size_t weight_bytes = 0;

  // The host KV tier: the store owns the block tables, the GPU holds a cache of units in `pool`.
  std::unique_ptr<kvstore::HostKvStore> store;
  // One cache per layer over its own share of the pool (slots [layer * layer_units, ...)), so
  // that the layers of a step are planned on several threads at once.
  std::vector<std::unique_ptr<kvstore::BlockCache>> caches;
  int32_t layer_units = 0;
  std::unique_ptr<kvstore::CudaCopyEngine> copier;
  DeviceBuffer pool;  // [units][2][16][head_dim] bf16
  size_t unit_bytes = 0;
  uint64_t step_id = 0;
  bool step_pending = false;  // step_id's units are pinned until step_done
  cudaEvent_t main_done = nullptr, step_done = nullptr;
  cudaEvent_t xfer_begin = nullptr, xfer_end = nullptr;  // timing the step's transfers
  HostKvTierStats tier_stats;

  // Segmented attention (a step whose lists of one layer do not fit that layer's share of the
  // cache): each segment's lists go through one of two slots, reused once the attention of the
  // segment before last has run; a slot's segment keeps its units pinned (under its own step id,
  // in its layer's cache) until then.
  struct SegmentSlot {
    cudaEvent_t done = nullptr;  // the segment's attention and merge have run
    PinnedBuffer stage;
    DeviceBuffer index;           // [indptr | blocks | slots] of the segment
    uint64_t step = 0;            // its pins; 0: none held
    int layer = 0;
  };
  SegmentSlot segment_slots[2];
  int64_t segments_run = 0;  // over the model's life: picks the slot and the pin id
  // Pin ids of segments: apart from the steps' own (step_id).
  static constexpr uint64_t kSegmentStepBit = uint64_t{1} << 63;
  DeviceBuffer seg_out, seg_acc, seg_acc_lse;
  cudaEvent_t fetch_done = nullptr;  // a segmented step's partial-block fetch has run
  // Waits for the slot's segment and unpins its units (wait = false: the caller has synchronised
  // the streams already, as the error path has; the pins go whatever the event says).
  absl::Status ReleaseSegment(SegmentSlot& slot, bool wait = true) {
    if (slot.step == 0) return absl::OkStatus();
    if (wait) SCOUT_RETURN_IF_CUDA(cudaEventSynchronize(slot.done), "segment wait");
    caches[slot.layer]->ReleaseStep(slot.step);
    slot.step = 0;
    return absl::OkStatus();
  }

  const kvstore::BlockTableManager& Tables() const { return store != nullptr ? store->tables() : *tables; }
  // Waits for the last tiered step (its flush included) and unpins its units.
  absl::Status FinishTieredStep() {
    if (!step_pending) return absl::OkStatus();
    SCOUT_RETURN_IF_CUDA(cudaEventSynchronize(step_done), "host KV tier step");
    float ms = 0;
    if (cudaEventElapsedTime(&ms, xfer_begin, xfer_end) == cudaSuccess) tier_stats.prefetch_seconds += ms * 1e-3;
    for (auto& cache : caches) cache->ReleaseStep(step_id);
    for (SegmentSlot& slot : segment_slots) SCOUT_RETURN_IF_ERROR(ReleaseSegment(slot));
    step_pending = false;
    return absl::OkStatus();
  }

  // Per-step buffers, grown before a step is enqueued (never during a capture).
  DeviceBuffer x, h, qkv, q, attn, gu, act, final_x, final_h, logits, lse, block_lse, attn_ws, mass, index;
  // The attention's in-kernel merge counters: zeroed when allocated, left zero by every launch
  // (kernels::SparseDecode), so steps and graph replays need no memset.
  DeviceBuffer merge_counters;
  DeviceBuffer sample_rows, sample_out;  // ForwardSampled's parameters and tokens
  int64_t last_sampled_rows = 0;         // logit rows of the last ForwardSampled (LastLogitRows)
  PinnedBuffer sample_stage;
  PinnedBuffer staging[2];
  cudaEvent_t staged[2] = {nullptr, nullptr};  // the upload of staging[i] has run
  int next_staging = 0;
  // A captured step owns its staging copy and index buffer, so later steps cannot disturb it;
  // it shares the activation buffers, so it is valid while they are not reallocated.
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    PinnedBuffer staging;
    DeviceBuffer index;
    uint64_t generation = 0;
  };
  std::vector<std::unique_ptr<Graph>> graphs;
  uint64_t generation = 0;  // bumped whenever a per-step buffer is reallocated
  // DeviceStepOptions::use_graph: one graph per step shape (everything a launch bakes in), the
  // least recently used dropped beyond kMaxStepGraphs. A replay refills the graph's own staging
  // once its last replay has run (`done`).
  struct StepGraph {
    std::string key;
    std::unique_ptr<Graph> graph;
    cudaEvent_t done = nullptr;
    uint64_t last_use = 0;
  };
  static constexpr size_t kMaxStepGraphs = 48;
  std::vector<StepGraph> step_graphs;
  uint64_t step_graph_clock = 0;
  int64_t step_graph_captures = 0, step_graph_replays = 0;

  // The step graph for `key`: found (*replay = true), or a new empty entry to capture into.
  absl::StatusOr<StepGraph*> StepGraphFor(const std::string& key, bool* replay) {
    ++step_graph_clock;
    for (StepGraph& g : step_graphs) {
      if (g.key == key && g.graph->exec != nullptr) {
        g.last_use = step_graph_clock;
        *replay = true;
        return &g;
      }
    }
    *replay = false;
    if (step_graphs.size() >= kMaxStepGraphs) {
      auto oldest = std::min_element(step_graphs.begin(), step_graphs.end(),
                                     [](const StepGraph& a, const StepGraph& b) { return a.last_use < b.last_use; });
      if (oldest->done != nullptr) {
        cudaEventSynchronize(oldest->done);
        cudaEventDestroy(oldest->done);
      }
      if (oldest->graph->exec != nullptr) cudaGraphExecDestroy(oldest->graph->exec);
      step_graphs.erase(oldest);
    }
    StepGraph g{.key = key, .graph = std::make_unique<Graph>(), .last_use = step_graph_clock};
    if (cudaError_t e = cudaEventCreateWithFlags(&g.done, cudaEventDisableTiming); e != cudaSuccess) {
      return CudaStatus(e, "step graph event");
    }
    step_graphs.push_back(std::move(g));
    return &step_graphs.back();
  }
  void DropStepGraph(StepGraph* g) {
    if (g->done != nullptr) cudaEventDestroy(g->done);
    if (g->graph->exec != nullptr) cudaGraphExecDestroy(g->graph->exec);
    step_graphs.erase(step_graphs.begin() + (g - step_graphs.data()));
  }

  ~Impl() {
    for (auto& g : graphs) {
      if (g->exec != nullptr) cudaGraphExecDestroy(g->exec);
    }
    for (StepGraph& g : step_graphs) {
      if (g.done != nullptr) cudaEventDestroy(g.done);
      if (g.graph->exec != nullptr) cudaGraphExecDestroy(g.graph->exec);
    }
    for (cudaEvent_t e : staged) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    if (step_done != nullptr) cudaEventSynchronize(step_done);
    copier.reset();
    for (SegmentSlot& slot : segment_slots) {
      if (slot.done != nullptr) cudaEventDestroy(slot.done);
    }
    for (cudaEvent_t e : {main_done, step_done, xfer_begin, xfer_end, fetch_done}) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    if (blas != nullptr) cublasDestroy(blas);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  absl::Status Init(const CudaModelOptions& o);
  absl::Status AllocWeights();
  absl::Status AllocKv(const CudaModelOptions& o);
  absl::Status AllocHostTier(const CudaModelOptions& o);
  // y[rows][out] (float32) = x[rows][in] (bf16) . w[out][in]^T (bf16) + beta * y
  absl::Status Gemm(const void* w, const void* x_bf16, float* y, int64_t rows, int64_t in, int64_t out, float beta);
  // x += in . w^T, summed over the tensor-parallel shards (each holds a slice of `in`'s columns).
  absl::Status ProjectAndReduce(const void* w, const void* in_bf16, int64_t rows, int64_t in, int64_t out);
  // One step of the host tier: the batch's transfers merged by layer, and the slot arrays the
  // kernels read.
  struct TierPlan {
    kvstore::PrefetchPlan prefetch;
    kvstore::AppendPlan append;          // fetch and flush only
    std::vector<int32_t> sel_slots;      // parallel to the step's sel_blocks
    std::vector<int32_t> unit_slots;     // [layers][rows][kv_heads]: where each new row is written
  };
  // Reserves the new tokens in the store, pins every unit the step reads or writes, and lists
  // the misses. All or nothing: on error nothing stays reserved or pinned.
  absl::Status PlanTieredStep(std::span<const SequenceInput> batch, const BatchShape& shape,
                              const std::vector<int32_t>& sel_indptr, const std::vector<int32_t>& sel_blocks,
                              TierPlan* tp);
  // Blocks a segment of the step's lists may span so that, per layer, the units its new tokens
  // write and two segments fit the layer's share of the cache: 0 when every layer's lists fit at
  // once (no segments needed). ResourceExhausted (kGpuBlockCacheFullPayload) when not even one
  // block a segment fits.
  absl::StatusOr<int64_t> SegmentBlocks(std::span<const SequenceInput> batch, const BatchShape& shape,
                                        const std::vector<int32_t>& sel_indptr) const;
  // Layer `layer`'s attention over the step's lists (indptr over [seqs][layers][kv heads], as the
  // step's sel arrays) in segments of seg_blocks logical blocks: each segment's units are
  // planned in the layer's cache, gathered on the copy stream while the segment before is
  // attended, attended into seg_out / lse and merged into seg_acc; the last merge writes `ap.out`.
  absl::Status SegmentedAttention(int layer, kernels::SparseDecodeParams ap, std::span<const SequenceInput> batch,
                                  const std::vector<int32_t>& indptr, const std::vector<int32_t>& blocks,
                                  int64_t seg_blocks, const kernels::SparseDecodePlan& plan);
  // capture: records the step into a new entry of graphs instead of running it.
  // host_selections: honour the inputs' host selections although the logits stay on the device
  // (ForwardSampled); Forward always does, EnqueueForward takes only device ones.
  absl::Status Enqueue(std::span<const SequenceInput> batch, const DeviceStepOptions& o, bool capture,
                       std::vector<float>* host_mass_out, std::vector<float>* host_logits, bool host_selections = false);
};

absl::Status CudaModel::Impl::Init(const CudaModelOptions& o) {
  device = o.device;
  tp_rank = o.tp_rank;
  tp_size = o.tp_size;
  if (tp_size < 1 || tp_rank < 0 || tp_rank >= tp_size) {
    return absl::InvalidArgumentError(absl::StrCat("tensor-parallel rank ", tp_rank, " of ", tp_size));
  }
  for (auto [n, what] : {std::pair{c.num_attention_heads, "num_attention_heads"},
                         std::pair{c.num_key_value_heads, "num_key_value_heads"},
                         std::pair{c.intermediate_size, "intermediate_size"}}) {
    if (n % tp_size != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor-parallel size ", tp_size, " does not divide ", what, " = ", n));
    }
  }
  lc = c;
  lc.num_attention_heads /= tp_size;
  lc.num_key_value_heads /= tp_size;
  lc.intermediate_size /= tp_size;
  if (tp_size > 1) {
#ifdef SCOUT_HAVE_NCCL
    if (o.nccl_comm == nullptr) return absl::InvalidArgumentError("tensor parallelism needs an NCCL communicator");
    comm = static_cast<ncclComm_t>(o.nccl_comm);
#else
    return absl::UnimplementedError("tensor parallelism needs a build with NCCL");
#endif
  }
  int count = 0;
  SCOUT_RETURN_IF_CUDA(cudaGetDeviceCount(&count), "CUDA device query");
  if (device < 0 || device >= count) {
    return absl::UnavailableError(absl::StrCat("CUDA device ", device, " requested, ", count, " present"));
  }
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(device), "cudaSetDevice");
  SCOUT_RETURN_IF_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  SCOUT_RETURN_IF_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  for (cudaEvent_t& e : staged) SCOUT_RETURN_IF_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event");
  SCOUT_RETURN_IF_ERROR(BlasStatus(cublasCreate(&blas), "cublasCreate"));
  SCOUT_RETURN_IF_ERROR(BlasStatus(cublasSetStream(blas, stream), "cublasSetStream"));
  // A fixed workspace keeps cuBLAS from allocating inside a graph capture.
  SCOUT_RETURN_IF_ERROR(blas_workspace.Reserve(size_t{32} << 20, "cuBLAS workspace"));
  SCOUT_RETURN_IF_ERROR(BlasStatus(cublasSetWorkspace(blas, blas_workspace.ptr, blas_workspace.bytes), "cublasSetWorkspace"));
  rope_scaling = RopeAttentionScaling(c.rope);
  std::vector<float> inv = RopeInvFreq(c.rope, c.head_dim);
  SCOUT_RETURN_IF_ERROR(inv_freq.Reserve(inv.size() * sizeof(float), "RoPE frequencies"));
  SCOUT_RETURN_IF_CUDA(cudaMemcpy(inv_freq.ptr, inv.data(), inv.size() * sizeof(float), cudaMemcpyHostToDevice), "upload");
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::AllocWeights() {
  const int64_t d = lc.hidden_size, hd = lc.head_dim, nh = lc.num_attention_heads, nkv = lc.num_key_value_heads;
  const int64_t inter = lc.intermediate_size, vocab = lc.vocab_size;
  const size_t b = sizeof(uint16_t);
  SCOUT_RETURN_IF_ERROR(embed.Reserve(vocab * d * b, "embedding"));
  if (!c.tie_word_embeddings) SCOUT_RETURN_IF_ERROR(lm_head.Reserve(vocab * d * b, "lm_head"));
  SCOUT_RETURN_IF_ERROR(norm.Reserve(d * sizeof(float), "final norm"));
  layers = std::vector<LayerWeights>(c.num_hidden_layers);
  for (LayerWeights& l : layers) {
    SCOUT_RETURN_IF_ERROR(l.attn_norm.Reserve(d * sizeof(float), "attention norm"));
    SCOUT_RETURN_IF_ERROR(l.wqkv.Reserve((nh + 2 * nkv) * hd * d * b, "qkv projection"));
    SCOUT_RETURN_IF_ERROR(l.wo.Reserve(d * nh * hd * b, "output projection"));
    SCOUT_RETURN_IF_ERROR(l.mlp_norm.Reserve(d * sizeof(float), "MLP norm"));
    SCOUT_RETURN_IF_ERROR(l.w_gate_up.Reserve(2 * inter * d * b, "gate/up projection"));
    SCOUT_RETURN_IF_ERROR(l.w_down.Reserve(d * inter * b, "down projection"));
    if (c.qkv_bias) SCOUT_RETURN_IF_ERROR(l.bqkv.Reserve((nh + 2 * nkv) * hd * sizeof(float), "qkv bias"));
    if (c.o_bias) SCOUT_RETURN_IF_ERROR(l.bo.Reserve(d * sizeof(float), "output bias"));
  }
  weight_bytes = (c.tie_word_embeddings ? 1 : 2) * vocab * d * b +
                 c.num_hidden_layers * ((nh + 2 * nkv) * hd * d + d * nh * hd + 3 * inter * d) * b;
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::AllocKv(const CudaModelOptions& o) {
  if (o.host_kv_tokens > 0) return AllocHostTier(o);
  const int64_t per_block = lc.num_key_value_heads * 2 * kvstore::kBlockSize * lc.head_dim * sizeof(uint16_t);
  int64_t tokens = o.kv_budget_tokens > 0 ? o.kv_budget_tokens : 4 * c.max_position_embeddings;
  int64_t blocks = kvstore::BlocksFor(tokens);
  if (o.kv_budget_tokens == 0) {
    // The default stays within 90% of what the GPU has free, as vLLM's gpu_memory_utilization.
    size_t free_bytes = 0, total_bytes = 0;
    SCOUT_RETURN_IF_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    const int64_t fit = static_cast<int64_t>(0.9 * static_cast<double>(free_bytes)) / (per_block * c.num_hidden_layers);
    blocks = std::max<int64_t>(1, std::min(blocks, fit - 64));
  }
  if (blocks > INT32_MAX) return absl::InvalidArgumentError("KV pool of more than 2^31 blocks");
  kv = std::vector<DeviceBuffer>(c.num_hidden_layers);
  for (DeviceBuffer& k : kv) {
    SCOUT_RETURN_IF_ERROR(k.Reserve(blocks * per_block, absl::StrCat("KV pool of ", blocks * kvstore::kBlockSize, " tokens")));
    // Slots past a sequence's end are read (weighted by zero): they must hold finite values.
    SCOUT_RETURN_IF_CUDA(cudaMemset(k.ptr, 0, k.bytes), "KV pool clear");
  }
  tables = std::make_unique<kvstore::BlockTableManager>(static_cast<int32_t>(blocks));
  return absl::OkStatus();
}

// 1 GiB chunks the host store keeps allocated ahead of the next free slab's, in a background
// thread, so a growing sequence does not wait for pinning (kvstore::HostStoreOptions).
constexpr int kHostChunksAhead = 2;

absl::Status CudaModel::Impl::AllocHostTier(const CudaModelOptions& o) {
  const kvstore::KvLayout layout{.num_layers = static_cast<int>(lc.num_hidden_layers),
                                 .num_kv_heads = static_cast<int>(lc.num_key_value_heads),
                                 .head_dim = static_cast<int>(lc.head_dim), .elem_bytes = 2};
  unit_bytes = layout.unit_bytes();
  if (unit_bytes % 512 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("the host KV tier needs head_dim a multiple of 8, not ", lc.head_dim));
  }
  const int64_t blocks = kvstore::BlocksFor(o.host_kv_tokens);
  if (blocks > INT32_MAX) return absl::InvalidArgumentError("host KV store of more than 2^31 blocks");
  absl::StatusOr<kvstore::HostAllocator> memory = kvstore::HostAllocatorNamed(o.host_kv_memory);
  if (!memory.ok()) return memory.status();
  absl::StatusOr<std::unique_ptr<kvstore::HostKvStore>> s =
      kvstore::HostKvStore::Create(layout, static_cast<int32_t>(blocks), *memory, {.chunks_ahead = kHostChunksAhead});
  if (!s.ok()) return s.status();
  store = std::move(*s);
  int64_t units = o.gpu_cache_units;
  if (units <= 0) {
    size_t free_bytes = 0, total_bytes = 0;
    SCOUT_RETURN_IF_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    units = static_cast<int64_t>(0.9 * static_cast<double>(free_bytes)) / static_cast<int64_t>(unit_bytes) - 4096;
  }
  units -= units % layout.num_layers;
  if (units < layout.num_layers || units > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("GPU block cache of ", units, " units for ", layout.num_layers,
                                                   " layers"));
  }
  SCOUT_RETURN_IF_ERROR(pool.Reserve(static_cast<size_t>(units) * unit_bytes,
                                     absl::StrCat("GPU block cache of ", units, " units")));
  // Units are read past a sequence's end (weighted by zero): they must hold finite values.
  SCOUT_RETURN_IF_CUDA(cudaMemset(pool.ptr, 0, pool.bytes), "GPU block cache clear");
  layer_units = static_cast<int32_t>(units / layout.num_layers);
  for (int l = 0; l < layout.num_layers; ++l) {
    caches.push_back(std::make_unique<kvstore::BlockCache>(layer_units, layout.num_layers, layout.num_kv_heads));
  }
  absl::StatusOr<std::unique_ptr<kvstore::CudaCopyEngine>> e = kvstore::CudaCopyEngine::Create(
      static_cast<std::byte*>(pool.ptr), unit_bytes, layout.num_layers, static_cast<int>(units));
  if (!e.ok()) return e.status();
  copier = std::move(*e);
  copier->set_signal(o.signalled_prefetch);
  for (cudaEvent_t* ev : {&main_done, &step_done, &fetch_done, &segment_slots[0].done, &segment_slots[1].done}) {
    SCOUT_RETURN_IF_CUDA(cudaEventCreateWithFlags(ev, cudaEventDisableTiming), "event");
  }
  for (cudaEvent_t* ev : {&xfer_begin, &xfer_end}) SCOUT_RETURN_IF_CUDA(cudaEventCreate(ev), "event");
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::Gemm(const void* w, const void* x_bf16, float* y, int64_t rows, int64_t in, int64_t out,
                                   float beta) {
  if (rows <= 2 && in % 8 == 0) {
    // Single-token decode steps: the weight streamed once. Measured on the H100 (8B target,
    // one row): 5.60 ms a step against cuBLAS's 6.17; at 5 and 8 rows cuBLAS was faster (6.23
    // vs 6.49, 6.24 vs 8.44 ms), as the GEMV re-reads x once per row.
    SCOUT_RETURN_IF_CUDA(kernels::Gemv({.w = static_cast<const uint16_t*>(w), .x = static_cast<const uint16_t*>(x_bf16),
                                        .y = y, .rows = static_cast<int>(rows), .in = static_cast<int>(in),
                                        .out = static_cast<int>(out), .beta = beta},
                                       stream),
                         "GEMV");
    return absl::OkStatus();
  }
  const float alpha = 1.0f;
  // Row-major y[rows][out] = x . w^T is column-major y^T[out][rows] = w^T(op T of [in][out]) . x^T.
  return BlasStatus(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(rows),
                                 static_cast<int>(in), &alpha, w, CUDA_R_16BF, static_cast<int>(in), x_bf16, CUDA_R_16BF,
                                 static_cast<int>(in), &beta, y, CUDA_R_32F, static_cast<int>(out), CUBLAS_COMPUTE_32F,
                                 CUBLAS_GEMM_DEFAULT),
                    "GEMM");
}

absl::Status CudaModel::Impl::ProjectAndReduce(const void* w, const void* in_bf16, int64_t rows, int64_t in,
                                               int64_t out) {
  if (tp_size == 1) return Gemm(w, in_bf16, x.as<float>(), rows, in, out, 1.0f);
#ifdef SCOUT_HAVE_NCCL
  SCOUT_RETURN_IF_ERROR(Gemm(w, in_bf16, partial.as<float>(), rows, in, out, 0.0f));
  if (ncclResult_t r = ncclAllReduce(partial.ptr, partial.ptr, rows * out, ncclFloat, ncclSum, comm, stream);
      r != ncclSuccess) {
    return absl::InternalError(absl::StrCat("NCCL all-reduce: ", ncclGetErrorString(r)));
  }
  const float one = 1.0f;
  return BlasStatus(cublasSaxpy(blas, static_cast<int>(rows * out), &one, partial.as<float>(), 1, x.as<float>(), 1),
                    "residual add");
#else
  return absl::UnimplementedError("tensor parallelism needs a build with NCCL");
#endif
}

absl::Status CudaModel::Impl::PlanTieredStep(std::span<const SequenceInput> batch, const BatchShape& shape,
                                             const std::vector<int32_t>& sel_indptr,
                                             const std::vector<int32_t>& sel_blocks, TierPlan* tp) {
  const auto t0 = std::chrono::steady_clock::now();
  const int L = static_cast<int>(lc.num_hidden_layers), nkv = static_cast<int>(lc.num_key_value_heads);
  const size_t B = batch.size();
  const int64_t T = shape.total_tokens;
  const uint64_t step = ++step_id;
  // The new tokens' room in the store first (serially: it may allocate host memory).
  for (size_t i = 0; i < B; ++i) {
    if (absl::Status st = store->Reserve(batch[i].seq, shape.start[i] + static_cast<int64_t>(batch[i].tokens.size()));
        !st.ok()) {
      for (size_t j = 0; j < i; ++j) store->Truncate(batch[j].seq, shape.start[j]).IgnoreError();
      return st;
    }
  }
  std::vector<kvstore::Selection> selections(B);
  std::vector<int64_t> first_row(B + 1, 0);
  for (size_t i = 0; i < B; ++i) {
    kvstore::Selection& sel = selections[i];
    sel.num_layers = L;
    sel.num_kv_heads = nkv;
    const int32_t base = sel_indptr[i * L * nkv];
    sel.indptr.reserve(static_cast<size_t>(L) * nkv + 1);
    for (int k = 0; k <= L * nkv; ++k) sel.indptr.push_back(sel_indptr[i * L * nkv + k] - base);
    sel.blocks.assign(sel_blocks.begin() + base, sel_blocks.begin() + base + sel.indptr.back());
    first_row[i + 1] = first_row[i] + static_cast<int64_t>(batch[i].tokens.size());
  }
  tp->sel_slots.assign(sel_blocks.size(), 0);
  tp->unit_slots.assign(static_cast<size_t>(L) * T * nkv, 0);
  // Each layer on its own cache: planned on several threads, writing the slot arrays in place.
  struct LayerOut {
    absl::Status status;
    std::vector<kvstore::Transfer> transfers, fetch, flush;
    int64_t hits = 0, misses = 0;
  };
  std::vector<LayerOut> out(L);
  auto plan_layer = [&](int l) {
    LayerOut& o = out[l];
    const int32_t base = l * layer_units;
    for (size_t i = 0; i < B && o.status.ok(); ++i) {
      const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
      absl::StatusOr<kvstore::AppendPlan> a =
          kvstore::PlanAppendLayers(batch[i].seq, shape.start[i], n, *store, *caches[l], step, l, l + 1);
      if (!a.ok()) {
        o.status = a.status();
        break;
      }
      for (int64_t t = 0; t < n; ++t) {
        const int32_t b = static_cast<int32_t>((shape.start[i] + t) / kvstore::kBlockSize) - a->first_block;
        for (int head = 0; head < nkv; ++head) {
          tp->unit_slots[(static_cast<size_t>(l) * T + first_row[i] + t) * nkv + head] =
              base + a->slots[static_cast<size_t>(head) * a->num_blocks + b];
        }
      }
      for (kvstore::Transfer x : a->fetch) o.fetch.push_back({x.src, base + x.slot});
      for (kvstore::Transfer x : a->flush) o.flush.push_back({x.src, base + x.slot});
      absl::StatusOr<kvstore::PrefetchPlan> p =
          kvstore::PlanPrefetchLayers(selections[i], batch[i].seq, *store, *caches[l], step, l, l + 1);
      if (!p.ok()) {
        o.status = p.status();
        break;
      }
      const size_t entry0 = sel_indptr[(i * L + l) * nkv];
      for (size_t k = 0; k < p->slots.size(); ++k) tp->sel_slots[entry0 + k] = base + p->slots[k];
      for (kvstore::Transfer x : p->transfers) o.transfers.push_back({x.src, base + x.slot});
      o.hits += p->hits;
      o.misses += p->misses;
    }
  };
  const int threads = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, std::min(L, 16));
  if (threads == 1) {
    for (int l = 0; l < L; ++l) plan_layer(l);
  } else {
    std::vector<std::thread> pool_threads;
    for (int t = 0; t < threads; ++t) {
      pool_threads.emplace_back([&, t] {
        for (int l = t; l < L; l += threads) plan_layer(l);
      });
    }
    for (std::thread& th : pool_threads) th.join();
  }
  for (int l = 0; l < L; ++l) {
    if (out[l].status.ok()) continue;
    // Undo: unpin, forget every unit the plans touched (a claimed slot holds nothing valid yet;
    // dropping hits too only costs a later miss), give the reserved tokens back.
    for (auto& cache : caches) cache->ReleaseStep(step);
    for (size_t i = 0; i < B; ++i) {
      const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
      const int32_t b0 = static_cast<int32_t>(shape.start[i] / kvstore::kBlockSize);
      const int32_t b1 = static_cast<int32_t>(kvstore::BlocksFor(shape.start[i] + n));
      const kvstore::Selection& sel = selections[i];
      for (int layer = 0; layer < L; ++layer) {
        for (int head = 0; head < nkv; ++head) {
          for (int32_t b = b0; b < b1; ++b) caches[layer]->Invalidate({batch[i].seq, layer, head, b}).IgnoreError();
          const int list = layer * nkv + head;
          for (int32_t k = sel.indptr[list]; k < sel.indptr[list + 1]; ++k) {
            caches[layer]->Invalidate({batch[i].seq, layer, head, sel.blocks[k]}).IgnoreError();
          }
        }
      }
      store->Truncate(batch[i].seq, shape.start[i]).IgnoreError();
    }
    const absl::Status& st = out[l].status;
    if (st.code() == absl::StatusCode::kResourceExhausted) {
      absl::Status full = absl::ResourceExhaustedError(absl::StrCat(
          "the GPU block cache (", layer_units, " units per layer) cannot hold this step's lists of layer ", l, ": ",
          st.message()));
      full.SetPayload(kGpuBlockCacheFullPayload, absl::Cord("1"));
      return full;
    }
    return st;
  }
  step_pending = true;  // pinned until the step is done
  tp->prefetch.layer_begin.assign(1, 0);
  for (int l = 0; l < L; ++l) {
    LayerOut& o = out[l];
    tp->prefetch.transfers.insert(tp->prefetch.transfers.end(), o.transfers.begin(), o.transfers.end());
    tp->prefetch.layer_begin.push_back(static_cast<int32_t>(tp->prefetch.transfers.size()));
    tp->append.fetch.insert(tp->append.fetch.end(), o.fetch.begin(), o.fetch.end());
    tp->append.flush.insert(tp->append.flush.end(), o.flush.begin(), o.flush.end());
    tier_stats.bytes_prefetched += static_cast<int64_t>(o.fetch.size() * unit_bytes);  // partial blocks appended to
    tier_stats.unit_hits += o.hits;
    tier_stats.unit_misses += o.misses;
    tier_stats.bytes_prefetched += o.misses * static_cast<int64_t>(unit_bytes);
    tier_stats.bytes_flushed += static_cast<int64_t>(o.flush.size() * unit_bytes);
  }
  ++tier_stats.steps;
  tier_stats.plan_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return absl::OkStatus();
}

absl::StatusOr<int64_t> CudaModel::Impl::SegmentBlocks(std::span<const SequenceInput> batch, const BatchShape& shape,
                                                       const std::vector<int32_t>& sel_indptr) const {
  const int64_t L = lc.num_hidden_layers, nkv = lc.num_key_value_heads;
  const int64_t B = static_cast<int64_t>(batch.size());
  int64_t most = 0;
  for (int64_t l = 0; l < L; ++l) {
    int64_t units = 0;
    for (int64_t i = 0; i < B; ++i) units += sel_indptr[(i * L + l + 1) * nkv] - sel_indptr[(i * L + l) * nkv];
    most = std::max(most, units);
  }
  if (most <= layer_units) return 0;
  int64_t written = 0;  // units the new tokens write, pinned for the whole step
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
    written += nkv * (kvstore::BlocksFor(shape.start[i] + n) - shape.start[i] / kvstore::kBlockSize);
  }
  const int64_t seg = (layer_units - written) / (2 * B * nkv);
  if (seg < 1) {
    absl::Status full = absl::ResourceExhaustedError(absl::StrCat(
        "the GPU block cache (", layer_units, " units per layer) cannot hold this step's ", written,
        " new units and two segments of its lists (", 2 * B * nkv, " units a block of context); run fewer tokens a step"));
    full.SetPayload(kGpuBlockCacheFullPayload, absl::Cord("1"));
    return full;
  }
  return seg;
}

absl::Status CudaModel::Impl::SegmentedAttention(int layer, kernels::SparseDecodeParams ap,
                                                 std::span<const SequenceInput> batch,
                                                 const std::vector<int32_t>& indptr,
                                                 const std::vector<int32_t>& blocks, int64_t seg_blocks,
                                                 const kernels::SparseDecodePlan& plan) {
  const int L = static_cast<int>(lc.num_hidden_layers), nkv = static_cast<int>(lc.num_key_value_heads);
  const int nh = static_cast<int>(lc.num_attention_heads), hd = static_cast<int>(lc.head_dim);
  const size_t B = batch.size();
  int64_t T = 0;
  for (const SequenceInput& in : batch) T += static_cast<int64_t>(in.tokens.size());
  uint16_t* const out = ap.out;
  // Each (sequence, head) list of this layer is ascending: a cursor walks it segment by segment.
  std::vector<int32_t> cursor(B * nkv);
  int32_t last_block = 0;
  for (size_t i = 0; i < B; ++i) {
    for (int h = 0; h < nkv; ++h) {
      const size_t list = (i * L + layer) * nkv + h;
      cursor[i * nkv + h] = indptr[list];
      if (indptr[list + 1] > indptr[list]) last_block = std::max(last_block, blocks[indptr[list + 1] - 1]);
    }
  }
  const int32_t base = layer * layer_units;
  bool first = true;
  for (int64_t k = 0; k * seg_blocks <= last_block; ++k) {
    const int64_t end_block = (k + 1) * seg_blocks;
    // This segment's lists: as the planner takes them (a Selection per sequence, this layer's
    // lists only) and as the kernel reads them ([sequence][head]).
    std::vector<kvstore::Selection> sel(B);
    std::vector<int32_t> seg_indptr = {0}, seg_list;
    for (size_t i = 0; i < B; ++i) {
      sel[i] = {.num_layers = L, .num_kv_heads = nkv};
      sel[i].indptr.assign(static_cast<size_t>(layer) * nkv + 1, 0);
      for (int h = 0; h < nkv; ++h) {
        const int32_t list_end = indptr[(i * L + layer) * nkv + h + 1];
        int32_t& c = cursor[i * nkv + h];
        for (; c < list_end && blocks[c] < end_block; ++c) {
          sel[i].blocks.push_back(blocks[c]);
          seg_list.push_back(blocks[c]);
        }
        sel[i].indptr.push_back(static_cast<int32_t>(sel[i].blocks.size()));
        seg_indptr.push_back(static_cast<int32_t>(seg_list.size()));
      }
      sel[i].indptr.resize(static_cast<size_t>(L) * nkv + 1, static_cast<int32_t>(sel[i].blocks.size()));
    }
    if (seg_list.empty()) continue;
    // The slot of the segment before last: its attention must be done before its units go.
    SegmentSlot& slot = segment_slots[segments_run % 2];
    SCOUT_RETURN_IF_ERROR(ReleaseSegment(slot));
    slot.step = kSegmentStepBit | static_cast<uint64_t>(++segments_run);
    slot.layer = layer;
    kvstore::PrefetchPlan moves;
    moves.layer_begin.assign(L + 1, 0);
    std::vector<int32_t> slots;
    slots.reserve(seg_list.size());
    for (size_t i = 0; i < B; ++i) {
      absl::StatusOr<kvstore::PrefetchPlan> p =
          kvstore::PlanPrefetchLayers(sel[i], batch[i].seq, *store, *caches[layer], slot.step, layer, layer + 1);
      if (!p.ok()) return p.status();
      for (int32_t x : p->slots) slots.push_back(base + x);
      for (kvstore::Transfer x : p->transfers) moves.transfers.push_back({x.src, base + x.slot});
      tier_stats.unit_hits += p->hits;
      tier_stats.unit_misses += p->misses;
      tier_stats.bytes_prefetched += p->misses * static_cast<int64_t>(unit_bytes);
    }
    for (int l = layer + 1; l <= L; ++l) moves.layer_begin[l] = static_cast<int32_t>(moves.transfers.size());
    if (!moves.transfers.empty()) {
      SCOUT_RETURN_IF_ERROR(copier->Upload(moves));
      SCOUT_RETURN_IF_ERROR(copier->LaunchLayer(moves, layer));
      SCOUT_RETURN_IF_CUDA(cudaStreamWaitEvent(stream, copier->layer_done(layer), 0), "segment wait");
    }
    const size_t n_indptr = seg_indptr.size(), n = seg_list.size(), total = n_indptr + 2 * n;
    SCOUT_RETURN_IF_ERROR(slot.stage.Reserve(total * 4));
    SCOUT_RETURN_IF_ERROR(slot.index.Reserve(total * 4, "segment lists"));
    int32_t* st = static_cast<int32_t*>(slot.stage.ptr);
    std::copy(seg_indptr.begin(), seg_indptr.end(), st);
    std::copy(seg_list.begin(), seg_list.end(), st + n_indptr);
    std::copy(slots.begin(), slots.end(), st + n_indptr + n);
    SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(slot.index.ptr, st, total * 4, cudaMemcpyHostToDevice, stream), "segment upload");
    const int32_t* di = slot.index.as<int32_t>();
    ap.sel_indptr = di;
    ap.sel_blocks = di + n_indptr;
    ap.sel_slots = di + n_indptr + n;
    ap.sel_seq_stride = nkv;
    ap.out = seg_out.as<uint16_t>();
    ap.lse = lse.as<float>();
    SCOUT_RETURN_IF_CUDA(kernels::SparseDecode(ap, plan, attn_ws.ptr, stream, merge_counters.as<unsigned int>()),
                         "segment attention");
    // Every merge writes the bf16 rows: the last one's are the layer's output.
    SCOUT_RETURN_IF_CUDA(kernels::MergeAttention({.part = seg_out.as<uint16_t>(), .part_lse = lse.as<float>(),
                                                  .acc = seg_acc.as<float>(), .acc_lse = seg_acc_lse.as<float>(),
                                                  .out = out, .rows = static_cast<int>(T * nh), .head_dim = hd,
                                                  .first = first},
                                                 stream),
                         "segment merge");
    SCOUT_RETURN_IF_CUDA(cudaEventRecord(slot.done, stream), "event");
    first = false;
  }
  if (first) return absl::InternalError("segmented attention over empty lists");
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::Enqueue(std::span<const SequenceInput> batch, const DeviceStepOptions& o, bool capture,
                                      std::vector<float>* host_mass_out, std::vector<float>* host_logits,
                                      bool host_selections) {
  // Shapes of this shard; selections name the whole model's KV heads (nkv_all), of which this
  // shard holds [kv0, kv0 + nkv).
  const int64_t d = lc.hidden_size, hd = lc.head_dim, nh = lc.num_attention_heads, nkv = lc.num_key_value_heads;
  const int64_t inter = lc.intermediate_size, vocab = lc.vocab_size, L = lc.num_hidden_layers;
  const int64_t nkv_all = c.num_key_value_heads, kv0 = tp_rank * nkv;
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(device), "cudaSetDevice");  // the calling thread may be new
  last_sampled_rows = 0;  // this pass overwrites the logits
  const bool tier = store != nullptr;
  if (tier) {
    if (capture) {
      return absl::UnimplementedError("steps of the host KV tier are planned on the host: they cannot be captured");
    }
    if (o.selection != nullptr) {
      return absl::UnimplementedError(
          "the host KV tier plans its prefetch from host selections (SequenceInput::selection), not device ones");
    }
    if (o.block_mass != nullptr || (host_mass_out != nullptr && std::any_of(batch.begin(), batch.end(), [](const SequenceInput& in) {
                                      return in.block_mass != nullptr;
                                    }))) {
      return absl::UnimplementedError("block mass (the draft's output) with the host KV tier");
    }
    SCOUT_RETURN_IF_ERROR(FinishTieredStep());
  }
  absl::StatusOr<BatchShape> shape = CheckBatch(c, Tables(), batch);
  if (!shape.ok()) return shape.status();
  bool host_selection = tier, host_mass = false;
  for (const SequenceInput& in : batch) {
    if (in.quest_budget != nullptr) {
      return absl::UnimplementedError("Quest-style selection runs on the CPU backend only");
    }
    host_selection |= in.selection != nullptr && o.selection == nullptr && (host_logits != nullptr || host_selections);
    host_mass |= in.block_mass != nullptr && host_mass_out != nullptr;
  }
  if (host_mass && host_selection) {
    return absl::InvalidArgumentError("block_mass on the GPU needs a dense pass (no selection in the batch)");
  }
  if ((o.block_mass != nullptr || host_mass) && tp_size > 1) {
    return absl::UnimplementedError("block mass of a tensor-parallel model (the draft's job) is not supported");
  }
  if ((o.block_mass != nullptr || host_mass) && o.santa_samples > 0) {
    return absl::InvalidArgumentError("block mass needs exact attention (no SANTA sampling in the same pass)");
  }
  if (o.santa_samples < 0) return absl::InvalidArgumentError("santa_samples must be >= 0");
  const int B = static_cast<int>(batch.size());
  const int64_t T = shape->total_tokens, R = shape->logit_rows;
  int max_q = 0, max_nb = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    max_q = std::max(max_q, static_cast<int>(batch[i].tokens.size()));
    max_nb = std::max(max_nb, static_cast<int>(kvstore::BlocksFor(shape->start[i] + batch[i].tokens.size())));
  }
  // A step graph bakes in the block table's width and the attention plan: both are sized for a
  // few blocks more than the step needs (entries past a sequence's blocks are masked by its
  // length), so that consecutive steps share a graph.
  const bool graphed = o.use_graph && !capture && !tier && o.santa_samples == 0 && host_logits == nullptr &&
                       host_mass_out == nullptr && !host_selections &&
                       std::none_of(batch.begin(), batch.end(), [](const SequenceInput& in) { return in.selection != nullptr; });
  constexpr int kGraphBlockQuantum = 16;
  auto quantize = [&](int n) { return graphed ? (n + kGraphBlockQuantum - 1) / kGraphBlockQuantum * kGraphBlockQuantum : n; };
  max_nb = quantize(max_nb);

  // Host index arrays: built in the staging buffer, uploaded with one copy.
  std::vector<int32_t> sel_indptr, sel_blocks;
  int max_list = max_nb;
  if (host_selection) {
    max_list = 0;
    sel_indptr.push_back(0);
    for (size_t i = 0; i < batch.size(); ++i) {
      const SequenceInput& in = batch[i];
      const int64_t n = static_cast<int64_t>(in.tokens.size());
      for (int64_t layer = 0; layer < L; ++layer) {
        if (in.selection != nullptr) {
          ListsWithNewBlocks(in.selection->indptr.data() + layer * nkv_all + kv0, in.selection->blocks.data(), nkv,
                             shape->start[i], n, &sel_indptr, &sel_blocks);
        } else {  // dense member of a sparse batch: every block
          const int32_t nb = static_cast<int32_t>(kvstore::BlocksFor(shape->start[i] + n));
          for (int64_t kh = 0; kh < nkv; ++kh) {
            for (int32_t b = 0; b < nb; ++b) sel_blocks.push_back(b);
            sel_indptr.push_back(static_cast<int32_t>(sel_blocks.size()));
          }
        }
      }
    }
    for (size_t k = 0; k + 1 < sel_indptr.size(); ++k) max_list = std::max(max_list, sel_indptr[k + 1] - sel_indptr[k]);
  }
  if (o.selection != nullptr) max_list = quantize(o.selection->max_list_blocks);
  // The host tier past its cache: a layer's lists too long for its share of the GPU block cache
  // (a prompt chunk deep into a context longer than the GPU holds) are attended in segments;
  // the step's own index arrays then carry no lists.
  int64_t seg_blocks = 0;
  std::vector<int32_t> seg_indptr, seg_list;
  if (tier) {
    absl::StatusOr<int64_t> sb = SegmentBlocks(batch, *shape, sel_indptr);
    if (!sb.ok()) return sb.status();
    seg_blocks = *sb;
    if (seg_blocks > 0) {
      if (o.santa_samples > 0) {
        return absl::UnimplementedError("SANTA over lists longer than the GPU block cache holds at once");
      }
      seg_indptr = std::move(sel_indptr);
      seg_list = std::move(sel_blocks);
      sel_indptr.assign(seg_indptr.size(), 0);
      sel_blocks.clear();
      max_list = static_cast<int>(seg_blocks);
    }
  }
  const int table_nb = std::max(max_nb, o.selection != nullptr ? quantize(o.selection->block_bound) : 0);

  StepLayout lay;
  lay.tokens = 0;
  lay.positions = lay.tokens + T;
  lay.phys = lay.positions + T;
  lay.q_indptr = lay.phys + T;
  lay.seq_lens = lay.q_indptr + B + 1;
  lay.block_table = lay.seq_lens + B;
  lay.sel_indptr = lay.block_table + static_cast<size_t>(B) * table_nb;
  lay.sel_blocks = lay.sel_indptr + sel_indptr.size();
  lay.sel_slots = lay.sel_blocks + sel_blocks.size();
  lay.unit_slots = lay.sel_slots + (tier ? sel_blocks.size() : 0);
  lay.total = lay.unit_slots + (tier ? static_cast<size_t>(L * T * nkv) : 0);

  // Buffers, sized before anything is enqueued (cudaMalloc must not run inside a capture).
  const int rows_per_cta = kernels::SparseDecodeRowsPerCta(static_cast<int>(nh), static_cast<int>(nkv), max_q);
  kernels::SparseDecodePlan plan = kernels::PlanSparseDecode(
      B, static_cast<int>(nh), static_cast<int>(nkv), max_q, max_list, static_cast<int>(T), static_cast<int>(hd), sms,
      kernels::SparseDecodeCtasPerSm(static_cast<int>(hd), rows_per_cta), 0, rows_per_cta);
  // Prompt chunks: the tiled prefill kernel where its tiles fill the GPU (dense layers only; the
  // per-layer check below keeps selections, unit pools and fused block mass on the decode kernel).
  const bool use_prefill_kernel =
      o.santa_samples == 0 && kernels::PrefillAttentionPays(static_cast<int>(nh), static_cast<int>(nkv),
                                                            static_cast<int>(T), max_q, sms);
  kernels::SantaPlan santa_plan;
  size_t ws_bytes = plan.workspace_bytes;
  if (o.santa_samples > 0) {
    santa_plan = kernels::PlanSanta(B, static_cast<int>(nh), static_cast<int>(nkv), max_q, max_list, static_cast<int>(T),
                                    static_cast<int>(hd), sms, kernels::SparseDecodeCtasPerSm(static_cast<int>(hd), 16));
    ws_bytes = santa_plan.workspace_bytes;
  }
  const int64_t mass_t = max_q, mass_per_layer = nh * mass_t * max_nb;
  const std::vector<const DeviceBuffer*> per_step = {&x, &h, &qkv, &q, &attn, &gu, &act, &final_x, &final_h,
                                                     &logits, &lse, &block_lse, &attn_ws, &mass, &partial,
                                                     &merge_counters};
  std::vector<void*> before;
  for (const DeviceBuffer* b : per_step) before.push_back(b->ptr);
  SCOUT_RETURN_IF_ERROR(x.Reserve(T * d * 4, "activations"));
  if (tp_size > 1) SCOUT_RETURN_IF_ERROR(partial.Reserve(T * d * 4, "activations"));
  SCOUT_RETURN_IF_ERROR(h.Reserve(T * std::max(d, nh * hd) * 2, "activations"));
  SCOUT_RETURN_IF_ERROR(qkv.Reserve(T * (nh + 2 * nkv) * hd * 4, "activations"));
  SCOUT_RETURN_IF_ERROR(q.Reserve(T * nh * hd * 2, "activations"));
  SCOUT_RETURN_IF_ERROR(attn.Reserve(T * nh * hd * 2, "activations"));
  SCOUT_RETURN_IF_ERROR(gu.Reserve(T * 2 * inter * 4, "activations"));
  SCOUT_RETURN_IF_ERROR(act.Reserve(T * inter * 2, "activations"));
  SCOUT_RETURN_IF_ERROR(final_x.Reserve(R * d * 4, "activations"));
  SCOUT_RETURN_IF_ERROR(final_h.Reserve(R * d * 2, "activations"));
  SCOUT_RETURN_IF_ERROR(logits.Reserve(R * vocab * 4, "logits"));
  SCOUT_RETURN_IF_ERROR(lse.Reserve(T * nh * 4, "log-sum-exp"));
  const bool fused_mass = (host_mass || o.block_mass != nullptr) && plan.rows_per_cta == 16;
  if (fused_mass) SCOUT_RETURN_IF_ERROR(block_lse.Reserve(T * nh * table_nb * 4, "block log-sum-exp"));
  SCOUT_RETURN_IF_ERROR(attn_ws.Reserve(std::max<size_t>(ws_bytes, 16), "attention workspace"));
  if (const size_t n = sizeof(unsigned int) * std::max(plan.num_counters, 1); n > merge_counters.bytes) {
    SCOUT_RETURN_IF_ERROR(merge_counters.Reserve(n, "attention merge counters"));
    // On the model's stream (non-blocking: it does not wait for the legacy default stream).
    SCOUT_RETURN_IF_CUDA(cudaMemsetAsync(merge_counters.ptr, 0, n, stream), "attention merge counters");
  }
  if (host_mass) SCOUT_RETURN_IF_ERROR(mass.Reserve(B * L * mass_per_layer * 4, "block mass"));
  if (seg_blocks > 0) {
    SCOUT_RETURN_IF_ERROR(seg_out.Reserve(T * nh * hd * 2, "segment attention"));
    SCOUT_RETURN_IF_ERROR(seg_acc.Reserve(T * nh * hd * 4, "segment attention"));
    SCOUT_RETURN_IF_ERROR(seg_acc_lse.Reserve(T * nh * 4, "segment attention"));
  }
  for (size_t i = 0; i < per_step.size(); ++i) {
    if (per_step[i]->ptr != before[i]) ++generation;
  }
  PinnedBuffer* stage;
  DeviceBuffer* idx;
  cudaEvent_t staged_event = nullptr;
  Graph* graph = nullptr;
  StepGraph* step_graph = nullptr;
  bool replay = false;
  if (graphed) {
    // Everything the launches bake in: shapes, the plan's inputs, buffer generation, pointers.
    std::string key = absl::StrCat(generation, "|", B, "|", T, "|", R, "|", table_nb, "|", max_list, "|", max_nb, "|",
                                   lay.total, "|", fused_mass, "|", o.skip_attention, "|",
                                   reinterpret_cast<uintptr_t>(o.argmax), "|", reinterpret_cast<uintptr_t>(o.device_tokens));
    for (const SequenceInput& in : batch) absl::StrAppend(&key, "|", in.tokens.size(), in.all_logits ? "a" : "l");
    if (o.selection != nullptr) {
      absl::StrAppend(&key, "|s", reinterpret_cast<uintptr_t>(o.selection->indptr), ",",
                      reinterpret_cast<uintptr_t>(o.selection->blocks));
    }
    if (o.block_mass != nullptr) {
      const DeviceBlockMass& m = *o.block_mass;
      absl::StrAppend(&key, "|m", reinterpret_cast<uintptr_t>(m.mass), ",", m.seq_stride, ",", m.token_stride, ",",
                      m.head_stride, ",", m.layer_stride, ",", m.layer_head_offset);
    }
    absl::StatusOr<StepGraph*> sg = StepGraphFor(key, &replay);
    if (!sg.ok()) return sg.status();
    step_graph = *sg;
    // Its staging is rewritten below: the upload of its last replay must have run.
    if (replay) SCOUT_RETURN_IF_CUDA(cudaEventSynchronize(step_graph->done), "step graph wait");
    graph = step_graph->graph.get();
    stage = &graph->staging;
    idx = &graph->index;
  } else if (capture) {
    graphs.push_back(std::make_unique<Graph>());
    graph = graphs.back().get();
    stage = &graph->staging;
    idx = &graph->index;
  } else {
    // The upload of the buffer used two steps ago must have run before it is overwritten.
    const int k = next_staging;
    next_staging ^= 1;
    SCOUT_RETURN_IF_CUDA(cudaEventSynchronize(staged[k]), "staging wait");
    stage = &staging[k];
    idx = &index;
    staged_event = staged[k];
  }
  SCOUT_RETURN_IF_ERROR(stage->Reserve(std::max<size_t>(lay.total, 1) * 4));
  SCOUT_RETURN_IF_ERROR(idx->Reserve(std::max<size_t>(lay.total, 1) * 4, "index arrays"));

  // All checks passed: the tables grow now (the host tier: plans the step's transfers, which
  // grows them), and the step is filled in.
  TierPlan tp;
  if (tier) {
    SCOUT_RETURN_IF_ERROR(PlanTieredStep(batch, *shape, sel_indptr, sel_blocks, &tp));
  } else {
    SCOUT_RETURN_IF_ERROR(GrowForBatch(*tables, batch, *shape));
  }
  int32_t* st = static_cast<int32_t*>(stage->ptr);
  {
    int64_t row = 0;
    st[lay.q_indptr] = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      const SequenceInput& in = batch[i];
      const std::vector<int32_t>& blocks = Tables().Find(in.seq)->blocks;
      const int64_t n = static_cast<int64_t>(in.tokens.size());
      for (int64_t t = 0; t < n; ++t, ++row) {
        const int64_t pos = shape->start[i] + t;
        st[lay.tokens + row] = in.tokens[t];
        st[lay.positions + row] = static_cast<int32_t>(pos);
        st[lay.phys + row] = blocks[pos / kvstore::kBlockSize];
      }
      st[lay.q_indptr + i + 1] = static_cast<int32_t>(row);
      st[lay.seq_lens + i] = static_cast<int32_t>(shape->start[i] + n);
      for (int b = 0; b < table_nb; ++b) {
        st[lay.block_table + i * table_nb + b] = b < static_cast<int>(blocks.size()) ? blocks[b] : 0;
      }
    }
    std::copy(sel_indptr.begin(), sel_indptr.end(), st + lay.sel_indptr);
    std::copy(sel_blocks.begin(), sel_blocks.end(), st + lay.sel_blocks);
    std::copy(tp.sel_slots.begin(), tp.sel_slots.end(), st + lay.sel_slots);
    std::copy(tp.unit_slots.begin(), tp.unit_slots.end(), st + lay.unit_slots);
  }

  if (replay) {
    ++step_graph_replays;
    SCOUT_RETURN_IF_CUDA(cudaGraphLaunch(graph->exec, stream), "step graph launch");
    SCOUT_RETURN_IF_CUDA(cudaEventRecord(step_graph->done, stream), "event");
    return absl::OkStatus();
  }
  const bool recording = capture || graphed;
  if (recording) {
    SCOUT_RETURN_IF_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "graph capture");
  }
  // From here on errors must end the capture; the lambda enqueues, the caller closes.
  auto enqueue = [&]() -> absl::Status {
    SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(idx->ptr, stage->ptr, lay.total * 4, cudaMemcpyHostToDevice, stream), "upload");
    if (staged_event != nullptr) SCOUT_RETURN_IF_CUDA(cudaEventRecord(staged_event, stream), "event");
    const int32_t* di = idx->as<int32_t>();
    const int32_t* tokens = o.device_tokens != nullptr ? o.device_tokens : di + lay.tokens;
    SCOUT_RETURN_IF_CUDA(kernels::Embed({.table = embed.as<uint16_t>(), .tokens = tokens, .out = x.as<float>(),
                                         .rows = static_cast<int>(T), .dim = static_cast<int>(d)},
                                        stream),
                         "embedding");
    const float eps = static_cast<float>(c.rms_norm_eps);
    if (tier) {  // the copy stream: partial blocks the new tokens extend, then every layer's misses
      SCOUT_RETURN_IF_CUDA(cudaEventRecord(xfer_begin, copier->stream()), "event");
      SCOUT_RETURN_IF_ERROR(copier->Fetch(tp.append));
      if (seg_blocks > 0) {  // the segments move their own units; every layer waits for the fetch
        SCOUT_RETURN_IF_CUDA(cudaEventRecord(fetch_done, copier->stream()), "event");
        SCOUT_RETURN_IF_CUDA(cudaStreamWaitEvent(stream, fetch_done, 0), "fetch wait");
      } else {
        SCOUT_RETURN_IF_ERROR(copier->Upload(tp.prefetch));
        SCOUT_RETURN_IF_ERROR(copier->Launch(tp.prefetch));
      }
      SCOUT_RETURN_IF_CUDA(cudaEventRecord(xfer_end, copier->stream()), "event");
    }
    uint16_t* const pool_kv = pool.as<uint16_t>();
    for (int64_t layer = 0; layer < L; ++layer) {
      const LayerWeights& w = layers[layer];
      SCOUT_RETURN_IF_CUDA(kernels::RmsNorm({.x = x.as<float>(), .weight = w.attn_norm.as<float>(), .out = h.as<uint16_t>(),
                                             .rows = static_cast<int>(T), .dim = static_cast<int>(d), .eps = eps},
                                            stream),
                           "RMSNorm");
      SCOUT_RETURN_IF_ERROR(Gemm(w.wqkv.ptr, h.ptr, qkv.as<float>(), T, d, (nh + 2 * nkv) * hd, 0.0f));
      // The host tier: this layer's units (and the partial blocks the new rows extend) must have
      // arrived; later layers' are still moving.
      if (tier && seg_blocks == 0) SCOUT_RETURN_IF_ERROR(copier->WaitLayer(stream, static_cast<int>(layer)));
      uint16_t* const layer_kv = tier ? pool_kv : kv[layer].as<uint16_t>();
      SCOUT_RETURN_IF_CUDA(kernels::RopeAppend({.qkv = qkv.as<float>(), .positions = di + lay.positions,
                                                .phys_blocks = di + lay.phys, .inv_freq = inv_freq.as<float>(),
                                                .q = q.as<uint16_t>(), .kv = layer_kv,
                                                .rows = static_cast<int>(T), .num_heads = static_cast<int>(nh),
                                                .num_kv_heads = static_cast<int>(nkv), .head_dim = static_cast<int>(hd),
                                                .bias = w.bqkv.ptr != nullptr ? w.bqkv.as<float>() : nullptr,
                                                .attention_scaling = rope_scaling,
                                                .unit_slots = tier ? di + lay.unit_slots + layer * T * nkv : nullptr},
                                               stream),
                           "RoPE and KV append");
      kernels::SparseDecodeParams ap{.q = q.as<uint16_t>(), .out = attn.as<uint16_t>(), .kv = layer_kv,
                                     .q_indptr = di + lay.q_indptr, .seq_lens = di + lay.seq_lens,
                                     .block_table = di + lay.block_table, .max_blocks_per_seq = table_nb,
                                     .num_seqs = B, .num_heads = static_cast<int>(nh),
                                     .num_kv_heads = static_cast<int>(nkv), .head_dim = static_cast<int>(hd),
                                     .scale = 1.0f / std::sqrt(static_cast<float>(hd))};
      ap.sliding_window = static_cast<int>(c.SlidingWindow(layer));  // 0 on full-attention layers
      if (o.selection != nullptr) {
        ap.sel_indptr = o.selection->indptr + layer * nkv_all + kv0;
        ap.sel_blocks = o.selection->blocks;
        ap.sel_seq_stride = static_cast<int>(L * nkv_all);
      } else if (host_selection) {
        ap.sel_indptr = di + lay.sel_indptr + layer * nkv;
        ap.sel_blocks = di + lay.sel_blocks;
        ap.sel_seq_stride = static_cast<int>(L * nkv);
        if (tier) ap.sel_slots = di + lay.sel_slots;
      }
      const bool want_mass = host_mass || o.block_mass != nullptr;
      if (want_mass) ap.lse = lse.as<float>();
      if (fused_mass) {  // the attention writes each block's log-sum-exp: the mass needs no key reads
        ap.block_lse = block_lse.as<float>();
        ap.block_lse_stride = table_nb;
      }
      if (o.skip_attention) {
        // benchmark variant: no attention kernel
      } else if (seg_blocks > 0) {
        SCOUT_RETURN_IF_ERROR(
            SegmentedAttention(static_cast<int>(layer), ap, batch, seg_indptr, seg_list, seg_blocks, plan));
      } else if (o.santa_samples > 0) {
        kernels::SantaParams sp{.attn = ap, .samples = o.santa_samples,
                                .seed = o.santa_seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(layer)};
        SCOUT_RETURN_IF_CUDA(kernels::Santa(sp, santa_plan, attn_ws.ptr, stream), "SANTA attention");
      } else if (use_prefill_kernel && kernels::PrefillAttentionSupports(ap)) {
        SCOUT_RETURN_IF_CUDA(kernels::PrefillAttention(ap, static_cast<int>(T), stream), "prefill attention");
      } else {
        SCOUT_RETURN_IF_CUDA(kernels::SparseDecode(ap, plan, attn_ws.ptr, stream, merge_counters.as<unsigned int>()), "attention");
      }
      if (want_mass && !o.skip_attention) {
        kernels::BlockMassParams mp{.attn = ap};
        if (o.block_mass != nullptr) {
          const DeviceBlockMass& m = *o.block_mass;
          mp.mass = m.mass + layer * m.layer_stride;
          mp.mass_seq_stride = m.seq_stride;
          mp.mass_token_stride = m.token_stride;
          mp.mass_head_stride = m.head_stride;
          mp.mass_head_offset = static_cast<int>(layer * m.layer_head_offset);
        } else {
          mp.mass = mass.as<float>() + layer * mass_per_layer;
          mp.mass_seq_stride = L * mass_per_layer;
          mp.mass_token_stride = max_nb;
          mp.mass_head_stride = mass_t * max_nb;
        }
        SCOUT_RETURN_IF_CUDA(kernels::BlockMass(mp, ap.sel_indptr != nullptr ? max_list : max_nb, max_q, stream),
                             "block mass");
      }
      SCOUT_RETURN_IF_ERROR(ProjectAndReduce(w.wo.ptr, attn.ptr, T, nh * hd, d));  // + residual
      if (w.bo.ptr != nullptr) {  // after the all-reduce: added once to the replicated stream
        SCOUT_RETURN_IF_CUDA(kernels::AddBias({.y = x.as<float>(), .bias = w.bo.as<float>(), .rows = static_cast<int>(T),
                                               .n = static_cast<int>(d)},
                                              stream),
                             "output bias");
      }
      SCOUT_RETURN_IF_CUDA(kernels::RmsNorm({.x = x.as<float>(), .weight = w.mlp_norm.as<float>(), .out = h.as<uint16_t>(),
                                             .rows = static_cast<int>(T), .dim = static_cast<int>(d), .eps = eps},
                                            stream),
                           "RMSNorm");
      SCOUT_RETURN_IF_ERROR(Gemm(w.w_gate_up.ptr, h.ptr, gu.as<float>(), T, d, 2 * inter, 0.0f));
      SCOUT_RETURN_IF_CUDA(kernels::SiluMul({.gate_up = gu.as<float>(), .out = act.as<uint16_t>(),
                                             .rows = static_cast<int>(T), .inter = static_cast<int>(inter)},
                                            stream),
                           "SwiGLU");
      SCOUT_RETURN_IF_ERROR(ProjectAndReduce(w.w_down.ptr, act.ptr, T, inter, d));  // + residual
    }
    if (tier) {  // the new tokens' units back to the store once every layer has written them
      SCOUT_RETURN_IF_CUDA(cudaEventRecord(main_done, stream), "event");
      SCOUT_RETURN_IF_CUDA(cudaStreamWaitEvent(copier->stream(), main_done, 0), "flush wait");
      SCOUT_RETURN_IF_ERROR(copier->Flush(tp.append));
      SCOUT_RETURN_IF_CUDA(cudaEventRecord(step_done, copier->stream()), "event");
    }
    // The rows whose logits are wanted, in runs of consecutive rows.
    {
      int64_t row = 0, out = 0;
      for (const SequenceInput& in : batch) {
        const int64_t n = static_cast<int64_t>(in.tokens.size());
        const int64_t first = in.all_logits ? 0 : n - 1;
        SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(final_x.as<float>() + out * d, x.as<float>() + (row + first) * d,
                                             (n - first) * d * 4, cudaMemcpyDeviceToDevice, stream),
                             "logit rows");
        out += n - first;
        row += n;
      }
    }
    SCOUT_RETURN_IF_CUDA(kernels::RmsNorm({.x = final_x.as<float>(), .weight = norm.as<float>(), .out = final_h.as<uint16_t>(),
                                           .rows = static_cast<int>(R), .dim = static_cast<int>(d), .eps = eps},
                                          stream),
                         "final norm");
    SCOUT_RETURN_IF_ERROR(Gemm(c.tie_word_embeddings ? embed.ptr : lm_head.ptr, final_h.ptr, logits.as<float>(), R, d, vocab, 0.0f));
    if (o.argmax != nullptr) {
      SCOUT_RETURN_IF_CUDA(kernels::Argmax({.logits = logits.as<float>(), .out = o.argmax, .rows = static_cast<int>(R),
                                            .vocab = static_cast<int>(vocab)},
                                           stream),
                           "argmax");
    }
    return absl::OkStatus();
  };
  absl::Status status = enqueue();
  if (tier && !status.ok()) {
    // The step was planned but not (all) enqueued: claimed slots may never be filled. Wait for
    // what did run, unpin, forget the batch's cached units (the host store has their bytes) and
    // give the reserved tokens back.
    cudaStreamSynchronize(stream);
    cudaStreamSynchronize(copier->stream());
    for (auto& cache : caches) cache->ReleaseStep(step_id);
    for (SegmentSlot& slot : segment_slots) ReleaseSegment(slot, /*wait=*/false).IgnoreError();
    step_pending = false;
    for (size_t i = 0; i < batch.size(); ++i) {
      for (auto& cache : caches) cache->EraseSession(batch[i].seq).IgnoreError();
      store->Truncate(batch[i].seq, shape->start[i]).IgnoreError();
    }
  }
  if (recording) {
    cudaGraph_t g = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream, &g);
    if (status.ok() && end != cudaSuccess) status = CudaStatus(end, "graph capture");
    if (status.ok()) {
      const cudaError_t inst = cudaGraphInstantiate(&graph->exec, g, 0);
      if (inst != cudaSuccess) status = CudaStatus(inst, "graph instantiate");
    }
    if (g != nullptr) cudaGraphDestroy(g);
    graph->generation = generation;
  }
  if (graphed) {
    if (status.ok()) {
      // Captured, not run: run it now, as the step it stands for.
      ++step_graph_captures;
      if (const cudaError_t e = cudaGraphLaunch(graph->exec, stream); e != cudaSuccess) {
        status = CudaStatus(e, "step graph launch");
      }
      if (status.ok()) {
        if (const cudaError_t e = cudaEventRecord(step_graph->done, stream); e != cudaSuccess) status = CudaStatus(e, "event");
      }
    }
    if (!status.ok()) DropStepGraph(step_graph);
  }
  if (!status.ok()) return status;

  if (host_logits != nullptr) {
    host_logits->resize(R * vocab);
    SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(host_logits->data(), logits.ptr, R * vocab * 4, cudaMemcpyDeviceToHost, stream),
                         "logits download");
    std::vector<float> mass_host;
    if (host_mass) {
      mass_host.resize(B * L * mass_per_layer);
      SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(mass_host.data(), mass.ptr, mass_host.size() * 4, cudaMemcpyDeviceToHost, stream),
                           "block mass download");
    }
    SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(stream), "forward pass");
    if (host_mass) {
      for (size_t i = 0; i < batch.size(); ++i) {
        const SequenceInput& in = batch[i];
        if (in.block_mass == nullptr) continue;
        const int64_t n = static_cast<int64_t>(in.tokens.size());
        const int64_t nb = kvstore::BlocksFor(shape->start[i] + n);
        in.block_mass->assign(L * nh * n * nb, 0.0f);
        for (int64_t layer = 0; layer < L; ++layer) {
          for (int64_t hh = 0; hh < nh; ++hh) {
            for (int64_t t = 0; t < n; ++t) {
              const float* src = mass_host.data() + i * L * mass_per_layer + layer * mass_per_layer +
                                 hh * mass_t * max_nb + t * max_nb;
              std::copy_n(src, nb, in.block_mass->data() + ((layer * nh + hh) * n + t) * nb);
            }
          }
        }
      }
    }
  }
  return absl::OkStatus();
}

CudaModel::CudaModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaModel::~CudaModel() {
  if (impl_ != nullptr) {
    cudaSetDevice(impl_->device);
    cudaStreamSynchronize(impl_->stream);
  }
}

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::Create(const ModelConfig& config, const LlamaWeights& weights,
                                                             const CudaModelOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->c = config;
  SCOUT_RETURN_IF_ERROR(impl->Init(options));
  SCOUT_RETURN_IF_ERROR(impl->AllocWeights());
  auto upload_bf16 = [](const std::vector<float>& v, DeviceBuffer& dst) -> absl::Status {
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = kernels::FloatToBf16(v[i]);
    SCOUT_RETURN_IF_CUDA(cudaMemcpy(dst.ptr, b.data(), b.size() * 2, cudaMemcpyHostToDevice), "weight upload");
    return absl::OkStatus();
  };
  auto upload_f32 = [](const std::vector<float>& v, DeviceBuffer& dst) -> absl::Status {
    SCOUT_RETURN_IF_CUDA(cudaMemcpy(dst.ptr, v.data(), v.size() * 4, cudaMemcpyHostToDevice), "weight upload");
    return absl::OkStatus();
  };
  SCOUT_RETURN_IF_ERROR(upload_bf16(weights.embed, impl->embed));
  if (!config.tie_word_embeddings) {
    SCOUT_RETURN_IF_ERROR(upload_bf16(weights.lm_head.empty() ? weights.embed : weights.lm_head, impl->lm_head));
  }
  SCOUT_RETURN_IF_ERROR(upload_f32(weights.norm, impl->norm));
  // This shard's slices: rows of [out][in] matrices for split outputs (q, k, v heads; gate and
  // up columns), columns for split inputs (the attention output and MLP projections).
  const int64_t dm = config.hidden_size, hd = config.head_dim, r = impl->tp_rank;
  const int64_t nh = impl->lc.num_attention_heads, nkv = impl->lc.num_key_value_heads, inter = impl->lc.intermediate_size;
  const int64_t nh_all = config.num_attention_heads, nkv_all = config.num_key_value_heads;
  auto rows = [](const std::vector<float>& m, int64_t cols, std::initializer_list<std::pair<int64_t, int64_t>> ranges) {
    std::vector<float> out;
    for (auto [begin, count] : ranges) out.insert(out.end(), m.begin() + begin * cols, m.begin() + (begin + count) * cols);
    return out;
  };
  auto cols = [](const std::vector<float>& m, int64_t n_rows, int64_t n_cols, int64_t begin, int64_t count) {
    std::vector<float> out(n_rows * count);
    for (int64_t i = 0; i < n_rows; ++i) {
      std::copy_n(m.begin() + i * n_cols + begin, count, out.begin() + i * count);
    }
    return out;
  };
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    const LlamaLayerWeights& w = weights.layers[l];
    LayerWeights& d = impl->layers[l];
    SCOUT_RETURN_IF_ERROR(upload_f32(w.attn_norm, d.attn_norm));
    SCOUT_RETURN_IF_ERROR(upload_f32(w.mlp_norm, d.mlp_norm));
    if (config.o_bias) SCOUT_RETURN_IF_ERROR(upload_f32(w.bo, d.bo));
    if (config.qkv_bias) {
      SCOUT_RETURN_IF_ERROR(upload_f32(impl->tp_size == 1 ? w.bqkv
                                                          : rows(w.bqkv, 1,
                                                                 {{r * nh * hd, nh * hd},
                                                                  {(nh_all + r * nkv) * hd, nkv * hd},
                                                                  {(nh_all + nkv_all + r * nkv) * hd, nkv * hd}}),
                                       d.bqkv));
    }
    if (impl->tp_size == 1) {
      SCOUT_RETURN_IF_ERROR(upload_bf16(w.wqkv, d.wqkv));
      SCOUT_RETURN_IF_ERROR(upload_bf16(w.wo, d.wo));
      SCOUT_RETURN_IF_ERROR(upload_bf16(w.w_gate_up, d.w_gate_up));
      SCOUT_RETURN_IF_ERROR(upload_bf16(w.w_down, d.w_down));
      continue;
    }
    SCOUT_RETURN_IF_ERROR(upload_bf16(rows(w.wqkv, dm,
                                           {{r * nh * hd, nh * hd},
                                            {(nh_all + r * nkv) * hd, nkv * hd},
                                            {(nh_all + nkv_all + r * nkv) * hd, nkv * hd}}),
                                      d.wqkv));
    SCOUT_RETURN_IF_ERROR(upload_bf16(cols(w.wo, dm, nh_all * hd, r * nh * hd, nh * hd), d.wo));
    SCOUT_RETURN_IF_ERROR(upload_bf16(
        rows(w.w_gate_up, dm, {{r * inter, inter}, {config.intermediate_size + r * inter, inter}}), d.w_gate_up));
    SCOUT_RETURN_IF_ERROR(upload_bf16(cols(w.w_down, dm, config.intermediate_size, r * inter, inter), d.w_down));
  }
  SCOUT_RETURN_IF_ERROR(impl->AllocKv(options));
  return std::unique_ptr<CudaModel>(new CudaModel(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::CreateRandom(const ModelConfig& config, uint64_t seed,
                                                                   const CudaModelOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->c = config;
  SCOUT_RETURN_IF_ERROR(impl->Init(options));
  SCOUT_RETURN_IF_ERROR(impl->AllocWeights());
  uint64_t next = seed;
  auto fill = [&](DeviceBuffer& b, int64_t fan_in) -> absl::Status {
    SCOUT_RETURN_IF_CUDA(kernels::RandomFill({.out = b.as<uint16_t>(), .n = static_cast<int64_t>(b.bytes / 2),
                                              .seed = next++, .scale = 1.0f / std::sqrt(static_cast<float>(fan_in))},
                                             impl->stream),
                         "random weights");
    return absl::OkStatus();
  };
  std::vector<float> ones(config.hidden_size, 1.0f);
  auto set_ones = [&](DeviceBuffer& b) -> absl::Status {
    SCOUT_RETURN_IF_CUDA(cudaMemcpy(b.ptr, ones.data(), ones.size() * 4, cudaMemcpyHostToDevice), "norm weights");
    return absl::OkStatus();
  };
  const int64_t d = config.hidden_size;
  SCOUT_RETURN_IF_ERROR(fill(impl->embed, 1));
  if (!config.tie_word_embeddings) SCOUT_RETURN_IF_ERROR(fill(impl->lm_head, d));
  SCOUT_RETURN_IF_ERROR(set_ones(impl->norm));
  for (LayerWeights& l : impl->layers) {
    for (DeviceBuffer* bias : {&l.bqkv, &l.bo}) {  // random models: zero biases
      if (bias->ptr != nullptr) SCOUT_RETURN_IF_CUDA(cudaMemset(bias->ptr, 0, bias->bytes), "biases");
    }
    SCOUT_RETURN_IF_ERROR(set_ones(l.attn_norm));
    SCOUT_RETURN_IF_ERROR(set_ones(l.mlp_norm));
    SCOUT_RETURN_IF_ERROR(fill(l.wqkv, d));
    SCOUT_RETURN_IF_ERROR(fill(l.wo, config.num_attention_heads * config.head_dim));
    SCOUT_RETURN_IF_ERROR(fill(l.w_gate_up, d));
    SCOUT_RETURN_IF_ERROR(fill(l.w_down, config.intermediate_size));
  }
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(impl->stream), "random weights");
  SCOUT_RETURN_IF_ERROR(impl->AllocKv(options));
  return std::unique_ptr<CudaModel>(new CudaModel(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::Load(const std::filesystem::path& model_dir,
                                                           const CudaModelOptions& options) {
  absl::StatusOr<Checkpoint> ckpt = LoadCheckpoint(model_dir);
  if (!ckpt.ok()) return ckpt.status();
  return Create(ckpt->config, ckpt->weights, options);
}

const ModelConfig& CudaModel::config() const { return impl_->c; }
absl::Status CudaModel::AddSequence(SequenceId seq) {
  return impl_->store != nullptr ? impl_->store->AddSession(seq) : impl_->tables->AddSequence(seq);
}
absl::Status CudaModel::ReleaseSequence(SequenceId seq) {
  Impl& m = *impl_;
  if (m.store == nullptr) return m.tables->Release(seq);
  if (m.store->Find(seq) == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.device), "cudaSetDevice");
  SCOUT_RETURN_IF_ERROR(m.FinishTieredStep());  // its units may be pinned by the last step
  for (auto& cache : m.caches) SCOUT_RETURN_IF_ERROR(cache->EraseSession(seq));
  return m.store->ReleaseSession(seq);
}
absl::Status CudaModel::TruncateSequence(SequenceId seq, int64_t num_tokens) {
  // The host tier keeps cached units of dropped blocks: their rows past the end are never read,
  // and a later append rewrites the unit and flushes it whole.
  return impl_->store != nullptr ? impl_->store->Truncate(seq, num_tokens) : impl_->tables->Truncate(seq, num_tokens);
}
absl::StatusOr<int64_t> CudaModel::SequenceLength(SequenceId seq) const {
  const kvstore::BlockTable* t = impl_->Tables().Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  return t->num_tokens;
}

absl::Status CudaModel::Forward(std::span<const SequenceInput> batch, std::vector<float>* logits) {
  std::vector<float> unused;
  // SANTA: one sample count a pass (the kernel's); the seeds of the inputs only vary the draw,
  // so the first one seeds the pass.
  DeviceStepOptions o;
  for (const SequenceInput& in : batch) {
    if (&in != &batch.front() && in.santa_samples != o.santa_samples) {
      return absl::InvalidArgumentError(absl::StrCat("SANTA samples differ within one pass (", o.santa_samples, " and ",
                                                     in.santa_samples, "): the CUDA backend takes one per pass"));
    }
    o.santa_samples = in.santa_samples;
  }
  if (!batch.empty()) o.santa_seed = batch.front().santa_seed;
  return impl_->Enqueue(batch, o, /*capture=*/false, &unused, logits);
}

absl::Status CudaModel::ForwardSampled(std::span<const SequenceInput> batch,
                                       std::span<const kernels::SampleRowParams> rows, std::vector<int32_t>* tokens) {
  Impl& m = *impl_;
  int64_t logit_rows = 0;
  for (const SequenceInput& in : batch) logit_rows += in.all_logits ? static_cast<int64_t>(in.tokens.size()) : 1;
  if (static_cast<int64_t>(rows.size()) != logit_rows) {
    return absl::InvalidArgumentError(absl::StrCat(rows.size(), " sampling rows for ", logit_rows, " logit rows"));
  }
  for (const kernels::SampleRowParams& r : rows) {
    if (!(r.temperature >= 0) || r.top_k < 0 || !(r.top_p > 0 && r.top_p <= 1)) {
      return absl::InvalidArgumentError("sampling row: temperature >= 0, top_k >= 0, top_p in (0, 1]");
    }
  }
  SCOUT_RETURN_IF_ERROR(m.Enqueue(batch, {}, /*capture=*/false, nullptr, nullptr, /*host_selections=*/true));
  const size_t param_bytes = rows.size() * sizeof(kernels::SampleRowParams), out_bytes = rows.size() * sizeof(int32_t);
  SCOUT_RETURN_IF_ERROR(m.sample_rows.Reserve(std::max<size_t>(param_bytes, 16), "sampling parameters"));
  SCOUT_RETURN_IF_ERROR(m.sample_out.Reserve(std::max<size_t>(out_bytes, 16), "sampled tokens"));
  SCOUT_RETURN_IF_ERROR(m.sample_stage.Reserve(std::max(param_bytes, out_bytes) + 16));
  std::copy(rows.begin(), rows.end(), static_cast<kernels::SampleRowParams*>(m.sample_stage.ptr));
  SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(m.sample_rows.ptr, m.sample_stage.ptr, param_bytes, cudaMemcpyHostToDevice, m.stream),
                       "sampling parameters upload");
  SCOUT_RETURN_IF_CUDA(kernels::Sample({.logits = m.logits.as<float>(), .row = m.sample_rows.as<kernels::SampleRowParams>(),
                                        .out = m.sample_out.as<int32_t>(), .rows = static_cast<int>(rows.size()),
                                        .vocab = static_cast<int>(m.c.vocab_size)},
                                       m.stream),
                       "sampling");
  tokens->resize(rows.size());
  SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(tokens->data(), m.sample_out.ptr, out_bytes, cudaMemcpyDeviceToHost, m.stream),
                       "tokens download");
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(m.stream), "sampling");
  m.last_sampled_rows = static_cast<int64_t>(rows.size());
  return absl::OkStatus();
}

absl::Status CudaModel::LastLogitRows(std::span<const int64_t> rows, std::vector<float>* out) const {
  const Impl& m = *impl_;
  const int64_t vocab = m.c.vocab_size;
  for (int64_t r : rows) {
    if (r < 0 || r >= m.last_sampled_rows) {
      return absl::OutOfRangeError(absl::StrCat("logit row ", r, " of a pass of ", m.last_sampled_rows));
    }
  }
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.device), "cudaSetDevice");
  out->resize(rows.size() * vocab);
  for (size_t i = 0; i < rows.size(); ++i) {
    SCOUT_RETURN_IF_CUDA(cudaMemcpy(out->data() + i * vocab, m.logits.as<float>() + rows[i] * vocab, vocab * 4,
                                    cudaMemcpyDeviceToHost),
                         "logit rows download");
  }
  return absl::OkStatus();
}

absl::Status CudaModel::EnqueueForward(std::span<const SequenceInput> batch, const DeviceStepOptions& options) {
  return impl_->Enqueue(batch, options, /*capture=*/false, nullptr, nullptr);
}

absl::StatusOr<int> CudaModel::CaptureForward(std::span<const SequenceInput> batch, const DeviceStepOptions& options) {
  absl::Status s = impl_->Enqueue(batch, options, /*capture=*/true, nullptr, nullptr);
  if (!s.ok()) {
    if (!impl_->graphs.empty() && impl_->graphs.back()->exec == nullptr) impl_->graphs.pop_back();
    return s;
  }
  return static_cast<int>(impl_->graphs.size()) - 1;
}

absl::Status CudaModel::Replay(int graph) {
  if (graph < 0 || graph >= static_cast<int>(impl_->graphs.size())) {
    return absl::NotFoundError(absl::StrCat("no captured step ", graph));
  }
  impl_->last_sampled_rows = 0;  // the replay overwrites the logits
  const Impl::Graph& g = *impl_->graphs[graph];
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(impl_->device), "cudaSetDevice");
  if (g.generation != impl_->generation) {
    return absl::FailedPreconditionError(absl::StrCat("captured step ", graph,
                                                      " is stale: a larger step reallocated the buffers it uses"));
  }
  SCOUT_RETURN_IF_CUDA(cudaGraphLaunch(g.exec, impl_->stream), "graph launch");
  return absl::OkStatus();
}

absl::Status CudaModel::Synchronize() {
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(impl_->device), "cudaSetDevice");
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(impl_->stream), "step");
  return absl::OkStatus();
}

const float* CudaModel::logits_device() const { return impl_->logits.as<float>(); }
int CudaModel::device() const { return impl_->device; }
bool CudaModel::concurrent_with(const ModelBackend& other) const {
  const auto* o = dynamic_cast<const CudaModel*>(&other);
  return o != nullptr && o != this && o->device() != device();
}
CudaModel::StepGraphStats CudaModel::step_graph_stats() const {
  return {.captures = impl_->step_graph_captures, .replays = impl_->step_graph_replays};
}
void* CudaModel::stream() const { return impl_->stream; }
const kvstore::BlockTableManager& CudaModel::block_tables() const { return impl_->Tables(); }
HostKvTierStats CudaModel::host_tier_stats() const {
  const Impl& m = *impl_;
  HostKvTierStats s = m.tier_stats;
  s.enabled = m.store != nullptr;
  for (const auto& cache : m.caches) {
    s.cache_units_used += cache->num_used();
    s.cache_units_total += cache->num_slots();
  }
  return s;
}
bool CudaModel::host_tier() const { return impl_->store != nullptr; }
ModelBackend::KvCacheUsage CudaModel::kv_cache_usage() const {
  const kvstore::BlockAllocator& a = impl_->Tables().allocator();
  return {.used_blocks = a.capacity() - a.num_free(), .total_blocks = a.capacity()};
}
size_t CudaModel::weight_bytes() const { return impl_->weight_bytes; }
size_t CudaModel::kv_bytes_per_token() const {
  const ModelConfig& lc = impl_->lc;
  return static_cast<size_t>(lc.num_hidden_layers * lc.num_key_value_heads * 2 * lc.head_dim * sizeof(uint16_t));
}

size_t CudaModel::kv_unit_bytes() const {
  if (impl_->tp_size > 1) return 0;
  return size_t{2} * kvstore::kBlockSize * static_cast<size_t>(impl_->c.head_dim) * 2;
}

absl::Status CudaModel::ExportKv(SequenceId seq, int64_t first_block, int64_t num_blocks, std::byte* out) const {
  Impl& m = *impl_;
  if (kv_unit_bytes() == 0) return absl::UnimplementedError("a tensor-parallel shard cannot export its KV alone");
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.device), "cudaSetDevice");
  const kvstore::BlockTable* t = m.Tables().Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  if (first_block < 0 || num_blocks < 0 || first_block + num_blocks > static_cast<int64_t>(t->blocks.size())) {
    return absl::OutOfRangeError(absl::StrCat("blocks [", first_block, ", ", first_block + num_blocks, ") of sequence ",
                                              seq, ", which has ", t->blocks.size()));
  }
  const int64_t L = m.c.num_hidden_layers, nkv = m.c.num_key_value_heads;
  const size_t unit = kv_unit_bytes();
  if (m.store != nullptr) {
    SCOUT_RETURN_IF_ERROR(m.FinishTieredStep());  // the last step's rows are flushed to the store
    for (int64_t b = first_block; b < first_block + num_blocks; ++b) {
      // A slab is [layer][kv_head][K|V][16][head_dim]: the export order of one block.
      std::memcpy(out, m.store->unit(t->blocks[b], 0, 0), unit * L * nkv);
      out += unit * L * nkv;
    }
    return absl::OkStatus();
  }
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(m.stream), "export KV");
  for (int64_t b = first_block; b < first_block + num_blocks; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      // The pool's layer l holds [blocks][kv_heads][2][16][head_dim]: one block's heads together.
      SCOUT_RETURN_IF_CUDA(cudaMemcpy(out, m.kv[l].as<std::byte>() + t->blocks[b] * nkv * unit, nkv * unit,
                                      cudaMemcpyDeviceToHost),
                           "export KV");
      out += nkv * unit;
    }
  }
  return absl::OkStatus();
}

absl::Status CudaModel::ImportKv(SequenceId seq, int64_t num_tokens, const std::byte* data) {
  Impl& m = *impl_;
  if (kv_unit_bytes() == 0) return absl::UnimplementedError("a tensor-parallel shard cannot import KV alone");
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.device), "cudaSetDevice");
  const kvstore::BlockTable* t = m.Tables().Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  if (t->num_tokens != 0) {
    return absl::FailedPreconditionError(absl::StrCat("sequence ", seq, " holds ", t->num_tokens,
                                                      " tokens; KV is imported into an empty one"));
  }
  if (num_tokens > m.c.max_position_embeddings) {
    return absl::OutOfRangeError(absl::StrCat(num_tokens, " tokens of KV is past max_position_embeddings ",
                                              m.c.max_position_embeddings));
  }
  const int64_t L = m.c.num_hidden_layers, nkv = m.c.num_key_value_heads;
  const size_t unit = kv_unit_bytes();
  if (m.store != nullptr) {
    SCOUT_RETURN_IF_ERROR(m.FinishTieredStep());
    for (auto& cache : m.caches) SCOUT_RETURN_IF_ERROR(cache->EraseSession(seq));
    SCOUT_RETURN_IF_ERROR(m.store->Reserve(seq, num_tokens));
    if (data == nullptr) return absl::OkStatus();  // filled unit by unit later (WriteKvUnits)
    for (int32_t slab : m.store->Find(seq)->blocks) {
      std::memcpy(m.store->unit(slab, 0, 0), data, unit * L * nkv);
      data += unit * L * nkv;
    }
    return absl::OkStatus();
  }
  SCOUT_RETURN_IF_ERROR(m.tables->Grow(seq, num_tokens));
  if (data == nullptr) return absl::OkStatus();
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(m.stream), "import KV");
  for (int32_t block : m.tables->Find(seq)->blocks) {
    for (int64_t l = 0; l < L; ++l) {
      const cudaError_t e =
          cudaMemcpy(m.kv[l].as<std::byte>() + block * nkv * unit, data, nkv * unit, cudaMemcpyHostToDevice);
      if (e != cudaSuccess) {
        (void)m.tables->Truncate(seq, 0);
        SCOUT_RETURN_IF_CUDA(e, "import KV");
      }
      data += nkv * unit;
    }
  }
  return absl::OkStatus();
}

absl::Status CudaModel::WriteKvUnits(SequenceId seq, std::span<const KvUnitRef> units, const std::byte* data) {
  Impl& m = *impl_;
  if (kv_unit_bytes() == 0) return absl::UnimplementedError("a tensor-parallel shard cannot import KV alone");
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.device), "cudaSetDevice");
  const kvstore::BlockTable* t = m.Tables().Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  SCOUT_RETURN_IF_ERROR(CheckKvUnits(m.c, seq, static_cast<int64_t>(t->blocks.size()), units));
  const int64_t nkv = m.c.num_key_value_heads;
  const size_t unit = kv_unit_bytes();
  if (m.store != nullptr) {
    // Into the host store; a GPU copy of the unit, if the cache has one, is stale now.
    SCOUT_RETURN_IF_ERROR(m.FinishTieredStep());
    for (size_t i = 0; i < units.size(); ++i) {
      const KvUnitRef& u = units[i];
      std::memcpy(m.store->unit(t->blocks[u.block], u.layer, u.head), data + i * unit, unit);
      m.caches[u.layer]->Invalidate({seq, u.layer, u.head, u.block}).IgnoreError();
    }
    return absl::OkStatus();
  }
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(m.stream), "write KV units");
  for (size_t i = 0; i < units.size(); ++i) {
    const KvUnitRef& u = units[i];
    SCOUT_RETURN_IF_CUDA(cudaMemcpy(m.kv[u.layer].as<std::byte>() + (t->blocks[u.block] * nkv + u.head) * unit,
                                    data + i * unit, unit, cudaMemcpyHostToDevice),
                         "write KV units");
  }
  return absl::OkStatus();
}

absl::Status CudaModel::FillRandomContext(SequenceId seq, int64_t num_tokens, uint64_t seed) {
  Impl& m = *impl_;
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.device), "cudaSetDevice");
  const kvstore::BlockTable* t = m.Tables().Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  if (num_tokens > m.c.max_position_embeddings) {
    return absl::OutOfRangeError(absl::StrCat("context of ", num_tokens, " tokens past max_position_embeddings ",
                                              m.c.max_position_embeddings));
  }
  const int64_t before = t->num_tokens;
  if (m.store != nullptr) {
    // The host tier: the slabs are written in place (the kernel stores into mapped host memory),
    // and the cache forgets the sequence's units.
    SCOUT_RETURN_IF_ERROR(m.FinishTieredStep());
    for (auto& cache : m.caches) SCOUT_RETURN_IF_ERROR(cache->EraseSession(seq));
    SCOUT_RETURN_IF_ERROR(m.store->Reserve(seq, num_tokens));
    const std::vector<int32_t>& slabs = m.store->Find(seq)->blocks;
    const int64_t slab_elems = static_cast<int64_t>(m.store->layout().slab_bytes() / 2);
    for (size_t i = static_cast<size_t>(before / kvstore::kBlockSize); i < slabs.size(); ++i) {
      SCOUT_RETURN_IF_CUDA(kernels::RandomFill({.out = reinterpret_cast<uint16_t*>(m.store->unit(slabs[i], 0, 0)),
                                                .n = slab_elems, .seed = seed * 1315423911ull + slabs[i]},
                                               m.stream),
                           "random context");
    }
    SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(m.stream), "random context");
    return absl::OkStatus();
  }
  SCOUT_RETURN_IF_ERROR(m.tables->Grow(seq, num_tokens));
  const std::vector<int32_t>& blocks = m.tables->Find(seq)->blocks;
  const int64_t per_block = m.lc.num_key_value_heads * 2 * kvstore::kBlockSize * m.lc.head_dim;
  // Runs of consecutive physical blocks, one fill each.
  const size_t first = static_cast<size_t>(before / kvstore::kBlockSize);
  for (int64_t layer = 0; layer < m.c.num_hidden_layers; ++layer) {
    for (size_t i = first; i < blocks.size();) {
      size_t j = i + 1;
      while (j < blocks.size() && blocks[j] == blocks[j - 1] + 1) ++j;
      SCOUT_RETURN_IF_CUDA(kernels::RandomFill({.out = m.kv[layer].as<uint16_t>() + blocks[i] * per_block,
                                                .n = static_cast<int64_t>(j - i) * per_block,
                                                .seed = seed * 1315423911ull + layer * 7919ull + blocks[i]},
                                               m.stream),
                           "random context");
      i = j;
    }
  }
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(m.stream), "random context");
  return absl::OkStatus();
}

}  // namespace scout::runtime
