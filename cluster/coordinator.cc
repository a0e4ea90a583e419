#include "cluster/coordinator.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvstore/block_table.h"
#include "cluster/placement.h"

namespace scout::cluster {

const char* RoleName(v1::Role role) {
  switch (role) {
    case v1::ROLE_TARGET:
      return "target";
    case v1::ROLE_DRAFT:
      return "draft";
    case v1::ROLE_KVSTORE:
      return "kvstore";
    default:
      return "unknown";
  }
}

// --- Coordinator ---------------------------------------------------------------------------

Coordinator::Coordinator(const CoordinatorOptions& options) : options_(options) {}

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Start(const std::string& host, int port,
                                                                const CoordinatorOptions& options) {
  std::unique_ptr<Coordinator> c(new Coordinator(options));
  Coordinator* self = c.get();
  {
    absl::MutexLock lock(&c->guard_->mu);
    c->guard_->self = self;
  }
  std::shared_ptr<Guard> guard = c->guard_;
  absl::StatusOr<std::unique_ptr<Listener>> l = Listener::Start(
      host, port,
      [guard](const std::string& peer) {
        auto key = std::make_shared<std::atomic<uint64_t>>(0);
        return std::make_pair(Channel::Handler([guard, key](Channel& ch, v1::Envelope m) {
                                absl::MutexLock lock(&guard->mu);
                                if (guard->self != nullptr) guard->self->OnMessage(ch, std::move(m), key);
                              }),
                              Channel::CloseHandler([guard, key](const absl::Status& why) {
                                absl::MutexLock lock(&guard->mu);
                                if (guard->self != nullptr && key->load() != 0) {
                                  guard->self->MarkDead(key->load(), std::string(why.message()));
                                }
                              }));
      },
      [](std::shared_ptr<Channel>) {});
  if (!l.ok()) return l.status();
  c->listener_ = std::move(*l);
  c->monitor_ = std::thread([self] { self->Monitor(); });
  return c;
}

Coordinator::~Coordinator() {
  {
    absl::MutexLock lock(&guard_->mu);  // waits for a handler running now
    guard_->self = nullptr;
  }
  stop_.Notify();
  if (monitor_.joinable()) monitor_.join();
  listener_.reset();
  std::vector<std::shared_ptr<Channel>> channels;
  {
    absl::MutexLock lock(&mu_);
    for (Member& m : members_) {
      if (m.channel) channels.push_back(std::move(m.channel));
    }
  }
  for (auto& ch : channels) ch->Close();
}

int Coordinator::port() const { return listener_->port(); }

void Coordinator::OnMessage(Channel& channel, v1::Envelope m, std::shared_ptr<std::atomic<uint64_t>> key) {
  if (m.body_case() == v1::Envelope::kHeartbeat) {
    absl::MutexLock lock(&mu_);
    for (Member& member : members_) {
      if (member.key == key->load() && member.alive) {
        member.last = m.heartbeat();
        last_seen_[member.key] = absl::Now();
      }
    }
    return;
  }
  if (m.body_case() == v1::Envelope::kGeneratePiece || m.body_case() == v1::Envelope::kGenerateDone) {
    absl::MutexLock hooks(&hooks_mu_);
    if (on_group_message_ && key->load() != 0) on_group_message_(key->load(), m);
    return;
  }
  if (m.body_case() != v1::Envelope::kRegister) return;
  const v1::Register& r = m.register_();
  absl::Status refuse;
  if (key->load() != 0) {
    refuse = absl::FailedPreconditionError("already registered on this connection");
  } else if (r.id().empty()) {
    refuse = absl::InvalidArgumentError("registration without an id");
  } else if (r.role() == v1::ROLE_TARGET && r.model_fingerprint() != options_.target_fingerprint) {
    refuse = absl::FailedPreconditionError(absl::StrCat("target worker ", r.id(), " serves [", r.model_fingerprint(),
                                                        "], the coordinator's target is [", options_.target_fingerprint, "]"));
  } else if (r.role() == v1::ROLE_TARGET && options_.groups && !r.runs_engine()) {
    refuse = absl::FailedPreconditionError(absl::StrCat(
        "target worker ", r.id(), " runs no engine of its own; this coordinator hands whole requests to target groups "
        "(--data-plane groups): start it with --engine"));
  } else if (r.role() == v1::ROLE_TARGET && !options_.groups && r.runs_engine()) {
    refuse = absl::FailedPreconditionError(absl::StrCat(
        "target worker ", r.id(), " runs an engine of its own (--engine); this coordinator runs passes on its workers "
        "(--data-plane passes): start it without --engine, or the coordinator with --data-plane groups"));
  } else if (r.role() == v1::ROLE_DRAFT && options_.groups) {
    refuse = absl::FailedPreconditionError(absl::StrCat(
        "draft worker ", r.id(), ": with --data-plane groups each target group runs its draft in-process "
        "(scout worker --engine --draft DIR)"));
  } else if (r.role() == v1::ROLE_DRAFT && options_.draft_fingerprint.empty()) {
    refuse = absl::FailedPreconditionError(absl::StrCat("draft worker ", r.id(), ": this coordinator runs no draft (--draft)"));
  } else if (r.role() == v1::ROLE_DRAFT && r.model_fingerprint() != options_.draft_fingerprint) {
    refuse = absl::FailedPreconditionError(absl::StrCat("draft worker ", r.id(), " serves [", r.model_fingerprint(),
                                                        "], the coordinator's draft is [", options_.draft_fingerprint, "]"));
  } else if (r.role() == v1::ROLE_KVSTORE && (r.kvstore_address().empty() || r.kv_unit_bytes() <= 0)) {
    refuse = absl::InvalidArgumentError(absl::StrCat("KV store ", r.id(), " registered without an address or unit size"));
  } else if (r.role() == v1::ROLE_UNSPECIFIED || !v1::Role_IsValid(r.role())) {
    refuse = absl::InvalidArgumentError(absl::StrCat("member ", r.id(), " registered without a role"));
  } else {
    refuse = CheckAgainstPlacement(r);
  }
  v1::Envelope reply;
  reply.set_call_id(m.call_id());
  *reply.mutable_register_reply()->mutable_status() = ToProto(refuse);
  reply.mutable_register_reply()->set_heartbeat_interval_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(options_.heartbeat_interval)));
  if (refuse.ok()) {
    std::vector<uint64_t> replaced;
    {
      absl::MutexLock lock(&mu_);
      for (const Member& old : members_) {
        if (old.alive && old.info.id() == r.id()) replaced.push_back(old.key);
      }
    }
    for (uint64_t k : replaced) MarkDead(k, absl::StrCat(r.id(), " registered again"));
    std::shared_ptr<Channel> self_ref = channel.shared_from_this();
    absl::MutexLock lock(&mu_);
    Member member{.key = next_key_++, .info = r, .alive = true, .channel = std::move(self_ref)};
    key->store(member.key);
    last_seen_[member.key] = absl::Now();
    std::fprintf(stderr, "scout: %s %s registered from %s\n", RoleName(r.role()), r.id().c_str(), channel.peer().c_str());
    const uint64_t new_key = member.key;
    members_.push_back(std::move(member));
    Replace();
    *reply.mutable_register_reply()->mutable_assignment() = AssignmentOf(new_key, r);
    members_.back().told = reply.register_reply().assignment().SerializeAsString();
  } else {
    std::fprintf(stderr, "scout: refused a member from %s: %s\n", channel.peer().c_str(), refuse.ToString().c_str());
  }
  (void)channel.Send(std::move(reply));
  FlushAssignments();
}

