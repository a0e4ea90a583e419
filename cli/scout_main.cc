// scout: one binary, subcommands in the style of `vllm serve` / `vllm bench`.
#include <chrono>
#include <cstdio>
#include <functional>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <iostream>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/serve_bench.h"
#include "cli/flags.h"
#include "yaml-cpp/yaml.h"
#include "runtime/cpu_model.h"
#ifdef SCOUT_HAVE_CUDA
#include <cuda_runtime.h>

#include "bench/decode_bench.h"
#include "runtime/cuda_model.h"
#endif
#ifdef SCOUT_HAVE_UCX
#include "kvstore/remote_store.h"
#endif
#ifdef SCOUT_HAVE_NCCL
#include "runtime/tensor_parallel.h"
#endif
#include <unistd.h>

#include <csignal>
#include <thread>

#include "monitoring/metrics.h"
#include "rpc/openai_server.h"
#include "runtime/calibrate.h"
#include "scheduler/cluster.h"
#include "scheduler/engine.h"
#include "scheduler/worker.h"
#include "runtime/fidelity.h"
#include "runtime/generator.h"
#include "runtime/tasks.h"
#include "round/speculative.h"
#include "runtime/tokenizer.h"

namespace scout::cli {
namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "scout: error: %s\n", s.ToString().c_str());
  return 1;
}

// Where `scout calibrate` writes, and generate/eval look by default.
std::filesystem::path DefaultHeadMapPath(const std::string& draft_dir) {
  return std::filesystem::path(draft_dir) / "scout_head_map.json";
}

// --head-map if given, else the draft folder's calibrated map if present, else proportional depth.
absl::StatusOr<runtime::HeadMap> ResolveHeadMap(const std::string& flag, const std::string& draft_dir,
                                                const runtime::ModelConfig& target, const runtime::ModelConfig& draft) {
  std::filesystem::path path = flag;
  if (path.empty() && std::filesystem::exists(DefaultHeadMapPath(draft_dir))) path = DefaultHeadMapPath(draft_dir);
  if (path.empty()) return runtime::DefaultHeadMap(target, draft);
  return runtime::LoadHeadMap(path, target, draft);
}

// The STS flags generate and serve share: --sparsity (with its own help text), --kv-budget-tokens,
// --kv-budget-fraction and --head-map, appended to a subcommand's flags.
std::vector<FlagSpec> WithStsFlags(std::vector<FlagSpec> specs, const std::string& sparsity_help) {
  specs.push_back({"sparsity", "dense", sparsity_help});
  specs.push_back({"kv-budget-tokens", "0", "sts: tokens of KV each target (layer, KV head) reads (0: --kv-budget-fraction)"});
  specs.push_back({"kv-budget-fraction", "0.1", "sts: fraction of the context's blocks each (layer, KV head) reads"});
  specs.push_back({"head-map", "", "sts: head map JSON (default: DRAFT/scout_head_map.json if present, else proportional depth)"});
  specs.push_back({"dense-layers", "", "sts: target layers that read every block, e.g. 0,1 or -1 for the last"});
  specs.push_back({"sparse-draft", "", "the draft's own steps attend only to its top blocks, picked by a dense step every --draft-refresh-rounds rounds", true});
  specs.push_back({"draft-kv-budget-fraction", "0", "sparse draft: fraction of the draft's blocks each of its (layer, KV head) reads (0: --kv-budget-fraction)"});
  specs.push_back({"draft-refresh-rounds", "1", "sparse draft: rounds between the draft's dense steps (1: every round)"});
  specs.push_back({"santa-samples", "0", "SANTA: value rows the target's verification samples per (KV head, 16 query rows) instead of summing all (0: exact)"});
  return specs;
}

// The sparse draft and SANTA, from the flags above.
struct RoundChoice {
  bool sparse_draft = false;
  runtime::StsBudget draft_budget;
  int draft_refresh_rounds = 1;
  int santa_samples = 0;
};

absl::StatusOr<RoundChoice> ParseRoundFlags(const Flags& flags) {
  absl::StatusOr<double> fraction = flags.GetDouble("draft-kv-budget-fraction"),
                         sts_fraction = flags.GetDouble("kv-budget-fraction");
  absl::StatusOr<int64_t> refresh = flags.GetInt("draft-refresh-rounds"), santa = flags.GetInt("santa-samples");
  for (const absl::Status& s : {fraction.status(), sts_fraction.status(), refresh.status(), santa.status()}) {
    if (!s.ok()) return s;
  }
  if (*fraction < 0 || *fraction > 1) return absl::InvalidArgumentError("--draft-kv-budget-fraction must be in [0, 1]");
  if (*refresh < 1) return absl::InvalidArgumentError("--draft-refresh-rounds must be >= 1");
  if (*santa < 0) return absl::InvalidArgumentError("--santa-samples must be >= 0");
  RoundChoice c{.sparse_draft = flags.GetBool("sparse-draft"), .draft_refresh_rounds = static_cast<int>(*refresh),
                .santa_samples = static_cast<int>(*santa)};
  c.draft_budget.budget_fraction = *fraction > 0 ? *fraction : *sts_fraction;
  return c;
}

struct StsChoice {
  runtime::HeadMap head_map;
  runtime::StsBudget budget;
};

// Reads those flags: nullopt for --sparsity dense; InvalidArgument for another value or a bad
// budget; head map errors pass through.
absl::StatusOr<std::optional<StsChoice>> ParseSts(const Flags& flags, const runtime::ModelConfig& target,
                                                  const runtime::ModelConfig& draft) {
  const std::string sparsity = flags.Get("sparsity");
  if (sparsity == "dense") return std::optional<StsChoice>();
  if (sparsity != "sts") {
    return absl::InvalidArgumentError(absl::StrCat("--sparsity must be dense or sts, got \"", sparsity, "\""));
  }
  absl::StatusOr<runtime::HeadMap> m = ResolveHeadMap(flags.Get("head-map"), flags.Get("draft"), target, draft);
  if (!m.ok()) return m.status();
  absl::StatusOr<int64_t> tokens = flags.GetInt("kv-budget-tokens");
  absl::StatusOr<double> fraction = flags.GetDouble("kv-budget-fraction");
  if (!tokens.ok()) return tokens.status();
  if (!fraction.ok()) return fraction.status();
  if (*tokens < 0 || !(*fraction > 0 && *fraction <= 1)) {
    return absl::InvalidArgumentError("--kv-budget-tokens must be >= 0 and --kv-budget-fraction in (0, 1]");
  }
  absl::StatusOr<std::vector<int>> dense = runtime::ParseDenseLayers(flags.Get("dense-layers"));
  if (!dense.ok()) return dense.status();
  return StsChoice{.head_map = *m,
                   .budget = {.budget_tokens = *tokens, .budget_fraction = *fraction, .dense_layers = *dense}};
}

// Writes `text` to `path` unless path is empty (the --csv flags).
absl::Status WriteCsv(const std::string& path, const std::string& text) {
  if (path.empty()) return absl::OkStatus();
  std::ofstream out(path);
  out << text;
  if (!out) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

// Target, draft and the target's tokenizer, for the subcommands that need all three.
struct ModelPair {
  std::unique_ptr<runtime::CpuModel> target;
  std::unique_ptr<runtime::CpuModel> draft;
  std::unique_ptr<runtime::Tokenizer> tokenizer;
};
absl::StatusOr<ModelPair> LoadPair(const std::string& model_dir, const std::string& draft_dir) {
  ModelPair pair;
  absl::StatusOr<std::unique_ptr<runtime::CpuModel>> target = runtime::CpuModel::Load(model_dir);
  if (!target.ok()) return target.status();
  absl::StatusOr<std::unique_ptr<runtime::CpuModel>> draft = runtime::CpuModel::Load(draft_dir);
  if (!draft.ok()) return draft.status();
  absl::StatusOr<std::unique_ptr<runtime::Tokenizer>> tok = runtime::LoadTokenizer(model_dir);
  if (!tok.ok()) return tok.status();
  pair.target = std::move(*target);
  pair.draft = std::move(*draft);
  pair.tokenizer = std::move(*tok);
  return pair;
}

// --host-kv-gb and --gpu-kv-cache-gb: the CUDA backend's host KV tier.
struct HostTierFlags {
  double host_gb = 0;  // > 0: the KV in a host store of this size
  double gpu_cache_gb = 0;
  std::string host_memory = "hugepages";
};

std::vector<FlagSpec> WithHostTierFlags(std::vector<FlagSpec> specs) {
  specs.push_back({"host-kv-gb", "0",
                   "cuda: keep the model's KV in a pinned host-memory store of this many GB (like SGLang's "
                   "hierarchical cache); the GPU keeps a cache of the 16-token blocks steps read, and sessions "
                   "outlive their GPU blocks (0: KV on the GPU only)"});
  specs.push_back({"gpu-kv-cache-gb", "0", "with --host-kv-gb: the GPU block cache in GB (0: what the GPU has room for)"});
  specs.push_back({"host-kv-memory", "hugepages",
                   "with --host-kv-gb: the store's memory, hugepages (2 MiB pages registered with CUDA: faster to "
                   "pin) or pinned (cudaHostAlloc)"});
  return specs;
}

absl::StatusOr<HostTierFlags> ParseHostTier(const Flags& flags) {
  absl::StatusOr<double> host = flags.GetDouble("host-kv-gb"), cache = flags.GetDouble("gpu-kv-cache-gb");
  if (!host.ok()) return host.status();
  if (!cache.ok()) return cache.status();
  if (*host < 0 || *cache < 0) return absl::InvalidArgumentError("--host-kv-gb and --gpu-kv-cache-gb must be >= 0");
  if (*cache > 0 && *host == 0) return absl::InvalidArgumentError("--gpu-kv-cache-gb needs --host-kv-gb");
  const std::string memory = flags.Get("host-kv-memory");
  if (memory != "hugepages" && memory != "pinned") {
    return absl::InvalidArgumentError(absl::StrCat("--host-kv-memory must be hugepages or pinned, got \"", memory, "\""));
  }
  return HostTierFlags{.host_gb = *host, .gpu_cache_gb = *cache, .host_memory = memory};
}

#ifdef SCOUT_HAVE_CUDA
// The host tier's sizes (zeros without --host-kv-gb): the store holds --host-kv-gb of the whole
// model's KV in tokens (a tensor-parallel shard stores only its KV heads of those tokens), the
// GPU cache --gpu-kv-cache-gb per GPU.
struct TierSizes {
  int64_t host_kv_tokens = 0;
  int64_t gpu_cache_units = 0;
};
absl::StatusOr<TierSizes> TierSizesFor(const std::string& dir, const HostTierFlags& tier) {
  if (tier.host_gb <= 0) return TierSizes{};
  absl::StatusOr<runtime::ModelConfig> c = runtime::LoadModelConfig(dir);
  if (!c.ok()) return c.status();
  const double unit = 2.0 * kvstore::kBlockSize * static_cast<double>(c->head_dim) * 2;
  const double per_token = static_cast<double>(c->num_hidden_layers * c->num_key_value_heads) * unit / kvstore::kBlockSize;
  TierSizes t;
  t.host_kv_tokens = std::max<int64_t>(kvstore::kBlockSize, static_cast<int64_t>(tier.host_gb * 1e9 / per_token));
  t.gpu_cache_units = static_cast<int64_t>(tier.gpu_cache_gb * 1e9 / unit);
  if (tier.gpu_cache_gb > 0 && t.gpu_cache_units < c->num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("--gpu-kv-cache-gb ", tier.gpu_cache_gb,
                                                   " holds less than one block per layer"));
  }
  return t;
}
#endif

