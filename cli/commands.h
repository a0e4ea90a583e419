// The scout binary's subcommands (one file each: generate.cc, serve.cc, ...) and what several of
// them share (common.cc): flag groups and their parsing, model pairs, the HTTP front end.
// `scout bench` runs the scout-bench binary that bench/ owns (main.cc).
#pragma once

#include <signal.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/flags.h"
#include "monitoring/metrics.h"
#include "runtime/backend.h"
#include "runtime/backend_factory.h"
#include "runtime/cpu_model.h"
#include "runtime/sts.h"
#include "text/tokenizer.h"
#include "cluster/placement.h"
#include "scheduler/completion_service.h"
#include "scheduler/engine.h"

namespace scout::cli {

// Subcommands: argv without the program and the subcommand's name; the process exit status.
int Generate(int argc, char** argv);
int Eval(int argc, char** argv);
int Calibrate(int argc, char** argv);
int Serve(int argc, char** argv);
int Coordinator(int argc, char** argv);
int Worker(int argc, char** argv);
int KvStore(int argc, char** argv);

// Prints "scout: error: <status>" to stderr; returns 1.
int Fail(const absl::Status& s);

// Where `scout calibrate` writes, and generate/eval look by default.
std::filesystem::path DefaultHeadMapPath(const std::string& draft_dir);
// --head-map if given, else the draft folder's calibrated map if present, else proportional depth.
absl::StatusOr<runtime::HeadMap> ResolveHeadMap(const std::string& flag, const std::string& draft_dir,
                                                const runtime::ModelConfig& target, const runtime::ModelConfig& draft);

// The STS flags generate and serve share: --sparsity (with its own help text), --kv-budget-tokens,
// --kv-budget-fraction, --head-map, --dense-layers, the sparse draft and SANTA.
std::vector<FlagSpec> WithStsFlags(std::vector<FlagSpec> specs, const std::string& sparsity_help);

// The sparse draft and SANTA, from the flags above.
struct RoundChoice {
  bool sparse_draft = false;
  runtime::StsBudget draft_budget;
  int draft_refresh_rounds = 1;
  int santa_samples = 0;
};
absl::StatusOr<RoundChoice> ParseRoundFlags(const Flags& flags);

struct StsChoice {
  runtime::HeadMap head_map;
  runtime::StsBudget budget;
};
// nullopt for --sparsity dense; InvalidArgument for another value or a bad budget; head map
// errors pass through.
absl::StatusOr<std::optional<StsChoice>> ParseSts(const Flags& flags, const runtime::ModelConfig& target,
                                                  const runtime::ModelConfig& draft);

// Writes `text` to `path` unless path is empty (the --csv flags).
absl::Status WriteCsv(const std::string& path, const std::string& text);

// Target, draft and the target's tokenizer on the CPU, for the subcommands that need all three.
struct ModelPair {
  std::unique_ptr<runtime::CpuModel> target;
  std::unique_ptr<runtime::CpuModel> draft;
  std::unique_ptr<text::Tokenizer> tokenizer;
};
absl::StatusOr<ModelPair> LoadPair(const std::string& model_dir, const std::string& draft_dir);

// --host-kv-gb, --gpu-kv-cache-gb and --host-kv-memory: the CUDA backend's host KV tier.
using HostTierFlags = runtime::HostTierChoice;
std::vector<FlagSpec> WithHostTierFlags(std::vector<FlagSpec> specs);
absl::StatusOr<HostTierFlags> ParseHostTier(const Flags& flags);

// The engine's flags (batching, prefill, sessions, speculation, STS), shared by `serve` and by
// `worker --engine` (a target group), and their EngineOptions (draft: null without one).
std::vector<FlagSpec> EngineFlags(std::vector<FlagSpec> specs);
absl::StatusOr<scheduler::EngineOptions> ParseEngineOptions(const Flags& flags, const runtime::ModelConfig& target,
                                                            const runtime::ModelConfig* draft);
// Flags of the HTTP front end, with the engine's, for `serve` and `coordinator`.
std::vector<FlagSpec> FrontEndFlags(std::vector<FlagSpec> specs);
// The API keys of --api-key (comma-separated), --api-key-file (one a line; blank lines and '#'
// comments skipped) and SCOUT_API_KEY, deduplicated in that order. NotFound for a missing file;
// InvalidArgument for a key with spaces.
absl::StatusOr<std::vector<std::string>> ApiKeys(const Flags& flags);
// Blocks SIGINT and SIGTERM (taken by sigwait later) before any thread starts, and ignores
// SIGPIPE (a peer that hangs up must not end the process).
sigset_t BlockStopSignals();
// The OpenAI-compatible front end over `service` until SIGINT/SIGTERM, then a drain; round_name
// (the engine's speculative rounds, if any) is printed with the address.
int ServeHttp(const Flags& flags, sigset_t signals, scheduler::CompletionService* service,
              monitoring::ServerMetrics* metrics, const std::string& round_name);
// The OpenAI-compatible front end over an engine of `model` (and `draft`), until SIGINT/SIGTERM,
// then a drain. `health`: whether the models can run (a coordinator's live workers).
int RunFrontEnd(const Flags& flags, sigset_t signals, std::unique_ptr<runtime::ModelBackend> model,
                std::unique_ptr<runtime::ModelBackend> draft, std::function<absl::Status()> health = nullptr,
                monitoring::ServerMetrics::Collector extra_metrics = nullptr);

// host:port, where host is a name, an IPv4 address or an IPv6 address in brackets ([::1]:8100).
// InvalidArgument naming the flag.
absl::StatusOr<std::pair<std::string, int>> ParseHostPort(const std::string& flag, const std::string& value);
// A --cluster-config YAML file: PlaceModels' ClusterConfig. InvalidArgument naming the file and
// the key for a malformed file or an unknown key.
absl::StatusOr<cluster::ClusterConfig> LoadClusterConfig(const std::string& path);

}  // namespace scout::cli
