// What several subcommands share: flag groups and their parsing, model pairs, the HTTP front end.
#include "cli/commands.h"

#include <cstdio>
#include <functional>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"
#include "yaml-cpp/yaml.h"
#include "runtime/backend_factory.h"
#include "runtime/cpu_model.h"
#ifdef SCOUT_HAVE_CUDA
#include <cuda_runtime.h>

#include "runtime/cuda_model.h"
#endif

#include <csignal>

#include "monitoring/metrics.h"
#include "server/openai_server.h"
#include "scheduler/engine.h"
#include "text/tokenizer.h"

namespace scout::cli {

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

absl::StatusOr<ModelPair> LoadPair(const std::string& model_dir, const std::string& draft_dir) {
  ModelPair pair;
  absl::StatusOr<std::unique_ptr<runtime::CpuModel>> target = runtime::CpuModel::Load(model_dir);
  if (!target.ok()) return target.status();
  absl::StatusOr<std::unique_ptr<runtime::CpuModel>> draft = runtime::CpuModel::Load(draft_dir);
  if (!draft.ok()) return draft.status();
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> tok = text::LoadTokenizer(model_dir);
  if (!tok.ok()) return tok.status();
  pair.target = std::move(*target);
  pair.draft = std::move(*draft);
  pair.tokenizer = std::move(*tok);
  return pair;
}

// --host-kv-gb and --gpu-kv-cache-gb: the CUDA backend's host KV tier.

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

// The engine's flags, shared by `serve` and by `worker --engine` (a target group).
std::vector<FlagSpec> EngineFlags(std::vector<FlagSpec> specs) {
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
           {"max-model-len", "0", "longest prompt + max_tokens accepted (0: the model's context)"},
           {"max-num-seqs", "16", "requests batched together in each decode step (with a draft: in each speculative round)"},
           {"session-idle-timeout", "0", "seconds an idle agent session keeps its KV (0: until deleted or the pool needs it)"},
           {"max-waiting", "64", "requests that may queue behind the running ones; more get 429"},
       }) {
    specs.push_back(f);
  }
  return WithStsFlags(std::move(specs), "with --draft: target attention while verifying, dense or sts");
}

