// The CUDA model's step runner: checks a step, builds its inputs and lists, stages its index
// arrays, and runs it plainly, as a new capture, or as a replay of a graph kept for its shape.
// The layer loop is cuda_layers.cc; where the KV lives is the placement's (cuda_kv_*.cc).
#include "runtime/cuda_model.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/prefill_attention.cuh"
#include "kernels/sampling.cuh"
#include "kernels/santa.cuh"
#include "kernels/sparse_decode.cuh"
#include "runtime/batch_check.h"
#include "runtime/cuda_buffers.h"
#include "runtime/cuda_kv_placement.h"
#include "runtime/cuda_layers.h"
#include "runtime/cuda_step_graphs.h"

namespace scout::runtime {
namespace {

using cuda::DeviceBuffer;
using cuda::PinnedBuffer;

// Offsets (in int32 elements) of one step's index arrays inside the staging buffer; the
// placement's entries come last.
struct StepLayout {
  size_t tokens = 0, positions = 0, phys = 0, q_indptr = 0, seq_lens = 0, block_table = 0, sel_indptr = 0,
         sel_blocks = 0, sel_slots = 0, kv = 0, total = 0;
};

// What a step decided before it is staged.
struct StepPlan {
  BatchShape shape;
  bool host_lists = false;  // attends over lists staged from the host (inputs' selections, host_lists, the host tier)
  bool host_mass = false;   // block mass copied to the inputs (Forward)
  bool graphed = false;     // run through a graph kept for its shape
  int64_t rows = 0, logit_rows = 0;
  int max_q = 0, max_blocks = 0, max_list = 0, table_blocks = 0;
  kvstore::Selection lists;  // host lists, this shard's KV heads
  StepLayout lay;
  kernels::SparseDecodePlan plan;
  kernels::SantaPlan santa_plan;
  bool prefill_kernel = false, fused_mass = false;
};

// Where a step's index arrays are staged and uploaded.
struct Staging {
  PinnedBuffer* stage = nullptr;
  DeviceBuffer* index = nullptr;
  cudaEvent_t uploaded = nullptr;    // recorded after the upload (the plain steps' ring)
  cuda::StepGraph* graph = nullptr;  // a kept graph or a numbered capture
  bool replay = false;
};

// A step graph bakes in the block table's width and the attention plan: both are sized for a few
// blocks more than the step needs (entries past a sequence's blocks are masked by its length), so
// that consecutive steps share a graph.
constexpr int kGraphBlockQuantum = 16;

}  // namespace

struct CudaModel::Impl {
  cuda::LayerStack stack;  // first: destroyed last (it owns the stream)
  std::unique_ptr<cuda::KvPlacement> kv;
  cuda::StepGraphs graphs;
  // Plain steps' staging: two buffers, the one used two steps ago reused once its upload ran.
  PinnedBuffer staging[2];
  cudaEvent_t staged[2] = {nullptr, nullptr};
  int next_staging = 0;
  DeviceBuffer index;
  DeviceBuffer sample_rows, sample_out;  // ForwardSampled's parameters and tokens
  PinnedBuffer sample_stage;
  int64_t last_sampled_rows = 0;  // logit rows of the last ForwardSampled (LastLogitRows)

  ~Impl() {
    for (cudaEvent_t e : staged) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  }

  // The layer stack and its weights' room (filled by the caller), then the KV placement.
  absl::Status Init(const ModelConfig& config, const CudaModelOptions& o) {
    SCOUT_RETURN_IF_ERROR(stack.Init(config, o));
    for (cudaEvent_t& e : staged) SCOUT_RETURN_IF_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event");
    return stack.AllocWeights();
  }
  absl::Status AllocKv(const CudaModelOptions& o) {
    const cuda::KvShape shape{.model = &stack.model(), .shard = &stack.shard()};
    absl::StatusOr<std::unique_ptr<cuda::KvPlacement>> p =
        o.host_kv_tokens > 0 ? cuda::MakeHostTierKv(shape, o) : cuda::MakeResidentKv(shape, o);
    if (!p.ok()) return p.status();
    kv = std::move(*p);
    return absl::OkStatus();
  }
  const kvstore::BlockTableManager& Tables() const { return kv->tables(); }

  // capture: records the step into a new numbered graph instead of running it.
  // host_selections: honour the inputs' host selections although the logits stay on the device
  // (ForwardSampled); Forward always does, EnqueueForward takes only device ones.
  absl::Status Enqueue(std::span<const SequenceInput> batch, const DeviceStepOptions& o, bool capture,
                       std::vector<float>* host_mass_out, std::vector<float>* host_logits, bool host_selections = false);