void Coordinator::FlushAssignments() {
  std::vector<std::pair<std::shared_ptr<Channel>, v1::Envelope>> pushes;
  {
    absl::MutexLock lock(&mu_);
    pushes.swap(assignment_pushes_);
  }
  for (auto& [channel, message] : pushes) (void)channel->Send(std::move(message));
}

void Coordinator::Monitor() {
  while (!stop_.WaitForNotificationWithTimeout(options_.heartbeat_interval / 2)) {
    std::vector<std::pair<uint64_t, std::string>> late;
    {
      absl::MutexLock lock(&mu_);
      const absl::Time now = absl::Now();
      for (const Member& m : members_) {
        if (!m.alive) continue;
        const absl::Duration silent = now - last_seen_[m.key];
        if (silent > options_.heartbeat_timeout) {
          late.emplace_back(m.key, absl::StrCat("no heartbeat for ", absl::FormatDuration(silent)));
        }
      }
    }
    for (const auto& [k, why] : late) MarkDead(k, why);
  }
}

void Coordinator::MarkDead(uint64_t key, const std::string& why) {
  std::shared_ptr<Channel> channel;
  {
    absl::MutexLock lock(&mu_);
    for (Member& m : members_) {
      if (m.key != key || !m.alive) continue;
      m.alive = false;
      m.why_dead = why;
      channel = std::move(m.channel);
      std::fprintf(stderr, "scout: %s %s is dead: %s\n", RoleName(m.info.role()), m.info.id().c_str(), why.c_str());
      Replace();
    }
  }
  FlushAssignments();
  if (channel) channel->Close();
  if (channel) {
    absl::MutexLock hooks(&hooks_mu_);
    if (on_dead_) on_dead_(key);
  }
}

