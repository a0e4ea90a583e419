// The coordinator's side of the cluster. Coordinator keeps the registry: workers (target and
// draft) and KV store nodes register over the control channel, send heartbeats, and are marked
// dead when they miss them or their connection closes. RemoteBackend is a ModelBackend whose
// sequences live on the workers of one role, so the serving Engine runs unchanged over the
// cluster: each pass is split by worker and sent in parallel, and its rows come back in batch
// order.
//
// Failover: every sequence's tokens are kept here, and workers copy each 16-token block of KV,
// once it is full, to the sequence's home on a KV store node. When a worker dies, its sequences move to live
// workers: a sequence whose home holds its KV is adopted from there (no recomputation) and only
// tokens past what the home held are run again; one without a home is rebuilt from its tokens.
// A pass that a worker's death interrupts is undone on the other workers and run again, so the
// Engine sees either the pass or an error naming why no worker could run it, never a hang. When
// a home dies, the worker still holds the KV and writes all of it to a new home.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "prometheus/metric_family.h"
#include "cluster/channel.h"
#include "cluster/control.pb.h"
#include "runtime/backend.h"
#include "cluster/placement.h"

namespace scout::cluster {

using kvstore::SequenceId;

// "target", "draft", "kvstore" (logs and metric labels).
const char* RoleName(v1::Role role);

struct CoordinatorOptions {
  // Workers must serve these models (ModelFingerprint); an empty draft: draft workers are refused.
  std::string target_fingerprint;
  std::string draft_fingerprint;
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  absl::Duration heartbeat_timeout = absl::Seconds(3);  // silent this long: dead
  absl::Duration call_timeout = absl::Seconds(120);     // one backend call at most
  // With a cluster config, placement (PlaceModels) decides which registered workers serve:
  // target-role workers only where it puts a target group, draft-role workers only where it puts
  // a draft replica; the others stay registered, idle, with the reason logged. Without one,
  // every live worker of a role serves.
  std::optional<ClusterConfig> placement;
  // The data plane: false, the coordinator's engine runs every pass on the workers (RemoteBackend);
  // true, target groups run their own engines and get whole requests (Router), so only target
  // workers started with --engine are accepted, and no draft workers (a group's draft runs in it).
  bool groups = false;
};

// What the cluster did since the coordinator started.
struct ClusterCounters {
  int64_t failovers = 0;        // sequences moved off a dead worker
  int64_t adopted_tokens = 0;   // tokens of KV new workers took from KV store nodes
  int64_t replayed_tokens = 0;  // tokens run again (no home, or past what the home held)
  int64_t rehomed = 0;          // sequences whose KV was written to a new home
  int64_t retried_passes = 0;   // passes run again after a worker died under them
  // Passes the engine ran over the workers, and the wall time it waited for them, per role.
  int64_t target_passes = 0;
  int64_t draft_passes = 0;
  double target_pass_seconds = 0;
  double draft_pass_seconds = 0;
  // KV over UCX, summed over workers' heartbeats (dead workers' last values kept).
  int64_t kv_bytes_written = 0;
  int64_t kv_bytes_read = 0;
  double kv_transfer_seconds = 0;
};

class Coordinator {
 public:
  // Listens for members on host:port (0: any free port). Unavailable if it cannot.
  static absl::StatusOr<std::unique_ptr<Coordinator>> Start(const std::string& host, int port,
                                                            const CoordinatorOptions& options);
  ~Coordinator();
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  int port() const;
  const CoordinatorOptions& options() const { return options_; }

  struct Member {
    uint64_t key = 0;  // this registration (a member that registers again gets a new key)
    v1::Register info;
    bool alive = true;
    std::string why_dead;
    v1::Heartbeat last;
    std::shared_ptr<Channel> channel;
    std::string told;  // the assignment it was last sent (serialized; empty: not yet told)
  };
  // Snapshot of the members of a role, live and dead, in registration order.
  std::vector<Member> Members(v1::Role role) const;
  bool Alive(uint64_t key) const;
  // Alive, and chosen by placement (always, without a cluster config).
  bool Serving(uint64_t key) const;
  // The last placement's notes (workers left out and why), or its error.
  std::vector<std::string> PlacementNotes() const;
  std::shared_ptr<Channel> ChannelOf(uint64_t key) const;  // null once dead
  // Marks a member dead and closes its connection (idempotent).
  void MarkDead(uint64_t key, const std::string& why);
  // Waits until n members of the role are alive; false at the timeout.
  bool WaitForMembers(v1::Role role, int n, absl::Duration timeout) const;