 private:
  absl::StatusOr<StepPlan> CheckStep(std::span<const SequenceInput> batch, const DeviceStepOptions& o, bool capture,
                                     bool host_mass_out, bool host_logits, bool host_selections);
  void BuildLists(std::span<const SequenceInput> batch, const DeviceStepOptions& o, StepPlan& p) const;
  absl::Status CheckLists(const DeviceStepOptions& o, int num_seqs) const;
  absl::Status SizeStep(const DeviceStepOptions& o, StepPlan& p);
  absl::StatusOr<Staging> ChooseStaging(std::span<const SequenceInput> batch, const DeviceStepOptions& o,
                                        const StepPlan& p, bool capture);
  void Stage(std::span<const SequenceInput> batch, const StepPlan& p, int32_t* st) const;
  cuda::LayerStep StepArgs(std::span<const SequenceInput> batch, const DeviceStepOptions& o, const StepPlan& p,
                           const int32_t* di) const;
  absl::Status Run(std::span<const SequenceInput> batch, const DeviceStepOptions& o, const StepPlan& p,
                   const Staging& s, bool capture);
  absl::Status Download(std::span<const SequenceInput> batch, const StepPlan& p, std::vector<float>* host_logits);
};

absl::StatusOr<StepPlan> CudaModel::Impl::CheckStep(std::span<const SequenceInput> batch, const DeviceStepOptions& o,
                                                    bool capture, bool host_mass_out, bool host_logits,
                                                    bool host_selections) {
  const bool any_mass = std::any_of(batch.begin(), batch.end(), [](const SequenceInput& in) { return in.block_mass; });
  SCOUT_RETURN_IF_ERROR(kv->Check({.capture = capture, .device_lists = o.selection != nullptr,
                                   .block_mass = o.block_mass != nullptr || (host_mass_out && any_mass)}));
  absl::StatusOr<BatchShape> shape = CheckBatch(stack.model(), Tables(), batch);
  if (!shape.ok()) return shape.status();
  StepPlan p;
  p.shape = std::move(*shape);
  p.host_lists = kv->needs_host_lists();
  for (const SequenceInput& in : batch) {
    if (in.quest_budget != nullptr) {
      return absl::UnimplementedError("Quest-style selection runs on the CPU backend only");
    }
    p.host_lists |= in.selection != nullptr && o.selection == nullptr && (host_logits || host_selections);
    p.host_mass |= in.block_mass != nullptr && host_mass_out;
  }
  if (p.host_mass && p.host_lists) {
    return absl::InvalidArgumentError("block_mass on the GPU needs a dense pass (no selection in the batch)");
  }
  if ((o.block_mass != nullptr || p.host_mass) && stack.tp_size() > 1) {
    return absl::UnimplementedError("block mass of a tensor-parallel model (the draft's job) is not supported");
  }
  if ((o.block_mass != nullptr || p.host_mass) && o.santa_samples > 0) {
    return absl::InvalidArgumentError("block mass needs exact attention (no SANTA sampling in the same pass)");
  }
  if (o.santa_samples < 0) return absl::InvalidArgumentError("santa_samples must be >= 0");
  SCOUT_RETURN_IF_ERROR(CheckLists(o, static_cast<int>(batch.size())));
  p.host_lists |= o.host_lists != nullptr;
  p.rows = p.shape.total_tokens;
  p.logit_rows = p.shape.logit_rows;
  for (size_t i = 0; i < batch.size(); ++i) {
    p.max_q = std::max(p.max_q, static_cast<int>(batch[i].tokens.size()));
    p.max_blocks =
        std::max(p.max_blocks, static_cast<int>(kvstore::BlocksFor(p.shape.start[i] + batch[i].tokens.size())));
  }
  p.graphed = o.use_graph && !capture && kv->graphs_allowed() && o.santa_samples == 0 && !host_logits &&
              !host_mass_out && !host_selections && o.host_lists == nullptr &&
              std::none_of(batch.begin(), batch.end(), [](const SequenceInput& in) { return in.selection != nullptr; });
  return p;
}

void CudaModel::Impl::BuildLists(std::span<const SequenceInput> batch, const DeviceStepOptions& o, StepPlan& p) const {
  // Lists name the whole model's KV heads, of which this shard holds [kv0, kv0 + nkv); the
  // blocks of each sequence's new tokens are always listed (ListsWithNewBlocks).
  const int L = static_cast<int>(stack.shard().num_hidden_layers), nkv = static_cast<int>(stack.shard().num_key_value_heads);
  const int nkv_all = static_cast<int>(stack.model().num_key_value_heads), kv0 = stack.tp_rank() * nkv;
  kvstore::Selection& lists = p.lists;
  lists = {.num_seqs = static_cast<int>(batch.size()), .num_layers = L, .num_kv_heads = nkv};
  lists.indptr.push_back(0);
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceInput& in = batch[i];
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    for (int layer = 0; layer < L; ++layer) {
      if (o.host_lists != nullptr) {
        const kvstore::Selection& b = *o.host_lists;
        ListsWithNewBlocks(b.indptr.data() + b.List(static_cast<int>(i), layer, kv0), b.blocks.data(), nkv,
                           p.shape.start[i], n, &lists.indptr, &lists.blocks);
      } else if (in.selection != nullptr) {
        ListsWithNewBlocks(in.selection->indptr.data() + layer * nkv_all + kv0, in.selection->blocks.data(), nkv,
                           p.shape.start[i], n, &lists.indptr, &lists.blocks);
      } else {  // dense member of a sparse batch: every block
        const int32_t nb = static_cast<int32_t>(kvstore::BlocksFor(p.shape.start[i] + n));
        for (int kh = 0; kh < nkv; ++kh) {
          for (int32_t b = 0; b < nb; ++b) lists.blocks.push_back(b);
          lists.indptr.push_back(static_cast<int32_t>(lists.blocks.size()));
        }
      }
    }
  }
  p.max_list = lists.MaxList();
}