// A model on the backend a --device flag names: "cpu", "cuda" or "cuda:N".
absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> LoadBackend(const std::string& dir, const std::string& device,
                                                                   int64_t kv_tokens, const HostTierFlags& tier = {}) {
  if (tier.host_gb > 0 && device == "cpu") {
    return absl::InvalidArgumentError("--host-kv-gb is the CUDA backend's host KV tier: it needs --device cuda");
  }
  if (device == "cpu") {
    absl::StatusOr<std::unique_ptr<runtime::CpuModel>> m = runtime::CpuModel::Load(dir, {.kv_budget_tokens = kv_tokens});
    if (!m.ok()) return m.status();
    return std::unique_ptr<runtime::ModelBackend>(std::move(*m));
  }
  int index = 0;
  if (device != "cuda" && !(device.rfind("cuda:", 0) == 0 && absl::SimpleAtoi(device.substr(5), &index) && index >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat("device must be cpu, cuda or cuda:N, got \"", device, "\""));
  }
#ifdef SCOUT_HAVE_CUDA
  absl::StatusOr<TierSizes> sizes = TierSizesFor(dir, tier);
  if (!sizes.ok()) return sizes.status();
  absl::StatusOr<std::unique_ptr<runtime::CudaModel>> m = runtime::CudaModel::Load(
      dir, {.device = index, .kv_budget_tokens = kv_tokens, .host_kv_tokens = sizes->host_kv_tokens,
            .gpu_cache_units = sizes->gpu_cache_units, .host_kv_memory = tier.host_memory});
  if (!m.ok()) return m.status();
  return std::unique_ptr<runtime::ModelBackend>(std::move(*m));
#else
  return absl::UnavailableError("this scout was built without CUDA (SCOUT_CUDA=OFF or no nvcc): use --device cpu");
#endif
}

// The target split over GPUs: --tensor-parallel-size N, or --target-devices 0,1,...
absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> LoadTensorParallel(const std::string& dir, int size,
                                                                          const std::string& devices, int64_t kv_tokens,
                                                                          const HostTierFlags& tier = {}) {
  std::vector<int> ids;
  if (devices.empty()) {
    for (int i = 0; i < size; ++i) ids.push_back(i);
  } else {
    for (absl::string_view v : absl::StrSplit(devices, ',')) {
      int x = 0;
      if (!absl::SimpleAtoi(v, &x) || x < 0) {
        return absl::InvalidArgumentError(absl::StrCat("--target-devices: \"", devices, "\" is not a list of GPU indices"));
      }
      ids.push_back(x);
    }
    if (size > 1 && static_cast<int>(ids.size()) != size) {
      return absl::InvalidArgumentError("--target-devices names a different number of GPUs than --tensor-parallel-size");
    }
  }
#ifdef SCOUT_HAVE_NCCL
  absl::StatusOr<TierSizes> sizes = TierSizesFor(dir, tier);
  if (!sizes.ok()) return sizes.status();
  absl::StatusOr<std::unique_ptr<runtime::TensorParallelModel>> m = runtime::TensorParallelModel::Load(
      dir, {.devices = ids, .kv_budget_tokens = kv_tokens, .host_kv_tokens = sizes->host_kv_tokens,
            .gpu_cache_units = sizes->gpu_cache_units, .host_kv_memory = tier.host_memory});
  if (!m.ok()) return m.status();
  return std::unique_ptr<runtime::ModelBackend>(std::move(*m));
#else
  return absl::UnavailableError("tensor parallelism needs a CUDA build with NCCL");
#endif
}

