#include "bench/decode_bench.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kernels/block_select.cuh"
#include "bench/random_model.h"
#include "round/cuda_round.h"
#include "runtime/cuda_model.h"
#include "runtime/generator.h"
#include "runtime/sts.h"

namespace scout::bench {
namespace {

using runtime::CudaModel;
using runtime::ModelConfig;
using runtime::SequenceInput;

#define BENCH_CHECK(expr)                                                              \
  do {                                                                                 \
    if (absl::Status s_ = (expr); !s_.ok()) {                                          \
      std::fprintf(stderr, "scout bench decode: %s\n", std::string(s_.message()).c_str()); \
      return absl::InternalError(s_.message());                                        \
    }                                                                                  \
  } while (0)

#define BENCH_CUDA(expr)                                                                              \
  do {                                                                                                \
    if (cudaError_t e_ = (expr); e_ != cudaSuccess) {                                                 \
      return absl::InternalError(absl::StrCat(#expr, ": ", cudaGetErrorString(e_)));                  \
    }                                                                                                 \
  } while (0)

// Llama-3.x shapes. max_position_embeddings is raised to 2M: positions past 128k cost the same,
// and the million-token runs decode past 1M.
ModelConfig Llama(int64_t hidden, int64_t inter, int64_t layers, int64_t head_dim, bool tied, double rope_factor) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = 128256;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = head_dim;
  c.max_position_embeddings = int64_t{1} << 21;
  c.rms_norm_eps = 1e-5;
  c.rope = {.type = "llama3", .theta = 500000, .factor = rope_factor, .low_freq_factor = 1, .high_freq_factor = 4,
            .original_max_position_embeddings = 8192};
  c.tie_word_embeddings = tied;
  c.bos_token_id = 128000;
  c.eos_token_ids = {128001, 128008, 128009};
  return c;
}

absl::StatusOr<ModelConfig> ConfigFor(const std::string& name) {
  if (name == "llama-3.1-8b") return Llama(4096, 14336, 32, 128, false, 8);
  if (name == "llama-3.2-1b") return Llama(2048, 8192, 16, 64, true, 32);
  if (name == "llama-3.2-3b") return Llama(3072, 8192, 28, 128, true, 32);
  absl::StatusOr<ModelConfig> c = runtime::LoadModelConfig(name);
  if (!c.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("model '", name,
                                                   "' is neither a preset (llama-3.1-8b, llama-3.2-1b, llama-3.2-3b) "
                                                   "nor a folder with config.json: ",
                                                   c.status().message()));
  }
  return c;
}

// Milliseconds per call of fn, over iters calls after one warm-up, timed with events on stream.
template <typename Fn>
absl::StatusOr<double> TimeMs(cudaStream_t stream, int iters, Fn fn) {
  BENCH_CHECK(fn());
  cudaEvent_t a, b;
  BENCH_CUDA(cudaEventCreate(&a));
  BENCH_CUDA(cudaEventCreate(&b));
  BENCH_CUDA(cudaEventRecord(a, stream));
  for (int i = 0; i < iters; ++i) BENCH_CHECK(fn());
  BENCH_CUDA(cudaEventRecord(b, stream));
  BENCH_CUDA(cudaEventSynchronize(b));
  float ms = 0;
  BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return static_cast<double>(ms) / iters;
}

struct Row {
  int64_t context = 0;
  int batch = 0;
  std::string mode;
  double round_ms = 0, tokens_per_s = 0;
  double draft_ms = 0, select_ms = 0, prefetch_ms = 0, attn_ms = 0, rest_ms = 0;
  double roofline_tokens_per_s = 0;
  // "lab": the bench's own graph-replayed steps; "product": the round scout generate and serve run
  // (round::MakeRound), timed over real rounds; "computed": not run (dense over PCIe).
  std::string path = "lab";
  double measured_acceptance = -1;  // product rows: accepted draft tokens per proposed, as measured
};

struct DeviceVec {
  void* p = nullptr;
  ~DeviceVec() { cudaFree(p); }
};

// The STS plumbing of one configuration, on the current device: the draft's block mass
// [seqs][k positions][draft layers * heads][blocks], the target's lists (BlockSelect through
// the proportional-depth head map: each target (layer, KV head) reads the draft layer at the
// same depth, the query heads of the same KV group) and the sparse draft's own lists (its own
// heads, same budget).
struct StsPlumbing {
  int nb = 0, nb_d = 0, list = 0, list_d = 0, dh_total = 0, units = 0, d_units = 0;
  size_t mass_floats = 0;
  std::vector<int32_t> offsets, offsets_d;
  DeviceVec mass, num_blocks, map_indptr, map_heads, out_indptr, out_blocks, scratch;
  DeviceVec d_num_blocks, d_map_indptr, d_map_heads, d_out_indptr, d_out_blocks, d_scratch;
  kernels::BlockSelectParams sp, dsp;
  kvstore::SelectionView sel, dsel;
};

class Bench {
 public:
  Bench(const DecodeBenchOptions& o, ModelConfig tc, ModelConfig dc) : o_(o), tc_(std::move(tc)), dc_(std::move(dc)) {}
  absl::Status Run();

 private:
  absl::Status RunResident();
  absl::Status RunConfig(int64_t ctx, int batch);
  absl::Status RunHostTier(int64_t ctx, int batch);
  absl::Status RunHostTierBudget(CudaModel& T, CudaModel& D, int64_t ctx, int batch, double fraction, double pcie_gbps);
  // The product's rounds (round::MakeRound over SpeculativeStreams continuing the filled contexts,
  // and runtime::Generate for plain decoding) in the given modes; contexts are put back after.
  absl::Status RunProductRows(CudaModel& T, CudaModel& D, int64_t ctx, int batch, double fraction,
                              const std::vector<std::string>& modes, const std::string& prefix);
  absl::Status WriteJson();
  absl::Status MeasureCopyBandwidth(cudaStream_t s);
  absl::Status MakeSts(int batch, int64_t ctx, double fraction, StsPlumbing* out) const;
  void Print(const Row& r);

