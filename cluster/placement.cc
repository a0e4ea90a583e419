#include "cluster/placement.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace scout::cluster {
namespace {

// Position of a class in a preference list, or -1.
int Rank(const std::vector<std::string>& classes, const std::string& c) {
  auto it = std::find(classes.begin(), classes.end(), c);
  return it == classes.end() ? -1 : static_cast<int>(it - classes.begin());
}

// Workers of the listed classes, alive, by (class preference, id).
std::vector<const WorkerInfo*> Candidates(const std::vector<std::string>& classes, std::span<const WorkerInfo> workers) {
  std::vector<const WorkerInfo*> out;
  for (const WorkerInfo& w : workers) {
    if (w.alive && Rank(classes, w.gpu_class) >= 0) out.push_back(&w);
  }
  std::sort(out.begin(), out.end(), [&](const WorkerInfo* a, const WorkerInfo* b) {
    const int ra = Rank(classes, a->gpu_class), rb = Rank(classes, b->gpu_class);
    return ra != rb ? ra < rb : a->id < b->id;
  });
  return out;
}

}  // namespace

absl::StatusOr<Placement> PlaceModels(const ClusterConfig& config, std::span<const WorkerInfo> workers) {
  if (config.tensor_parallel_size < 1 || config.target_bytes_per_gpu < 0 || config.draft_bytes_per_gpu < 0 ||
      config.max_draft_replicas < 0) {
    return absl::InvalidArgumentError("cluster config: tensor_parallel_size >= 1, sizes and replicas >= 0");
  }
  Placement p;
  for (const WorkerInfo& w : workers) {
    if (!w.alive) {
      p.notes.push_back(absl::StrCat(w.id, ": not alive"));
    } else if (Rank(config.target_classes, w.gpu_class) < 0 && Rank(config.draft_classes, w.gpu_class) < 0) {
      p.notes.push_back(absl::StrCat(w.id, ": GPU class \"", w.gpu_class, "\" is in neither class list"));
    }
  }
  const int tp = config.tensor_parallel_size;
  std::vector<GpuSlot> spare;  // target workers' GPUs outside any group
  std::vector<const WorkerInfo*> spare_owner;
  for (const WorkerInfo* w : Candidates(config.target_classes, workers)) {
    if (w->gpu_memory_bytes < config.target_bytes_per_gpu) {
      p.notes.push_back(absl::StrCat(w->id, ": ", w->gpu_memory_bytes, " bytes per GPU, a target shard needs ",
                                     config.target_bytes_per_gpu));
      continue;
    }
    if (w->num_gpus < tp) {
      p.notes.push_back(absl::StrCat(w->id, ": ", w->num_gpus, " GPUs, a target group needs ", tp));
    }
    const int groups = w->num_gpus / tp;
    for (int g = 0; g < groups; ++g) {
      std::vector<GpuSlot> group;
      for (int i = 0; i < tp; ++i) group.push_back({w->id, g * tp + i});
      p.target_groups.push_back(std::move(group));
    }
    for (int i = groups * tp; i < w->num_gpus; ++i) {
      spare.push_back({w->id, i});
      spare_owner.push_back(w);
    }
  }
  if (p.target_groups.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "no worker can hold a target group of ", tp, " GPUs of class [", absl::StrJoin(config.target_classes, ", "),
        "] with ", config.target_bytes_per_gpu, " bytes each", p.notes.empty() ? "" : ": ", absl::StrJoin(p.notes, "; ")));
  }
  if (!config.drafts) return p;
  const size_t max_drafts = config.max_draft_replicas > 0 ? static_cast<size_t>(config.max_draft_replicas)
                                                          : std::numeric_limits<size_t>::max();
  for (const WorkerInfo* w : Candidates(config.draft_classes, workers)) {
    if (Rank(config.target_classes, w->gpu_class) >= 0) continue;  // target workers lend only spare GPUs
    if (w->gpu_memory_bytes < config.draft_bytes_per_gpu) {
      p.notes.push_back(absl::StrCat(w->id, ": ", w->gpu_memory_bytes, " bytes per GPU, a draft needs ",
                                     config.draft_bytes_per_gpu));
      continue;
    }
    for (int i = 0; i < w->num_gpus && p.draft_replicas.size() < max_drafts; ++i) p.draft_replicas.push_back({w->id, i});
  }
  if (p.draft_replicas.empty()) {
    for (size_t i = 0; i < spare.size() && p.draft_replicas.size() < max_drafts; ++i) {
      if (spare_owner[i]->gpu_memory_bytes >= config.draft_bytes_per_gpu) p.draft_replicas.push_back(spare[i]);
    }
    p.drafts_on_target_workers = !p.draft_replicas.empty();
  }
  if (p.draft_replicas.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "no GPU for a draft replica: none of class [", absl::StrJoin(config.draft_classes, ", "), "] with ",
        config.draft_bytes_per_gpu, " bytes, and no target worker has a GPU outside its groups",
        p.notes.empty() ? "" : ": ", absl::StrJoin(p.notes, "; ")));
  }
  return p;
}

absl::StatusOr<SessionAssignment> AssignSession(const Placement& placement, std::span<const SessionLoad> load,
                                                std::span<const KvStoreInfo> stores, const SessionPlace& session,
                                                int64_t kv_bytes, int imbalance) {
  const int groups = static_cast<int>(placement.target_groups.size());
  if (groups == 0) return absl::FailedPreconditionError("no target group is placed");
  if (kv_bytes < 0 || imbalance < 0) return absl::InvalidArgumentError("kv_bytes and imbalance must be >= 0");
  SessionAssignment a;
  // The KV store node.
  if (!session.kv_store.empty()) {
    auto it = std::find_if(stores.begin(), stores.end(), [&](const KvStoreInfo& s) { return s.id == session.kv_store; });
    if (it == stores.end() || !it->alive) {
      return absl::UnavailableError(absl::StrCat("KV store node \"", session.kv_store,
                                                 "\" that held this session's KV is gone: its context is lost; send the "
                                                 "whole conversation to start it again"));
    }
    a.kv_store = it->id;
  } else {
    const KvStoreInfo* best = nullptr;
    int64_t largest_free = 0;
    for (const KvStoreInfo& s : stores) {
      if (!s.alive) continue;
      const int64_t free_bytes = s.capacity_bytes - s.used_bytes;
      largest_free = std::max(largest_free, free_bytes);
      if (free_bytes < kv_bytes) continue;
      if (best == nullptr || free_bytes > best->capacity_bytes - best->used_bytes ||
          (free_bytes == best->capacity_bytes - best->used_bytes && s.id < best->id)) {
        best = &s;
      }
    }
    if (best == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("no KV store node has ", kv_bytes,
                                                       " bytes free for this session (the most free is ", largest_free,
                                                       ")"));
    }
    a.kv_store = best->id;
  }
  // The target group.
  std::vector<int> active(groups, 0);
  for (const SessionLoad& l : load) {
    if (l.target_group >= 0 && l.target_group < groups) active[l.target_group] = l.active_sessions;
  }
  const int least = static_cast<int>(std::min_element(active.begin(), active.end()) - active.begin());
  a.target_group = least;
  if (session.target.has_value()) {
    for (int g = 0; g < groups; ++g) {
      if (placement.target_groups[g].front() == *session.target && active[g] <= active[least] + imbalance) {
        a.target_group = g;
        break;
      }
    }
    a.moved = !(placement.target_groups[a.target_group].front() == *session.target);
  }
  return a;
}

}  // namespace scout::cluster