// The progress line of a long prefill on a terminal (stderr): tokens done, tokens/s and the time
// left at that rate, redrawn at most 5 times a second and wiped when the prefill ends. Prompts of
// fewer than 8192 tokens, and stderr that is not a terminal, draw nothing.
class PrefillProgressLine {
 public:
  explicit PrefillProgressLine(int64_t prompt_tokens)
      : enabled_(prompt_tokens >= 8192 && isatty(STDERR_FILENO) == 1), start_(Clock::now()), last_(start_) {}
  ~PrefillProgressLine() { Clear(); }
  void Update(int64_t done, int64_t total) {
    if (!enabled_) return;
    const Clock::time_point now = Clock::now();
    if (done < total && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    const double s = std::chrono::duration<double>(now - start_).count();
    const double rate = s > 0 ? static_cast<double>(done) / s : 0.0;
    const double left = rate > 0 ? static_cast<double>(total - done) / rate : 0.0;
    std::fprintf(stderr, "\r\033[Kscout: prefill %lld / %lld tokens (%.0f%%), %.0f tokens/s, %.0f s left",
                 static_cast<long long>(done), static_cast<long long>(total), total > 0 ? 100.0 * done / total : 100.0,
                 rate, left);
    std::fflush(stderr);
    drawn_ = true;
    if (done >= total) Clear();
  }
  std::function<void(int64_t, int64_t)> Callback() {
    return [this](int64_t done, int64_t total) { Update(done, total); };
  }

 private:
  using Clock = std::chrono::steady_clock;
  void Clear() {
    if (!drawn_) return;
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
    drawn_ = false;
  }
  bool enabled_;
  bool drawn_ = false;
  Clock::time_point start_, last_;
};

int Generate(int argc, char** argv) {
  Flags flags(WithStsFlags(WithHostTierFlags({
      {"model", "", "Hugging Face model folder (config.json, safetensors, tokenizer)"},
      {"prompt", "", "prompt text"},
      {"prompt-file", "", "read the prompt from this file instead"},
      {"max-tokens", "64", "tokens to generate"},
      {"temperature", "0", "0 for greedy"},
      {"top-k", "0", "0 for no limit"},
      {"top-p", "1", "nucleus mass"},
      {"seed", "0", "sampling seed"},
      {"prefill-chunk", "4096", "prompt tokens per forward pass (the CUDA prefill kernel needs chunks that fill the GPU)"},
      {"kv-cache-tokens", "0", "KV pool size in tokens (0: 4 x max_position_embeddings)"},
      {"device", "cpu", "backend of the target: cpu, cuda or cuda:N"},
      {"draft-device", "", "backend of the draft (default: --device)"},
      {"tensor-parallel-size", "1", "cuda: split the target over this many GPUs (NCCL)"},
      {"target-devices", "", "cuda: the target's GPUs, comma-separated (default: 0..tensor-parallel-size-1)"},
      {"ignore-eos", "", "keep generating past the end-of-sequence token", true},
      {"speculative", "", "speculative decoding with --draft proposing tokens", true},
      {"draft", "", "draft model folder (same vocabulary as --model)"},
      {"num-speculative-tokens", "4", "draft tokens proposed per round"},
      {"help", "", "show this help", true},
  }), "target attention while verifying: dense, or sts (blocks picked by the draft's attention)"));
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout generate --model DIR --prompt TEXT [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  if (flags.Get("model").empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  std::string prompt = flags.Get("prompt");
  if (!flags.Get("prompt-file").empty()) {
    absl::StatusOr<std::string> text = runtime::ReadFile(flags.Get("prompt-file"));
    if (!text.ok()) return Fail(text.status());
    prompt = *text;
  }
  absl::StatusOr<int64_t> max_tokens = flags.GetInt("max-tokens"), top_k = flags.GetInt("top-k"),
                          seed = flags.GetInt("seed"), chunk = flags.GetInt("prefill-chunk"),
                          budget = flags.GetInt("kv-cache-tokens");
  absl::StatusOr<double> temperature = flags.GetDouble("temperature"), top_p = flags.GetDouble("top-p");
  for (const absl::Status& s : {max_tokens.status(), top_k.status(), seed.status(), chunk.status(), budget.status(),
                                temperature.status(), top_p.status()}) {
    if (!s.ok()) return Fail(s);
  }
  absl::StatusOr<int64_t> tp = flags.GetInt("tensor-parallel-size");
  if (!tp.ok()) return Fail(tp.status());
  absl::StatusOr<HostTierFlags> tier = ParseHostTier(flags);
  if (!tier.ok()) return Fail(tier.status());
  const bool split = *tp > 1 || !flags.Get("target-devices").empty();
  absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> model =
      split ? LoadTensorParallel(flags.Get("model"), static_cast<int>(*tp), flags.Get("target-devices"), *budget, *tier)
            : LoadBackend(flags.Get("model"), flags.Get("device"), *budget, *tier);
  if (!model.ok()) return Fail(model.status());
  absl::StatusOr<std::unique_ptr<runtime::Tokenizer>> tok = runtime::LoadTokenizer(flags.Get("model"));
  if (!tok.ok()) return Fail(tok.status());

  std::vector<int32_t> ids = (*tok)->Encode(prompt, /*add_bos=*/true);
  runtime::GenerateOptions opt{
      .max_tokens = *max_tokens,
      .sampling = {.temperature = static_cast<float>(*temperature), .top_k = static_cast<int>(*top_k),
                   .top_p = static_cast<float>(*top_p), .seed = static_cast<uint64_t>(*seed)},
      .prefill_chunk = *chunk,
  };
  if (!flags.GetBool("ignore-eos")) opt.stop_ids = (*tok)->eos_ids();
  PrefillProgressLine progress(static_cast<int64_t>(ids.size()));
  opt.on_prefill_progress = progress.Callback();
  const runtime::Tokenizer& t = **tok;
  auto print = [&](int32_t id) {
    absl::StatusOr<std::string> piece = t.Decode({&id, 1});
    if (piece.ok()) std::fwrite(piece->data(), 1, piece->size(), stdout);
    std::fflush(stdout);
    return true;
  };
  if (flags.GetBool("speculative")) {
    if (flags.Get("draft").empty()) return Fail(absl::InvalidArgumentError("--speculative needs --draft DIR"));
    absl::StatusOr<int64_t> k = flags.GetInt("num-speculative-tokens");
    if (!k.ok()) return Fail(k.status());
    const std::string draft_device = flags.Get("draft-device").empty() ? flags.Get("device") : flags.Get("draft-device");
    absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> draft = LoadBackend(flags.Get("draft"), draft_device, *budget);
    if (!draft.ok()) return Fail(draft.status());
    round::SpeculativeOptions sopt{.num_speculative_tokens = static_cast<int>(*k), .max_tokens = opt.max_tokens,
                                   .sampling = opt.sampling, .prefill_chunk = opt.prefill_chunk,
                                   .stop_ids = opt.stop_ids, .on_prefill_progress = opt.on_prefill_progress};
    absl::StatusOr<std::optional<StsChoice>> sts = ParseSts(flags, (*model)->config(), (*draft)->config());
    if (!sts.ok()) return Fail(sts.status());
    if (sts->has_value()) {
      sopt.head_map = &(*sts)->head_map;
      sopt.sts_budget = (*sts)->budget;
    }
    absl::StatusOr<RoundChoice> rc = ParseRoundFlags(flags);
    if (!rc.ok()) return Fail(rc.status());
    const runtime::HeadMap self_map = runtime::SelfHeadMap((*draft)->config());
    if (rc->sparse_draft) {
      sopt.draft_head_map = &self_map;
      sopt.draft_budget = rc->draft_budget;
      sopt.draft_refresh_rounds = rc->draft_refresh_rounds;
    }
    sopt.santa_samples = rc->santa_samples;
    absl::StatusOr<round::SpeculativeResult> r = round::GenerateSpeculative(**model, **draft, 0, ids, sopt, print);
    std::printf("\n");
    if (!r.ok()) return Fail(r.status());
    std::fprintf(stderr,
                 "scout: prompt %lld tokens, prefill %.3f s; generated %zu tokens in %lld rounds, decode %.3f s "
                 "(%.1f tokens/s, %.3f ms a round, %s round); draft acceptance %.1f%% (%lld of %lld)\n",
                 static_cast<long long>(r->prompt_tokens), r->prefill_seconds, r->tokens.size(),
                 static_cast<long long>(r->rounds), r->decode_seconds, r->tokens.size() / std::max(r->decode_seconds, 1e-9),
                 1e3 * r->decode_seconds / std::max<int64_t>(r->rounds, 1), r->round_impl.c_str(),
                 100.0 * r->acceptance_rate(), static_cast<long long>(r->draft_accepted),
                 static_cast<long long>(r->draft_proposed));
    if (r->context_blocks > 0) {
      std::fprintf(stderr, "scout: sts: target read %.1f%% of the context's blocks while verifying\n",
                   100.0 * r->selected_blocks / r->context_blocks);
    }
    if (rc->sparse_draft && r->draft_context_blocks > 0) {
      std::fprintf(stderr, "scout: sparse draft: its steps read %.1f%% of its context's blocks\n",
                   100.0 * r->draft_selected_blocks / r->draft_context_blocks);
    }
    return 0;
  }
  absl::StatusOr<runtime::GenerateResult> r = runtime::Generate(**model, 0, ids, opt, print);
  std::printf("\n");
  if (!r.ok()) return Fail(r.status());
  const double decode_tokens = r->tokens.size() > 1 ? static_cast<double>(r->tokens.size() - 1) : 0.0;
  std::fprintf(stderr,
               "scout: prompt %lld tokens, prefill %.3f s (%.1f tokens/s); generated %zu tokens, decode %.3f s "
               "(%.1f tokens/s)\n",
               static_cast<long long>(r->prompt_tokens), r->prefill_seconds,
               r->prompt_tokens / std::max(r->prefill_seconds, 1e-9), r->tokens.size(), r->decode_seconds,
               decode_tokens / std::max(r->decode_seconds, 1e-9));
  return 0;
}

int Eval(int argc, char** argv) {
  Flags flags({
      {"model", "", "target model folder"},
      {"draft", "", "draft model folder"},
      {"text", "", "text file to score (byte-level: the fixtures' tokenizer)"},
      {"context-tokens", "3584", "tokens prefilled densely before scoring starts"},
      {"eval-tokens", "512", "tokens scored after the context"},
      {"num-speculative-tokens", "4", "k: tokens are scored in rounds of k + 1, as verification sees them"},
      {"budgets", "0.5,0.2,0.1,0.05,0.02", "fractions of the context's blocks each (layer, KV head) reads"},
      {"methods", "sts,oracle,quest,window", "selection rules to compare with dense"},
      {"head-map", "", "head map JSON (default: DRAFT/scout_head_map.json if present, else proportional depth)"},
      {"csv", "", "also write the table as CSV to this file"},
      {"acceptance-seeds", "1", "acceptance: sampled continuations per setting (seeds 1..N), averaged"},
      {"sparse-draft", "", "acceptance: also with the sparse draft (its later steps over its own top blocks at the same budget)", true},
      {"draft-refresh-rounds", "1", "sparse draft: its dense first step every this many rounds (others fully sparse)"},
      {"acceptance-tokens", "0", "also sample this many tokens (temperature 1) speculatively after the context, dense and with STS at each budget, and report the draft's acceptance and how much the STS lists change from round to round"},
      {"sink-blocks", "1", "first blocks every list keeps"},
      {"window-blocks", "4", "last blocks every list keeps"},
      {"dense-layers", "", "target layers every method reads densely, e.g. 0,1 (Quest's practice) or -1 (the last)"},
      {"santa-samples", "64", "methods named M+santa (and dense+santa): SANTA value rows sampled per (KV head, 16 query rows)"},
      {"tasks", "", "instead of perplexity on --text: retrieval accuracy on generated tasks (passkey,kv)"},
      {"task-lengths", "2048,4096", "tasks: prompt lengths in bytes"},
      {"task-count", "8", "tasks: prompts per task and length"},
      {"filler", "", "tasks: text the facts are written over"},
      {"help", "", "show this help", true},
  });
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout eval --model DIR --draft DIR (--text FILE | --tasks passkey,kv --filler FILE) [flags]\n%s",
                flags.Help().c_str());
    return 0;
  }
  const bool tasks = !flags.Get("tasks").empty();
  for (const char* f : {"model", "draft", tasks ? "filler" : "text"}) {
    if (flags.Get(f).empty()) return Fail(absl::InvalidArgumentError(absl::StrCat("--", f, " is required")));
  }
  absl::StatusOr<ModelPair> pair = LoadPair(flags.Get("model"), flags.Get("draft"));
  if (!pair.ok()) return Fail(pair.status());
  runtime::CpuModel* target = pair->target.get();
  runtime::CpuModel* draft = pair->draft.get();
  runtime::Tokenizer* tok = pair->tokenizer.get();
  absl::StatusOr<std::string> text = runtime::ReadFile(flags.Get(tasks ? "filler" : "text"));
  if (!text.ok()) return Fail(text.status());
  absl::StatusOr<runtime::HeadMap> map_or =
      ResolveHeadMap(flags.Get("head-map"), flags.Get("draft"), target->config(), draft->config());
  if (!map_or.ok()) return Fail(map_or.status());
  const runtime::HeadMap& map = *map_or;
  runtime::FidelityOptions opt;
  absl::StatusOr<int64_t> ctx = flags.GetInt("context-tokens"), ev = flags.GetInt("eval-tokens"),
                          k = flags.GetInt("num-speculative-tokens");
  for (const absl::Status& s : {ctx.status(), ev.status(), k.status()}) {
    if (!s.ok()) return Fail(s);
  }
  opt.context_tokens = *ctx;
  opt.eval_tokens = *ev;
  opt.num_speculative_tokens = static_cast<int>(*k);
  opt.budgets.clear();
  for (absl::string_view b : absl::StrSplit(flags.Get("budgets"), ',')) {
    double v;
    if (!absl::SimpleAtod(b, &v) || !(v > 0 && v <= 1)) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--budgets: \"", b, "\" is not a fraction in (0, 1]")));
    }
    opt.budgets.push_back(v);
  }
  opt.methods = absl::StrSplit(flags.Get("methods"), ',');
  absl::StatusOr<int64_t> sinks = flags.GetInt("sink-blocks"), window = flags.GetInt("window-blocks");
  if (!sinks.ok()) return Fail(sinks.status());
  if (!window.ok()) return Fail(window.status());
  if (*sinks < 0 || *window < 1) return Fail(absl::InvalidArgumentError("--sink-blocks >= 0 and --window-blocks >= 1"));
  opt.sink_blocks = static_cast<int>(*sinks);
  opt.window_blocks = static_cast<int>(*window);
  absl::StatusOr<std::vector<int>> dense_layers = runtime::ParseDenseLayers(flags.Get("dense-layers"));
  if (!dense_layers.ok()) return Fail(dense_layers.status());
  opt.dense_layers = *dense_layers;
  absl::StatusOr<int64_t> santa = flags.GetInt("santa-samples");
  if (!santa.ok()) return Fail(santa.status());
  if (*santa < 1) return Fail(absl::InvalidArgumentError("--santa-samples must be >= 1"));
  opt.santa_samples = static_cast<int>(*santa);
  if (tasks) {
    absl::StatusOr<int64_t> count = flags.GetInt("task-count");
    if (!count.ok()) return Fail(count.status());
    std::string csv = "task,length,method,budget,correct,total\n";
    std::printf("%-8s %7s %-8s %7s | %9s\n", "task", "length", "method", "budget", "accuracy");
    for (absl::string_view kind : absl::StrSplit(flags.Get("tasks"), ',')) {
      if (kind != "passkey" && kind != "kv") return Fail(absl::InvalidArgumentError(absl::StrCat("unknown task \"", kind, "\"")));
      for (absl::string_view ls : absl::StrSplit(flags.Get("task-lengths"), ',')) {
        int64_t length;
        if (!absl::SimpleAtoi(ls, &length) || length < 256) return Fail(absl::InvalidArgumentError("--task-lengths: integers >= 256"));
        std::vector<std::vector<int32_t>> prompts, answers;
        for (int64_t i = 0; i < *count; ++i) {
          runtime::RetrievalTask t = kind == "passkey" ? runtime::MakePasskeyTask(*text, length, 1000 + i)
                                                       : runtime::MakeKeyValueTask(*text, length, 2000 + i);
          prompts.push_back(tok->Encode(t.prompt, /*add_bos=*/true));
          answers.push_back(tok->Encode(t.answer, /*add_bos=*/false));
        }
        absl::StatusOr<std::vector<runtime::RetrievalRow>> rows =
            runtime::RunRetrieval(*target, *draft, map, prompts, answers, opt);
        if (!rows.ok()) return Fail(rows.status());
        for (const runtime::RetrievalRow& r : *rows) {
          std::printf("%-8s %7lld %-8s %6.0f%% | %4d / %-3d\n", std::string(kind).c_str(), static_cast<long long>(length),
                      r.method.c_str(), r.budget * 100, r.correct, r.total);
          absl::StrAppend(&csv, kind, ",", length, ",", r.method, ",", r.budget, ",", r.correct, ",", r.total, "\n");
        }
      }
    }
    if (absl::Status st = WriteCsv(flags.Get("csv"), csv); !st.ok()) return Fail(st);
    return 0;
  }
  std::vector<int32_t> ids = tok->Encode(*text, /*add_bos=*/true);
  absl::StatusOr<std::vector<runtime::FidelityRow>> rows = runtime::RunFidelity(*target, *draft, map, ids, opt);
  if (!rows.ok()) return Fail(rows.status());
  const double dense_ppl = rows->front().perplexity;
  // Draft acceptance while generating after the context: dense verification, and STS at each budget.
  absl::StatusOr<int64_t> acc_tokens = flags.GetInt("acceptance-tokens");
  if (!acc_tokens.ok()) return Fail(acc_tokens.status());
  absl::StatusOr<int64_t> acc_seeds = flags.GetInt("acceptance-seeds"), refresh_rounds = flags.GetInt("draft-refresh-rounds");
  if (!acc_seeds.ok()) return Fail(acc_seeds.status());
  if (!refresh_rounds.ok()) return Fail(refresh_rounds.status());
  if (*refresh_rounds < 1) return Fail(absl::InvalidArgumentError("--draft-refresh-rounds must be >= 1"));
  if (*acc_seeds < 1) return Fail(absl::InvalidArgumentError("--acceptance-seeds must be >= 1"));
  std::map<double, double> acceptance, acceptance_sd;  // budget (1 = dense) -> rate
  // budget -> {new, movable} blocks of the target's lists between consecutive rounds (STS only)
  std::map<double, std::pair<int64_t, int64_t>> turnover, turnover_sd;
  const runtime::HeadMap self_map = runtime::SelfHeadMap(draft->config());
  if (*acc_tokens > 0) {
    std::span<const int32_t> prompt(ids.data(), static_cast<size_t>(opt.context_tokens));
    for (double budget : [&] { std::vector<double> b = {1.0}; b.insert(b.end(), opt.budgets.begin(), opt.budgets.end()); return b; }()) {
      for (int sparse_draft = 0; sparse_draft < (flags.GetBool("sparse-draft") && budget < 1.0 ? 2 : 1); ++sparse_draft) {
        int64_t proposed = 0, accepted = 0, fresh = 0, movable = 0;
        for (int64_t seed = 1; seed <= *acc_seeds; ++seed) {
          // Sampled at temperature 1: greedy continuations of this text are runs the draft always
          // gets right, which says little.
          round::SpeculativeOptions so{.num_speculative_tokens = opt.num_speculative_tokens, .max_tokens = *acc_tokens,
                                         .sampling = {.temperature = 1.0f, .seed = static_cast<uint64_t>(seed)}};
          const runtime::StsBudget b{.budget_fraction = budget, .sink_blocks = opt.sink_blocks,
                                     .window_blocks = opt.window_blocks, .dense_layers = opt.dense_layers};
          if (budget < 1.0) {
            so.head_map = &map;
            so.sts_budget = b;
          }
          if (sparse_draft) {
            so.draft_head_map = &self_map;
            so.draft_budget = b;
            so.draft_refresh_rounds = static_cast<int>(*refresh_rounds);
          }
          absl::StatusOr<round::SpeculativeResult> r = round::GenerateSpeculative(*target, *draft, 77, prompt, so);
          if (!r.ok()) return Fail(r.status());
          proposed += r->draft_proposed;
          accepted += r->draft_accepted;
          fresh += r->turnover_new_blocks;
          movable += r->turnover_movable_blocks;
        }
        (sparse_draft ? acceptance_sd : acceptance)[budget] = proposed > 0 ? double(accepted) / proposed : 0.0;
        if (budget < 1.0) (sparse_draft ? turnover_sd : turnover)[budget] = {fresh, movable};
      }
    }
  }
  auto acceptance_text = [&](const runtime::FidelityRow& r, const std::map<double, double>& from) -> std::string {
    const double key = r.method == "dense" ? 1.0 : r.budget;
    if ((r.method != "dense" && r.method != "sts") || !from.contains(key)) return "";
    return absl::StrFormat("%.3f", from.at(key));
  };
  // Empty where not measured; "-" where every list was sinks and window only (nothing can move).
  auto turnover_text = [&](const runtime::FidelityRow& r, const std::map<double, std::pair<int64_t, int64_t>>& from,
                           bool table) -> std::string {
    if (r.method != "sts" || !from.contains(r.budget)) return "";
    const auto [fresh, movable] = from.at(r.budget);
    if (movable == 0) return table ? "-" : "";
    return absl::StrFormat("%.3f", double(fresh) / movable);
  };
  std::printf("fidelity: %s scored on %lld tokens after %lld of context, rounds of k+1 = %d\n",
              flags.Get("text").c_str(), static_cast<long long>(opt.eval_tokens),
              static_cast<long long>(opt.context_tokens), opt.num_speculative_tokens + 1);
  if (*acc_tokens > 0) {
    std::printf("turnover: share of each (layer, KV head) list's blocks, sinks and window excepted, that the "
                "previous round's list did not hold, over the acceptance runs\n");
  }
  std::printf("%-8s %7s | %10s %8s %9s | %8s %8s %8s | %10s %13s | %8s %14s\n", "method", "budget", "perplexity",
              "vs dense", "bits/tok", "recall", "jaccard", "read", "acceptance", "acc_sparse_dr", "turnover",
              "turn_sparse_dr");
  std::string csv =
      "method,budget,perplexity,ppl_change_pct,nll_per_token,recall,jaccard_oracle,blocks_read,acceptance,"
      "acceptance_sparse_draft,turnover,turnover_sparse_draft\n";
  for (const runtime::FidelityRow& r : *rows) {
    const double change = 100.0 * (r.perplexity / dense_ppl - 1.0);
    std::printf("%-8s %6.0f%% | %10.4f %+7.2f%% %9.4f | %7.1f%% %8.3f %7.1f%% | %10s %13s | %8s %14s\n",
                r.method.c_str(), r.budget * 100, r.perplexity, change, r.nll_per_token / std::log(2.0), 100 * r.recall,
                r.jaccard_oracle, 100 * r.blocks_read, acceptance_text(r, acceptance).c_str(),
                acceptance_text(r, acceptance_sd).c_str(), turnover_text(r, turnover, true).c_str(),
                turnover_text(r, turnover_sd, true).c_str());
    absl::StrAppend(&csv, r.method, ",", r.budget, ",", r.perplexity, ",", change, ",", r.nll_per_token, ",", r.recall,
                    ",", r.jaccard_oracle, ",", r.blocks_read, ",", acceptance_text(r, acceptance), ",",
                    acceptance_text(r, acceptance_sd), ",", turnover_text(r, turnover, false), ",",
                    turnover_text(r, turnover_sd, false), "\n");
  }
  if (absl::Status st = WriteCsv(flags.Get("csv"), csv); !st.ok()) return Fail(st);
  return 0;
}