absl::Status CudaModel::Impl::CheckLists(const DeviceStepOptions& o, int num_seqs) const {
  const int L = static_cast<int>(stack.model().num_hidden_layers), nkv = static_cast<int>(stack.model().num_key_value_heads);
  if (o.selection != nullptr && o.host_lists != nullptr) {
    return absl::InvalidArgumentError("a step takes device lists or host lists, not both");
  }
  if (o.selection != nullptr && (o.selection->num_seqs != num_seqs || o.selection->num_layers != L ||
                                 o.selection->num_kv_heads != nkv || o.selection->indptr == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat("device lists of ", o.selection->num_seqs, " x ",
                                                   o.selection->num_layers, " x ", o.selection->num_kv_heads,
                                                   " for a batch of ", num_seqs, " x ", L, " x ", nkv));
  }
  if (const kvstore::Selection* h = o.host_lists;
      h != nullptr && (h->num_seqs != num_seqs || h->num_layers != L || h->num_kv_heads != nkv ||
                       h->indptr.size() != static_cast<size_t>(h->num_lists()) + 1 ||
                       h->indptr.back() != static_cast<int32_t>(h->blocks.size()))) {
    return absl::InvalidArgumentError(absl::StrCat("host lists of ", h->num_seqs, " x ", h->num_layers, " x ",
                                                   h->num_kv_heads, " (", h->indptr.size(), " offsets) for a batch of ",
                                                   num_seqs, " x ", L, " x ", nkv));
  }
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::SizeStep(const DeviceStepOptions& o, StepPlan& p) {
  const ModelConfig& lc = stack.shard();
  const int nh = static_cast<int>(lc.num_attention_heads), nkv = static_cast<int>(lc.num_key_value_heads);
  const int hd = static_cast<int>(lc.head_dim), B = static_cast<int>(p.shape.start.size());
  auto quantize = [&](int n) {
    return p.graphed ? (n + kGraphBlockQuantum - 1) / kGraphBlockQuantum * kGraphBlockQuantum : n;
  };
  p.max_blocks = quantize(p.max_blocks);
  if (!p.host_lists) p.max_list = p.max_blocks;
  if (o.selection != nullptr) p.max_list = quantize(o.selection->max_list_blocks);
  p.table_blocks = std::max(p.max_blocks, o.selection != nullptr ? quantize(o.selection->block_bound) : 0);

  StepLayout& lay = p.lay;
  const int64_t T = p.rows;
  lay.tokens = 0;
  lay.positions = lay.tokens + T;
  lay.phys = lay.positions + T;
  lay.q_indptr = lay.phys + T;
  lay.seq_lens = lay.q_indptr + B + 1;
  lay.block_table = lay.seq_lens + B;
  lay.sel_indptr = lay.block_table + static_cast<size_t>(B) * p.table_blocks;
  lay.sel_blocks = lay.sel_indptr + p.lists.indptr.size();
  lay.sel_slots = lay.sel_blocks + p.lists.blocks.size();
  lay.kv = lay.sel_slots + (kv->fills_slots() ? p.lists.blocks.size() : 0);
  lay.total = lay.kv + kv->IndexInts(T);

  const int rows_per_cta = kernels::SparseDecodeRowsPerCta();
  p.plan = kernels::PlanSparseDecode(B, nh, nkv, p.max_q, p.max_list, static_cast<int>(T), hd, stack.sms(),
                                     kernels::SparseDecodeCtasPerSm(hd, rows_per_cta), 0, rows_per_cta);
  // Prompt chunks: the tiled prefill kernel where its tiles fill the GPU (dense layers only; the
  // layer loop keeps selections, unit pools and fused block mass on the decode kernel).
  p.prefill_kernel =
      o.santa_samples == 0 && kernels::PrefillAttentionPays(nh, nkv, static_cast<int>(T), p.max_q, stack.sms());
  size_t ws_bytes = p.plan.workspace_bytes;
  if (o.santa_samples > 0) {
    p.santa_plan = kernels::PlanSanta(B, nh, nkv, p.max_q, p.max_list, static_cast<int>(T), hd, stack.sms(),
                                      kernels::SparseDecodeCtasPerSm(hd, 16));
    ws_bytes = p.santa_plan.workspace_bytes;
  }
  p.fused_mass = (p.host_mass || o.block_mass != nullptr) && p.plan.rows_per_cta == 16;
  // Buffers, sized before anything is enqueued (cudaMalloc must not run inside a capture).
  const int64_t mass_floats =
      p.host_mass ? int64_t{B} * lc.num_hidden_layers * nh * p.max_q * p.max_blocks : 0;
  return stack.Reserve({.rows = T, .logit_rows = p.logit_rows, .table_blocks = p.table_blocks,
                        .attention_workspace = ws_bytes, .merge_counters = p.plan.num_counters,
                        .fused_mass = p.fused_mass, .host_mass_floats = mass_floats});
}

absl::StatusOr<Staging> CudaModel::Impl::ChooseStaging(std::span<const SequenceInput> batch,
                                                       const DeviceStepOptions& o, const StepPlan& p, bool capture) {
  Staging s;
  if (p.graphed) {
    // Everything the launches bake in: shapes, the plan's inputs, buffer generation, pointers.
    std::string key = absl::StrCat(stack.generation(), "|", batch.size(), "|", p.rows, "|", p.logit_rows, "|",
                                   p.table_blocks, "|", p.max_list, "|", p.max_blocks, "|", p.lay.total, "|",
                                   p.fused_mass, "|", o.skip_attention, "|", reinterpret_cast<uintptr_t>(o.argmax), "|",
                                   reinterpret_cast<uintptr_t>(o.device_tokens));
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
    absl::StatusOr<cuda::StepGraph*> g = graphs.ForShape(key, &s.replay);
    if (!g.ok()) return g.status();
    s.graph = *g;
  } else if (capture) {
    s.graph = graphs.NewNumbered();
  } else {
    // The upload of the buffer used two steps ago must have run before it is overwritten.
    const int k = next_staging;
    next_staging ^= 1;
    SCOUT_RETURN_IF_CUDA(cudaEventSynchronize(staged[k]), "staging wait");
    s.stage = &staging[k];
    s.index = &index;
    s.uploaded = staged[k];
  }
  if (s.graph != nullptr) {
    s.stage = &s.graph->staging;
    s.index = &s.graph->index;
  }
  SCOUT_RETURN_IF_ERROR(s.stage->Reserve(std::max<size_t>(p.lay.total, 1) * 4));
  SCOUT_RETURN_IF_ERROR(s.index->Reserve(std::max<size_t>(p.lay.total, 1) * 4, "index arrays"));
  return s;
}

void CudaModel::Impl::Stage(std::span<const SequenceInput> batch, const StepPlan& p, int32_t* st) const {
  const StepLayout& lay = p.lay;
  int64_t row = 0;
  st[lay.q_indptr] = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceInput& in = batch[i];
    const std::vector<int32_t>& blocks = Tables().Find(in.seq)->blocks;
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    for (int64_t t = 0; t < n; ++t, ++row) {
      const int64_t pos = p.shape.start[i] + t;
      st[lay.tokens + row] = in.tokens[t];
      st[lay.positions + row] = static_cast<int32_t>(pos);
      st[lay.phys + row] = blocks[pos / kvstore::kBlockSize];
    }
    st[lay.q_indptr + i + 1] = static_cast<int32_t>(row);
    st[lay.seq_lens + i] = static_cast<int32_t>(p.shape.start[i] + n);
    for (int b = 0; b < p.table_blocks; ++b) {
      st[lay.block_table + i * p.table_blocks + b] = b < static_cast<int>(blocks.size()) ? blocks[b] : 0;
    }
  }
  std::copy(p.lists.indptr.begin(), p.lists.indptr.end(), st + lay.sel_indptr);
  std::copy(p.lists.blocks.begin(), p.lists.blocks.end(), st + lay.sel_blocks);
  std::copy(p.lists.slots.begin(), p.lists.slots.end(), st + lay.sel_slots);
}