void Coordinator::SetDataPlane(std::function<void(uint64_t, const v1::Envelope&)> on_message,
                               std::function<void(uint64_t)> on_dead) {
  absl::MutexLock hooks(&hooks_mu_);
  on_group_message_ = std::move(on_message);
  on_dead_ = std::move(on_dead);
}

absl::Status Coordinator::CheckAgainstPlacement(const v1::Register& r) const {
  if (!options_.placement.has_value() || (r.role() != v1::ROLE_TARGET && r.role() != v1::ROLE_DRAFT)) {
    return absl::OkStatus();
  }
  const ClusterConfig& c = *options_.placement;
  const bool target = r.role() == v1::ROLE_TARGET;
  if (target && r.num_gpus() != c.tensor_parallel_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        "target worker ", r.id(), " runs on ", r.num_gpus(), " GPU(s) (--tensor-parallel-size ", r.num_gpus(),
        "), but this cluster's placement makes target groups of ", c.tensor_parallel_size,
        " (--cluster-config tensor_parallel_size): start it with --tensor-parallel-size ", c.tensor_parallel_size));
  }
  // (PlaceModels lends drafts only the spare GPUs of target workers, which a worker holding
  // exactly one group does not have: a draft worker of a target class would never be placed.)
  const std::vector<std::string>& own = target ? c.target_classes : c.draft_classes;
  const bool listed = std::find(own.begin(), own.end(), r.gpu_class()) != own.end();
  if (!listed && !own.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        RoleName(r.role()), " worker ", r.id(), " runs on ", r.gpu_class(), " (--gpu-class), a class this cluster's "
        "placement does not use for ", RoleName(r.role()), "s (--cluster-config ", target ? "target" : "draft",
        "_classes: [", absl::StrJoin(own, ", "), "])"));
  }
  return absl::OkStatus();
}

v1::Assignment Coordinator::AssignmentOf(uint64_t key, const v1::Register& r) const {
  v1::Assignment a;
  if (!options_.placement.has_value()) return a;
  a.set_placed(true);
  a.set_tensor_parallel_size(options_.placement->tensor_parallel_size);
  if (auto it = serving_.find(key); it != serving_.end()) a.set_serving(it->second);
  if (!placement_.has_value()) {
    a.set_note(placement_notes_.empty() ? "no placement yet" : placement_notes_.back());
    return a;
  }
  const Placement& p = *placement_;
  for (size_t g = 0; g < p.target_groups.size() && r.role() == v1::ROLE_TARGET; ++g) {
    if (p.target_groups[g].front().worker != r.id()) continue;
    for (const GpuSlot& slot : p.target_groups[g]) a.add_gpus(slot.gpu);
    if (!p.draft_replicas.empty()) a.set_draft(p.draft_replicas[g % p.draft_replicas.size()].worker);
    break;
  }
  for (const GpuSlot& slot : p.draft_replicas) {
    if (r.role() == v1::ROLE_DRAFT && slot.worker == r.id()) a.add_gpus(slot.gpu);
  }
  if (!a.serving()) {
    for (const std::string& n : placement_notes_) {
      if (absl::StrContains(n, r.id())) a.set_note(n);
    }
    if (a.note().empty()) a.set_note("standby: the placement has no slot for it now");
  }
  return a;
}