int Calibrate(int argc, char** argv) {
  Flags flags({
      {"model", "", "target model folder"},
      {"draft", "", "draft model folder"},
      {"text", "", "calibration text file (keep it apart from evaluation text)"},
      {"context-tokens", "2048", "tokens prefilled before calibration rounds start"},
      {"calib-tokens", "1024", "tokens over which coverage is measured"},
      {"num-speculative-tokens", "4", "k: rounds of k + 1 tokens"},
      {"budget-fraction", "0.1", "budget at which coverage is measured"},
      {"max-heads", "3", "draft heads per target (layer, KV head) at most"},
      {"output", "", "head map JSON to write (default: DRAFT/scout_head_map.json)"},
      {"help", "", "show this help", true},
  });
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout calibrate --model DIR --draft DIR --text FILE [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  for (const char* f : {"model", "draft", "text"}) {
    if (flags.Get(f).empty()) return Fail(absl::InvalidArgumentError(absl::StrCat("--", f, " is required")));
  }
  absl::StatusOr<ModelPair> pair = LoadPair(flags.Get("model"), flags.Get("draft"));
  if (!pair.ok()) return Fail(pair.status());
  runtime::CpuModel* target = pair->target.get();
  runtime::CpuModel* draft = pair->draft.get();
  runtime::Tokenizer* tok = pair->tokenizer.get();
  absl::StatusOr<std::string> text = runtime::ReadFile(flags.Get("text"));
  if (!text.ok()) return Fail(text.status());
  absl::StatusOr<int64_t> ctx = flags.GetInt("context-tokens"), n = flags.GetInt("calib-tokens"),
                          k = flags.GetInt("num-speculative-tokens"), heads = flags.GetInt("max-heads");
  absl::StatusOr<double> frac = flags.GetDouble("budget-fraction");
  for (const absl::Status& s : {ctx.status(), n.status(), k.status(), heads.status(), frac.status()}) {
    if (!s.ok()) return Fail(s);
  }
  std::vector<int32_t> ids = tok->Encode(*text, /*add_bos=*/true);
  absl::StatusOr<runtime::CalibrationReport> rep = runtime::CalibrateHeadMap(
      *target, *draft, ids,
      {.context_tokens = *ctx, .calib_tokens = *n, .num_speculative_tokens = static_cast<int>(*k),
       .budget_fraction = *frac, .max_heads_per_unit = static_cast<int>(*heads)});
  if (!rep.ok()) return Fail(rep.status());
  std::printf("%6s %8s | %-16s %9s | %9s\n", "layer", "kv head", "draft heads", "captured", "default");
  double mean = 0, mean_def = 0;
  for (size_t u = 0; u < rep->map.units.size(); ++u) {
    std::string heads_text;
    for (int32_t h : rep->map.units[u]) {
      absl::StrAppend(&heads_text, heads_text.empty() ? "" : ",", "L", h / rep->map.draft_heads, "H",
                      h % rep->map.draft_heads);
    }
    std::printf("%6zu %8zu | %-16s %8.1f%% | %8.1f%%\n", u / rep->map.target_kv_heads, u % rep->map.target_kv_heads,
                heads_text.c_str(), 100 * rep->unit_recall[u], 100 * rep->default_recall[u]);
    mean += rep->unit_recall[u] / rep->map.units.size();
    mean_def += rep->default_recall[u] / rep->map.units.size();
  }
  std::printf("mean captured target attention at %.0f%% of blocks: %.1f%% (proportional-depth default %.1f%%)\n",
              *frac * 100, 100 * mean, 100 * mean_def);
  std::filesystem::path out = flags.Get("output");
  if (out.empty()) out = DefaultHeadMapPath(flags.Get("draft"));
  if (absl::Status s = runtime::SaveHeadMap(out, rep->map); !s.ok()) return Fail(s);
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

// Flags of the HTTP front end and its engine, shared by `serve` and `coordinator`.
std::vector<FlagSpec> FrontEndFlags(std::vector<FlagSpec> specs) {
  for (FlagSpec f : std::vector<FlagSpec>{
           {"num-speculative-tokens", "4", "draft tokens proposed per round"},
           {"max-num-batched-tokens", "2048",
            "tokens one pass may carry, over all its prompts (and, without a draft, the decoding requests' tokens "
            "that prompt chunks ride with)"},
           {"max-decode-slowdown", "1.5",
            "a decode step carrying prompt chunks (with a draft: a prefill pass and the round after it) takes at "
            "most this many times a decode-only step or round (measured), so running requests' inter-token latency "
            "holds while a long prompt prefills; <= 1: prompts bounded by --max-num-batched-tokens only"},
           {"prefill-chunk", "", "the same as --max-num-batched-tokens (older name)"},
           {"served-model-name", "", "model id in the API (default: the model folder's name)"},
           {"max-model-len", "0", "longest prompt + max_tokens accepted (0: the model's context)"},
           {"max-num-seqs", "16", "requests batched together in each decode step (with a draft: in each speculative round)"},
           {"session-idle-timeout", "0", "seconds an idle agent session keeps its KV (0: until deleted or the pool needs it)"},
           {"max-waiting", "64", "requests that may queue behind the running ones; more get 429"},
           {"shutdown-timeout", "30", "seconds SIGTERM waits for admitted requests before stopping"},
           {"host", "0.0.0.0", "address to listen on"},
           {"port", "8000", "port to listen on (0: any free port, printed at start)"},
           {"max-request-bytes", "67108864", "largest request body accepted; larger ones get 413"},
           {"max-connections", "16384", "open HTTP connections accepted; more get 503"},
           {"timeout-keep-alive", "60", "seconds an idle kept-alive connection waits for its next request"},
           {"timeout-request-header", "30", "seconds a new connection has to send its first whole request"},
           {"api-key", "", "API keys clients must send as Authorization: Bearer KEY, comma-separated (also SCOUT_API_KEY); each key is a tenant with its own sessions"},
           {"api-key-file", "", "a file of API keys, one a line (with --api-key and SCOUT_API_KEY)"},
           {"help", "", "show this help", true},
       }) {
    specs.push_back(f);
  }
  return WithStsFlags(std::move(specs), "with --draft: target attention while verifying, dense or sts");
}

// The API keys of --api-key (comma-separated), --api-key-file (one a line; blank lines and
// '#' comments skipped) and SCOUT_API_KEY, deduplicated in that order. NotFound for a missing
// file; InvalidArgument for a key with spaces.
absl::StatusOr<std::vector<std::string>> ApiKeys(const Flags& flags) {
  std::vector<std::string> keys;
  auto add = [&](absl::string_view key) -> absl::Status {
    key = absl::StripAsciiWhitespace(key);
    if (key.empty() || key[0] == '#') return absl::OkStatus();
    if (key.find_first_of(" \t") != absl::string_view::npos) {
      return absl::InvalidArgumentError("an API key may not contain spaces");
    }
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) keys.emplace_back(key);
    return absl::OkStatus();
  };
  for (absl::string_view k : absl::StrSplit(flags.Get("api-key"), ',')) {
    if (absl::Status s = add(k); !s.ok()) return s;
  }
  if (!flags.Get("api-key-file").empty()) {
    absl::StatusOr<std::string> text = runtime::ReadFile(flags.Get("api-key-file"));
    if (!text.ok()) return text.status();
    for (absl::string_view line : absl::StrSplit(*text, '\n')) {
      if (absl::Status s = add(line); !s.ok()) return s;
    }
  }
  if (const char* env = std::getenv("SCOUT_API_KEY"); env != nullptr) {
    if (absl::Status s = add(env); !s.ok()) return s;
  }
  return keys;
}

// Blocks SIGINT and SIGTERM (taken by sigwait later) before any thread starts, and ignores
// SIGPIPE (a peer that hangs up must not end the process).
sigset_t BlockStopSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
  return signals;
}