cuda::LayerStep CudaModel::Impl::StepArgs(std::span<const SequenceInput> batch, const DeviceStepOptions& o,
                                          const StepPlan& p, const int32_t* di) const {
  const int64_t L = stack.shard().num_hidden_layers, nkv = stack.shard().num_key_value_heads;
  const int64_t kv0 = stack.tp_rank() * nkv;
  const StepLayout& lay = p.lay;
  cuda::LayerStep s{.batch = batch, .rows = p.rows, .logit_rows = p.logit_rows,
                    .tokens = o.device_tokens != nullptr ? o.device_tokens : di + lay.tokens,
                    .positions = di + lay.positions, .phys = di + lay.phys, .q_indptr = di + lay.q_indptr,
                    .seq_lens = di + lay.seq_lens, .block_table = di + lay.block_table,
                    .table_blocks = p.table_blocks, .kv_index = di + lay.kv};
  if (o.selection != nullptr) {  // the whole model's KV heads: this shard's from kv0
    s.lists = *o.selection;
    s.list_head_offset = static_cast<int>(kv0);
  } else if (p.host_lists) {  // staged with this shard's KV heads
    s.lists = {.indptr = di + lay.sel_indptr, .blocks = di + lay.sel_blocks,
               .slots = p.lists.slots.empty() ? nullptr : di + lay.sel_slots, .num_seqs = p.lists.num_seqs,
               .num_layers = static_cast<int>(L), .num_kv_heads = static_cast<int>(nkv),
               .max_list_blocks = p.max_list};
  }
  s.max_q = p.max_q;
  s.max_list = p.max_list;
  s.max_blocks = p.max_blocks;
  s.plan = &p.plan;
  s.santa_plan = &p.santa_plan;
  s.santa_samples = o.santa_samples;
  s.santa_seed = o.santa_seed;
  s.prefill_kernel = p.prefill_kernel;
  s.block_mass = o.block_mass;
  s.host_mass = p.host_mass;
  s.fused_mass = p.fused_mass;
  s.skip_attention = o.skip_attention;
  s.argmax = o.argmax;
  return s;
}