void Coordinator::Replace() {
  serving_.clear();
  placement_.reset();
  if (!options_.placement.has_value()) return;  // every live worker serves
  std::vector<WorkerInfo> workers;
  for (const Member& m : members_) {
    if (!m.alive || m.info.role() == v1::ROLE_KVSTORE) continue;
    workers.push_back({.id = m.info.id(), .gpu_class = m.info.gpu_class(), .num_gpus = m.info.num_gpus(),
                       .gpu_memory_bytes = m.info.gpu_memory_bytes(), .alive = true});
  }
  std::vector<std::string> notes;
  absl::StatusOr<Placement> p = PlaceModels(*options_.placement, workers);
  if (p.ok()) {
    placement_ = *p;
    notes = p->notes;
    for (const Member& m : members_) {
      if (!m.alive) continue;
      bool chosen = false;
      if (m.info.role() == v1::ROLE_TARGET) {
        for (const auto& group : p->target_groups) chosen |= group.front().worker == m.info.id();
      } else if (m.info.role() == v1::ROLE_DRAFT) {
        for (const GpuSlot& slot : p->draft_replicas) chosen |= slot.worker == m.info.id();
      }
      serving_[m.key] = chosen;
      if (!chosen && m.info.role() != v1::ROLE_KVSTORE) {
        notes.push_back(absl::StrCat(m.info.id(), ": registered as ", RoleName(m.info.role()),
                                     " but placement gives it no ", RoleName(m.info.role()), " slot"));
      }
    }
  } else {
    notes.push_back(std::string(p.status().message()));
  }
  if (notes != placement_notes_) {
    for (const std::string& n : notes) std::fprintf(stderr, "scout: placement: %s\n", n.c_str());
  }
  placement_notes_ = std::move(notes);
  // Workers told an assignment before hear of a change (a standby given a group, a new draft).
  for (Member& m : members_) {
    if (!m.alive || m.told.empty() || m.channel == nullptr) continue;
    v1::Envelope e;
    *e.mutable_assignment() = AssignmentOf(m.key, m.info);
    std::string now = e.assignment().SerializeAsString();
    if (now == m.told) continue;
    m.told = std::move(now);
    assignment_pushes_.emplace_back(m.channel, std::move(e));
  }
}

bool Coordinator::Serving(uint64_t key) const {
  absl::MutexLock lock(&mu_);
  for (const Member& m : members_) {
    if (m.key != key) continue;
    if (!m.alive) return false;
    if (!options_.placement.has_value() || m.info.role() == v1::ROLE_KVSTORE) return true;
    auto it = serving_.find(key);
    return it != serving_.end() && it->second;
  }
  return false;
}

std::vector<std::string> Coordinator::PlacementNotes() const {
  absl::MutexLock lock(&mu_);
  return placement_notes_;
}

std::vector<Coordinator::Member> Coordinator::Members(v1::Role role) const {
  absl::MutexLock lock(&mu_);
  std::vector<Member> out;
  for (const Member& m : members_) {
    if (m.info.role() == role) out.push_back(m);
  }
  return out;
}

bool Coordinator::Alive(uint64_t key) const {
  absl::MutexLock lock(&mu_);
  for (const Member& m : members_) {
    if (m.key == key) return m.alive;
  }
  return false;
}

std::shared_ptr<Channel> Coordinator::ChannelOf(uint64_t key) const {
  absl::MutexLock lock(&mu_);
  for (const Member& m : members_) {
    if (m.key == key && m.alive) return m.channel;
  }
  return nullptr;
}

bool Coordinator::WaitForMembers(v1::Role role, int n, absl::Duration timeout) const {
  auto enough = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    int alive = 0;
    for (const Member& m : members_) alive += m.alive && m.info.role() == role;
    return alive >= n;
  };
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
}

ClusterCounters Coordinator::counters() const {
  absl::MutexLock lock(&mu_);
  ClusterCounters c = counters_;
  for (const Member& m : members_) {
    c.kv_bytes_written += m.last.kv_bytes_written();
    c.kv_bytes_read += m.last.kv_bytes_read();
    c.kv_transfer_seconds += m.last.kv_transfer_seconds();
  }
  return c;
}