// The OpenAI-compatible front end over an engine of `model` (and `draft`), until SIGINT/SIGTERM,
// then a drain. `health`: whether the models can run (a coordinator's live workers).
int RunFrontEnd(const Flags& flags, sigset_t signals, std::unique_ptr<runtime::ModelBackend> model,
                std::unique_ptr<runtime::ModelBackend> draft, std::function<absl::Status()> health = nullptr,
                monitoring::ServerMetrics::Collector extra_metrics = nullptr) {
  absl::StatusOr<int64_t> port = flags.GetInt("port"), k = flags.GetInt("num-speculative-tokens"),
                          max_len = flags.GetInt("max-model-len"), max_waiting = flags.GetInt("max-waiting"),
                          max_num_seqs = flags.GetInt("max-num-seqs"),
                          prefill_chunk = flags.GetInt(flags.IsSet("prefill-chunk") ? "prefill-chunk" : "max-num-batched-tokens"),
                          max_request_bytes = flags.GetInt("max-request-bytes"),
                          max_connections = flags.GetInt("max-connections");
  absl::StatusOr<double> shutdown_timeout = flags.GetDouble("shutdown-timeout"),
                         idle_timeout = flags.GetDouble("session-idle-timeout"),
                         keep_alive = flags.GetDouble("timeout-keep-alive"),
                         header_timeout = flags.GetDouble("timeout-request-header"),
                         max_slowdown = flags.GetDouble("max-decode-slowdown");
  for (const absl::Status& s : {port.status(), k.status(), max_len.status(), max_waiting.status(),
                                max_num_seqs.status(), prefill_chunk.status(), max_request_bytes.status(),
                                max_connections.status(), shutdown_timeout.status(), idle_timeout.status(),
                                keep_alive.status(), header_timeout.status(), max_slowdown.status()}) {
    if (!s.ok()) return Fail(s);
  }
  if (*max_connections < 1) return Fail(absl::InvalidArgumentError("--max-connections must be >= 1"));
  if (*keep_alive <= 0 || *header_timeout <= 0) {
    return Fail(absl::InvalidArgumentError("--timeout-keep-alive and --timeout-request-header must be > 0"));
  }
  if (*idle_timeout < 0) return Fail(absl::InvalidArgumentError("--session-idle-timeout must be >= 0"));
  if (flags.IsSet("prefill-chunk") && flags.IsSet("max-num-batched-tokens") &&
      flags.Get("prefill-chunk") != flags.Get("max-num-batched-tokens")) {
    return Fail(absl::InvalidArgumentError("--prefill-chunk and --max-num-batched-tokens name the same bound: give one"));
  }
  if (*prefill_chunk < 1) return Fail(absl::InvalidArgumentError("--max-num-batched-tokens must be >= 1"));
  if (*max_request_bytes < 1) return Fail(absl::InvalidArgumentError("--max-request-bytes must be >= 1"));
  absl::StatusOr<std::unique_ptr<runtime::Tokenizer>> tok = runtime::LoadTokenizer(flags.Get("model"));
  if (!tok.ok()) return Fail(tok.status());
  absl::StatusOr<std::optional<runtime::ModelChatTemplate>> chat_template = runtime::LoadChatTemplate(flags.Get("model"));
  if (!chat_template.ok()) return Fail(chat_template.status());
  std::string name = flags.Get("served-model-name");
  if (name.empty()) name = std::filesystem::path(flags.Get("model")).lexically_normal().filename().string();
  if (name.empty()) name = std::filesystem::path(flags.Get("model")).lexically_normal().parent_path().filename().string();
  scheduler::EngineOptions engine_options{.num_speculative_tokens = static_cast<int>(*k), .max_model_len = *max_len,
                                          .max_waiting = static_cast<int>(*max_waiting),
                                          .max_num_seqs = static_cast<int>(std::max<int64_t>(1, *max_num_seqs))};
  engine_options.session_idle_timeout_s = *idle_timeout;
  engine_options.max_num_batched_tokens = *prefill_chunk;
  engine_options.max_decode_slowdown = *max_slowdown;
  engine_options.health = std::move(health);
  if (flags.Get("sparsity") != "dense" && draft == nullptr) {
    return Fail(absl::InvalidArgumentError(flags.Get("sparsity") == "sts"
                                               ? "--sparsity sts needs --draft DIR"
                                               : absl::StrCat("--sparsity must be dense or sts, got \"",
                                                              flags.Get("sparsity"), "\"")));
  }
  if (draft != nullptr) {
    absl::StatusOr<std::optional<StsChoice>> sts = ParseSts(flags, model->config(), draft->config());
    if (!sts.ok()) return Fail(sts.status());
    if (sts->has_value()) {
      engine_options.head_map = (*sts)->head_map;
      engine_options.sts_budget = (*sts)->budget;
    }
    absl::StatusOr<RoundChoice> rc = ParseRoundFlags(flags);
    if (!rc.ok()) return Fail(rc.status());
    engine_options.sparse_draft = rc->sparse_draft;
    engine_options.draft_budget = rc->draft_budget;
    engine_options.draft_refresh_rounds = rc->draft_refresh_rounds;
    engine_options.santa_samples = rc->santa_samples;
  }
  absl::StatusOr<std::vector<std::string>> api_keys = ApiKeys(flags);
  if (!api_keys.ok()) return Fail(api_keys.status());
  monitoring::ServerMetrics metrics;
  if (extra_metrics) metrics.AddCollector(std::move(extra_metrics));
  // /tokenize and /detokenize get a copy of the tokenizer of their own (the engine's is its
  // scheduler thread's).
  absl::StatusOr<std::unique_ptr<runtime::Tokenizer>> front_tok = runtime::LoadTokenizer(flags.Get("model"));
  if (!front_tok.ok()) return Fail(front_tok.status());
  scheduler::Engine engine(std::move(model), std::move(draft), std::move(*tok), &metrics, engine_options);
  absl::StatusOr<std::unique_ptr<rpc::HttpServer>> server =
      rpc::HttpServer::Start(flags.Get("host"), static_cast<int>(*port),
                             rpc::MakeOpenAiHandler(&engine, &metrics, name, chat_template->has_value() ? &**chat_template : nullptr,
                                                    {.api_keys = *api_keys,
                                                     .tokenizer = std::shared_ptr<const runtime::Tokenizer>(
                                                         std::move(*front_tok))}),
                             {.max_request_bytes = static_cast<size_t>(*max_request_bytes),
                              .max_connections = static_cast<int>(*max_connections),
                              .header_timeout_s = *header_timeout,
                              .idle_timeout_s = *keep_alive});
  if (!server.ok()) return Fail(server.status());
  std::fprintf(stderr, "scout: serving %s on http://%s:%d%s%s\n", name.c_str(), flags.Get("host").c_str(),
               (*server)->port(), *engine.round_name() != '\0' ? ", speculative rounds: " : "", engine.round_name());
  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "scout: signal %d, draining (up to %.0f s)\n", sig, *shutdown_timeout);
  const bool drained = engine.Drain(*shutdown_timeout);
  (*server)->Stop();
  std::fprintf(stderr, "scout: stopped%s\n", drained ? "" : " with requests still running (timeout)");
  return 0;
}