absl::Status CudaModel::Impl::Run(std::span<const SequenceInput> batch, const DeviceStepOptions& o, const StepPlan& p,
                                  const Staging& s, bool capture) {
  const cudaStream_t stream = stack.stream();
  if (s.replay) {
    ++graphs.replays;
    SCOUT_RETURN_IF_CUDA(cudaGraphLaunch(s.graph->exec, stream), "step graph launch");
    SCOUT_RETURN_IF_CUDA(cudaEventRecord(s.graph->done, stream), "event");
    return absl::OkStatus();
  }
  const bool recording = capture || p.graphed;
  if (recording) {
    SCOUT_RETURN_IF_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "graph capture");
  }
  // From here on errors must end the capture; the lambda enqueues, the caller closes.
  auto enqueue = [&]() -> absl::Status {
    SCOUT_RETURN_IF_CUDA(
        cudaMemcpyAsync(s.index->ptr, s.stage->ptr, p.lay.total * 4, cudaMemcpyHostToDevice, stream), "upload");
    if (s.uploaded != nullptr) SCOUT_RETURN_IF_CUDA(cudaEventRecord(s.uploaded, stream), "event");
    return stack.EnqueueStep(StepArgs(batch, o, p, s.index->as<int32_t>()), *kv);
  };
  absl::Status status = enqueue();
  if (!status.ok()) kv->Abort(batch, p.shape, stream);
  if (recording) status = cuda::StepGraphs::EndCapture(stream, s.graph, stack.generation(), std::move(status));
  if (p.graphed) {
    if (status.ok()) {
      // Captured, not run: run it now, as the step it stands for.
      ++graphs.captures;
      if (const cudaError_t e = cudaGraphLaunch(s.graph->exec, stream); e != cudaSuccess) {
        status = cuda::CudaStatus(e, "step graph launch");
      }
      if (status.ok()) {
        if (const cudaError_t e = cudaEventRecord(s.graph->done, stream); e != cudaSuccess) {
          status = cuda::CudaStatus(e, "event");
        }
      }
    }
    if (!status.ok()) graphs.DropShape(s.graph);
  }
  return status;
}

