// `scout worker`: serves the target or the draft model to a coordinator, or runs a target group
// (an engine of its own, --engine) that takes whole requests from it.
#include "cli/commands.h"

#include <cstdio>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/backend_factory.h"
#ifdef SCOUT_HAVE_CUDA
#include <cuda_runtime.h>

#include "runtime/cuda_model.h"
#endif
#ifdef SCOUT_HAVE_NCCL
#include "runtime/tensor_parallel.h"
#endif
#include <unistd.h>

#include <csignal>
#include <thread>

#include "cluster/group.h"
#include "cluster/worker.h"
#include "scheduler/engine.h"
#include "server/http_server.h"

namespace scout::cli {

namespace {

// A target group (--engine): the engine of `scout serve` over the worker's model and its draft,
// the service that takes the coordinator's requests, and the engine's /metrics.
struct TargetGroup {
  std::unique_ptr<monitoring::ServerMetrics> metrics;
  std::unique_ptr<scheduler::Engine> engine;
  std::unique_ptr<cluster::GroupService> service;  // declared after the engine: ends its requests first
  std::unique_ptr<server::HttpServer> metrics_server;
  cluster::v1::Register registration;  // model and what it runs, without id and role
};

absl::StatusOr<std::unique_ptr<TargetGroup>> StartTargetGroup(const Flags& flags,
                                                              std::unique_ptr<runtime::ModelBackend> model,
                                                              int64_t kv_tokens) {
  auto group = std::make_unique<TargetGroup>();
  std::unique_ptr<runtime::ModelBackend> draft;
  if (!flags.Get("draft").empty()) {
    const std::string draft_device = flags.Get("draft-device").empty() ? flags.Get("device") : flags.Get("draft-device");
    absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> d = runtime::LoadBackend(flags.Get("draft"), draft_device, kv_tokens);
    if (!d.ok()) return d.status();
    draft = std::move(*d);
  }
  absl::StatusOr<scheduler::EngineOptions> engine_options =
      ParseEngineOptions(flags, model->config(), draft != nullptr ? &draft->config() : nullptr);
  if (!engine_options.ok()) return engine_options.status();
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> tok = text::LoadTokenizer(flags.Get("model"));
  if (!tok.ok()) return tok.status();
  absl::StatusOr<int64_t> metrics_port = flags.GetInt("metrics-port");
  if (!metrics_port.ok()) return metrics_port.status();
  group->registration.set_model_fingerprint(cluster::ModelFingerprint(model->config()));
  group->registration.set_samples_on_device(model->samples_on_device());
  group->registration.set_runs_engine(true);
  group->metrics = std::make_unique<monitoring::ServerMetrics>();
  group->engine = std::make_unique<scheduler::Engine>(std::move(model), std::move(draft), std::move(*tok),
                                                      group->metrics.get(), *engine_options);
  group->service = std::make_unique<cluster::GroupService>(group->engine.get());
  if (*metrics_port > 0) {
    monitoring::ServerMetrics* m = group->metrics.get();
    absl::StatusOr<std::unique_ptr<server::HttpServer>> ms = server::HttpServer::Start(
        "0.0.0.0", static_cast<int>(*metrics_port), [m](const server::HttpRequest& req, server::HttpResponder& out) {
          if (req.target == "/metrics") out.Send(200, "text/plain; version=0.0.4", m->Serialize());
          else if (req.target == "/health") out.Send(200, "text/plain", "OK");
          else out.Send(404, "text/plain", "not found: this port serves /metrics and /health");
        });
    if (!ms.ok()) return ms.status();
    group->metrics_server = std::move(*ms);
    std::fprintf(stderr, "scout: engine metrics on http://0.0.0.0:%d/metrics\n", group->metrics_server->port());
  }
  return group;
}

// What placement knows the worker by: its devices (the CPU counts as one; tp > 0: a
// tensor-parallel group of that many GPUs), their class and memory. Returns the class.
std::string DescribeDevices(const Flags& flags, int tp, cluster::v1::Register* r) {
  const bool on_cpu = flags.Get("device") == "cpu" && tp == 0;
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
  r->set_gpu_class(gpu_class);
  r->set_num_gpus(tp > 0 ? tp : 1);
  r->set_gpu_memory_bytes(device_memory);
  return gpu_class;
}

}  // namespace

// `scout worker`: serves the target or the draft model to a coordinator.
int Worker(int argc, char** argv) {
  Flags flags(EngineFlags(WithHostTierFlags({
      {"model", "", "model folder"},
      {"role", "target", "target or draft"},
      {"coordinator", "127.0.0.1:8100", "the coordinator's control address, host:port"},
      {"id", "", "this worker's name in the cluster (default: host name and process id)"},
      {"device", "cpu", "backend: cpu, cuda or cuda:N"},
      {"tensor-parallel-size", "1", "cuda: split the model over this many GPUs (NCCL)"},
      {"target-devices", "", "cuda: the model's GPUs, comma-separated"},
      {"gpu-class", "", "the class placement knows this worker's GPUs by (default: cpu, or the CUDA device name)"},
      {"kv-cache-tokens", "0", "KV pool of the model (and the draft) in tokens (0: 4 x max_position_embeddings)"},
      {"engine", "",
       "a target group: run an engine of its own (with --draft in-process) and take whole requests from a "
       "coordinator started with --data-plane groups",
       true},
      {"draft", "", "with --engine: the draft model folder, run in this process (speculative decoding)"},
      {"draft-device", "", "with --engine: backend of the draft (default: --device)"},
      {"metrics-port", "0", "with --engine: serve the engine's Prometheus /metrics on this port (0: none)"},
      {"kv-remote-tier", "",
       "keep sequences whole on their KV store homes (partial blocks and lengths too) and, after an adoption, fetch "
       "per step only the KV units the step reads",
       true},
      {"help", "", "show this help", true},
  })));
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
  absl::StatusOr<int64_t> tp = flags.GetInt("tensor-parallel-size"), kv_tokens = flags.GetInt("kv-cache-tokens");
  if (!tp.ok()) return Fail(tp.status());
  if (!kv_tokens.ok()) return Fail(kv_tokens.status());
  absl::StatusOr<HostTierFlags> tier = ParseHostTier(flags);
  if (!tier.ok()) return Fail(tier.status());
  const bool split = *tp > 1 || !flags.Get("target-devices").empty();
  absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> model =
      split ? runtime::LoadTensorParallel(flags.Get("model"), static_cast<int>(*tp), flags.Get("target-devices"), *kv_tokens, *tier)
            : runtime::LoadBackend(flags.Get("model"), flags.Get("device"), *kv_tokens, *tier);
  if (!model.ok()) return Fail(model.status());
  const bool engine_mode = flags.GetBool("engine");
  if (engine_mode && role != "target") return Fail(absl::InvalidArgumentError("--engine is for target workers"));
  if (!engine_mode) {
    for (const char* f : {"draft", "draft-device", "metrics-port"}) {
      if (flags.IsSet(f)) return Fail(absl::InvalidArgumentError(absl::StrCat("--", f, " needs --engine")));
    }
  }
  // A target group's engine (GroupService) or a worker whose passes the coordinator runs
  // (WorkerService).
  std::unique_ptr<cluster::WorkerService> service;
  std::unique_ptr<TargetGroup> group;
  cluster::v1::Register registration;
  if (engine_mode) {
    absl::StatusOr<std::unique_ptr<TargetGroup>> g = StartTargetGroup(flags, std::move(*model), *kv_tokens);
    if (!g.ok()) return Fail(g.status());
    group = std::move(*g);
    registration = group->registration;
  } else {
    service = std::make_unique<cluster::WorkerService>(std::move(*model),
                                                       cluster::WorkerOptions{.remote_tier = flags.GetBool("kv-remote-tier")});
    registration = service->Describe();
  }
  cluster::MemberOptions options{.registration = registration, .coordinator_host = coord->first,
                                   .coordinator_port = coord->second};
  std::string id = flags.Get("id");
  if (id.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof host - 1);
    id = absl::StrCat(host, "-", getpid());
  }
  options.registration.set_id(id);
  options.registration.set_role(role == "target" ? cluster::v1::ROLE_TARGET : cluster::v1::ROLE_DRAFT);
  options.on_assignment = [](const cluster::v1::Assignment& a) {
    if (!a.placed()) return;
    if (a.serving()) {
      std::fprintf(stderr, "scout: placement: serving on GPU(s) %s of this worker%s\n",
                   absl::StrJoin(a.gpus(), ",").c_str(), a.draft().empty() ? "" : absl::StrCat(", draft ", a.draft()).c_str());
    } else {
      std::fprintf(stderr, "scout: placement: standing by (%s)\n", a.note().c_str());
    }
  };
  const std::string gpu_class = DescribeDevices(flags, split ? static_cast<int>(*tp) : 0, &options.registration);
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
  absl::Status s;
  if (group != nullptr) {
    cluster::GroupService* g = group->service.get();
    options.on_message = [g](cluster::Channel& c, const cluster::v1::Envelope& m) { return g->Handle(c, m); };
    scheduler::Engine* e = group->engine.get();
    auto beat = [e] {  // the group's KV use, for the router's choice and the cluster's metrics
      cluster::v1::Heartbeat h;
      const runtime::ModelBackend::KvCacheUsage u = e->kv_usage();
      h.set_kv_used_blocks(u.used_blocks);
      h.set_kv_total_blocks(u.total_blocks);
      return h;
    };
    s = cluster::RunClusterMember(options, nullptr, beat, [g] { g->Lost(); }, &stop);
  } else {
    cluster::WorkerService* w = service.get();
    s = cluster::RunClusterMember(
        options, [w](const cluster::v1::BackendRequest& r) { return w->Handle(r); }, [w] { return w->Heartbeat(); },
        [w] { w->Reset(); }, &stop, [w] { w->Flush(); });
  }
  if (!s.ok()) return Fail(s);
  return 0;
}

}  // namespace scout::cli