int Serve(int argc, char** argv) {
  Flags flags(FrontEndFlags(WithHostTierFlags({
      {"model", "", "model folder"},
      {"draft", "", "draft model folder: speculative decoding when given"},
      {"device", "cpu", "backend of the model: cpu, cuda or cuda:N"},
      {"draft-device", "", "backend of the draft (default: --device)"},
      {"tensor-parallel-size", "1", "cuda: split the model over this many GPUs (NCCL)"},
      {"target-devices", "", "cuda: the model's GPUs, comma-separated"},
      {"kv-cache-tokens", "0", "KV pool of each model in tokens (0: 4 x max_position_embeddings)"},
  })));
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout serve --model DIR [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  if (flags.Get("model").empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  const sigset_t signals = BlockStopSignals();
  absl::StatusOr<int64_t> tp = flags.GetInt("tensor-parallel-size");
  if (!tp.ok()) return Fail(tp.status());
  absl::StatusOr<HostTierFlags> tier = ParseHostTier(flags);
  if (!tier.ok()) return Fail(tier.status());
  absl::StatusOr<int64_t> kv_tokens = flags.GetInt("kv-cache-tokens");
  if (!kv_tokens.ok()) return Fail(kv_tokens.status());
  if (*kv_tokens < 0) return Fail(absl::InvalidArgumentError("--kv-cache-tokens must be >= 0"));
  const bool split = *tp > 1 || !flags.Get("target-devices").empty();
  absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> model =
      split ? LoadTensorParallel(flags.Get("model"), static_cast<int>(*tp), flags.Get("target-devices"), *kv_tokens, *tier)
            : LoadBackend(flags.Get("model"), flags.Get("device"), *kv_tokens, *tier);
  if (!model.ok()) return Fail(model.status());
  std::unique_ptr<runtime::ModelBackend> draft;
  if (!flags.Get("draft").empty()) {
    const std::string draft_device = flags.Get("draft-device").empty() ? flags.Get("device") : flags.Get("draft-device");
    absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> d = LoadBackend(flags.Get("draft"), draft_device, *kv_tokens);
    if (!d.ok()) return Fail(d.status());
    draft = std::move(*d);
  }
  return RunFrontEnd(flags, signals, std::move(*model), std::move(draft));
}

// host:port -> (host, port). InvalidArgument naming the flag.
// host:port, where host is a name, an IPv4 address or an IPv6 address in brackets ([::1]:8100).
absl::StatusOr<std::pair<std::string, int>> ParseHostPort(const std::string& flag, const std::string& value) {
  const size_t colon = value.rfind(':');
  int port = 0;
  if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(value.substr(colon + 1), &port) || port <= 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, " must be host:port, got \"", value, "\""));
  }
  std::string host = value.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.find(':') != std::string::npos && value.front() != '[') {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": an IPv6 address goes in brackets, [", host, "]:", port, "; got \"", value, "\""));
  }
  return std::make_pair(host, port);
}

// A --cluster-config YAML file: PlaceModels' ClusterConfig. InvalidArgument naming the file and
// the key for a malformed file or an unknown key.
absl::StatusOr<scheduler::ClusterConfig> LoadClusterConfig(const std::string& path) {
  scheduler::ClusterConfig c;
  try {
    const YAML::Node root = YAML::LoadFile(path);
    if (!root.IsMap()) return absl::InvalidArgumentError(absl::StrCat(path, ": a map of placement settings is expected"));
    for (const auto& kv : root) {
      const std::string key = kv.first.as<std::string>();
      const YAML::Node& v = kv.second;
      if (key == "tensor_parallel_size") {
        c.tensor_parallel_size = v.as<int>();
      } else if (key == "target_bytes_per_gpu") {
        c.target_bytes_per_gpu = v.as<int64_t>();
      } else if (key == "draft_bytes_per_gpu") {
        c.draft_bytes_per_gpu = v.as<int64_t>();
      } else if (key == "max_draft_replicas") {
        c.max_draft_replicas = v.as<int>();
      } else if (key == "target_classes") {
        c.target_classes = v.as<std::vector<std::string>>();
      } else if (key == "draft_classes") {
        c.draft_classes = v.as<std::vector<std::string>>();
      } else {
        return absl::InvalidArgumentError(absl::StrCat(path, ": unknown key \"", key, "\""));
      }
    }
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
  if (c.target_classes.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": target_classes is empty"));
  return c;
}

// `scout coordinator`: the cluster's HTTP front end and scheduler. Workers and KV store nodes
// register on --control-port; the engine runs over them (scheduler/cluster.h).
int Coordinator(int argc, char** argv) {
  Flags flags(FrontEndFlags({
      {"model", "", "the target model's folder: its config.json, tokenizer and chat template (no weights needed)"},
      {"draft", "", "the draft model's folder (config.json): speculative decoding over draft workers"},
      {"control-host", "0.0.0.0", "address workers and KV store nodes connect to"},
      {"control-port", "8100", "port workers and KV store nodes connect to (0: any free port, printed)"},
      {"heartbeat-interval", "0.5", "seconds between members' heartbeats"},
      {"heartbeat-timeout", "3", "a member silent this many seconds is dead: its sessions move"},
      {"worker-timeout", "120", "seconds one call to a worker may take before the worker is taken for dead"},
      {"cluster-config", "", "YAML placement config: target_classes, draft_classes (GPU classes in order of "
                             "preference), tensor_parallel_size, target_bytes_per_gpu, draft_bytes_per_gpu, "
                             "max_draft_replicas; workers placement leaves out stay idle (default: every worker serves)"},
  }));
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout coordinator --model DIR [--draft DIR] [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  if (flags.Get("model").empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  const sigset_t signals = BlockStopSignals();
  absl::StatusOr<runtime::ModelConfig> target = runtime::LoadModelConfig(flags.Get("model"));
  if (!target.ok()) return Fail(target.status());
  std::optional<runtime::ModelConfig> draft;
  if (!flags.Get("draft").empty()) {
    absl::StatusOr<runtime::ModelConfig> d = runtime::LoadModelConfig(flags.Get("draft"));
    if (!d.ok()) return Fail(d.status());
    draft = *d;
  }
  absl::StatusOr<int64_t> control_port = flags.GetInt("control-port");
  absl::StatusOr<double> interval = flags.GetDouble("heartbeat-interval"), timeout = flags.GetDouble("heartbeat-timeout"),
                         call = flags.GetDouble("worker-timeout");
  for (const absl::Status& s : {control_port.status(), interval.status(), timeout.status(), call.status()}) {
    if (!s.ok()) return Fail(s);
  }
  if (!(*interval > 0 && *timeout > *interval && *call > 0)) {
    return Fail(absl::InvalidArgumentError("need 0 < --heartbeat-interval < --heartbeat-timeout and --worker-timeout > 0"));
  }
  std::optional<scheduler::ClusterConfig> placement;
  if (!flags.Get("cluster-config").empty()) {
    absl::StatusOr<scheduler::ClusterConfig> pc = LoadClusterConfig(flags.Get("cluster-config"));
    if (!pc.ok()) return Fail(pc.status());
    pc->drafts = draft.has_value();
    placement = *pc;
  }
  absl::StatusOr<std::unique_ptr<scheduler::Coordinator>> coordinator = scheduler::Coordinator::Start(
      flags.Get("control-host"), static_cast<int>(*control_port),
      {.target_fingerprint = scheduler::ModelFingerprint(*target),
       .draft_fingerprint = draft ? scheduler::ModelFingerprint(*draft) : "",
       .heartbeat_interval = absl::Seconds(*interval), .heartbeat_timeout = absl::Seconds(*timeout),
       .call_timeout = absl::Seconds(*call), .placement = placement});
  if (!coordinator.ok()) return Fail(coordinator.status());
  std::fprintf(stderr, "scout: coordinator control channel on %s:%d\n", flags.Get("control-host").c_str(),
               (*coordinator)->port());
  scheduler::Coordinator* c = coordinator->get();
  auto remote_target = std::make_unique<scheduler::RemoteBackend>(c, scheduler::v1::ROLE_TARGET, *target);
  std::unique_ptr<scheduler::RemoteBackend> remote_draft;
  if (draft) remote_draft = std::make_unique<scheduler::RemoteBackend>(c, scheduler::v1::ROLE_DRAFT, *draft);
  // Health reads only the registry (thread-safe), never the backends' sequence tables.
  auto health = [c, with_draft = draft.has_value()]() -> absl::Status {
    bool target_alive = false, draft_alive = !with_draft;
    for (const auto& m : c->Members(scheduler::v1::ROLE_TARGET)) target_alive |= c->Serving(m.key);
    if (with_draft) {
      for (const auto& m : c->Members(scheduler::v1::ROLE_DRAFT)) draft_alive |= c->Serving(m.key);
    }
    if (!target_alive) return absl::UnavailableError("no live target worker");
    if (!draft_alive) return absl::UnavailableError("no live draft worker");
    return absl::OkStatus();
  };
  const int rc = RunFrontEnd(flags, signals, std::move(remote_target), std::move(remote_draft), health,
                             [c] { return scheduler::ClusterMetricFamilies(*c); });
  const scheduler::ClusterCounters n = c->counters();
  std::fprintf(stderr,
               "scout: cluster: %lld failovers, %lld tokens adopted from KV stores, %lld replayed, %lld rehomed, "
               "%lld passes retried; KV over UCX %.1f MB written, %.1f MB read in %.2f s; waited %.2f s on %lld target "
               "passes, %.2f s on %lld draft passes\n",
               static_cast<long long>(n.failovers), static_cast<long long>(n.adopted_tokens),
               static_cast<long long>(n.replayed_tokens), static_cast<long long>(n.rehomed),
               static_cast<long long>(n.retried_passes), n.kv_bytes_written / 1e6, n.kv_bytes_read / 1e6,
               n.kv_transfer_seconds, n.target_pass_seconds, static_cast<long long>(n.target_passes),
               n.draft_pass_seconds, static_cast<long long>(n.draft_passes));
  return rc;
}

// `scout worker`: serves the target or the draft model to a coordinator.
int Worker(int argc, char** argv) {
  Flags flags(WithHostTierFlags({
      {"model", "", "model folder"},
      {"role", "target", "target or draft"},
      {"coordinator", "127.0.0.1:8100", "the coordinator's control address, host:port"},
      {"id", "", "this worker's name in the cluster (default: host name and process id)"},
      {"device", "cpu", "backend: cpu, cuda or cuda:N"},
      {"tensor-parallel-size", "1", "cuda: split the model over this many GPUs (NCCL)"},
      {"target-devices", "", "cuda: the model's GPUs, comma-separated"},
      {"gpu-class", "", "the class placement knows this worker's GPUs by (default: cpu, or the CUDA device name)"},
      {"kv-budget-tokens", "0", "cpu: tokens of KV the worker holds (0: four sequences of the model's context)"},
      {"kv-remote-tier", "",
       "keep sequences whole on their KV store homes (partial blocks and lengths too) and, after an adoption, fetch "
       "per step only the KV units the step reads",
       true},
      {"help", "", "show this help", true},
  }));
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout worker --model DIR --role target|draft --coordinator HOST:PORT [flags]\n%s",
                flags.Help().c_str());
    return 0;
  }
  if (flags.Get("model").empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  const std::string role = flags.Get("role");
  if (role != "target" && role != "draft") {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--role must be target or draft, got \"", role, "\"")));
  }
  absl::StatusOr<std::pair<std::string, int>> coord = ParseHostPort("coordinator", flags.Get("coordinator"));
  if (!coord.ok()) return Fail(coord.status());
  const sigset_t signals = BlockStopSignals();
  absl::StatusOr<int64_t> tp = flags.GetInt("tensor-parallel-size"), kv_tokens = flags.GetInt("kv-budget-tokens");
  if (!tp.ok()) return Fail(tp.status());
  if (!kv_tokens.ok()) return Fail(kv_tokens.status());
  absl::StatusOr<HostTierFlags> tier = ParseHostTier(flags);
  if (!tier.ok()) return Fail(tier.status());
  const bool split = *tp > 1 || !flags.Get("target-devices").empty();
  absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> model =
      split ? LoadTensorParallel(flags.Get("model"), static_cast<int>(*tp), flags.Get("target-devices"), *kv_tokens, *tier)
            : LoadBackend(flags.Get("model"), flags.Get("device"), *kv_tokens, *tier);
  if (!model.ok()) return Fail(model.status());
  scheduler::WorkerService service(std::move(*model), {.remote_tier = flags.GetBool("kv-remote-tier")});
  scheduler::MemberOptions options{.registration = service.Describe(), .coordinator_host = coord->first,
                                   .coordinator_port = coord->second};
  std::string id = flags.Get("id");
  if (id.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof host - 1);
    id = absl::StrCat(host, "-", getpid());
  }
  options.registration.set_id(id);
  options.registration.set_role(role == "target" ? scheduler::v1::ROLE_TARGET : scheduler::v1::ROLE_DRAFT);
  options.on_assignment = [](const scheduler::v1::Assignment& a) {
    if (!a.placed()) return;
    if (a.serving()) {
      std::fprintf(stderr, "scout: placement: serving on GPU(s) %s of this worker%s\n",
                   absl::StrJoin(a.gpus(), ",").c_str(), a.draft().empty() ? "" : absl::StrCat(", draft ", a.draft()).c_str());
    } else {
      std::fprintf(stderr, "scout: placement: standing by (%s)\n", a.note().c_str());
    }
  };
  // What placement knows the worker by: its devices (the CPU counts as one), their class and
  // memory.
  const bool on_cpu = flags.Get("device") == "cpu" && !split;
  std::string gpu_class = flags.Get("gpu-class");
  int64_t device_memory = 0;