absl::Status CudaModel::Impl::Download(std::span<const SequenceInput> batch, const StepPlan& p,
                                       std::vector<float>* host_logits) {
  const cudaStream_t stream = stack.stream();
  const int64_t L = stack.shard().num_hidden_layers, nh = stack.shard().num_attention_heads;
  const int64_t vocab = stack.shard().vocab_size, R = p.logit_rows;
  host_logits->resize(R * vocab);
  SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(host_logits->data(), stack.logits(), R * vocab * 4, cudaMemcpyDeviceToHost, stream),
                       "logits download");
  // The mass as the layer loop wrote it, [seqs][layers][heads][max_q][max_blocks], to each
  // input's [layers][heads][tokens][blocks].
  const int64_t per_layer = nh * p.max_q * p.max_blocks;
  std::vector<float> mass;
  if (p.host_mass) {
    mass.resize(static_cast<size_t>(batch.size()) * L * per_layer);
    SCOUT_RETURN_IF_CUDA(
        cudaMemcpyAsync(mass.data(), stack.host_mass(), mass.size() * 4, cudaMemcpyDeviceToHost, stream),
        "block mass download");
  }
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(stream), "forward pass");
  if (!p.host_mass) return absl::OkStatus();
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceInput& in = batch[i];
    if (in.block_mass == nullptr) continue;
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    const int64_t nb = kvstore::BlocksFor(p.shape.start[i] + n);
    in.block_mass->assign(L * nh * n * nb, 0.0f);
    for (int64_t layer = 0; layer < L; ++layer) {
      for (int64_t hh = 0; hh < nh; ++hh) {
        for (int64_t t = 0; t < n; ++t) {
          const float* src = mass.data() + (i * L + layer) * per_layer + (hh * p.max_q + t) * p.max_blocks;
          std::copy_n(src, nb, in.block_mass->data() + ((layer * nh + hh) * n + t) * nb);
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::Enqueue(std::span<const SequenceInput> batch, const DeviceStepOptions& o, bool capture,
                                      std::vector<float>* host_mass_out, std::vector<float>* host_logits,
                                      bool host_selections) {
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(stack.device()), "cudaSetDevice");  // the calling thread may be new
  last_sampled_rows = 0;  // this pass overwrites the logits
  absl::StatusOr<StepPlan> p =
      CheckStep(batch, o, capture, host_mass_out != nullptr, host_logits != nullptr, host_selections);
  if (!p.ok()) return p.status();
  if (p->host_lists) {
    BuildLists(batch, o, *p);
    SCOUT_RETURN_IF_ERROR(kv->TakeLists(batch, p->shape, o.santa_samples > 0, &p->lists, &p->max_list));
  }
  SCOUT_RETURN_IF_ERROR(SizeStep(o, *p));
  absl::StatusOr<Staging> s = ChooseStaging(batch, o, *p, capture);
  if (!s.ok()) return s.status();
  int32_t* st = static_cast<int32_t*>(s->stage->ptr);
  // All checks passed: the placement commits the step (the tables grow; the host tier pins and
  // plans its transfers), then the step's arrays are staged.
  SCOUT_RETURN_IF_ERROR(kv->Prepare(batch, p->shape, &p->lists, st + p->lay.kv));
  Stage(batch, *p, st);
  SCOUT_RETURN_IF_ERROR(Run(batch, o, *p, *s, capture));
  if (host_logits != nullptr) return Download(batch, *p, host_logits);
  return absl::OkStatus();
}

CudaModel::CudaModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaModel::~CudaModel() {
  if (impl_ != nullptr) {
    cudaSetDevice(impl_->stack.device());
    cudaStreamSynchronize(impl_->stack.stream());
  }
}

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::Create(const ModelConfig& config, const LlamaWeights& weights,
                                                             const CudaModelOptions& options) {
  auto impl = std::make_unique<Impl>();
  SCOUT_RETURN_IF_ERROR(impl->Init(config, options));
  SCOUT_RETURN_IF_ERROR(impl->stack.UploadWeights(weights));
  SCOUT_RETURN_IF_ERROR(impl->AllocKv(options));
  return std::unique_ptr<CudaModel>(new CudaModel(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::CreateWith(const ModelConfig& config, const WeightWriter& write,
                                                                 const CudaModelOptions& options) {
  auto impl = std::make_unique<Impl>();
  SCOUT_RETURN_IF_ERROR(impl->Init(config, options));
  SCOUT_RETURN_IF_ERROR(impl->stack.WriteWeights(write));
  SCOUT_RETURN_IF_ERROR(impl->AllocKv(options));
  return std::unique_ptr<CudaModel>(new CudaModel(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::Load(const std::filesystem::path& model_dir,
                                                           const CudaModelOptions& options) {
  absl::StatusOr<Checkpoint> ckpt = LoadCheckpoint(model_dir);
  if (!ckpt.ok()) return ckpt.status();
  return Create(ckpt->config, ckpt->weights, options);
}

const ModelConfig& CudaModel::config() const { return impl_->stack.model(); }
absl::Status CudaModel::AddSequence(SequenceId seq) { return impl_->kv->AddSequence(seq); }
absl::Status CudaModel::ReleaseSequence(SequenceId seq) {
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(impl_->stack.device()), "cudaSetDevice");
  return impl_->kv->ReleaseSequence(seq);
}
absl::Status CudaModel::TruncateSequence(SequenceId seq, int64_t num_tokens) {
  return impl_->kv->TruncateSequence(seq, num_tokens);
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
  const cudaStream_t stream = m.stack.stream();
  const size_t param_bytes = rows.size() * sizeof(kernels::SampleRowParams), out_bytes = rows.size() * sizeof(int32_t);
  SCOUT_RETURN_IF_ERROR(m.sample_rows.Reserve(std::max<size_t>(param_bytes, 16), "sampling parameters"));
  SCOUT_RETURN_IF_ERROR(m.sample_out.Reserve(std::max<size_t>(out_bytes, 16), "sampled tokens"));
  SCOUT_RETURN_IF_ERROR(m.sample_stage.Reserve(std::max(param_bytes, out_bytes) + 16));
  std::copy(rows.begin(), rows.end(), static_cast<kernels::SampleRowParams*>(m.sample_stage.ptr));
  SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(m.sample_rows.ptr, m.sample_stage.ptr, param_bytes, cudaMemcpyHostToDevice, stream),
                       "sampling parameters upload");
  SCOUT_RETURN_IF_CUDA(kernels::Sample({.logits = m.stack.logits(), .row = m.sample_rows.as<kernels::SampleRowParams>(),
                                        .out = m.sample_out.as<int32_t>(), .rows = static_cast<int>(rows.size()),
                                        .vocab = static_cast<int>(m.stack.model().vocab_size)},
                                       stream),
                       "sampling");
  tokens->resize(rows.size());
  SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(tokens->data(), m.sample_out.ptr, out_bytes, cudaMemcpyDeviceToHost, stream),
                       "tokens download");
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(stream), "sampling");
  m.last_sampled_rows = static_cast<int64_t>(rows.size());
  return absl::OkStatus();
}

absl::Status CudaModel::LastLogitRows(std::span<const int64_t> rows, std::vector<float>* out) const {
  const Impl& m = *impl_;
  const int64_t vocab = m.stack.model().vocab_size;
  for (int64_t r : rows) {
    if (r < 0 || r >= m.last_sampled_rows) {
      return absl::OutOfRangeError(absl::StrCat("logit row ", r, " of a pass of ", m.last_sampled_rows));
    }
  }
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.stack.device()), "cudaSetDevice");
  out->resize(rows.size() * vocab);
  for (size_t i = 0; i < rows.size(); ++i) {
    SCOUT_RETURN_IF_CUDA(cudaMemcpy(out->data() + i * vocab, m.stack.logits() + rows[i] * vocab, vocab * 4,
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
    impl_->graphs.DropFailedNumbered();
    return s;
  }
  return impl_->graphs.numbered() - 1;
}

absl::Status CudaModel::Replay(int graph) {
  const cuda::StepGraph* g = impl_->graphs.Numbered(graph);
  if (g == nullptr) return absl::NotFoundError(absl::StrCat("no captured step ", graph));
  impl_->last_sampled_rows = 0;  // the replay overwrites the logits
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(impl_->stack.device()), "cudaSetDevice");
  if (g->generation != impl_->stack.generation()) {
    return absl::FailedPreconditionError(absl::StrCat("captured step ", graph,
                                                      " is stale: a larger step reallocated the buffers it uses"));
  }
  SCOUT_RETURN_IF_CUDA(cudaGraphLaunch(g->exec, impl_->stack.stream()), "graph launch");
  return absl::OkStatus();
}

absl::Status CudaModel::Synchronize() {
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(impl_->stack.device()), "cudaSetDevice");
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(impl_->stack.stream()), "step");
  return absl::OkStatus();
}

const float* CudaModel::logits_device() const { return impl_->stack.logits(); }
int CudaModel::device() const { return impl_->stack.device(); }
bool CudaModel::concurrent_with(const ModelBackend& other) const {
  const auto* o = dynamic_cast<const CudaModel*>(&other);
  return o != nullptr && o != this && o->device() != device();
}
CudaModel::StepGraphStats CudaModel::step_graph_stats() const {
  return {.captures = impl_->graphs.captures, .replays = impl_->graphs.replays};
}
void* CudaModel::stream() const { return impl_->stack.stream(); }
const kvstore::BlockTableManager& CudaModel::block_tables() const { return impl_->Tables(); }
HostKvTierStats CudaModel::host_tier_stats() const { return impl_->kv->stats(); }
bool CudaModel::host_tier() const { return impl_->kv->needs_host_lists(); }
ModelBackend::KvCacheUsage CudaModel::kv_cache_usage() const { return impl_->kv->usage(); }
size_t CudaModel::weight_bytes() const { return impl_->stack.weight_bytes(); }
size_t CudaModel::kv_bytes_per_token() const {
  const ModelConfig& lc = impl_->stack.shard();
  return static_cast<size_t>(lc.num_hidden_layers * lc.num_key_value_heads * 2 * lc.head_dim * sizeof(uint16_t));
}

size_t CudaModel::kv_unit_bytes() const {
  if (impl_->stack.tp_size() > 1) return 0;
  return size_t{2} * kvstore::kBlockSize * static_cast<size_t>(impl_->stack.model().head_dim) * 2;
}

absl::Status CudaModel::ExportKv(SequenceId seq, int64_t first_block, int64_t num_blocks, std::byte* out) const {
  const Impl& m = *impl_;
  if (kv_unit_bytes() == 0) return absl::UnimplementedError("a tensor-parallel shard cannot export its KV alone");
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.stack.device()), "cudaSetDevice");
  const kvstore::BlockTable* t = m.Tables().Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  if (first_block < 0 || num_blocks < 0 || first_block + num_blocks > static_cast<int64_t>(t->blocks.size())) {
    return absl::OutOfRangeError(absl::StrCat("blocks [", first_block, ", ", first_block + num_blocks, ") of sequence ",
                                              seq, ", which has ", t->blocks.size()));
  }
  return m.kv->ExportKv(seq, first_block, num_blocks, out, m.stack.stream());
}

