// `scout coordinator`: the cluster's HTTP front end and scheduler.
#include "cli/commands.h"

#include <cstdio>
#include <optional>
#include <string>

#include <csignal>

#include "cluster/coordinator.h"
#include "cluster/router.h"
#include "cluster/worker.h"

namespace scout::cli {

// `scout coordinator`: the cluster's HTTP front end and scheduler. Workers and KV store nodes
// register on --control-port. With --data-plane groups it routes whole requests to target groups
// that run their own engines (cluster/router.h); with passes its engine runs over the workers
// (cluster/coordinator.h).
int Coordinator(int argc, char** argv) {
  Flags flags(FrontEndFlags({
      {"model", "", "the target model's folder: its config.json, tokenizer and chat template (no weights needed)"},
      {"draft", "", "the draft model's folder (config.json): speculative decoding over draft workers"},
      {"control-host", "0.0.0.0", "address workers and KV store nodes connect to"},
      {"control-port", "8100", "port workers and KV store nodes connect to (0: any free port, printed)"},
      {"heartbeat-interval", "0.5", "seconds between members' heartbeats"},
      {"heartbeat-timeout", "3", "a member silent this many seconds is dead: its sessions move"},
      {"worker-timeout", "120", "seconds one call to a worker may take before the worker is taken for dead"},
      {"data-plane", "passes",
       "groups: each target worker (scout worker --engine) runs its own engine with its draft in-process and gets "
       "whole requests, the coordinator only routes (sessions return to the group holding their KV); passes: the "
       "coordinator's engine runs every pass and draft step on the workers"},
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
  const std::string data_plane = flags.Get("data-plane");
  if (data_plane != "passes" && data_plane != "groups") {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--data-plane must be passes or groups, got \"", data_plane, "\"")));
  }
  const bool groups = data_plane == "groups";
  if (groups) {
    // The engine's flags belong to the groups: refused here rather than ignored.
    for (const FlagSpec& f : EngineFlags({})) {
      if (f.name != "max-model-len" && f.name != "session-idle-timeout" && flags.IsSet(f.name)) {
        return Fail(absl::InvalidArgumentError(absl::StrCat(
            "--", f.name, " is the target groups' with --data-plane groups: give it to scout worker --engine")));
      }
    }
  }
  std::optional<cluster::ClusterConfig> placement;
  if (!flags.Get("cluster-config").empty()) {
    absl::StatusOr<cluster::ClusterConfig> pc = LoadClusterConfig(flags.Get("cluster-config"));
    if (!pc.ok()) return Fail(pc.status());
    pc->drafts = draft.has_value() && !groups;
    placement = *pc;
  }
  absl::StatusOr<std::unique_ptr<cluster::Coordinator>> coordinator = cluster::Coordinator::Start(
      flags.Get("control-host"), static_cast<int>(*control_port),
      {.target_fingerprint = cluster::ModelFingerprint(*target),
       .draft_fingerprint = draft ? cluster::ModelFingerprint(*draft) : "",
       .heartbeat_interval = absl::Seconds(*interval), .heartbeat_timeout = absl::Seconds(*timeout),
       .call_timeout = absl::Seconds(*call), .placement = placement, .groups = groups});
  if (!coordinator.ok()) return Fail(coordinator.status());
  std::fprintf(stderr, "scout: coordinator control channel on %s:%d\n", flags.Get("control-host").c_str(),
               (*coordinator)->port());
  cluster::Coordinator* c = coordinator->get();
  if (groups) {
    absl::StatusOr<int64_t> max_len = flags.GetInt("max-model-len");
    if (!max_len.ok()) return Fail(max_len.status());
    absl::StatusOr<double> idle = flags.GetDouble("session-idle-timeout");
    if (!idle.ok()) return Fail(idle.status());
    if (*idle < 0) return Fail(absl::InvalidArgumentError("--session-idle-timeout must be >= 0"));
    absl::StatusOr<std::unique_ptr<text::Tokenizer>> tok = text::LoadTokenizer(flags.Get("model"));
    if (!tok.ok()) return Fail(tok.status());
    monitoring::ServerMetrics metrics;
    metrics.AddCollector([c] { return cluster::ClusterMetricFamilies(*c); });
    cluster::Router router(c, std::move(*tok), &metrics,
                           {.max_model_len = *max_len > 0 ? *max_len : target->max_position_embeddings,
                            .session_idle_timeout_s = *idle});
    const int rc = ServeHttp(flags, signals, &router, &metrics, "");
    std::fprintf(stderr,
                 "scout: cluster: %lld requests moved to another target group after theirs died, %lld after theirs "
                 "was full\n",
                 static_cast<long long>(router.moved_requests()), static_cast<long long>(router.rebalanced_requests()));
    return rc;
  }
  auto remote_target = std::make_unique<cluster::RemoteBackend>(c, cluster::v1::ROLE_TARGET, *target);
  std::unique_ptr<cluster::RemoteBackend> remote_draft;
  if (draft) remote_draft = std::make_unique<cluster::RemoteBackend>(c, cluster::v1::ROLE_DRAFT, *draft);
  // Health reads only the registry (thread-safe), never the backends' sequence tables.
  auto health = [c, with_draft = draft.has_value()]() -> absl::Status {
    bool target_alive = false, draft_alive = !with_draft;
    for (const auto& m : c->Members(cluster::v1::ROLE_TARGET)) target_alive |= c->Serving(m.key);
    if (with_draft) {
      for (const auto& m : c->Members(cluster::v1::ROLE_DRAFT)) draft_alive |= c->Serving(m.key);
    }
    if (!target_alive) return absl::UnavailableError("no live target worker");
    if (!draft_alive) return absl::UnavailableError("no live draft worker");
    return absl::OkStatus();
  };
  const int rc = RunFrontEnd(flags, signals, std::move(remote_target), std::move(remote_draft), health,
                             [c] { return cluster::ClusterMetricFamilies(*c); });
  const cluster::ClusterCounters n = c->counters();
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

}  // namespace scout::cli