#ifdef SCOUT_HAVE_CUDA
  if (!on_cpu) {
    int index = 0;
    if (flags.Get("device").rfind("cuda:", 0) == 0) (void)absl::SimpleAtoi(flags.Get("device").substr(5), &index);
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, index) == cudaSuccess) {
      device_memory = static_cast<int64_t>(prop.totalGlobalMem);
      if (gpu_class.empty()) gpu_class = prop.name;
    }
  }
#endif
  if (gpu_class.empty()) gpu_class = on_cpu ? "cpu" : "cuda";
  options.registration.set_gpu_class(gpu_class);
  options.registration.set_num_gpus(split ? static_cast<int32_t>(*tp) : 1);
  options.registration.set_gpu_memory_bytes(device_memory);
  absl::Notification stop;
  std::thread signal_thread([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    std::fprintf(stderr, "scout: signal %d, leaving the cluster\n", sig);
    stop.Notify();
  });
  signal_thread.detach();
  std::fprintf(stderr, "scout: %s worker %s (%s) for %s\n", role.c_str(), id.c_str(), gpu_class.c_str(),
               flags.Get("model").c_str());
  absl::Status s = scheduler::RunClusterMember(
      options, [&service](const scheduler::v1::BackendRequest& r) { return service.Handle(r); },
      [&service] { return service.Heartbeat(); }, [&service] { service.Reset(); }, &stop,
      [&service] { service.Flush(); });
  if (!s.ok()) return Fail(s);
  return 0;
}

// `scout bench serve`: see bench/serve_bench.h.
int BenchServe(int argc, char** argv) {
  Flags flags({
      {"base-url", "http://127.0.0.1:8000", "the server, http://HOST:PORT"},
      {"endpoint", "/v1/completions", "/v1/completions or /v1/chat/completions"},
      {"model", "", "model name in the requests (default: the server's first in /v1/models)"},
      {"api-key", "", "sent as Authorization: Bearer (default: $OPENAI_API_KEY)"},
      {"num-prompts", "100", "requests to send"},
      {"request-rate", "inf", "requests a second, Poisson arrivals (inf: all at once)"},
      {"max-concurrency", "0", "requests in flight at most (0: no bound)"},
      {"burstiness", "1", "arrival gaps gamma-distributed with this shape (1: Poisson; below 1 burstier)"},
      {"metric-percentiles", "99", "percentiles reported beside mean and median, comma-separated, e.g. 50,90,99"},
      {"seed", "0", "random prompts and arrival times"},
      {"random-input-len", "1024", "prompt tokens (random token ids)"},
      {"random-output-len", "128", "tokens to generate"},
      {"random-range-ratio", "0", "lengths uniform in [len * (1 - r), len * (1 + r)]"},
      {"dataset-path", "", "JSONL of {\"prompt\": text or token ids, \"max_tokens\": n} instead of random prompts"},
      {"sessions", "0", "agent sessions instead of requests: conversations on a session_id, one turn at a time"},
      {"turn-tokens", "1024", "sessions: new prompt tokens a turn"},
      {"session-output-len", "64", "sessions: tokens generated a turn"},
      {"session-length", "32768", "sessions: context a session grows to"},
      {"ignore-eos", "true", "generate every requested token (true or false)"},
      {"extra-body", "", "JSON object merged into every request, e.g. '{\"sparsity\": \"sts\"}'"},
      {"goodput", "", "SLOs in ms, e.g. ttft:500,tpot:50,e2el:10000: goodput counts requests meeting all"},
      {"label", "", "name of the run in the report"},
      {"result-json", "", "write the report and every request's figures here"},
      {"help", "", "show this help", true},
  });
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout bench serve [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  bench::ServeBenchOptions o;
  o.base_url = flags.Get("base-url");
  o.endpoint = flags.Get("endpoint");
  o.model = flags.Get("model");
  o.api_key = flags.Get("api-key");
  if (o.api_key.empty() && std::getenv("OPENAI_API_KEY") != nullptr) o.api_key = std::getenv("OPENAI_API_KEY");
  absl::StatusOr<int64_t> num = flags.GetInt("num-prompts"), conc = flags.GetInt("max-concurrency"),
                          seed = flags.GetInt("seed"), in = flags.GetInt("random-input-len"),
                          out = flags.GetInt("random-output-len"), sessions = flags.GetInt("sessions"),
                          turn = flags.GetInt("turn-tokens"), sout = flags.GetInt("session-output-len"),
                          slen = flags.GetInt("session-length");
  absl::StatusOr<double> ratio = flags.GetDouble("random-range-ratio");
  for (const absl::Status& s : {num.status(), conc.status(), seed.status(), in.status(), out.status(),
                                sessions.status(), turn.status(), sout.status(), slen.status(), ratio.status()}) {
    if (!s.ok()) return Fail(s);
  }
  o.num_prompts = static_cast<int>(*num);
  o.max_concurrency = static_cast<int>(*conc);
  o.seed = static_cast<uint64_t>(*seed);
  o.random_input_len = static_cast<int>(*in);
  o.random_output_len = static_cast<int>(*out);
  o.random_range_ratio = *ratio;
  o.sessions = static_cast<int>(*sessions);
  o.turn_tokens = static_cast<int>(*turn);
  o.session_output_len = static_cast<int>(*sout);
  o.session_length = *slen;
  if (const std::string rate = flags.Get("request-rate"); rate != "inf") {
    absl::StatusOr<double> r = flags.GetDouble("request-rate");
    if (!r.ok()) return Fail(r.status());
    o.request_rate = *r;
  }
  const std::string eos = flags.Get("ignore-eos");
  if (eos != "true" && eos != "false") return Fail(absl::InvalidArgumentError("--ignore-eos must be true or false"));
  o.ignore_eos = eos == "true";
  o.dataset_path = flags.Get("dataset-path");
  o.extra_body = flags.Get("extra-body");
  for (absl::string_view slo : absl::StrSplit(flags.Get("goodput"), ',', absl::SkipEmpty())) {
    const std::vector<std::string> kv = absl::StrSplit(slo, ':');
    double ms = 0;
    if (kv.size() != 2 || !absl::SimpleAtod(kv[1], &ms) || ms <= 0) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--goodput: NAME:MS pairs, got \"", slo, "\"")));
    }
    if (kv[0] == "ttft") {
      o.slo_ttft_ms = ms;
    } else if (kv[0] == "tpot") {
      o.slo_tpot_ms = ms;
    } else if (kv[0] == "e2el") {
      o.slo_e2el_ms = ms;
    } else {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--goodput: ttft, tpot or e2el, got \"", kv[0], "\"")));
    }
  }
  absl::StatusOr<double> burst = flags.GetDouble("burstiness");
  if (!burst.ok()) return Fail(burst.status());
  o.burstiness = *burst;
  o.percentiles.clear();
  for (absl::string_view q : absl::StrSplit(flags.Get("metric-percentiles"), ',', absl::SkipEmpty())) {
    double v = 0;
    if (!absl::SimpleAtod(q, &v)) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--metric-percentiles: numbers, got \"", q, "\"")));
    }
    o.percentiles.push_back(v);
  }
  o.label = flags.Get("label");
  o.result_json = flags.Get("result-json");
  if (absl::Status s = bench::RunServeBench(o); !s.ok()) return Fail(s);
  return 0;
}

// `scout bench decode`: see bench/decode_bench.h.
int BenchDecode(int argc, char** argv) {
  Flags flags({
      {"target", "llama-3.1-8b", "target shape: llama-3.1-8b, llama-3.2-3b, llama-3.2-1b or a model folder"},
      {"draft", "llama-3.2-1b", "draft shape (same forms)"},
      {"contexts", "32768,131072", "context lengths with the KV on the GPU, comma-separated (empty: none)"},
      {"host-contexts", "", "context lengths with the target's KV in the host store (batch 1), e.g. 1048576"},
      {"host-batch-sizes", "1", "host-store runs: sequences per step, comma-separated"},
      {"draft-device", "", "host-store runs: the draft's GPU, cuda:N (default: the target's)"},
      {"gpu-cache-units", "0", "host-store runs: the target's GPU block cache in 16-token units (0: what fits)"},
      {"prefetch-launch", "signal",
       "host-store runs: signal (one gather a step, layers waited for through counters) or layers (a gather and an "
       "event per layer)"},
      {"host-budget-fractions", "0.02", "host-store runs: STS budgets, comma-separated (one model setup for all)"},
      {"host-turnovers", "0,0.17,0.5,1", "host-store runs: fraction of each list's blocks new every round (0.17 measured on the fixture pair; random "
                                        "weights pick the same blocks every round), comma-separated"},
      {"batch-sizes", "1,8", "sequences per step, comma-separated"},
      {"num-speculative-tokens", "4", "draft tokens per round (k)"},
      {"accepted", "3", "draft tokens ASSUMED accepted per round (random weights accept none)"},
      {"kv-budget-fraction", "0.1", "STS: fraction of the blocks each target (layer, KV head) reads"},
      {"santa-samples", "512", "SANTA: value rows sampled per 16-row group"},
      {"draft-refresh-rounds", "4", "sparse draft: its dense first step every this many rounds (the -sd/R rows)"},
      {"iters", "20", "timed rounds per configuration"},
      {"device", "cuda", "cuda or cuda:N"},
      {"json", "", "also write the results as JSON lines to this file"},
      {"help", "", "show this help", true},
  });
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout bench decode [flags]\n%s", flags.Help().c_str());
    return 0;
  }
