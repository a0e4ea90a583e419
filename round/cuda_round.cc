#include "round/cuda_round.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/block_select.cuh"
#include "kernels/model_ops.cuh"
#include "kernels/sampling.cuh"
#include "kvstore/block_table.h"
#include "round/round_plan.h"

namespace scout::round {
namespace {

absl::Status Cuda(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  if (e == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(absl::StrCat("speculative round: ", what, ": GPU out of memory"));
  }
  return absl::InternalError(absl::StrCat("speculative round: ", what, ": ", cudaGetErrorString(e)));
}

#define ROUND_CUDA(expr, what)                                        \
  do {                                                                \
    if (absl::Status s_ = Cuda((expr), what); !s_.ok()) return s_;    \
  } while (0)
#define ROUND_OK(expr)                                   \
  do {                                                   \
    if (absl::Status s_ = (expr); !s_.ok()) return s_;   \
  } while (0)

// Device memory on one GPU that grows on demand (contents are not kept).
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (ptr_ != nullptr) {
      cudaSetDevice(device_);
      cudaFree(ptr_);
    }
  }
  absl::Status Reserve(int device, size_t bytes, absl::string_view what) {
    bytes = std::max<size_t>(bytes, 16);
    if (bytes <= bytes_ && device == device_) return absl::OkStatus();
    ROUND_CUDA(cudaSetDevice(device), "cudaSetDevice");
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    device_ = device;
    ROUND_CUDA(cudaMalloc(&ptr_, bytes), what);
    bytes_ = bytes;
    return absl::OkStatus();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  int device_ = -1;
};

class PinnedArray {
 public:
  PinnedArray() = default;
  PinnedArray(const PinnedArray&) = delete;
  PinnedArray& operator=(const PinnedArray&) = delete;
  ~PinnedArray() { cudaFreeHost(ptr_); }
  absl::Status Reserve(size_t bytes) {
    bytes = std::max<size_t>(bytes, 16);
    if (bytes <= bytes_) return absl::OkStatus();
    cudaFreeHost(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    ROUND_CUDA(cudaHostAlloc(&ptr_, bytes, cudaHostAllocPortable), "pinned buffer");
    bytes_ = bytes;
    return absl::OkStatus();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Host ints uploaded to a device array through pinned memory: stage on the host, then one copy.
struct Upload {
  PinnedArray host;
  DeviceArray dev;
  absl::Status Send(int device, const std::vector<int32_t>& v, cudaStream_t stream, absl::string_view what) {
    ROUND_OK(host.Reserve(v.size() * 4));
    ROUND_OK(dev.Reserve(device, v.size() * 4, what));
    std::copy(v.begin(), v.end(), host.as<int32_t>());
    ROUND_CUDA(cudaSetDevice(device), "cudaSetDevice");
    ROUND_CUDA(cudaMemcpyAsync(dev.as<int32_t>(), host.as<int32_t>(), v.size() * 4, cudaMemcpyHostToDevice, stream), what);
    return absl::OkStatus();
  }
  const int32_t* data() const { return dev.as<int32_t>(); }
};

// A head map on the draft's GPU, uploaded again only when its contents change.
struct DeviceHeadMap {
  std::vector<int32_t> ip, hs;  // what is on the device
  Upload indptr, heads;
  absl::Status Set(int device, const HeadMap& map, cudaStream_t stream) {
    std::vector<int32_t> want_ip{0}, want_hs;
    for (const std::vector<int32_t>& u : map.units) {
      want_hs.insert(want_hs.end(), u.begin(), u.end());
      want_ip.push_back(static_cast<int32_t>(want_hs.size()));
    }
    if (want_ip == ip && want_hs == hs) return absl::OkStatus();
    ROUND_OK(indptr.Send(device, want_ip, stream, "head map"));
    ROUND_OK(heads.Send(device, want_hs, stream, "head map"));
    ROUND_CUDA(cudaStreamSynchronize(stream), "head map upload");  // the staging is reused by the next map
    ip = std::move(want_ip);
    hs = std::move(want_hs);
    return absl::OkStatus();
  }
};

int MaxList(const std::vector<int32_t>& off) {
  int m = 0;
  for (size_t i = 0; i + 1 < off.size(); ++i) m = std::max(m, off[i + 1] - off[i]);
  return m;
}

}  // namespace

// One group of a round (round_plan.h: PlanRoundGroups): its streams, the options they share (the
// first stream's), and the tokens each drafts.
struct CudaRound::Group {
  std::vector<SpeculativeStream*> streams;
  const SpeculativeOptions* o = nullptr;
  int k = 0;
  bool greedy() const { return o->sampling.temperature == 0; }
};

struct CudaRound::Buffers {
  // The draft's GPU.
  DeviceArray mass;                 // [streams][k + 1 slots][draft layers * heads][stride] float
  DeviceArray drafted;              // [k][streams] tokens drawn by the draft's steps
  DeviceArray draft_logits;         // sampled rounds: [k][streams][vocab] float
  DeviceArray sample_rows;          // sampled rounds: [k][streams] SampleRowParams
  PinnedArray sample_stage;
  DeviceArray t_blocks, t_scratch;  // the target's lists as BlockSelect writes them
  Upload t_indptr, t_num_blocks;
  DeviceHeadMap t_map, d_map;
  DeviceArray d_blocks, d_scratch;  // the sparse draft's own lists (kept between rounds)
  Upload d_indptr, d_num_blocks;
  // The target's GPU.
  DeviceArray verify_tokens;        // [streams][k + 1]
  DeviceArray t_argmax;             // [streams][k + 1]
  DeviceArray drafted_t;            // drafted, on the target's GPU when the draft has its own
  DeviceArray t_blocks_t;           // the target's lists, on the target's GPU when the draft has its own
  Upload t_indptr_t;
  PinnedArray pending;              // [streams] each stream's pending target token
  PinnedArray readback;             // drafted and argmax tokens
  PinnedArray lists_back;           // the target's lists, for a host KV tier
  PinnedArray logits_back;          // sampled rounds (or logprobs asked for): target rows, then draft rows
  cudaEvent_t drafted_event = nullptr, verified_event = nullptr, draft_done = nullptr;
  // The sparse draft's lists: when to pick them again, and what they cover.
  SparseDraftPlan sd;
  int sd_max_list = 0;
  std::vector<int64_t> sd_list_units;  // per stream, the blocks its lists name over all units
};

CudaRound::CudaRound(runtime::CudaModel& target, runtime::CudaModel& draft, bool use_graphs)
    : target_(target), draft_(draft), use_graphs_(use_graphs), buf_(std::make_unique<Buffers>()) {}

CudaRound::~CudaRound() {
  for (cudaEvent_t e : {buf_->drafted_event, buf_->verified_event, buf_->draft_done}) {
    if (e != nullptr) cudaEventDestroy(e);
  }
}

absl::Status CudaRound::Run(std::span<SpeculativeStream* const> streams) {
  std::vector<SpeculativeStream*> live;
  std::vector<StreamRound> plan;
  for (SpeculativeStream* s : streams) {
    if (s->done()) continue;
    s->StartRound();
    if (s->done()) continue;
    live.push_back(s);
    plan.push_back({.options = &s->options(), .k = s->k_,
                    .room = s->limit_ - (s->target_len_at_start_ + static_cast<int64_t>(s->target_pending_.size()))});
  }
  std::vector<Group> groups;
  for (const RoundGroup& rg : PlanRoundGroups(plan)) {
    Group g{.o = &live[rg.members[0]]->options(), .k = rg.k};
    for (int m : rg.members) g.streams.push_back(live[m]);
    groups.push_back(std::move(g));
  }
  for (size_t i = 0; i < groups.size(); ++i) {
    if (absl::Status st = RunGroup(groups[i]); !st.ok()) {
      // Groups not yet run go back as they were.
      for (size_t later = i + 1; later < groups.size(); ++later) {
        for (SpeculativeStream* s : groups[later].streams) s->AbortRound().IgnoreError();
      }
      return st;
    }
  }
  return absl::OkStatus();
}

absl::Status CudaRound::Abort(const Group& group, absl::Status why) {
  cudaSetDevice(draft_.device());
  cudaStreamSynchronize(static_cast<cudaStream_t>(draft_.stream()));
  cudaSetDevice(target_.device());
  cudaStreamSynchronize(static_cast<cudaStream_t>(target_.stream()));
  for (SpeculativeStream* s : group.streams) s->AbortRound().IgnoreError();
  buf_->sd.Invalidate();
  return why;
}

// What a group's round works out phase by phase (RunGroup).
struct CudaRound::GroupState {
  int B = 0, k = 0, tdev = 0, ddev = 0;
  cudaStream_t ts = nullptr, ds = nullptr;
  int64_t vocab = 0;
  bool tier = false, sts = false, sd = false;
  int tl = 0, tkv = 0, dl = 0, dkv = 0, dh_total = 0;
  // Lengths: the target verifies pending + k tokens over nb_verify blocks; the draft's steps
  // reach draft_end tokens. refresh: the sparse draft picks its lists this round.
  std::vector<int32_t> nb_verify, draft_end;
  bool refresh = false;
  int stride = 0, slots = 0;  // block-mass rows: blocks (padded to 4) and positions a stream
  kernels::BlockSelectParams tsp, dsp;  // the target's and the sparse draft's selections
  std::vector<int32_t> t_off;           // the target's list offsets
  size_t target_floats = 0, draft_floats = 0;
  const int32_t* drafted_t = nullptr;   // the drafted tokens, on the target's GPU
  kvstore::Selection host_lists;        // the host tier's: the batch's lists as BlockSelect wrote them
  kvstore::SelectionView tsel;
  int32_t* back_targ = nullptr;         // read back: verified tokens, then drafted ones
  int32_t* back_drafted = nullptr;
  bool target_rows = false;  // the target's rows come back (sampled, or a stream wants logprobs or penalties)
};

// The state's names as locals in a phase.
#define ROUND_UNPACK(st)                                                                           \
  [[maybe_unused]] Buffers& b = *buf_;                                                             \
  [[maybe_unused]] const int B = (st).B, k = (st).k, tdev = (st).tdev, ddev = (st).ddev;           \
  [[maybe_unused]] const cudaStream_t ts = (st).ts, ds = (st).ds;                                  \
  [[maybe_unused]] const runtime::ModelConfig &tc_ = target_.config(), &dc_ = draft_.config();     \
  [[maybe_unused]] const int64_t vocab = (st).vocab;                                               \
  [[maybe_unused]] const bool tier = (st).tier, sts = (st).sts, sd = (st).sd;                      \
  [[maybe_unused]] const int tl = (st).tl, tkv = (st).tkv, dl = (st).dl, dkv = (st).dkv, dh_total = (st).dh_total
#define ROUND_UNPACK_PLAN(st)                                                                      \
  [[maybe_unused]] const std::vector<int32_t>& nb_verify = (st).nb_verify;                         \
  [[maybe_unused]] const bool refresh = (st).refresh;                                              \
  [[maybe_unused]] const int stride = (st).stride, slots = (st).slots;                             \
  [[maybe_unused]] const std::vector<int32_t>& t_off = (st).t_off;                                 \
  [[maybe_unused]] const size_t target_floats = (st).target_floats, draft_floats = (st).draft_floats
#define ROUND_TRY(expr)                        \
  do {                                         \
    if (absl::Status s_ = (expr); !s_.ok()) return s_; \
  } while (0)
#define ROUND_TRY_CUDA(expr, what) ROUND_TRY(Cuda((expr), what))

absl::Status CudaRound::RunGroup(const Group& g) {
  GroupState st;
  Plan(g, st);
  for (auto phase : {&CudaRound::SetUp, &CudaRound::DraftSteps, &CudaRound::Verify, &CudaRound::ReadBack}) {
    if (absl::Status s = (this->*phase)(g, st); !s.ok()) return Abort(g, std::move(s));
  }
  return Accept(g, st);
}

// Shapes, lengths, and whether the sparse draft picks its lists again.
void CudaRound::Plan(const Group& g, GroupState& st) {
  st.B = static_cast<int>(g.streams.size());
  st.k = g.k;
  st.tdev = target_.device();
  st.ddev = draft_.device();
  st.ts = static_cast<cudaStream_t>(target_.stream());
  st.ds = static_cast<cudaStream_t>(draft_.stream());
  const runtime::ModelConfig &tc = target_.config(), &dc = draft_.config();
  st.vocab = tc.vocab_size;
  st.tier = target_.host_tier();
  st.sts = g.o->head_map != nullptr && g.k > 0;
  st.sd = g.o->draft_head_map != nullptr && g.k > 0;
  st.tl = static_cast<int>(tc.num_hidden_layers);
  st.tkv = static_cast<int>(tc.num_key_value_heads);
  st.dl = static_cast<int>(dc.num_hidden_layers);
  st.dkv = static_cast<int>(dc.num_key_value_heads);
  st.dh_total = static_cast<int>(dc.num_hidden_layers * dc.num_attention_heads);
  ROUND_UNPACK(st);
  std::vector<int32_t>& nb_verify = st.nb_verify;
  std::vector<int32_t>& draft_end = st.draft_end;
  nb_verify.assign(B, 0);
  draft_end.assign(B, 0);
  for (int j = 0; j < B; ++j) {
    SpeculativeStream& s = *g.streams[j];
    s.target_before_ = s.target_len_at_start_;
    nb_verify[j] = static_cast<int32_t>(
        kvstore::BlocksFor(s.target_before_ + static_cast<int64_t>(s.target_pending_.size()) + k));
    draft_end[j] = static_cast<int32_t>(s.draft_len_at_start_ + static_cast<int64_t>(s.draft_pending_.size()) +
                                        std::max(k - 1, 0));
  }
  // The sparse draft: pick its lists again when they are missing, stale, for other streams, or
  // about to be outgrown.
  bool& refresh = st.refresh;
  if (sd) {
    std::vector<SequenceId> seqs;
    for (SpeculativeStream* s : g.streams) seqs.push_back(s->seq());
    refresh = b.sd.StartRound(seqs, g.o->draft_head_map->units, draft_end, g.o->draft_refresh_rounds, k);
  }
  int& stride = st.stride;
  stride = *std::max_element(nb_verify.begin(), nb_verify.end());
  if (sd) stride = std::max(stride, b.sd.max_bound());
  stride = (stride + 3) & ~3;  // BlockSelect reads rows as float4
  st.slots = k + 1;  // step 0 may carry two rows
  st.target_rows = !g.greedy() || std::any_of(g.streams.begin(), g.streams.end(), [](SpeculativeStream* s) {
                     return s->options().logprobs >= 0 || s->options().penalties.any();
                   });
}

// The round's device and pinned buffers, the selections' offsets and head maps, the sampling
// parameters; the block mass cleared.
absl::Status CudaRound::SetUp(const Group& g, GroupState& st) {
  ROUND_UNPACK(st);
  const bool refresh = st.refresh;
  const int stride = st.stride, slots = st.slots;
  const std::vector<int32_t>& nb_verify = st.nb_verify;
  for (cudaEvent_t* e : {&b.drafted_event, &b.verified_event, &b.draft_done}) {
    if (*e == nullptr) {
      ROUND_TRY_CUDA(cudaSetDevice(e == &b.verified_event ? tdev : ddev), "cudaSetDevice");
      ROUND_TRY_CUDA(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "event");
    }
  }
  // ---- The draft's GPU: buffers, uploads, the mass cleared.
  ROUND_TRY(b.drafted.Reserve(ddev, sizeof(int32_t) * std::max(k, 1) * B, "drafted tokens"));
  const bool want_mass = sts || refresh;
  const size_t mass_floats = static_cast<size_t>(B) * slots * dh_total * stride;
  if (want_mass) {
    ROUND_TRY(b.mass.Reserve(ddev, mass_floats * 4, "block mass"));
    ROUND_TRY_CUDA(cudaSetDevice(ddev), "cudaSetDevice");
    ROUND_TRY_CUDA(cudaMemsetAsync(b.mass.as<float>(), 0, mass_floats * 4, ds), "block mass clear");
  }
  kernels::BlockSelectParams &tsp = st.tsp, &dsp = st.dsp;
  std::vector<int32_t>& t_off = st.t_off;
  if (sts) {
    ROUND_TRY(b.t_map.Set(ddev, *g.o->head_map, ds));
    std::vector<int64_t> first_new(B);
    for (int j = 0; j < B; ++j) first_new[j] = g.streams[j]->target_before_;
    const int window = VerifyWindowBlocks(g.o->sts_budget, first_new, nb_verify);
    t_off = StsListOffsets(nb_verify, tl, tkv, g.o->sts_budget, window);
    ROUND_TRY(b.t_indptr.Send(ddev, t_off, ds, "selection offsets"));
    ROUND_TRY(b.t_num_blocks.Send(ddev, nb_verify, ds, "selection lengths"));
    ROUND_TRY(b.t_blocks.Reserve(ddev, sizeof(int32_t) * t_off.back(), "target lists"));
    tsp = {.mass = b.mass.as<float>(), .num_blocks = b.t_num_blocks.data(), .map_indptr = b.t_map.indptr.data(),
           .map_heads = b.t_map.heads.data(), .out_indptr = b.t_indptr.data(), .out_blocks = b.t_blocks.as<int32_t>(),
           .num_seqs = B, .num_positions = slots, .num_draft_heads = dh_total, .max_blocks = stride,
           .num_units = tl * tkv, .budget_blocks = 0, .sink_blocks = g.o->sts_budget.sink_blocks, .window_blocks = window};
    ROUND_TRY(b.t_scratch.Reserve(ddev, kernels::BlockSelectScratchBytes(tsp), "selection scratch"));
  }
  if (refresh) {
    ROUND_TRY(b.d_map.Set(ddev, *g.o->draft_head_map, ds));
    const int ahead_window = g.o->draft_budget.window_blocks + b.sd.ahead_blocks();
    StsBudget db = g.o->draft_budget;
    db.dense_layers.clear();  // the draft's own lists: no dense layers of the target's budget
    std::vector<int32_t> d_off = StsListOffsets(b.sd.bound(), dl, dkv, db, ahead_window);
    ROUND_TRY(b.d_indptr.Send(ddev, d_off, ds, "draft selection offsets"));
    ROUND_TRY(b.d_num_blocks.Send(ddev, b.sd.bound(), ds, "draft selection lengths"));
    ROUND_TRY(b.d_blocks.Reserve(ddev, sizeof(int32_t) * d_off.back(), "draft lists"));
    dsp = {.mass = b.mass.as<float>(), .num_blocks = b.d_num_blocks.data(), .map_indptr = b.d_map.indptr.data(),
           .map_heads = b.d_map.heads.data(), .out_indptr = b.d_indptr.data(), .out_blocks = b.d_blocks.as<int32_t>(),
           .num_seqs = B, .num_positions = slots, .num_draft_heads = dh_total, .max_blocks = stride,
           .num_units = dl * dkv, .budget_blocks = 0, .sink_blocks = db.sink_blocks, .window_blocks = ahead_window};
    ROUND_TRY(b.d_scratch.Reserve(ddev, kernels::BlockSelectScratchBytes(dsp), "draft selection scratch"));
    b.sd_max_list = MaxList(d_off);
    const int units = dl * dkv;
    b.sd_list_units.resize(B);
    for (int j = 0; j < B; ++j) b.sd_list_units[j] = d_off[(j + 1) * units] - d_off[j * units];
  }
  if (!g.greedy() && k > 0) {
    ROUND_TRY(b.draft_logits.Reserve(ddev, sizeof(float) * k * B * vocab, "draft logits"));
    ROUND_TRY(b.sample_rows.Reserve(ddev, sizeof(kernels::SampleRowParams) * k * B, "sampling parameters"));
    ROUND_TRY(b.sample_stage.Reserve(sizeof(kernels::SampleRowParams) * k * B));
    kernels::SampleRowParams* rows = b.sample_stage.as<kernels::SampleRowParams>();
    for (int i = 0; i < k; ++i) {
      for (int j = 0; j < B; ++j) {
        SpeculativeStream& s = *g.streams[j];
        const runtime::SamplingParams& sp = s.options().sampling;
        rows[i * B + j] = {.temperature = sp.temperature, .top_k = sp.top_k, .top_p = sp.top_p, .seed = s.rng_()};
      }
    }
    ROUND_TRY_CUDA(cudaSetDevice(ddev), "cudaSetDevice");
    ROUND_TRY_CUDA(cudaMemcpyAsync(b.sample_rows.as<void>(), b.sample_stage.as<void>(),
                                   sizeof(kernels::SampleRowParams) * k * B, cudaMemcpyHostToDevice, ds),
                   "sampling parameters");
  }

  // Host memory the round's results come back to (allocated before anything is enqueued: a
  // pinned allocation can wait for the device).
  ROUND_TRY(b.readback.Reserve(sizeof(int32_t) * (B * (k + 1) + k * B)));
  st.target_floats = static_cast<size_t>(B) * (k + 1) * vocab;
  st.draft_floats = static_cast<size_t>(k) * B * vocab;
  const size_t target_floats = st.target_floats, draft_floats = st.draft_floats;
  if (st.target_rows) ROUND_TRY(b.logits_back.Reserve(sizeof(float) * (target_floats + draft_floats)));
  ROUND_TRY(b.pending.Reserve(sizeof(int32_t) * B));
  ROUND_TRY(b.verify_tokens.Reserve(tdev, sizeof(int32_t) * B * (k + 1), "verification tokens"));
  ROUND_TRY(b.t_argmax.Reserve(tdev, sizeof(int32_t) * B * (k + 1), "verification tokens"));
  if (ddev != tdev) ROUND_TRY(b.drafted_t.Reserve(tdev, sizeof(int32_t) * std::max(k, 1) * B, "drafted tokens"));
  if (sts && tier) ROUND_TRY(b.lists_back.Reserve(sizeof(int32_t) * t_off.back()));
  if (sts && !tier && ddev != tdev) ROUND_TRY(b.t_blocks_t.Reserve(tdev, sizeof(int32_t) * t_off.back(), "target lists"));
  return absl::OkStatus();
}

// 1 and 2: the draft's k steps (the sparse draft's lists picked after its dense one), then the
// target's lists by BlockSelect, on the draft's GPU.
absl::Status CudaRound::DraftSteps(const Group& g, GroupState& st) {
  ROUND_UNPACK(st);
  ROUND_UNPACK_PLAN(st);
  const runtime::ModelConfig& dc = dc_;
  const kernels::BlockSelectParams &tsp = st.tsp, &dsp = st.dsp;
  // ---- 1. The draft's steps.
  const kvstore::SelectionView dsel{.indptr = b.d_indptr.data(), .blocks = b.d_blocks.as<int32_t>(), .num_seqs = B,
                                    .num_layers = dl, .num_kv_heads = dkv, .max_list_blocks = b.sd_max_list,
                                    .block_bound = b.sd.max_bound()};
  const std::vector<int32_t> one_token(1, 0);
  for (int i = 0; i < k; ++i) {
    std::vector<SequenceInput> in;
    for (SpeculativeStream* s : g.streams) {
      in.push_back({.seq = s->seq(), .tokens = i == 0 ? std::span<const int32_t>(s->draft_pending_) : one_token});
    }
    const bool dense_step = !sd || (refresh && i == 0);
    for (int j = 0; j < B; ++j) {
      SpeculativeStream& s = *g.streams[j];
      const int64_t end = s.draft_len_at_start_ + static_cast<int64_t>(s.draft_pending_.size()) + i;
      const int64_t dense_units = kvstore::BlocksFor(end) * dl * dkv;
      s.result_.draft_context_blocks += dense_units;
      s.result_.draft_selected_blocks += dense_step ? dense_units : b.sd_list_units[j];
    }
    // Slot 0 (and 1, for a second pending token) is step 0's; slot i + 1 is step i's.
    const runtime::DeviceBlockMass bm{
        .mass = b.mass.as<float>() + static_cast<size_t>(i == 0 ? 0 : i + 1) * dh_total * stride,
        .seq_stride = static_cast<int64_t>(slots) * dh_total * stride, .token_stride = int64_t{dh_total} * stride,
        .head_stride = stride, .layer_stride = 0, .layer_head_offset = static_cast<int>(dc.num_attention_heads)};
    runtime::DeviceStepOptions o{.selection = dense_step ? nullptr : &dsel,
                                 .block_mass = (sts || (refresh && i == 0)) ? &bm : nullptr,
                                 .argmax = g.greedy() ? b.drafted.as<int32_t>() + i * B : nullptr,
                                 .device_tokens = i == 0 ? nullptr : b.drafted.as<int32_t>() + (i - 1) * B,
                                 .use_graph = use_graphs_};
    ROUND_TRY(draft_.EnqueueForward(in, o));
    ROUND_TRY_CUDA(cudaSetDevice(ddev), "cudaSetDevice");
    if (!g.greedy()) {
      float* rows = b.draft_logits.as<float>() + static_cast<size_t>(i) * B * vocab;
      ROUND_TRY_CUDA(cudaMemcpyAsync(rows, draft_.logits_device(), sizeof(float) * B * vocab, cudaMemcpyDeviceToDevice, ds),
                     "draft logits");
      ROUND_TRY_CUDA(kernels::Sample({.logits = rows, .row = b.sample_rows.as<kernels::SampleRowParams>() + i * B,
                                      .out = b.drafted.as<int32_t>() + i * B, .rows = B, .vocab = static_cast<int>(vocab)},
                                     ds),
                     "draft sampling");
    }
    if (refresh && i == 0) {
      ROUND_TRY_CUDA(kernels::BlockSelect(dsp, b.d_scratch.as<void>(), ds), "draft block selection");
    }
  }
  // ---- 2. The target's lists, on the draft's GPU.
  if (sts) ROUND_TRY_CUDA(kernels::BlockSelect(tsp, b.t_scratch.as<void>(), ds), "block selection");
  ROUND_TRY_CUDA(cudaEventRecord(b.drafted_event, ds), "event");
  return absl::OkStatus();
}

absl::Status CudaRound::Verify(const Group& g, GroupState& st) {
  ROUND_UNPACK(st);
  ROUND_UNPACK_PLAN(st);
  // ---- 3. The target's verification.
  for (int j = 0; j < B; ++j) b.pending.as<int32_t>()[j] = g.streams[j]->target_pending_.back();
  ROUND_TRY_CUDA(cudaSetDevice(tdev), "cudaSetDevice");
  ROUND_TRY_CUDA(cudaStreamWaitEvent(ts, b.drafted_event, 0), "event wait");
  const int32_t*& drafted_t = st.drafted_t;
  drafted_t = b.drafted.as<int32_t>();
  kvstore::Selection& host_lists = st.host_lists;
  kvstore::SelectionView& tsel = st.tsel;
  if (k > 0 && ddev != tdev) {
    ROUND_TRY_CUDA(cudaMemcpyPeerAsync(b.drafted_t.as<void>(), tdev, b.drafted.as<void>(), ddev, sizeof(int32_t) * k * B, ts),
                   "drafted tokens to the target");
    drafted_t = b.drafted_t.as<int32_t>();
  }
  if (sts && tier) {
    // The host tier plans its prefetch from host lists: the one mid-round wait.
    ROUND_TRY_CUDA(cudaSetDevice(ddev), "cudaSetDevice");
    ROUND_TRY_CUDA(cudaMemcpyAsync(b.lists_back.as<int32_t>(), b.t_blocks.as<int32_t>(), sizeof(int32_t) * t_off.back(),
                                   cudaMemcpyDeviceToHost, ds),
                   "target lists to the host");
    ROUND_TRY_CUDA(cudaStreamSynchronize(ds), "draft steps");
    host_lists = {.num_seqs = B, .num_layers = tl, .num_kv_heads = tkv, .indptr = t_off};
    host_lists.blocks.assign(b.lists_back.as<int32_t>(), b.lists_back.as<int32_t>() + t_off.back());
  } else if (sts) {
    tsel = {.indptr = b.t_indptr.data(), .blocks = b.t_blocks.as<int32_t>(), .num_seqs = B, .num_layers = tl,
            .num_kv_heads = tkv, .max_list_blocks = MaxList(t_off)};
    if (ddev != tdev) {
      ROUND_TRY(b.t_indptr_t.Send(tdev, t_off, ts, "selection offsets"));
      ROUND_TRY_CUDA(cudaMemcpyPeerAsync(b.t_blocks_t.as<void>(), tdev, b.t_blocks.as<void>(), ddev,
                                         sizeof(int32_t) * t_off.back(), ts),
                     "target lists to the target");
      tsel.indptr = b.t_indptr_t.data();
      tsel.blocks = b.t_blocks_t.as<int32_t>();
    }
  }
  ROUND_TRY_CUDA(cudaSetDevice(tdev), "cudaSetDevice");
  // Each stream's row: its pending token, then its drafted ones (column i of drafted).
  const size_t pitch = sizeof(int32_t) * (k + 1);
  ROUND_TRY_CUDA(cudaMemcpy2DAsync(b.verify_tokens.as<int32_t>(), pitch, b.pending.as<int32_t>(), sizeof(int32_t),
                                   sizeof(int32_t), B, cudaMemcpyHostToDevice, ts),
                 "verification tokens");
  for (int i = 0; i < k; ++i) {
    ROUND_TRY_CUDA(cudaMemcpy2DAsync(b.verify_tokens.as<int32_t>() + 1 + i, pitch, drafted_t + i * B, sizeof(int32_t),
                                     sizeof(int32_t), B, cudaMemcpyDeviceToDevice, ts),
                   "verification tokens");
  }
  const std::vector<int32_t> placeholder(k + 1, 0);
  std::vector<SequenceInput> vin;
  for (int j = 0; j < B; ++j) {
    vin.push_back({.seq = g.streams[j]->seq(), .tokens = placeholder, .all_logits = true});
  }
  ROUND_TRY(target_.EnqueueForward(vin, {.selection = (sts && !tier) ? &tsel : nullptr,
                                         .host_lists = (sts && tier) ? &host_lists : nullptr,
                                         .argmax = g.greedy() ? b.t_argmax.as<int32_t>() : nullptr,
                                         .device_tokens = b.verify_tokens.as<int32_t>(), .santa_samples = g.o->santa_samples,
                                         .santa_seed = ++rounds_, .use_graph = use_graphs_}));
  return absl::OkStatus();
}

absl::Status CudaRound::ReadBack(const Group& g, GroupState& st) {
  ROUND_UNPACK(st);
  ROUND_UNPACK_PLAN(st);
  const int32_t* drafted_t = st.drafted_t;
  // ---- 4. One synchronisation: tokens (greedy) or logit rows (sampled) back to the host.
  st.back_targ = b.readback.as<int32_t>();
  st.back_drafted = st.back_targ + B * (k + 1);
  int32_t* const back_targ = st.back_targ;
  int32_t* const back_drafted = st.back_drafted;
  ROUND_TRY_CUDA(cudaSetDevice(tdev), "cudaSetDevice");
  if (k > 0) {
    ROUND_TRY_CUDA(cudaMemcpyAsync(back_drafted, drafted_t, sizeof(int32_t) * k * B, cudaMemcpyDeviceToHost, ts),
                   "drafted tokens");
  }
  if (g.greedy()) {
    ROUND_TRY_CUDA(cudaMemcpyAsync(back_targ, b.t_argmax.as<int32_t>(), sizeof(int32_t) * B * (k + 1),
                                   cudaMemcpyDeviceToHost, ts),
                   "verified tokens");
    if (st.target_rows) {  // for logprobs
      ROUND_TRY_CUDA(cudaMemcpyAsync(b.logits_back.as<float>(), target_.logits_device(), sizeof(float) * target_floats,
                                     cudaMemcpyDeviceToHost, ts),
                     "target logits");
    }
  } else {
    ROUND_TRY_CUDA(cudaMemcpyAsync(b.logits_back.as<float>(), target_.logits_device(), sizeof(float) * target_floats,
                                   cudaMemcpyDeviceToHost, ts),
                   "target logits");
    if (k > 0) {
      ROUND_TRY_CUDA(cudaSetDevice(ddev), "cudaSetDevice");
      ROUND_TRY_CUDA(cudaMemcpyAsync(b.logits_back.as<float>() + target_floats, b.draft_logits.as<float>(),
                                     sizeof(float) * draft_floats, cudaMemcpyDeviceToHost, ds),
                     "draft logits");
      ROUND_TRY_CUDA(cudaEventRecord(b.draft_done, ds), "event");
    }
  }
  ROUND_TRY_CUDA(cudaSetDevice(tdev), "cudaSetDevice");
  ROUND_TRY_CUDA(cudaEventRecord(b.verified_event, ts), "event");
  ROUND_TRY_CUDA(cudaEventSynchronize(b.verified_event), "speculative round");
  if (!g.greedy() && k > 0) ROUND_TRY_CUDA(cudaEventSynchronize(b.draft_done), "speculative round");
  // The next round's draft steps must not overwrite what this round's verification still reads.
  ROUND_TRY_CUDA(cudaSetDevice(ddev), "cudaSetDevice");
  ROUND_TRY_CUDA(cudaStreamWaitEvent(ds, b.verified_event, 0), "event wait");
  return absl::OkStatus();
}

#undef ROUND_TRY
#undef ROUND_TRY_CUDA
#undef ROUND_UNPACK_PLAN

absl::Status CudaRound::Accept(const Group& g, GroupState& st) {
  ROUND_UNPACK(st);
  const std::vector<int32_t>& nb_verify = st.nb_verify;
  const std::vector<int32_t>& t_off = st.t_off;
  const size_t target_floats = st.target_floats;
  const int32_t* back_targ = st.back_targ;
  const int32_t* back_drafted = st.back_drafted;
  // ---- Acceptance, rollback and emission, stream by stream.
  for (int j = 0; j < B; ++j) {
    SpeculativeStream& s = *g.streams[j];
    s.drafted_.resize(k);
    for (int i = 0; i < k; ++i) s.drafted_[i] = back_drafted[i * B + j];
    Verdict v;
    const bool penalised = s.options().penalties.any();
    const std::vector<float> pen =
        penalised ? s.PenalisedRows({b.logits_back.as<float>() + static_cast<size_t>(j) * (k + 1) * vocab,
                                     static_cast<size_t>(k + 1) * vocab},
                                    k + 1)
                  : std::vector<float>();
    if (g.greedy()) {
      std::vector<int32_t> pen_argmax;  // the penalised rows' greedy tokens
      for (int i = 0; penalised && i <= k; ++i) {
        pen_argmax.push_back(runtime::ArgMax({pen.data() + static_cast<size_t>(i) * vocab, static_cast<size_t>(vocab)}));
      }
      const int32_t* t = penalised ? pen_argmax.data() : back_targ + j * (k + 1);
      while (v.accepted < s.k_ && s.drafted_[v.accepted] == t[v.accepted]) ++v.accepted;
      v.next = t[v.accepted];
    } else {
      std::vector<std::vector<float>> p(s.k_ + 1, std::vector<float>(vocab)), q(s.k_, std::vector<float>(vocab));
      const float* tl_rows = penalised ? pen.data() : b.logits_back.as<float>() + static_cast<size_t>(j) * (k + 1) * vocab;
      for (int i = 0; i <= s.k_; ++i) s.dist_.Distribution({tl_rows + i * vocab, static_cast<size_t>(vocab)}, p[i]);
      for (int i = 0; i < s.k_; ++i) {
        const float* row = b.logits_back.as<float>() + target_floats + (static_cast<size_t>(i) * B + j) * vocab;
        s.dist_.Distribution({row, static_cast<size_t>(vocab)}, q[i]);
      }
      v = VerifyDraft(p, q, std::span<const int32_t>(s.drafted_).first(s.k_), s.rng_);
    }
    if (sts) {
      const int units = tl * tkv;
      std::vector<int64_t> per_layer(tl);
      for (int l = 0; l < tl; ++l) per_layer[l] = t_off[j * units + (l + 1) * tkv] - t_off[j * units + l * tkv];
      s.CountSelection(per_layer, nb_verify[j], tkv);
    }
    const std::span<const float> rows =
        st.target_rows ? std::span<const float>(b.logits_back.as<float>() + static_cast<size_t>(j) * (k + 1) * vocab,
                                                static_cast<size_t>(k + 1) * vocab)
                       : std::span<const float>();
    if (absl::Status why = s.AcceptVerdict(v, std::max(k - 1, 0), rows); !why.ok()) {
      for (int later = j + 1; later < B; ++later) g.streams[later]->AbortRound().IgnoreError();
      b.sd.Invalidate();
      return why;
    }
  }
  return absl::OkStatus();
}

#undef ROUND_UNPACK

}  // namespace scout::round