// Flags of the HTTP front end, with the engine's (EngineFlags), for `serve` and `coordinator`.
std::vector<FlagSpec> FrontEndFlags(std::vector<FlagSpec> specs) {
  for (FlagSpec f : std::vector<FlagSpec>{
           {"served-model-name", "", "model id in the API (default: the model folder's name)"},
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
  return EngineFlags(std::move(specs));
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

absl::StatusOr<scheduler::EngineOptions> ParseEngineOptions(const Flags& flags, const runtime::ModelConfig& target,
                                                            const runtime::ModelConfig* draft) {
  absl::StatusOr<int64_t> k = flags.GetInt("num-speculative-tokens"), max_len = flags.GetInt("max-model-len"),
                          max_waiting = flags.GetInt("max-waiting"), max_num_seqs = flags.GetInt("max-num-seqs"),
                          prefill_chunk = flags.GetInt(flags.IsSet("prefill-chunk") ? "prefill-chunk" : "max-num-batched-tokens");
  absl::StatusOr<double> idle_timeout = flags.GetDouble("session-idle-timeout"),
                         max_slowdown = flags.GetDouble("max-decode-slowdown");
  for (const absl::Status& s : {k.status(), max_len.status(), max_waiting.status(), max_num_seqs.status(),
                                prefill_chunk.status(), idle_timeout.status(), max_slowdown.status()}) {
    if (!s.ok()) return s;
  }
  if (*idle_timeout < 0) return absl::InvalidArgumentError("--session-idle-timeout must be >= 0");
  if (flags.IsSet("prefill-chunk") && flags.IsSet("max-num-batched-tokens") &&
      flags.Get("prefill-chunk") != flags.Get("max-num-batched-tokens")) {
    return absl::InvalidArgumentError("--prefill-chunk and --max-num-batched-tokens name the same bound: give one");
  }
  if (*prefill_chunk < 1) return absl::InvalidArgumentError("--max-num-batched-tokens must be >= 1");
  scheduler::EngineOptions options{.num_speculative_tokens = static_cast<int>(*k), .max_model_len = *max_len,
                                   .max_waiting = static_cast<int>(*max_waiting),
                                   .max_num_seqs = static_cast<int>(std::max<int64_t>(1, *max_num_seqs))};
  options.session_idle_timeout_s = *idle_timeout;
  options.max_num_batched_tokens = *prefill_chunk;
  options.max_decode_slowdown = *max_slowdown;
  if (flags.Get("sparsity") != "dense" && draft == nullptr) {
    return absl::InvalidArgumentError(flags.Get("sparsity") == "sts"
                                          ? "--sparsity sts needs --draft DIR"
                                          : absl::StrCat("--sparsity must be dense or sts, got \"", flags.Get("sparsity"), "\""));
  }
  if (draft != nullptr) {
    absl::StatusOr<std::optional<StsChoice>> sts = ParseSts(flags, target, *draft);
    if (!sts.ok()) return sts.status();
    if (sts->has_value()) {
      options.head_map = (*sts)->head_map;
      options.sts_budget = (*sts)->budget;
    }
    absl::StatusOr<RoundChoice> rc = ParseRoundFlags(flags);
    if (!rc.ok()) return rc.status();
    options.sparse_draft = rc->sparse_draft;
    options.draft_budget = rc->draft_budget;
    options.draft_refresh_rounds = rc->draft_refresh_rounds;
    options.santa_samples = rc->santa_samples;
  }
  return options;
}

int ServeHttp(const Flags& flags, sigset_t signals, scheduler::CompletionService* service,
              monitoring::ServerMetrics* metrics, const std::string& round_name) {
  absl::StatusOr<int64_t> port = flags.GetInt("port"), max_request_bytes = flags.GetInt("max-request-bytes"),
                          max_connections = flags.GetInt("max-connections");
  absl::StatusOr<double> shutdown_timeout = flags.GetDouble("shutdown-timeout"),
                         keep_alive = flags.GetDouble("timeout-keep-alive"),
                         header_timeout = flags.GetDouble("timeout-request-header");
  for (const absl::Status& s : {port.status(), max_request_bytes.status(), max_connections.status(),
                                shutdown_timeout.status(), keep_alive.status(), header_timeout.status()}) {
    if (!s.ok()) return Fail(s);
  }
  if (*max_connections < 1) return Fail(absl::InvalidArgumentError("--max-connections must be >= 1"));
  if (*keep_alive <= 0 || *header_timeout <= 0) {
    return Fail(absl::InvalidArgumentError("--timeout-keep-alive and --timeout-request-header must be > 0"));
  }
  if (*max_request_bytes < 1) return Fail(absl::InvalidArgumentError("--max-request-bytes must be >= 1"));
  absl::StatusOr<std::optional<text::ModelChatTemplate>> chat_template = text::LoadChatTemplate(flags.Get("model"));
  if (!chat_template.ok()) return Fail(chat_template.status());
  std::string name = flags.Get("served-model-name");
  if (name.empty()) name = std::filesystem::path(flags.Get("model")).lexically_normal().filename().string();
  if (name.empty()) name = std::filesystem::path(flags.Get("model")).lexically_normal().parent_path().filename().string();
  absl::StatusOr<std::vector<std::string>> api_keys = ApiKeys(flags);
  if (!api_keys.ok()) return Fail(api_keys.status());
  // /tokenize and /detokenize get a copy of the tokenizer of their own (the engine's is its
  // scheduler thread's).
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> front_tok = text::LoadTokenizer(flags.Get("model"));
  if (!front_tok.ok()) return Fail(front_tok.status());
  absl::StatusOr<std::unique_ptr<server::HttpServer>> server = server::HttpServer::Start(
      flags.Get("host"), static_cast<int>(*port),
      server::MakeOpenAiHandler(service, metrics, name, chat_template->has_value() ? &**chat_template : nullptr,
                                {.api_keys = *api_keys,
                                 .tokenizer = std::shared_ptr<const text::Tokenizer>(std::move(*front_tok))}),
      {.max_request_bytes = static_cast<size_t>(*max_request_bytes),
       .max_connections = static_cast<int>(*max_connections),
       .header_timeout_s = *header_timeout,
       .idle_timeout_s = *keep_alive});
  if (!server.ok()) return Fail(server.status());
  std::fprintf(stderr, "scout: serving %s on http://%s:%d%s%s\n", name.c_str(), flags.Get("host").c_str(),
               (*server)->port(), round_name.empty() ? "" : ", speculative rounds: ", round_name.c_str());
  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "scout: signal %d, draining (up to %.0f s)\n", sig, *shutdown_timeout);
  const bool drained = service->Drain(*shutdown_timeout);
  (*server)->Stop();
  std::fprintf(stderr, "scout: stopped%s\n", drained ? "" : " with requests still running (timeout)");
  return 0;
}

int RunFrontEnd(const Flags& flags, sigset_t signals, std::unique_ptr<runtime::ModelBackend> model,
                std::unique_ptr<runtime::ModelBackend> draft, std::function<absl::Status()> health,
                monitoring::ServerMetrics::Collector extra_metrics) {
  absl::StatusOr<scheduler::EngineOptions> options =
      ParseEngineOptions(flags, model->config(), draft != nullptr ? &draft->config() : nullptr);
  if (!options.ok()) return Fail(options.status());
  options->health = std::move(health);
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> tok = text::LoadTokenizer(flags.Get("model"));
  if (!tok.ok()) return Fail(tok.status());
  monitoring::ServerMetrics metrics;
  if (extra_metrics) metrics.AddCollector(std::move(extra_metrics));
  scheduler::Engine engine(std::move(model), std::move(draft), std::move(*tok), &metrics, *options);
  return ServeHttp(flags, signals, &engine, &metrics, engine.round_name());
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
absl::StatusOr<cluster::ClusterConfig> LoadClusterConfig(const std::string& path) {
  cluster::ClusterConfig c;
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

}  // namespace scout::cli