  ClusterCounters counters() const;
  void Count(const ClusterCounters& delta);

  // The data plane's hooks (Router): on_message gets the target groups' GeneratePiece and
  // GenerateDone messages on the member's reader thread (it must not block), on_dead each member
  // marked dead. Null hooks unhook; no hook runs once SetDataPlane(nullptr, nullptr) returns.
  void SetDataPlane(std::function<void(uint64_t member, const v1::Envelope& message)> on_message,
                    std::function<void(uint64_t member)> on_dead);

 private:
  explicit Coordinator(const CoordinatorOptions& options);
  // Reader thread of a member's channel; `key` is 0 until it registered.
  void OnMessage(Channel& channel, v1::Envelope message, std::shared_ptr<std::atomic<uint64_t>> key);
  void Monitor();
  // Runs placement over the live workers (mu_ held) after a registration or a death.
  void Replace() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // What members' reader threads reach the coordinator through: nulled (under its mutex) when
  // the coordinator goes, so a connection closing after that finds no one to tell.
  struct Guard {
    absl::Mutex mu;
    Coordinator* self ABSL_GUARDED_BY(mu) = nullptr;
  };

  CoordinatorOptions options_;
  std::shared_ptr<Guard> guard_ = std::make_shared<Guard>();
  std::unique_ptr<Listener> listener_;
  mutable absl::Mutex mu_;
  uint64_t next_key_ ABSL_GUARDED_BY(mu_) = 1;
  std::vector<Member> members_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, absl::Time> last_seen_ ABSL_GUARDED_BY(mu_);
  ClusterCounters counters_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, bool> serving_ ABSL_GUARDED_BY(mu_);  // placement's choice per member
  std::optional<Placement> placement_ ABSL_GUARDED_BY(mu_);  // the last one computed (with a config)
  // A registering worker's contradictions of the placement config (its GPU count against the
  // target groups' size, its GPU class against the classes listed for its role); OK if none.
  absl::Status CheckAgainstPlacement(const v1::Register& r) const;
  // What the placement makes of member `key` (mu_ held).
  v1::Assignment AssignmentOf(uint64_t key, const v1::Register& r) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Replace queues a message to every worker whose assignment changed; sent by FlushAssignments
  // outside mu_ (a send blocks on the peer).
  std::vector<std::pair<std::shared_ptr<Channel>, v1::Envelope>> assignment_pushes_ ABSL_GUARDED_BY(mu_);
  void FlushAssignments() ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<std::string> placement_notes_ ABSL_GUARDED_BY(mu_);
  absl::Notification stop_;
  std::thread monitor_;
  absl::Mutex hooks_mu_;  // held while a hook runs
  std::function<void(uint64_t, const v1::Envelope&)> on_group_message_ ABSL_GUARDED_BY(hooks_mu_);
  std::function<void(uint64_t)> on_dead_ ABSL_GUARDED_BY(hooks_mu_);
};

// The cluster's Prometheus families, read from the coordinator at scrape time:
// scout_cluster_members{role,state}, scout_cluster_failovers_total,
// scout_cluster_adopted_tokens_total, scout_cluster_replayed_tokens_total,
// scout_cluster_rehomed_total, scout_cluster_retried_passes_total,
// scout_kv_remote_bytes_total{direction="write|read"} and scout_kv_remote_seconds_total (KV moved
// between workers and KV store nodes over UCX).
std::vector<prometheus::MetricFamily> ClusterMetricFamilies(const Coordinator& coordinator);

struct RemoteBackendOptions {
  int64_t replay_chunk = 512;  // tokens per pass when a sequence is rebuilt from its tokens
  int max_attempts = 4;        // passes tried while workers die under them
};

class RemoteBackend final : public runtime::ModelBackend {
 public:
  // Sequences on the live workers of `role` (target or draft); `config` is the model they serve.
  RemoteBackend(Coordinator* coordinator, v1::Role role, runtime::ModelConfig config,
                const RemoteBackendOptions& options = {});

  const runtime::ModelConfig& config() const override { return config_; }
  absl::Status AddSequence(SequenceId seq) override;
  absl::Status ReleaseSequence(SequenceId seq) override;
  absl::Status TruncateSequence(SequenceId seq, int64_t num_tokens) override;
  absl::StatusOr<int64_t> SequenceLength(SequenceId seq) const override;
  absl::Status Forward(std::span<const runtime::SequenceInput> batch, std::vector<float>* logits) override;
  KvCacheUsage kv_cache_usage() const override;
  bool samples_on_device() const override;
  absl::Status ForwardSampled(std::span<const runtime::SequenceInput> batch,
                              std::span<const kernels::SampleRowParams> rows, std::vector<int32_t>* tokens) override;