  const DecodeBenchOptions& o_;
  ModelConfig tc_, dc_;
  std::unique_ptr<CudaModel> target_, draft_;
  double copy_gbps_ = 0;  // HBM: bytes read + written per second of a device-to-device copy
  std::vector<Row> rows_;
};

absl::Status Bench::MeasureCopyBandwidth(cudaStream_t s) {
  const size_t bytes = size_t{2} << 30;
  DeviceVec a, b;
  BENCH_CUDA(cudaMalloc(&a.p, bytes));
  BENCH_CUDA(cudaMalloc(&b.p, bytes));
  BENCH_CUDA(cudaMemset(a.p, 1, bytes));
  absl::StatusOr<double> ms = TimeMs(s, 10, [&]() -> absl::Status {
    if (cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, s) != cudaSuccess) return absl::InternalError("copy");
    return absl::OkStatus();
  });
  if (!ms.ok()) return ms.status();
  copy_gbps_ = 2.0 * bytes / (*ms * 1e-3) / 1e9;
  return absl::OkStatus();
}

absl::Status Bench::MakeSts(int B, int64_t ctx, double fraction, StsPlumbing* out) const {
  StsPlumbing& p = *out;
  const int k = o_.k;
  p.nb = static_cast<int>(kvstore::BlocksFor(ctx + k + 1));  // the verification's context
  p.nb_d = static_cast<int>(kvstore::BlocksFor(ctx + k));
  p.dh_total = static_cast<int>(dc_.num_hidden_layers * dc_.num_attention_heads);
  p.units = static_cast<int>(tc_.num_hidden_layers * tc_.num_key_value_heads);
  p.d_units = static_cast<int>(dc_.num_hidden_layers * dc_.num_key_value_heads);
  const runtime::StsBudget budget{.budget_fraction = fraction, .sink_blocks = o_.sink_blocks,
                                  .window_blocks = o_.window_blocks};
  p.list = static_cast<int>(runtime::BudgetBlocks(budget, p.nb));
  p.list_d = static_cast<int>(runtime::BudgetBlocks(budget, p.nb_d));
  p.offsets = kernels::SelectionOffsets(std::vector<int32_t>(B, p.nb), p.units, p.list, o_.sink_blocks, o_.window_blocks);
  p.offsets_d =
      kernels::SelectionOffsets(std::vector<int32_t>(B, p.nb_d), p.d_units, p.list_d, o_.sink_blocks, o_.window_blocks);
  const int group = static_cast<int>(dc_.num_attention_heads / dc_.num_key_value_heads);
  const int tkv = static_cast<int>(tc_.num_key_value_heads), dkv_n = static_cast<int>(dc_.num_key_value_heads);
  std::vector<int32_t> mi{0}, mh, dmi{0}, dmh;
  for (int u = 0; u < p.units; ++u) {
    const int layer = u / tkv, kvh = u % tkv;
    const int dl = static_cast<int>(int64_t{layer} * dc_.num_hidden_layers / tc_.num_hidden_layers);
    for (int g = 0; g < group; ++g) mh.push_back(dl * static_cast<int>(dc_.num_attention_heads) + (kvh % dkv_n) * group + g);
    mi.push_back(static_cast<int32_t>(mh.size()));
  }
  for (int u = 0; u < p.d_units; ++u) {
    const int layer = u / dkv_n, kvh = u % dkv_n;
    for (int g = 0; g < group; ++g) dmh.push_back(layer * static_cast<int>(dc_.num_attention_heads) + kvh * group + g);
    dmi.push_back(static_cast<int32_t>(dmh.size()));
  }
  auto upload = [](DeviceVec& d, const std::vector<int32_t>& v) -> absl::Status {
    BENCH_CUDA(cudaMalloc(&d.p, std::max<size_t>(4, v.size() * 4)));
    BENCH_CUDA(cudaMemcpy(d.p, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
    return absl::OkStatus();
  };
  p.mass_floats = static_cast<size_t>(B) * k * p.dh_total * p.nb;
  BENCH_CUDA(cudaMalloc(&p.mass.p, p.mass_floats * 4));
  BENCH_CUDA(cudaMemset(p.mass.p, 0, p.mass_floats * 4));
  BENCH_CHECK(upload(p.num_blocks, std::vector<int32_t>(B, p.nb)));
  BENCH_CHECK(upload(p.map_indptr, mi));
  BENCH_CHECK(upload(p.map_heads, mh));
  BENCH_CHECK(upload(p.out_indptr, p.offsets));
  BENCH_CUDA(cudaMalloc(&p.out_blocks.p, std::max<size_t>(4, p.offsets.back() * 4)));
  p.sp = {.mass = static_cast<float*>(p.mass.p), .num_blocks = static_cast<int32_t*>(p.num_blocks.p),
          .map_indptr = static_cast<int32_t*>(p.map_indptr.p), .map_heads = static_cast<int32_t*>(p.map_heads.p),
          .out_indptr = static_cast<int32_t*>(p.out_indptr.p), .out_blocks = static_cast<int32_t*>(p.out_blocks.p),
          .num_seqs = B, .num_positions = k, .num_draft_heads = p.dh_total, .max_blocks = p.nb, .num_units = p.units,
          .budget_blocks = p.list, .sink_blocks = o_.sink_blocks, .window_blocks = o_.window_blocks};
  BENCH_CUDA(cudaMalloc(&p.scratch.p, kernels::BlockSelectScratchBytes(p.sp)));
  p.sel = {.indptr = static_cast<int32_t*>(p.out_indptr.p), .blocks = static_cast<int32_t*>(p.out_blocks.p),
           .num_seqs = B, .num_layers = static_cast<int>(tc_.num_hidden_layers), .num_kv_heads = tkv,
           .max_list_blocks = p.list};
  BENCH_CHECK(upload(p.d_num_blocks, std::vector<int32_t>(B, p.nb_d)));
  BENCH_CHECK(upload(p.d_map_indptr, dmi));
  BENCH_CHECK(upload(p.d_map_heads, dmh));
  BENCH_CHECK(upload(p.d_out_indptr, p.offsets_d));
  BENCH_CUDA(cudaMalloc(&p.d_out_blocks.p, std::max<size_t>(4, p.offsets_d.back() * 4)));
  p.dsp = p.sp;
  p.dsp.num_blocks = static_cast<int32_t*>(p.d_num_blocks.p);
  p.dsp.map_indptr = static_cast<int32_t*>(p.d_map_indptr.p);
  p.dsp.map_heads = static_cast<int32_t*>(p.d_map_heads.p);
  p.dsp.out_indptr = static_cast<int32_t*>(p.d_out_indptr.p);
  p.dsp.out_blocks = static_cast<int32_t*>(p.d_out_blocks.p);
  p.dsp.num_units = p.d_units;
  p.dsp.budget_blocks = p.list_d;
  BENCH_CUDA(cudaMalloc(&p.d_scratch.p, kernels::BlockSelectScratchBytes(p.dsp)));
  p.dsel = {.indptr = static_cast<int32_t*>(p.d_out_indptr.p), .blocks = static_cast<int32_t*>(p.d_out_blocks.p),
            .num_seqs = B, .num_layers = static_cast<int>(dc_.num_hidden_layers), .num_kv_heads = dkv_n,
            .max_list_blocks = p.list_d, .block_bound = p.nb_d};
  return absl::OkStatus();
}

absl::Status Bench::Run() {
  std::printf("k = %d draft tokens per round, ASSUMED %.2f accepted per round (random weights accept nothing): "
              "a round yields %.2f tokens per sequence\n",
              o_.k, o_.accepted, o_.accepted + 1);
  if (!o_.contexts.empty()) {
    if (absl::Status s = RunResident(); !s.ok()) return s;
  }
  target_.reset();
  draft_.reset();
  for (int64_t ctx : o_.host_contexts) {
    for (int b : o_.host_batches) {
      if (absl::Status s = RunHostTier(ctx, b); !s.ok()) return s;
    }
  }
  return WriteJson();
}

absl::Status Bench::RunResident() {
  const int k = o_.k;
  const size_t kvpt_t = tc_.num_hidden_layers * tc_.num_key_value_heads * 2 * tc_.head_dim * 2;
  const size_t kvpt_d = dc_.num_hidden_layers * dc_.num_key_value_heads * 2 * dc_.head_dim * 2;
  auto weights = [](const ModelConfig& c) {
    const int64_t d = c.hidden_size, per_layer = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim * d +
                                                 d * c.num_attention_heads * c.head_dim + 3 * c.intermediate_size * d;
    return static_cast<double>((c.tie_word_embeddings ? 1 : 2) * c.vocab_size * d + c.num_hidden_layers * per_layer) * 2;
  };
  size_t free_bytes = 0, total_bytes = 0;
  BENCH_CUDA(cudaSetDevice(o_.device));
  BENCH_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  const double fixed = weights(tc_) + weights(dc_) + 4e9;  // + activations, logits, workspaces, mass
  int64_t pool_tokens = 0;
  std::vector<std::pair<int64_t, int>> runs;
  for (int64_t ctx : o_.contexts) {
    for (int b : o_.batches) {
      const int64_t tokens = int64_t{b} * (ctx + 2 * kvstore::kBlockSize + k + 1);
      const double need = fixed + static_cast<double>(tokens) * (kvpt_t + kvpt_d);
      if (need > 0.95 * static_cast<double>(free_bytes)) {
        std::printf("skip context %lld batch %d: needs %.1f GB of GPU memory (weights + KV of both models), %.1f GB free; "
                    "the host-store tier serves it\n",
                    static_cast<long long>(ctx), b, need / 1e9, free_bytes / 1e9);
        continue;
      }
      runs.push_back({ctx, b});
      pool_tokens = std::max(pool_tokens, tokens);
    }
  }
  if (runs.empty()) return absl::ResourceExhaustedError("no configuration fits on this GPU");
  std::printf("creating random-weight models: target %.2f GB, draft %.2f GB, KV pools of %lld tokens (%.1f + %.1f GB)\n",
              weights(tc_) / 1e9, weights(dc_) / 1e9, static_cast<long long>(pool_tokens),
              pool_tokens * static_cast<double>(kvpt_t) / 1e9, pool_tokens * static_cast<double>(kvpt_d) / 1e9);
  absl::StatusOr<std::unique_ptr<CudaModel>> t =
      CreateRandomCudaModel(tc_, 1, {.device = o_.device, .kv_budget_tokens = pool_tokens});
  if (!t.ok()) return t.status();
  target_ = std::move(*t);
  absl::StatusOr<std::unique_ptr<CudaModel>> d =
      CreateRandomCudaModel(dc_, 2, {.device = o_.device, .kv_budget_tokens = pool_tokens});
  if (!d.ok()) return d.status();
  draft_ = std::move(*d);
  if (absl::Status s = MeasureCopyBandwidth(static_cast<cudaStream_t>(target_->stream())); !s.ok()) return s;
  std::printf("HBM copy bandwidth (read + write) measured: %.0f GB/s\n", copy_gbps_);
  std::printf("STS: %.0f%% of blocks per (layer, KV head) incl. %d sink + %d window blocks; head map: each target "
              "(layer, KV head) reads the draft layer at proportional depth, the 4 query heads of the same KV group; "
              "SANTA %d samples per 16-row group. -sd: sparse draft (first draft step dense, the next k-1 over the "
              "draft's own top blocks at the same budget)\n\n",
              100 * o_.budget_fraction, o_.sink_blocks, o_.window_blocks, o_.santa_samples);
  std::printf("%8s %5s %-12s %9s %9s %7s | %8s %8s %8s %8s %8s | %10s %6s\n", "context", "batch", "mode", "round_ms",
              "tok/s", "vs_AR", "draft", "select", "prefetch", "t_attn", "t_rest", "roof_tok/s", "%roof");
  for (auto [ctx, b] : runs) {
    if (absl::Status s = RunConfig(ctx, b); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status Bench::WriteJson() {
  if (!o_.json_out.empty()) {
    std::ofstream f(o_.json_out);
    for (const Row& r : rows_) {
      f << "{\"context\":" << r.context << ",\"batch\":" << r.batch << ",\"mode\":\"" << r.mode
        << "\",\"round_ms\":" << r.round_ms << ",\"tokens_per_s\":" << r.tokens_per_s << ",\"draft_ms\":" << r.draft_ms
        << ",\"select_ms\":" << r.select_ms << ",\"prefetch_ms\":" << r.prefetch_ms << ",\"target_attn_ms\":" << r.attn_ms
        << ",\"target_rest_ms\":" << r.rest_ms << ",\"roofline_tokens_per_s\":" << r.roofline_tokens_per_s
        << ",\"accepted_assumed\":" << o_.accepted << ",\"k\":" << o_.k << ",\"copy_gbps\":" << copy_gbps_
        << ",\"path\":\"" << r.path << "\",\"measured_acceptance\":" << r.measured_acceptance << "}\n";
    }
  }
  return absl::OkStatus();
}

void Bench::Print(const Row& r) {
  double ar = 0;
  for (const Row& x : rows_) {
    if (x.context == r.context && x.batch == r.batch && (x.mode == "dense-AR" || x.mode == "dense-AR-pcie")) {
      ar = x.tokens_per_s;
    }
  }
  std::printf("%8lld %5d %-12s %9.3f %9.1f %6.2fx | %8.3f %8.3f %8.3f %8.3f %8.3f | %10.1f %5.0f%%\n",
              static_cast<long long>(r.context), r.batch, r.mode.c_str(), r.round_ms, r.tokens_per_s,
              ar > 0 ? r.tokens_per_s / ar : 1.0, r.draft_ms, r.select_ms, r.prefetch_ms, r.attn_ms, r.rest_ms,
              r.roofline_tokens_per_s, 100 * r.tokens_per_s / r.roofline_tokens_per_s);
  std::fflush(stdout);
}

absl::Status Bench::RunConfig(int64_t ctx, int batch) {
  const int k = o_.k, B = batch;
  CudaModel& T = *target_;
  CudaModel& D = *draft_;
  cudaStream_t ts = static_cast<cudaStream_t>(T.stream()), ds = static_cast<cudaStream_t>(D.stream());
  for (int s = 0; s < B; ++s) {
    BENCH_CHECK(T.AddSequence(s));
    BENCH_CHECK(D.AddSequence(s));
    BENCH_CHECK(FillRandomContext(T, s, ctx, 100 + s));
    BENCH_CHECK(FillRandomContext(D, s, ctx, 200 + s));
  }
  auto truncate_all = [&](CudaModel& m) -> absl::Status {
    for (int s = 0; s < B; ++s) {
      if (absl::Status st = m.TruncateSequence(s, ctx); !st.ok()) return st;
    }
    return absl::OkStatus();
  };
  std::vector<std::vector<int32_t>> one(B, std::vector<int32_t>{7}), kp1(B, std::vector<int32_t>(k + 1, 7));
  auto inputs = [&](std::vector<std::vector<int32_t>>& toks, bool all_logits) {
    std::vector<SequenceInput> in;
    for (int s = 0; s < B; ++s) in.push_back({.seq = s, .tokens = toks[s], .all_logits = all_logits});
    return in;
  };
  DeviceVec t_argmax, d_argmax;
  BENCH_CUDA(cudaMalloc(&t_argmax.p, sizeof(int32_t) * B * (k + 1)));
  BENCH_CUDA(cudaMalloc(&d_argmax.p, sizeof(int32_t) * B));
  BENCH_CUDA(cudaMemset(d_argmax.p, 0, sizeof(int32_t) * B));
  int32_t* targmax = static_cast<int32_t*>(t_argmax.p);
  int32_t* dargmax = static_cast<int32_t*>(d_argmax.p);

  // Target graphs: dense autoregressive step, dense / STS / STS+SANTA verification, and the same
  // without attention (the rest of the step).
  auto capture_target = [&](std::vector<std::vector<int32_t>>& toks, bool all, const runtime::DeviceStepOptions& opt) {
    std::vector<SequenceInput> in = inputs(toks, all);
    absl::StatusOr<int> g = T.CaptureForward(in, opt);
    if (g.ok()) {
      if (absl::Status st = truncate_all(T); !st.ok()) return absl::StatusOr<int>(st);
    }
    return g;
  };
  // STS plumbing, sized for the verification's context: the draft's mass, the target's lists
  // and the sparse draft's own.
  StsPlumbing sts;
  BENCH_CHECK(MakeSts(B, ctx, o_.budget_fraction, &sts));
  const int nb = sts.nb, dh_total = sts.dh_total, list = sts.list, list_d = sts.list_d;
  DeviceVec& mass = sts.mass;
  const size_t mass_floats = sts.mass_floats;
  const kernels::BlockSelectParams& sp = sts.sp;
  const kernels::BlockSelectParams& dsp = sts.dsp;
  DeviceVec& scratch = sts.scratch;
  DeviceVec& d_scratch = sts.d_scratch;
  const kvstore::SelectionView& dsel = sts.dsel;
  const kvstore::SelectionView& sel = sts.sel;
  auto select = [&]() -> absl::Status {
    BENCH_CUDA(kernels::BlockSelect(sp, scratch.p, ts));
    return absl::OkStatus();
  };
  BENCH_CHECK(select());  // valid lists before the STS verification is captured
  BENCH_CUDA(cudaStreamSynchronize(ts));

  // Sparse draft ("-sd" rows): the draft's first step of a round is dense and writes its mass;
  // its own top blocks per (draft layer, KV head) — its 4 query heads, same budget — then serve
  // its remaining k - 1 steps, which write their mass over those blocks only.
  // Between the first and second draft step: forget the previous round's later positions, then
  // pick the draft's own blocks from the first step's mass.
  auto draft_select = [&]() -> absl::Status {
    for (int s = 0; s < B && k > 1; ++s) {
      BENCH_CUDA(cudaMemsetAsync(static_cast<float*>(mass.p) + (static_cast<size_t>(s) * k + 1) * dh_total * nb, 0,
                                 static_cast<size_t>(k - 1) * dh_total * nb * 4, ds));
    }
    BENCH_CUDA(kernels::BlockSelect(dsp, d_scratch.p, ds));
    return absl::OkStatus();
  };
  BENCH_CHECK(draft_select());
  BENCH_CUDA(cudaStreamSynchronize(ds));

  // Every variant runs once first, so the model's step buffers reach their largest size before
  // any capture (a later reallocation would make the earlier graphs stale).
  auto warm = [&](CudaModel& m, std::vector<std::vector<int32_t>>& toks, bool all,
                  const runtime::DeviceStepOptions& opt) -> absl::Status {
    std::vector<SequenceInput> in = inputs(toks, all);
    if (absl::Status st = m.EnqueueForward(in, opt); !st.ok()) return st;
    if (absl::Status st = m.Synchronize(); !st.ok()) return st;
    return truncate_all(m);
  };
  BENCH_CHECK(warm(T, one, false, {.argmax = targmax}));
  BENCH_CHECK(warm(T, kp1, true, {.argmax = targmax}));
  BENCH_CHECK(warm(T, kp1, true, {.selection = &sel, .argmax = targmax}));
  BENCH_CHECK(warm(T, kp1, true, {.selection = &sel, .argmax = targmax, .santa_samples = o_.santa_samples}));
  {
    runtime::DeviceBlockMass bm{.mass = static_cast<float*>(mass.p), .seq_stride = static_cast<int64_t>(k) * dh_total * nb,
                                .token_stride = 0, .head_stride = nb, .layer_stride = 0,
                                .layer_head_offset = static_cast<int>(dc_.num_attention_heads)};
    BENCH_CHECK(warm(D, one, false, {.block_mass = &bm, .argmax = dargmax}));
    BENCH_CHECK(warm(D, one, false, {.selection = &dsel, .block_mass = &bm, .argmax = dargmax}));
  }
  absl::StatusOr<int> g_ar = capture_target(one, false, {.argmax = targmax});
  absl::StatusOr<int> g_ar_rest = capture_target(one, false, {.argmax = targmax, .skip_attention = true});
  absl::StatusOr<int> g_vd = capture_target(kp1, true, {.argmax = targmax});
  absl::StatusOr<int> g_vs = capture_target(kp1, true, {.selection = &sel, .argmax = targmax});
  absl::StatusOr<int> g_vss = capture_target(
      kp1, true, {.selection = &sel, .argmax = targmax, .santa_samples = o_.santa_samples, .santa_seed = 5});
  absl::StatusOr<int> g_v_rest = capture_target(kp1, true, {.argmax = targmax, .skip_attention = true});
  for (const absl::StatusOr<int>* g : {&g_ar, &g_ar_rest, &g_vd, &g_vs, &g_vss, &g_v_rest}) {
    if (!g->ok()) return g->status();
  }
  // Draft graphs: k single-token steps, each feeding the previous step's greedy token, plain
  // (dense speculation) or writing its attention mass per block (STS).
  std::vector<int> g_draft, g_draft_mass, g_draft_sd, g_draft_sparse;
  for (int variant = 0; variant < 4; ++variant) {  // plain, mass, sparse draft, all steps sparse
    const bool with_mass = variant > 0;
    for (int p = 0; p < k; ++p) {
      runtime::DeviceBlockMass bm{.mass = static_cast<float*>(mass.p) + static_cast<size_t>(p) * dh_total * nb,
                                  .seq_stride = static_cast<int64_t>(k) * dh_total * nb, .token_stride = 0,
                                  .head_stride = nb, .layer_stride = 0,
                                  .layer_head_offset = static_cast<int>(dc_.num_attention_heads)};
      runtime::DeviceStepOptions opt{.selection = (variant == 2 && p > 0) || variant == 3 ? &dsel : nullptr,
                                     .block_mass = with_mass ? &bm : nullptr, .argmax = dargmax,
                                     .device_tokens = dargmax};
      std::vector<SequenceInput> in = inputs(one, false);
      absl::StatusOr<int> g = D.CaptureForward(in, opt);
      if (!g.ok()) return g.status();
      (variant == 0 ? g_draft : variant == 1 ? g_draft_mass : variant == 2 ? g_draft_sd : g_draft_sparse).push_back(*g);
    }
    BENCH_CHECK(truncate_all(D));
  }
  // The graphs captured first must not have been made stale by larger later ones.
  auto replay = [](CudaModel& m, int g) { return m.Replay(g); };
  auto draft_round = [&](const std::vector<int>& gs) -> absl::Status {
    if (&gs == &g_draft_sparse) {  // its masses cover listed blocks only: clear the previous round's
      BENCH_CUDA(cudaMemsetAsync(mass.p, 0, mass_floats * 4, ds));
    }
    for (size_t i = 0; i < gs.size(); ++i) {
      if (absl::Status st = replay(D, gs[i]); !st.ok()) return st;
      if (i == 0 && &gs == &g_draft_sd) {
        if (absl::Status st = draft_select(); !st.ok()) return st;
      }
    }
    return absl::OkStatus();
  };
  const int it = o_.iters;
  absl::StatusOr<double> t_ar = TimeMs(ts, it, [&] { return replay(T, *g_ar); });
  absl::StatusOr<double> t_ar_rest = TimeMs(ts, it, [&] { return replay(T, *g_ar_rest); });
  absl::StatusOr<double> t_vd = TimeMs(ts, it, [&] { return replay(T, *g_vd); });
  absl::StatusOr<double> t_vs = TimeMs(ts, it, [&] { return replay(T, *g_vs); });
  absl::StatusOr<double> t_vss = TimeMs(ts, it, [&] { return replay(T, *g_vss); });
  absl::StatusOr<double> t_v_rest = TimeMs(ts, it, [&] { return replay(T, *g_v_rest); });
  absl::StatusOr<double> t_sel = TimeMs(ts, it, select);
  absl::StatusOr<double> t_dr = TimeMs(ds, it, [&] { return draft_round(g_draft); });
  absl::StatusOr<double> t_drm = TimeMs(ds, it, [&] { return draft_round(g_draft_mass); });
  absl::StatusOr<double> t_dsd = TimeMs(ds, it, [&] { return draft_round(g_draft_sd); });
  // The sparse draft's parts, to see where its time goes.
  absl::StatusOr<double> t_dsel = TimeMs(ds, it, draft_select);
  absl::StatusOr<double> t_dstep0 = TimeMs(ds, it, [&] { return replay(D, g_draft_sd[0]); });
  absl::StatusOr<double> t_dsparse = TimeMs(ds, it, [&] { return replay(D, g_draft_sd.back()); });
  absl::StatusOr<double> t_dplain = TimeMs(ds, it, [&] { return replay(D, g_draft[0]); });
  if (t_dsel.ok() && t_dstep0.ok() && t_dsparse.ok() && t_dplain.ok()) {
    std::printf("   draft parts (ms): dense step %.3f, dense step + mass %.3f, own selection %.3f, sparse step + mass %.3f\n",
                *t_dplain, *t_dstep0, *t_dsel, *t_dsparse);
  }
  for (const absl::StatusOr<double>* t :
       {&t_ar, &t_ar_rest, &t_vd, &t_vs, &t_vss, &t_v_rest, &t_sel, &t_dr, &t_drm, &t_dsd}) {
    if (!t->ok()) return t->status();
  }

  // End to end, as a serving loop runs it: the draft's k steps, then (STS) the selection, the
  // target's verification, and the one host synchronisation acceptance needs (the greedy tokens
  // read back); the next round's draft waits for it.
  int32_t* host_tokens = nullptr;
  BENCH_CUDA(cudaHostAlloc(&host_tokens, sizeof(int32_t) * B * (k + 1), cudaHostAllocDefault));
  cudaEvent_t drafted, verified;
  BENCH_CUDA(cudaEventCreateWithFlags(&drafted, cudaEventDisableTiming));
  BENCH_CUDA(cudaEventCreateWithFlags(&verified, cudaEventDisableTiming));
  // refresh > 1: the sparse draft's dense first step only every `refresh` rounds; the rounds
  // between run all draft steps over the lists the last dense step picked (draft_graphs must
  // be g_draft_sd).
  auto end_to_end = [&](const std::vector<int>* draft_graphs, bool sts, int verify_graph, int rows,
                        int refresh = 1) -> absl::StatusOr<double> {
    int round_index = 0;
    auto round = [&]() -> absl::Status {
      if (draft_graphs != nullptr) {
        const bool dense_step = refresh <= 1 || round_index++ % refresh == 0;
        if (absl::Status st = draft_round(dense_step ? *draft_graphs : g_draft_sparse); !st.ok()) return st;
        BENCH_CUDA(cudaEventRecord(drafted, ds));
        BENCH_CUDA(cudaStreamWaitEvent(ts, drafted, 0));
      }
      if (sts) {
        if (absl::Status st = select(); !st.ok()) return st;
      }
      if (absl::Status st = replay(T, verify_graph); !st.ok()) return st;
      BENCH_CUDA(cudaMemcpyAsync(host_tokens, targmax, sizeof(int32_t) * rows, cudaMemcpyDeviceToHost, ts));
      BENCH_CUDA(cudaEventRecord(verified, ts));
      BENCH_CUDA(cudaStreamWaitEvent(ds, verified, 0));
      BENCH_CUDA(cudaEventSynchronize(verified));
      return absl::OkStatus();
    };
    if (absl::Status st = round(); !st.ok()) return st;  // warm-up
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) {
      if (absl::Status st = round(); !st.ok()) return st;
    }
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / it;
  };
  absl::StatusOr<double> e_ar = end_to_end(nullptr, false, *g_ar, B);
  absl::StatusOr<double> e_spec = end_to_end(&g_draft, false, *g_vd, B * (k + 1));
  absl::StatusOr<double> e_sts = end_to_end(&g_draft_mass, true, *g_vs, B * (k + 1));
  absl::StatusOr<double> e_santa = end_to_end(&g_draft_mass, true, *g_vss, B * (k + 1));
  absl::StatusOr<double> e_sts_sd = end_to_end(&g_draft_sd, true, *g_vs, B * (k + 1));
  absl::StatusOr<double> e_santa_sd = end_to_end(&g_draft_sd, true, *g_vss, B * (k + 1));
  const int refresh = o_.draft_refresh_rounds;
  absl::StatusOr<double> e_sts_sdr = end_to_end(&g_draft_sd, true, *g_vs, B * (k + 1), refresh);
  absl::StatusOr<double> t_dsparse_round = TimeMs(ds, it, [&] { return draft_round(g_draft_sparse); });
  cudaFreeHost(host_tokens);
  cudaEventDestroy(drafted);
  cudaEventDestroy(verified);
  for (const absl::StatusOr<double>* t : {&e_ar, &e_spec, &e_sts, &e_santa, &e_sts_sd, &e_santa_sd, &e_sts_sdr,
                                          &t_dsparse_round}) {
    if (!t->ok()) return t->status();
  }

  // Roofline: bytes a round must read from HBM (weights once per pass, the KV it attends), over
  // the copy bandwidth measured above.
  const double wt = static_cast<double>(T.weight_bytes()), wd = static_cast<double>(D.weight_bytes());
  const double kv_t = static_cast<double>(B) * ctx * T.kv_bytes_per_token();
  const double kv_d = static_cast<double>(B) * ctx * D.kv_bytes_per_token();
  const double kv_t_sel = static_cast<double>(B) * list * kvstore::kBlockSize * T.kv_bytes_per_token();
  const double bw = copy_gbps_ * 1e9;
  const double per_round = B * (o_.accepted + 1);
  auto add = [&](const std::string& mode, double round_ms, double draft_ms, double select_ms, double attn_ms,
                 double rest_ms, double bytes, double tokens) {
    Row r{.context = ctx, .batch = B, .mode = mode, .round_ms = round_ms, .tokens_per_s = tokens / (round_ms * 1e-3),
          .draft_ms = draft_ms, .select_ms = select_ms, .prefetch_ms = 0, .attn_ms = attn_ms, .rest_ms = rest_ms,
          .roofline_tokens_per_s = tokens / (bytes / bw)};
    rows_.push_back(r);
    Print(r);
  };
  add("dense-AR", *e_ar, 0, 0, *t_ar - *t_ar_rest, *t_ar_rest, wt + kv_t, B);
  add("dense-spec", *e_spec, *t_dr, 0, *t_vd - *t_v_rest, *t_v_rest, k * (wd + kv_d) + wt + kv_t, per_round);
  // The draft's block mass comes out of its attention pass (block log-sum-exp): no extra bytes.
  add("STS-spec", *e_sts, *t_drm, *t_sel, *t_vs - *t_v_rest, *t_v_rest, k * (wd + kv_d) + wt + kv_t_sel, per_round);
  add("STS+SANTA", *e_santa, *t_drm, *t_sel, *t_vss - *t_v_rest, *t_v_rest, k * (wd + kv_d) + wt + kv_t_sel, per_round);
  const double kv_d_sel = static_cast<double>(B) * list_d * kvstore::kBlockSize * D.kv_bytes_per_token();
  const double sd_bytes = k * wd + kv_d + (k - 1) * kv_d_sel + wt + kv_t_sel;
  add("STS-spec-sd", *e_sts_sd, *t_dsd, *t_sel, *t_vs - *t_v_rest, *t_v_rest, sd_bytes, per_round);
  add("STS+SANTA-sd", *e_santa_sd, *t_dsd, *t_sel, *t_vss - *t_v_rest, *t_v_rest, sd_bytes, per_round);
  // Sparse draft refreshed every `refresh` rounds: amortized draft time and bytes.
  const double sparse_round_bytes = k * wd + k * kv_d_sel;
  const double sdr_bytes = (sd_bytes - wt - kv_t_sel + (refresh - 1) * sparse_round_bytes) / refresh + wt + kv_t_sel;
  add(absl::StrCat("STS-spec-sd/", refresh), *e_sts_sdr, (*t_dsd + (refresh - 1) * *t_dsparse_round) / refresh, *t_sel,
      *t_vs - *t_v_rest, *t_v_rest, sdr_bytes, per_round);
  BENCH_CHECK(RunProductRows(T, D, ctx, B, o_.budget_fraction,
                             {"dense-AR", "dense-spec", "STS-spec", "STS+SANTA", "STS-spec-sd",
                              absl::StrCat("STS-spec-sd/", refresh)},
                             "product:"));
  for (int s = 0; s < B; ++s) {
    BENCH_CHECK(T.ReleaseSequence(s));
    BENCH_CHECK(D.ReleaseSequence(s));
  }
  return absl::OkStatus();
}

absl::Status Bench::RunProductRows(CudaModel& T, CudaModel& D, int64_t ctx, int B, double fraction,
                                   const std::vector<std::string>& modes, const std::string& prefix) {
  const int k = o_.k, it = o_.iters;
  // What scout generate uses for a checkpoint without a calibrated head map.
  const runtime::HeadMap map = runtime::DefaultHeadMap(tc_, dc_), self = runtime::SelfHeadMap(dc_);
  const runtime::StsBudget budget{.budget_fraction = fraction, .sink_blocks = o_.sink_blocks,
                                  .window_blocks = o_.window_blocks};
  const std::unique_ptr<round::SpeculativeRound> rnd = round::MakeRound(T, D);
  const std::vector<int32_t> prompt = {7};
  auto restore = [&]() -> absl::Status {
    for (int s = 0; s < B; ++s) {
      for (CudaModel* m : {&T, &D}) {
        if (absl::Status st = m->TruncateSequence(s, ctx); !st.ok()) return st;
      }
    }
    return absl::OkStatus();
  };
  using Clock = std::chrono::steady_clock;
  std::printf("product path: the rounds scout generate and serve run (round::MakeRound: the %s round; default head "
              "map, contexts continued by real rounds, acceptance as measured on random weights)\n",
              rnd->name());
  for (const std::string& mode : modes) {
    Row r{.context = ctx, .batch = B, .mode = prefix + mode, .path = "product"};
    if (mode == "dense-AR") {
      // Plain decoding as scout generate runs it (one sequence at a time).
      double seconds = 0;
      int64_t tokens = 0;
      for (int s = 0; s < B; ++s) {
        absl::StatusOr<runtime::GenerateResult> g =
            runtime::Generate(T, s, prompt, {.max_tokens = it + 1, .continue_sequence = true});
        if (!g.ok()) return g.status();
        seconds += g->decode_seconds;
        tokens += static_cast<int64_t>(g->tokens.size()) - 1;
      }
      r.round_ms = 1e3 * seconds / std::max<int64_t>(tokens / B, 1);
      r.tokens_per_s = tokens / std::max(seconds, 1e-9);
    } else {
      round::SpeculativeOptions so{.num_speculative_tokens = k, .max_tokens = int64_t{it + 4} * (k + 1),
                                   .continue_sequence = true};
      if (mode.rfind("STS", 0) == 0) {
        so.head_map = &map;
        so.sts_budget = budget;
      }
      if (mode.find("SANTA") != std::string::npos) so.santa_samples = o_.santa_samples;
      if (mode.find("-sd") != std::string::npos) {
        so.draft_head_map = &self;
        so.draft_budget = budget;
        const size_t slash = mode.find('/');
        so.draft_refresh_rounds = slash == std::string::npos ? 1 : std::stoi(mode.substr(slash + 1));
      }
      std::vector<std::unique_ptr<round::SpeculativeStream>> streams;
      std::vector<round::SpeculativeStream*> ptrs;
      for (int s = 0; s < B; ++s) {
        streams.push_back(std::make_unique<round::SpeculativeStream>(T, D, s, prompt, so));
        BENCH_CHECK(streams.back()->Begin());
        ptrs.push_back(streams.back().get());
      }
      for (int w = 0; w < 2; ++w) BENCH_CHECK(rnd->Run(ptrs));  // buffers grown, first refresh done
      int64_t proposed0 = 0, accepted0 = 0, proposed1 = 0, accepted1 = 0;
      for (auto* st : ptrs) {
        proposed0 += st->result().draft_proposed;
        accepted0 += st->result().draft_accepted;
      }
      const auto start = Clock::now();
      for (int i = 0; i < it; ++i) BENCH_CHECK(rnd->Run(ptrs));
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count() / it;
      for (auto* st : ptrs) {
        proposed1 += st->result().draft_proposed;
        accepted1 += st->result().draft_accepted;
      }
      r.round_ms = ms;
      r.measured_acceptance = proposed1 > proposed0 ? double(accepted1 - accepted0) / (proposed1 - proposed0) : 0;
      const double emitted_per_round = static_cast<double>(B) + double(accepted1 - accepted0) / it;
      r.tokens_per_s = emitted_per_round / (ms * 1e-3);
      streams.clear();
    }
    BENCH_CHECK(restore());
    rows_.push_back(r);
    std::printf("%8lld %5d %-22s %9.3f %9.1f  (measured acceptance %s; tok/s at the assumed %.2f accepted: %.1f)\n",
                static_cast<long long>(r.context), r.batch, r.mode.c_str(), r.round_ms, r.tokens_per_s,
                r.measured_acceptance < 0 ? "-" : absl::StrCat(r.measured_acceptance).c_str(), o_.accepted,
                mode == "dense-AR" ? r.tokens_per_s : B * (o_.accepted + 1) / (r.round_ms * 1e-3));
    std::fflush(stdout);
  }
  return absl::OkStatus();
}


// The million-token configuration: the target's KV in the host store (pinned host memory, a GPU
// block cache, the selected units prefetched every step), the draft on its own GPU with its KV
// there, as the coordinator places them. Sparse draft refreshed every R rounds.
absl::Status Bench::RunHostTier(int64_t ctx, int B) {
  const int k = o_.k;
  const int tdev = o_.device, ddev = o_.draft_device >= 0 ? o_.draft_device : o_.device;
  const int64_t pool_tokens = int64_t{B} * (ctx + 2 * kvstore::kBlockSize + k + 1);
  const double kvpt_t = static_cast<double>(tc_.num_hidden_layers * tc_.num_key_value_heads * 2 * tc_.head_dim * 2);
  std::printf("\nhost KV tier, context %lld, batch %d: target on cuda:%d with its KV (%.1f GB) in pinned host memory, "
              "draft on cuda:%d with its KV on that GPU\n",
              static_cast<long long>(ctx), B, tdev, pool_tokens * kvpt_t / 1e9, ddev);
  BENCH_CUDA(cudaSetDevice(tdev));
  double pcie_gbps = 0;
  {  // PCIe: a pinned 1 GiB host-to-device copy, the bound on what the prefetch can move
    const size_t bytes = size_t{1} << 30;
    void* host = nullptr;
    DeviceVec dev;
    BENCH_CUDA(cudaHostAlloc(&host, bytes, cudaHostAllocDefault));
    BENCH_CUDA(cudaMalloc(&dev.p, bytes));
    std::memset(host, 1, bytes);
    cudaStream_t s = nullptr;
    BENCH_CUDA(cudaStreamCreate(&s));
    absl::StatusOr<double> ms = TimeMs(s, 5, [&]() -> absl::Status {
      if (cudaMemcpyAsync(dev.p, host, bytes, cudaMemcpyHostToDevice, s) != cudaSuccess) return absl::InternalError("copy");
      return absl::OkStatus();
    });
    cudaStreamDestroy(s);
    cudaFreeHost(host);
    if (!ms.ok()) return ms.status();
    pcie_gbps = bytes / (*ms * 1e-3) / 1e9;
  }
  const auto t_create = std::chrono::steady_clock::now();
  // The draft first: on a shared GPU the target's block cache then takes only what is left.
  absl::StatusOr<std::unique_ptr<CudaModel>> dm =
      CreateRandomCudaModel(dc_, 2, {.device = ddev, .kv_budget_tokens = pool_tokens});
  if (!dm.ok()) return dm.status();
  absl::StatusOr<std::unique_ptr<CudaModel>> tm = CreateRandomCudaModel(
      tc_, 1, {.device = tdev, .host_kv_tokens = pool_tokens, .gpu_cache_units = o_.gpu_cache_units,
                        .signalled_prefetch = o_.signalled_prefetch});
  if (!tm.ok()) return tm.status();
  CudaModel& T = **tm;
  CudaModel& D = **dm;
  if (copy_gbps_ == 0) {
    BENCH_CUDA(cudaSetDevice(tdev));
    if (absl::Status st = MeasureCopyBandwidth(static_cast<cudaStream_t>(T.stream())); !st.ok()) return st;
  }
  for (int s = 0; s < B; ++s) {
    BENCH_CHECK(T.AddSequence(s));
    BENCH_CHECK(D.AddSequence(s));
    BENCH_CHECK(FillRandomContext(T, s, ctx, 100 + s));
    BENCH_CHECK(FillRandomContext(D, s, ctx, 200 + s));
  }
  std::printf("models made and %d x %lld-token contexts written in %.1f s (pinning host memory dominates); PCIe "
              "pinned copy %.1f GB/s, HBM copy %.0f GB/s\n",
              B, static_cast<long long>(ctx),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t_create).count(), pcie_gbps, copy_gbps_);
  for (double fraction : o_.host_budget_fractions) {
    if (absl::Status st = RunHostTierBudget(T, D, ctx, B, fraction, pcie_gbps); !st.ok()) return st;
  }
  for (int s = 0; s < B; ++s) {
    BENCH_CHECK(T.ReleaseSequence(s));
    BENCH_CHECK(D.ReleaseSequence(s));
  }
  return absl::OkStatus();
}

absl::Status Bench::RunHostTierBudget(CudaModel& T, CudaModel& D, int64_t ctx, int B, double fraction,
                                      double pcie_gbps) {
  const int k = o_.k, R = o_.draft_refresh_rounds;
  const int tdev = o_.device, ddev = o_.draft_device >= 0 ? o_.draft_device : o_.device;
  cudaStream_t ts = static_cast<cudaStream_t>(T.stream()), ds = static_cast<cudaStream_t>(D.stream());
  // Draft-side buffers, on the draft's GPU: its block mass, the target's lists and its own.
  BENCH_CUDA(cudaSetDevice(ddev));
  StsPlumbing sts;
  BENCH_CHECK(MakeSts(B, ctx, fraction, &sts));
  const int nb = sts.nb, dh_total = sts.dh_total, units = sts.units, list = sts.list, list_d = sts.list_d;
  const int tkv = static_cast<int>(tc_.num_key_value_heads);
  const std::vector<int32_t>& offsets = sts.offsets;
  DeviceVec& mass = sts.mass;
  const size_t mass_floats = sts.mass_floats;
  const kernels::BlockSelectParams& sp = sts.sp;
  const kernels::BlockSelectParams& dsp = sts.dsp;
  const kvstore::SelectionView& dsel = sts.dsel;
  DeviceVec d_argmax;
  BENCH_CUDA(cudaMalloc(&d_argmax.p, sizeof(int32_t) * B));
  BENCH_CUDA(cudaMemset(d_argmax.p, 0, sizeof(int32_t) * B));
  int32_t* dargmax = static_cast<int32_t*>(d_argmax.p);
  auto draft_select = [&]() -> absl::Status {
    BENCH_CUDA(cudaSetDevice(ddev));
    for (int s = 0; s < B && k > 1; ++s) {
      BENCH_CUDA(cudaMemsetAsync(static_cast<float*>(mass.p) + (static_cast<size_t>(s) * k + 1) * dh_total * nb, 0,
                                 static_cast<size_t>(k - 1) * dh_total * nb * 4, ds));
    }
    BENCH_CUDA(kernels::BlockSelect(dsp, sts.d_scratch.p, ds));
    return absl::OkStatus();
  };
  BENCH_CHECK(draft_select());
  BENCH_CUDA(cudaStreamSynchronize(ds));
  std::vector<int32_t> one_tok{7}, kp1(k + 1, 7);
  std::vector<SequenceInput> d_in;
  for (int s = 0; s < B; ++s) d_in.push_back({.seq = s, .tokens = one_tok});
  auto truncate_draft = [&]() -> absl::Status {
    for (int s = 0; s < B; ++s) {
      if (absl::Status st = D.TruncateSequence(s, ctx); !st.ok()) return st;
    }
    return absl::OkStatus();
  };
  auto bm_at = [&](int p) {
    return runtime::DeviceBlockMass{.mass = static_cast<float*>(mass.p) + static_cast<size_t>(p) * dh_total * nb,
                                    .seq_stride = static_cast<int64_t>(k) * dh_total * nb, .token_stride = 0,
                                    .head_stride = nb, .layer_stride = 0,
                                    .layer_head_offset = static_cast<int>(dc_.num_attention_heads)};
  };
  {  // the draft's step buffers at their largest before any capture
    runtime::DeviceBlockMass bm = bm_at(0);
    const std::vector<const kvstore::SelectionView*> variants = {nullptr, &dsel};
    for (const kvstore::SelectionView* sel : variants) {
      BENCH_CHECK(D.EnqueueForward(d_in, {.selection = sel, .block_mass = &bm, .argmax = dargmax}));
      BENCH_CHECK(D.Synchronize());
      BENCH_CHECK(truncate_draft());
    }
  }
  std::vector<int> g_sd, g_sparse;  // first step dense then sparse; every step sparse
  std::vector<runtime::DeviceBlockMass> bms;
  for (int p = 0; p < k; ++p) bms.push_back(bm_at(p));
  for (int variant = 0; variant < 2; ++variant) {
    for (int p = 0; p < k; ++p) {
      runtime::DeviceStepOptions opt{.selection = variant == 1 || p > 0 ? &dsel : nullptr, .block_mass = &bms[p],
                                     .argmax = dargmax, .device_tokens = dargmax};
      absl::StatusOr<int> g = D.CaptureForward(d_in, opt);
      if (!g.ok()) return g.status();
      (variant == 0 ? g_sd : g_sparse).push_back(*g);
    }
    BENCH_CHECK(truncate_draft());
  }
  auto draft_round = [&](bool dense_first) -> absl::Status {
    BENCH_CUDA(cudaSetDevice(ddev));
    const std::vector<int>& gs = dense_first ? g_sd : g_sparse;
    if (!dense_first) BENCH_CUDA(cudaMemsetAsync(mass.p, 0, mass_floats * 4, ds));
    for (size_t i = 0; i < gs.size(); ++i) {
      if (absl::Status st = D.Replay(gs[i]); !st.ok()) return st;
      if (i == 0 && dense_first) {
        if (absl::Status st = draft_select(); !st.ok()) return st;
      }
    }
    return absl::OkStatus();
  };
  // The target's selection: picked on the draft's GPU, read back to the host, where the tier
  // plans the step's prefetch.
  int32_t* host_blocks = nullptr;
  BENCH_CUDA(cudaHostAlloc(&host_blocks, std::max<size_t>(4, offsets.back() * 4), cudaHostAllocDefault));
  using Lists = std::vector<kvstore::Selection>;  // one per sequence
  Lists sel(B);
  for (int s = 0; s < B; ++s) {
    sel[s] = {.num_layers = static_cast<int>(tc_.num_hidden_layers), .num_kv_heads = tkv, .indptr = {}, .blocks = {}};
    for (int u = 0; u <= units; ++u) sel[s].indptr.push_back(offsets[s * units + u] - offsets[s * units]);
  }
  auto target_select = [&](Lists* out) -> absl::Status {
    BENCH_CUDA(cudaSetDevice(ddev));
    BENCH_CUDA(kernels::BlockSelect(sp, sts.scratch.p, ds));
    BENCH_CUDA(cudaMemcpyAsync(host_blocks, sts.out_blocks.p, offsets.back() * 4, cudaMemcpyDeviceToHost, ds));
    BENCH_CUDA(cudaStreamSynchronize(ds));
    for (int s = 0; s < B; ++s) {
      (*out)[s].blocks.assign(host_blocks + offsets[s * units], host_blocks + offsets[(s + 1) * units]);
    }
    return absl::OkStatus();
  };
  BENCH_CUDA(cudaSetDevice(tdev));
  DeviceVec t_argmax;
  BENCH_CUDA(cudaMalloc(&t_argmax.p, sizeof(int32_t) * B * (k + 1)));
  int32_t* host_tokens = nullptr;
  BENCH_CUDA(cudaHostAlloc(&host_tokens, sizeof(int32_t) * B * (k + 1), cudaHostAllocDefault));
  auto verify = [&](const Lists& lists, bool skip_attention) -> absl::Status {
    std::vector<SequenceInput> in;
    for (int s = 0; s < B; ++s) in.push_back({.seq = s, .tokens = kp1, .all_logits = true, .selection = &lists[s]});
    if (absl::Status st = T.EnqueueForward(in, {.argmax = static_cast<int32_t*>(t_argmax.p),
                                                .skip_attention = skip_attention});
        !st.ok()) {
      return st;
    }
    BENCH_CUDA(cudaSetDevice(tdev));
    BENCH_CUDA(cudaMemcpyAsync(host_tokens, t_argmax.p, sizeof(int32_t) * B * (k + 1), cudaMemcpyDeviceToHost, ts));
    BENCH_CUDA(cudaStreamSynchronize(ts));
    for (int s = 0; s < B; ++s) {
      if (absl::Status st = T.TruncateSequence(s, ctx); !st.ok()) return st;
    }
    return absl::OkStatus();
  };
  using Clock = std::chrono::steady_clock;
  auto wall_ms = [&](int n, auto fn) -> absl::StatusOr<double> {
    if (absl::Status st = fn(); !st.ok()) return st;  // warm-up
    const auto start = Clock::now();
    for (int i = 0; i < n; ++i) {
      if (absl::Status st = fn(); !st.ok()) return st;
    }
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count() / n;
  };
  const int it = o_.iters;
  // End to end: the draft's round, the selection, the target's tiered verification (plan,
  // prefetch, attention over cached units, write-back), and the greedy tokens read back.
  // The parts. The draft: dense-first and all-sparse rounds on its GPU; the target's selection;
  // its verification with every unit cached (the same lists again), with and without attention.
  BENCH_CHECK(target_select(&sel));
  BENCH_CUDA(cudaSetDevice(ddev));
  absl::StatusOr<double> t_dsd = TimeMs(ds, it, [&] { return draft_round(true); });
  absl::StatusOr<double> t_dsparse = TimeMs(ds, it, [&] { return draft_round(false); });
  absl::StatusOr<double> t_sel = wall_ms(it, [&] { return target_select(&sel); });
  const Lists fixed_sel = sel;
  BENCH_CHECK(verify(fixed_sel, false));
  const runtime::HostKvTierStats h0 = T.host_tier_stats();
  absl::StatusOr<double> t_vhit = wall_ms(it, [&] { return verify(fixed_sel, false); });
  const runtime::HostKvTierStats h1 = T.host_tier_stats();
  absl::StatusOr<double> t_vrest = wall_ms(it, [&] { return verify(fixed_sel, true); });
  for (const absl::StatusOr<double>* t : {&t_dsd, &t_dsparse, &t_sel, &t_vhit, &t_vrest}) {
    if (!t->ok()) return t->status();
  }
  const double draft_ms = (*t_dsd + (R - 1) * *t_dsparse) / R;
  const double plan_hit_ms = (h1.plan_ms - h0.plan_ms) / (it + 1);  // wall_ms runs one warm-up call
  const double attn_ms = *t_vhit - *t_vrest;
  const double rest_ms = *t_vrest - plan_hit_ms;
  const double dense_pcie_tok_s = pcie_gbps * 1e9 / (static_cast<double>(ctx) * T.kv_bytes_per_token());
  if (fraction == o_.host_budget_fractions.front()) {
    std::printf("dense decoding with the KV streamed over PCIe instead (not run: bound by PCIe): %.2f tokens/s\n",
                dense_pcie_tok_s);
    Row r{.context = ctx, .batch = B, .mode = "dense-AR-pcie", .round_ms = 1e3 / dense_pcie_tok_s,
          .tokens_per_s = dense_pcie_tok_s, .roofline_tokens_per_s = dense_pcie_tok_s, .path = "computed"};
    rows_.push_back(r);
  }
  // Roofline of a round, the parts in series: draft bytes over HBM, target weights and selected
  // KV over HBM, the moved units over PCIe.
  const double bw = copy_gbps_ * 1e9;
  const double wt = static_cast<double>(T.weight_bytes()), wd = static_cast<double>(D.weight_bytes());
  const double kv_d = static_cast<double>(B) * ctx * D.kv_bytes_per_token();
  const double kv_d_sel = static_cast<double>(B) * list_d * kvstore::kBlockSize * D.kv_bytes_per_token();
  const double kv_t_sel = static_cast<double>(B) * list * kvstore::kBlockSize * T.kv_bytes_per_token();
  const double draft_bytes = (kv_d + (k - 1) * kv_d_sel + (R - 1) * k * kv_d_sel) / R + k * wd;
  const double per_round = B * (o_.accepted + 1);
  std::printf("STS budget %.3g%%: %d units selected per round over the batch; draft %.3f ms a round (dense-first %.3f, all-sparse %.3f; "
              "dense first step every %d rounds); target selection + readback %.3f ms; verification with every unit "
              "cached %.3f ms, of which host planning %.2f ms\n",
              100 * fraction, offsets.back(), draft_ms, *t_dsd, *t_dsparse, R, *t_sel, *t_vhit, plan_hit_ms);
  std::printf("%8s %5s %-14s %9s %9s %7s | %8s %8s %8s %8s %8s | %10s %6s | %6s %8s %8s\n", "context", "batch", "mode",
              "round_ms", "tok/s", "vs_AR", "draft", "select", "prefetch", "t_attn", "t_rest", "roof_tok/s", "%roof",
              "cached", "moved_GB", "plan_ms");
  // Turnover: random weights make the draft pick the same blocks every round (its queries and
  // the context do not change between rounds), so, as with acceptance, how much the target's
  // lists change from one round to the next is set explicitly: each round replaces that
  // fraction of every list's blocks (sinks and window excepted) with blocks it did not hold,
  // starting from the draft's real selection.
  std::mt19937 rng(17);
  const int sink = o_.sink_blocks, window_begin = nb - o_.window_blocks;
  std::vector<char> in_list(nb);
  auto mutate_one = [&](const kvstore::Selection& from, double turnover) {
    kvstore::Selection to = from;
    to.blocks.clear();
    to.indptr.assign(1, 0);
    std::vector<int32_t> keep;
    for (int u = 0; u < units; ++u) {
      keep.assign(from.blocks.begin() + from.indptr[u], from.blocks.begin() + from.indptr[u + 1]);
      for (int32_t b : keep) in_list[b] = 1;
      int movable = 0;
      for (int32_t b : keep) movable += b >= sink && b < window_begin;
      const int replace = static_cast<int>(std::lround(turnover * movable));
      const int room = window_begin - sink - movable;
      for (int r = 0; r < std::min(replace, room); ++r) {
        // drop a random movable block, add a random block not in the list
        int32_t victim;
        do {
          victim = keep[rng() % keep.size()];
        } while (victim < sink || victim >= window_begin || in_list[victim] != 1);
        in_list[victim] = 2;  // dropped this round: not re-added
        int32_t fresh;
        do {
          fresh = sink + static_cast<int32_t>(rng() % (window_begin - sink));
        } while (in_list[fresh] != 0);
        in_list[fresh] = 3;
      }
      const size_t begin = to.blocks.size();
      for (int32_t b : keep) {
        if (in_list[b] == 1) to.blocks.push_back(b);
        in_list[b] = 0;
      }
      for (int32_t b = sink; b < window_begin && replace > 0; ++b) {
        if (in_list[b] == 3) {
          to.blocks.push_back(b);
          in_list[b] = 0;
        }
      }
      std::sort(to.blocks.begin() + begin, to.blocks.end());
      to.indptr.push_back(static_cast<int32_t>(to.blocks.size()));
    }
    return to;
  };
  auto mutate = [&](const Lists& from, double turnover) {
    Lists to;
    for (const kvstore::Selection& one : from) to.push_back(mutate_one(one, turnover));
    return to;
  };
  for (double turnover : o_.host_turnovers) {
    std::vector<Lists> sels = {fixed_sel};
    while (static_cast<int>(sels.size()) < it + 3) sels.push_back(mutate(sels.back(), turnover));
    int round_index = 0;
    auto round = [&]() -> absl::Status {
      const int r = round_index++;
      if (absl::Status st = draft_round(r % R == 0); !st.ok()) return st;
      if (absl::Status st = target_select(&sel); !st.ok()) return st;  // run as in serving; lists from sels
      return verify(sels[r % sels.size()], false);
    };
    for (int w = 0; w < 2; ++w) BENCH_CHECK(round());  // round 1 is the first with a turnover
    const runtime::HostKvTierStats s0 = T.host_tier_stats();
    absl::StatusOr<double> e2e = wall_ms(it, round);
    const runtime::HostKvTierStats s1 = T.host_tier_stats();
    if (!e2e.ok()) return e2e.status();
    const double rounds = it + 1;
    const double plan_ms = (s1.plan_ms - s0.plan_ms) / rounds;
    const double moved = static_cast<double>(s1.bytes_prefetched - s0.bytes_prefetched) / rounds;
    const double hits = static_cast<double>(s1.unit_hits - s0.unit_hits);
    const double misses = static_cast<double>(s1.unit_misses - s0.unit_misses);
    const double prefetch_ms = std::max(0.0, *e2e - draft_ms - *t_sel - *t_vhit - (plan_ms - plan_hit_ms));
    const double roof_s = (draft_bytes + wt + kv_t_sel) / bw + moved / (pcie_gbps * 1e9);
    Row r{.context = ctx, .batch = B, .mode = absl::StrCat("host-", 100 * fraction, "%-t", std::lround(100 * turnover)),
          .round_ms = *e2e, .tokens_per_s = per_round / (*e2e * 1e-3), .draft_ms = draft_ms, .select_ms = *t_sel,
          .prefetch_ms = prefetch_ms, .attn_ms = attn_ms, .rest_ms = rest_ms, .roofline_tokens_per_s = per_round / roof_s};
    rows_.push_back(r);
    std::printf("%8lld %5d %-14s %9.3f %9.1f %6.2fx | %8.3f %8.3f %8.3f %8.3f %8.3f | %10.1f %5.0f%% | %5.1f%% %8.2f %8.2f\n",
                static_cast<long long>(r.context), r.batch, r.mode.c_str(), r.round_ms, r.tokens_per_s,
                r.tokens_per_s / dense_pcie_tok_s, r.draft_ms, r.select_ms, r.prefetch_ms, r.attn_ms, r.rest_ms,
                r.roofline_tokens_per_s, 100 * r.tokens_per_s / r.roofline_tokens_per_s,
                100 * hits / std::max(1.0, hits + misses), moved / 1e9, plan_ms);
    std::fflush(stdout);
  }
  std::printf("(-tN: N%% of each list's blocks new every round; vs_AR: against dense decoding streamed over PCIe; "
              "select: the target's selection on the draft's GPU and its readback; prefetch: what the transfers add "
              "to the round beyond the all-cached verification; t_rest: the verification without attention or "
              "planning; cached: selected units already on the GPU)\n");
  cudaFreeHost(host_blocks);
  cudaFreeHost(host_tokens);
  BENCH_CUDA(cudaSetDevice(tdev));
  return RunProductRows(T, D, ctx, B, fraction, {absl::StrCat("STS-spec-sd/", R)}, absl::StrCat("product:host-", 100 * fraction, "%-"));
}

}  // namespace

int RunDecodeBench(const DecodeBenchOptions& o) {
  if (o.k < 1 || o.accepted < 0 || o.accepted > o.k || !(o.budget_fraction > 0 && o.budget_fraction <= 1) ||
      o.iters < 1 || o.santa_samples < 1) {
    std::fprintf(stderr, "scout bench decode: need k >= 1, 0 <= accepted <= k, budget fraction in (0, 1], iters >= 1, "
                         "santa samples >= 1\n");
    return 2;
  }
  absl::StatusOr<ModelConfig> tc = ConfigFor(o.target);
  absl::StatusOr<ModelConfig> dc = ConfigFor(o.draft);
  for (const absl::StatusOr<ModelConfig>* c : {&tc, &dc}) {
    if (!c->ok()) {
      std::fprintf(stderr, "scout bench decode: %s\n", std::string(c->status().message()).c_str());
      return 2;
    }
  }
  if (tc->vocab_size != dc->vocab_size) {
    std::fprintf(stderr, "scout bench decode: target and draft vocabularies differ (%lld vs %lld)\n",
                 static_cast<long long>(tc->vocab_size), static_cast<long long>(dc->vocab_size));
    return 2;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, o.device) != cudaSuccess) {
    std::fprintf(stderr, "scout bench decode: no CUDA device %d\n", o.device);
    return 1;
  }
  std::printf("scout bench decode on %s: target %s, draft %s, bf16\n", prop.name, o.target.c_str(), o.draft.c_str());
  Bench b(o, *tc, *dc);
  absl::Status s = b.Run();
  if (!s.ok()) {
    std::fprintf(stderr, "scout bench decode: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace scout::bench