void Coordinator::Count(const ClusterCounters& d) {
  absl::MutexLock lock(&mu_);
  counters_.failovers += d.failovers;
  counters_.adopted_tokens += d.adopted_tokens;
  counters_.replayed_tokens += d.replayed_tokens;
  counters_.rehomed += d.rehomed;
  counters_.retried_passes += d.retried_passes;
  counters_.target_passes += d.target_passes;
  counters_.draft_passes += d.draft_passes;
  counters_.target_pass_seconds += d.target_pass_seconds;
  counters_.draft_pass_seconds += d.draft_pass_seconds;
}

std::vector<prometheus::MetricFamily> ClusterMetricFamilies(const Coordinator& coordinator) {
  auto family = [](std::string name, std::string help, prometheus::MetricType type) {
    prometheus::MetricFamily f;
    f.name = std::move(name);
    f.help = std::move(help);
    f.type = type;
    return f;
  };
  auto metric = [](double value, std::vector<prometheus::ClientMetric::Label> labels, bool counter) {
    prometheus::ClientMetric m;
    m.label = std::move(labels);
    if (counter) {
      m.counter.value = value;
    } else {
      m.gauge.value = value;
    }
    return m;
  };
  std::vector<prometheus::MetricFamily> out;
  prometheus::MetricFamily members =
      family("scout_cluster_members", "Workers and KV store nodes registered, by role and state", prometheus::MetricType::Gauge);
  for (v1::Role role : {v1::ROLE_TARGET, v1::ROLE_DRAFT, v1::ROLE_KVSTORE}) {
    int alive = 0, dead = 0;
    for (const Coordinator::Member& m : coordinator.Members(role)) (m.alive ? alive : dead) += 1;
    members.metric.push_back(metric(alive, {{"role", RoleName(role)}, {"state", "alive"}}, false));
    members.metric.push_back(metric(dead, {{"role", RoleName(role)}, {"state", "dead"}}, false));
  }
  out.push_back(std::move(members));
  prometheus::MetricFamily kv = family("scout_cluster_kv_usage_ratio",
                                       "Each live target worker's KV pool in use, from its last heartbeat",
                                       prometheus::MetricType::Gauge);
  for (const Coordinator::Member& m : coordinator.Members(v1::ROLE_TARGET)) {
    if (!m.alive || m.last.kv_total_blocks() <= 0) continue;
    kv.metric.push_back(
        metric(static_cast<double>(m.last.kv_used_blocks()) / m.last.kv_total_blocks(), {{"member", m.info.id()}}, false));
  }
  out.push_back(std::move(kv));
  const ClusterCounters c = coordinator.counters();
  for (auto [name, help, value] : std::vector<std::tuple<const char*, const char*, double>>{
           {"scout_cluster_failovers_total", "Sequences moved off a dead worker", double(c.failovers)},
           {"scout_cluster_adopted_tokens_total", "Tokens of KV new workers took from KV store nodes", double(c.adopted_tokens)},
           {"scout_cluster_replayed_tokens_total", "Tokens run again to rebuild sequences after a failure",
            double(c.replayed_tokens)},
           {"scout_cluster_rehomed_total", "Sequences whose KV was written to a new KV store node", double(c.rehomed)},
           {"scout_cluster_retried_passes_total", "Passes run again after a worker died under them", double(c.retried_passes)},
           {"scout_kv_remote_seconds_total", "Time workers spent moving KV to and from KV store nodes", c.kv_transfer_seconds},
       }) {
    prometheus::MetricFamily f = family(name, help, prometheus::MetricType::Counter);
    f.metric.push_back(metric(value, {}, true));
    out.push_back(std::move(f));
  }
  prometheus::MetricFamily bytes = family("scout_kv_remote_bytes_total",
                                          "KV bytes workers moved to (write) and from (read) KV store nodes over UCX",
                                          prometheus::MetricType::Counter);
  bytes.metric.push_back(metric(double(c.kv_bytes_written), {{"direction", "write"}}, true));
  bytes.metric.push_back(metric(double(c.kv_bytes_read), {{"direction", "read"}}, true));
  out.push_back(std::move(bytes));
  return out;
}

}  // namespace scout::cluster