  // OK while a worker of the role is alive; else Unavailable saying so.
  absl::Status Health() const;
  // The worker holding a sequence (its registered id), for tests and logs; empty if none.
  std::string WorkerOf(SequenceId seq) const;

 private:
  struct Seq {
    uint64_t worker = 0;  // member key; 0: not placed
    std::vector<int32_t> tokens;  // every token it holds, to rebuild it
    uint64_t home_store = 0;  // member key of its KV store node; 0: none
    int64_t persisted = 0;    // tokens of KV its home holds
    // Bumped at each adoption: the home's session there (a worker taken for dead but still
    // running writes to the old one, which the adopter has taken and freed).
    uint32_t epoch = 0;
    bool whole_home = false;  // its worker writes partial blocks too (the remote KV tier)
    // Tokens its home holds once the worker has written after a pass.
    int64_t HomeHolds() const {
      const int64_t n = static_cast<int64_t>(tokens.size());
      return home_store == 0 ? 0 : whole_home ? n : n / kvstore::kBlockSize * kvstore::kBlockSize;
    }
  };
  // Runs a request on a worker: the reply, or Unavailable/DeadlineExceeded when the worker
  // failed (it is marked dead then). Model errors are in the reply's status.
  absl::StatusOr<v1::BackendReply> Call(uint64_t worker, v1::BackendRequest request, const std::string& what);
  // A worker's answer: its reply (usage recorded), or the transport error (the worker marked
  // dead). Failed home writes it lists are left to the caller.
  absl::StatusOr<v1::BackendReply> TakeReply(uint64_t worker, absl::StatusOr<v1::Envelope> answer);
  // Puts a sequence that has no live worker on one: adopted from its home, then its remaining
  // tokens run again.
  absl::Status Place(SequenceId id, Seq& seq);
  // A live KV store node for the sequence (AssignSession's rule), or 0 if none fits.
  uint64_t PickHome(const Seq& seq, uint64_t exclude) const;
  // The sequence's home and session on it (epoch: Seq::epoch unless given).
  v1::KvHome HomeOf(SequenceId id, const Seq& seq, std::optional<uint32_t> epoch = std::nullopt) const;
  // Sequences whose home could not be written get a new one (or none: the worker then stops
  // writing, and they are rebuilt from tokens after a failure).
  void Rehome(SequenceId id, Seq& seq, const absl::Status& why);
  // The sequences a worker's reply lists as not written home, rehomed.
  void HandleUnpersisted(uint64_t worker, const v1::BackendReply& reply);
  absl::Status RunPass(std::span<const runtime::SequenceInput> batch, std::span<const kernels::SampleRowParams> rows,
                       std::vector<float>* logits, std::vector<int32_t>* tokens);
  // The Forward request of batch entries `entries` (one worker's share of a pass).
  v1::Forward ForwardOf(std::span<const runtime::SequenceInput> batch, const std::vector<size_t>& entries,
                        std::span<const kernels::SampleRowParams> rows, const std::vector<int64_t>& entry_rows,
                        const std::vector<int64_t>& row_start, bool sampled) const;
  // The rows of a pass that ran everywhere, from each worker's reply (replies[g] answers
  // entries[g]) into batch order; the sequences' token logs and home counts advance.
  absl::Status TakeRows(std::span<const runtime::SequenceInput> batch, const std::vector<const v1::BackendReply*>& replies,
                        const std::vector<std::vector<size_t>>& entries, const std::vector<int64_t>& entry_rows,
                        const std::vector<int64_t>& row_start, int64_t total_rows, std::vector<float>* logits,
                        std::vector<int32_t>* tokens);
  // RunPass, its wall time counted.
  absl::Status TimedPass(std::span<const runtime::SequenceInput> batch, std::span<const kernels::SampleRowParams> rows,
                         std::vector<float>* logits, std::vector<int32_t>* tokens);

  Coordinator* coordinator_;
  v1::Role role_;
  runtime::ModelConfig config_;
  RemoteBackendOptions options_;
  absl::flat_hash_map<SequenceId, Seq> seqs_;
  absl::flat_hash_map<uint64_t, KvCacheUsage> usage_;  // per worker, from its last reply
};

}  // namespace scout::cluster