absl::Status CudaModel::ImportKv(SequenceId seq, int64_t num_tokens, const std::byte* data) {
  Impl& m = *impl_;
  if (kv_unit_bytes() == 0) return absl::UnimplementedError("a tensor-parallel shard cannot import KV alone");
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.stack.device()), "cudaSetDevice");
  const kvstore::BlockTable* t = m.Tables().Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  if (t->num_tokens != 0) {
    return absl::FailedPreconditionError(absl::StrCat("sequence ", seq, " holds ", t->num_tokens,
                                                      " tokens; KV is imported into an empty one"));
  }
  if (num_tokens > m.stack.model().max_position_embeddings) {
    return absl::OutOfRangeError(absl::StrCat(num_tokens, " tokens of KV is past max_position_embeddings ",
                                              m.stack.model().max_position_embeddings));
  }
  return m.kv->ImportKv(seq, num_tokens, data, m.stack.stream());
}

absl::Status CudaModel::WriteKvUnits(SequenceId seq, std::span<const KvUnitRef> units, const std::byte* data) {
  Impl& m = *impl_;
  if (kv_unit_bytes() == 0) return absl::UnimplementedError("a tensor-parallel shard cannot import KV alone");
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.stack.device()), "cudaSetDevice");
  const kvstore::BlockTable* t = m.Tables().Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  SCOUT_RETURN_IF_ERROR(CheckKvUnits(m.stack.model(), seq, static_cast<int64_t>(t->blocks.size()), units));
  return m.kv->WriteKvUnits(seq, units, data, m.stack.stream());
}

absl::Status CudaModel::WriteContext(SequenceId seq, int64_t num_tokens, const KvStretchWriter& write) {
  Impl& m = *impl_;
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(m.stack.device()), "cudaSetDevice");
  const kvstore::BlockTable* t = m.Tables().Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  if (num_tokens > m.stack.model().max_position_embeddings) {
    return absl::OutOfRangeError(absl::StrCat("context of ", num_tokens, " tokens past max_position_embeddings ",
                                              m.stack.model().max_position_embeddings));
  }
  return m.kv->WriteContext(seq, num_tokens, write, m.stack.stream());
}

}  // namespace scout::runtime