#ifdef SCOUT_HAVE_CUDA
  bench::DecodeBenchOptions o;
  o.target = flags.Get("target");
  o.draft = flags.Get("draft");
  o.contexts.clear();
  o.batches.clear();
  for (auto [name, out] : {std::pair{"contexts", &o.contexts}, std::pair{"host-contexts", &o.host_contexts}}) {
    for (absl::string_view v : absl::StrSplit(flags.Get(name), ',', absl::SkipEmpty())) {
      int64_t x = 0;
      if (!absl::SimpleAtoi(v, &x) || x < 1) {
        return Fail(absl::InvalidArgumentError(absl::StrCat("--", name, ": positive integers")));
      }
      out->push_back(x);
    }
  }
  if (o.contexts.empty() && o.host_contexts.empty()) {
    return Fail(absl::InvalidArgumentError("--contexts and --host-contexts are both empty"));
  }
  if (const std::string dd = flags.Get("draft-device"); !dd.empty()) {
    if (!(dd.rfind("cuda:", 0) == 0 && absl::SimpleAtoi(dd.substr(5), &o.draft_device) && o.draft_device >= 0)) {
      return Fail(absl::InvalidArgumentError("--draft-device must be cuda:N"));
    }
  }
  absl::StatusOr<int64_t> cache_units = flags.GetInt("gpu-cache-units");
  if (!cache_units.ok()) return Fail(cache_units.status());
  if (*cache_units < 0) return Fail(absl::InvalidArgumentError("--gpu-cache-units must be >= 0"));
  o.gpu_cache_units = *cache_units;
  if (const std::string pl = flags.Get("prefetch-launch"); pl == "signal" || pl == "layers") {
    o.signalled_prefetch = pl == "signal";
  } else {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--prefetch-launch must be signal or layers, got \"", pl, "\"")));
  }
  o.host_budget_fractions.clear();
  for (absl::string_view v : absl::StrSplit(flags.Get("host-budget-fractions"), ',', absl::SkipEmpty())) {
    double x = 0;
    if (!absl::SimpleAtod(v, &x) || !(x > 0 && x <= 1)) {
      return Fail(absl::InvalidArgumentError("--host-budget-fractions: numbers in (0, 1]"));
    }
    o.host_budget_fractions.push_back(x);
  }
  o.host_batches.clear();
  for (absl::string_view v : absl::StrSplit(flags.Get("host-batch-sizes"), ',', absl::SkipEmpty())) {
    int x = 0;
    if (!absl::SimpleAtoi(v, &x) || x < 1) return Fail(absl::InvalidArgumentError("--host-batch-sizes: positive integers"));
    o.host_batches.push_back(x);
  }
  o.host_turnovers.clear();
  for (absl::string_view v : absl::StrSplit(flags.Get("host-turnovers"), ',', absl::SkipEmpty())) {
    double x = 0;
    if (!absl::SimpleAtod(v, &x) || !(x >= 0 && x <= 1)) {
      return Fail(absl::InvalidArgumentError("--host-turnovers: numbers in [0, 1]"));
    }
    o.host_turnovers.push_back(x);
  }
  if (!o.host_contexts.empty() && (o.host_budget_fractions.empty() || o.host_turnovers.empty())) {
    return Fail(absl::InvalidArgumentError("--host-budget-fractions and --host-turnovers must not be empty"));
  }
  for (absl::string_view v : absl::StrSplit(flags.Get("batch-sizes"), ',')) {
    int x = 0;
    if (!absl::SimpleAtoi(v, &x) || x < 1) return Fail(absl::InvalidArgumentError("--batch-sizes: positive integers"));
    o.batches.push_back(x);
  }
  absl::StatusOr<int64_t> k = flags.GetInt("num-speculative-tokens"), santa = flags.GetInt("santa-samples"),
                          iters = flags.GetInt("iters"), refresh = flags.GetInt("draft-refresh-rounds");
  if (!refresh.ok()) return Fail(refresh.status());
  if (*refresh < 1) return Fail(absl::InvalidArgumentError("--draft-refresh-rounds must be >= 1"));
  absl::StatusOr<double> accepted = flags.GetDouble("accepted"), fraction = flags.GetDouble("kv-budget-fraction");
  for (const absl::Status& s : {k.status(), santa.status(), iters.status(), accepted.status(), fraction.status()}) {
    if (!s.ok()) return Fail(s);
  }
  o.k = static_cast<int>(*k);
  o.accepted = *accepted;
  o.budget_fraction = *fraction;
  o.santa_samples = static_cast<int>(*santa);
  o.iters = static_cast<int>(*iters);
  o.draft_refresh_rounds = static_cast<int>(*refresh);
  const std::string device = flags.Get("device");
  if (device != "cuda" && !(device.rfind("cuda:", 0) == 0 && absl::SimpleAtoi(device.substr(5), &o.device))) {
    return Fail(absl::InvalidArgumentError("--device must be cuda or cuda:N"));
  }
  o.json_out = flags.Get("json");
  return bench::RunDecodeBench(o);
#else
  return Fail(absl::UnavailableError("scout bench decode needs a CUDA build (SCOUT_CUDA=ON)"));
#endif
}

// `scout kvstore`: a KV store node of the cluster (host memory, served over UCX).
int KvStore(int argc, char** argv) {
  Flags flags({
      {"host", "0.0.0.0", "address to listen on"},
      {"port", "7100", "port to listen on (0: any free port, printed at start)"},
      {"capacity-gb", "16", "host memory for KV units, in GB"},
      {"unit-bytes", "8192", "bytes of one (layer, KV head, 16-token block) unit: 64 x head_dim for bf16, 128 x head_dim "
                             "for the CPU backend's float32"},
      {"coordinator", "", "register with this coordinator (host:port of its control channel)"},
      {"advertise-host", "", "the host workers reach this node at (default: --host, or this machine's name)"},
      {"id", "", "this node's name in the cluster (default: host name and port)"},
      {"help", "", "show this help", true},
  });
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout kvstore [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  absl::StatusOr<int64_t> port = flags.GetInt("port"), unit = flags.GetInt("unit-bytes");
  absl::StatusOr<double> gb = flags.GetDouble("capacity-gb");
  for (const absl::Status& s : {port.status(), unit.status(), gb.status()}) {
    if (!s.ok()) return Fail(s);
  }
  if (*unit < 1 || *gb <= 0) return Fail(absl::InvalidArgumentError("--unit-bytes and --capacity-gb must be > 0"));
  std::optional<std::pair<std::string, int>> coord;
  if (!flags.Get("coordinator").empty()) {
    absl::StatusOr<std::pair<std::string, int>> c = ParseHostPort("coordinator", flags.Get("coordinator"));
    if (!c.ok()) return Fail(c.status());
    coord = *c;
  }
#ifdef SCOUT_HAVE_UCX
  const sigset_t signals = BlockStopSignals();
  const int64_t capacity = static_cast<int64_t>(*gb * 1e9 / static_cast<double>(*unit));
  absl::StatusOr<std::unique_ptr<kvstore::KvStoreServer>> server =
      kvstore::KvStoreServer::Start(flags.Get("host"), static_cast<int>(*port), static_cast<size_t>(*unit), capacity);
  if (!server.ok()) return Fail(server.status());
  std::fprintf(stderr, "scout: KV store on %s:%d (UCX), %lld units of %lld bytes\n", flags.Get("host").c_str(),
               (*server)->port(), static_cast<long long>(capacity), static_cast<long long>(*unit));
  absl::Notification stop;
  std::thread member;
  if (coord) {
    char hostname[256] = {0};
    gethostname(hostname, sizeof hostname - 1);
    std::string advertise = flags.Get("advertise-host");
    if (advertise.empty()) advertise = flags.Get("host") == "0.0.0.0" ? hostname : flags.Get("host");
    scheduler::MemberOptions options{.coordinator_host = coord->first, .coordinator_port = coord->second};
    std::string id = flags.Get("id");
    if (id.empty()) id = absl::StrCat(hostname, "-", (*server)->port());
    options.registration.set_id(id);
    options.registration.set_role(scheduler::v1::ROLE_KVSTORE);
    options.registration.set_kvstore_address(absl::StrCat(advertise, ":", (*server)->port()));
    options.registration.set_kv_unit_bytes(*unit);
    options.registration.set_capacity_units(capacity);
    kvstore::KvStoreServer* srv = server->get();
    member = std::thread([options, srv, &stop] {
      absl::Status s = scheduler::RunClusterMember(
          options, nullptr,
          [srv] {
            scheduler::v1::Heartbeat h;
            h.set_units_held(srv->units_held());
            return h;
          },
          nullptr, &stop);
      if (!s.ok()) {
        std::fprintf(stderr, "scout: error: %s\n", s.ToString().c_str());
        std::exit(1);
      }
    });
  }
  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "scout: signal %d, stopping (%lld units held)\n", sig, static_cast<long long>((*server)->units_held()));
  stop.Notify();
  if (member.joinable()) member.join();
  return 0;
#else
  return Fail(absl::UnavailableError("this scout was built without UCX (SCOUT_USE_UCX=OFF)"));
#endif
}

void Usage() {
  std::printf(
      "usage: scout <command> [flags]\n\n"
      "commands:\n"
      "  generate   generate text from a prompt on the CPU backend (--speculative with --draft)\n"
      "  eval       fidelity of sparse attention (STS, oracle, Quest, window) against dense on a text\n"
      "  calibrate  choose the draft heads that stand for each target (layer, KV head)\n"
      "  serve      OpenAI-compatible HTTP server (/v1/completions, /v1/models, /health, /metrics)\n"
      "  coordinator  the cluster's HTTP front end and scheduler over registered workers\n"
      "  worker     serves the target or draft model to a coordinator (--role target|draft)\n"
      "  kvstore    a KV store node: sessions' KV units in host memory, served over UCX\n"
      "  bench decode  decode throughput at production shapes on the GPU (dense, speculative, STS, SANTA)\n"
      "  bench serve   load against an OpenAI-compatible server (rate, concurrency, agent sessions), as vllm bench serve\n\n"
      "Run `scout <command> --help` for its flags.\n");
}

}  // namespace
}  // namespace scout::cli

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    scout::cli::Usage();
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  if (cmd == "--version" || cmd == "version") {
    std::printf("scout %s\n", scout::rpc::ScoutVersion());
    return 0;
  }
  if (cmd == "generate") return scout::cli::Generate(argc - 2, argv + 2);
  if (cmd == "eval") return scout::cli::Eval(argc - 2, argv + 2);
  if (cmd == "calibrate") return scout::cli::Calibrate(argc - 2, argv + 2);
  if (cmd == "serve") return scout::cli::Serve(argc - 2, argv + 2);
  if (cmd == "kvstore") return scout::cli::KvStore(argc - 2, argv + 2);
  if (cmd == "coordinator") return scout::cli::Coordinator(argc - 2, argv + 2);
  if (cmd == "worker") return scout::cli::Worker(argc - 2, argv + 2);
  if (cmd == "bench") {
    if (argc >= 3 && std::string(argv[2]) == "decode") return scout::cli::BenchDecode(argc - 3, argv + 3);
    if (argc >= 3 && std::string(argv[2]) == "serve") return scout::cli::BenchServe(argc - 3, argv + 3);
    std::fprintf(stderr, "scout: bench needs a benchmark name: decode or serve\n");
    return 2;
  }
  std::fprintf(stderr, "scout: unknown command \"%s\"\n", cmd.c_str());
  scout::cli::Usage();
  return 2;
}
