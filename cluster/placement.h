// Cluster placement, as pure functions of the cluster's state (tested as such): which workers
// hold the target's tensor-parallel groups and the draft replicas, and which target group and KV
// store node serve each session. The coordinator calls them whenever a worker registers or dies;
// nothing here talks to the network.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace scout::cluster {

// A GPU worker as it registers: its GPUs are all of one class (one machine).
struct WorkerInfo {
  std::string id;
  std::string gpu_class;         // e.g. "H100-80GB", "L4"
  int num_gpus = 0;
  int64_t gpu_memory_bytes = 0;  // per GPU
  bool alive = true;
};

struct ClusterConfig {
  int tensor_parallel_size = 1;  // a target group's GPUs, all on one worker (NCCL inside a host)
  // GPU memory one GPU needs: its share of the target's weights plus the KV cache it should keep
  // (the block cache of the host KV tier); the draft's weights and its KV.
  int64_t target_bytes_per_gpu = 0;
  int64_t draft_bytes_per_gpu = 0;
  // Classes in order of preference; a class in neither list is not used.
  std::vector<std::string> target_classes;  // large GPUs
  std::vector<std::string> draft_classes;   // cheap GPUs
  int max_draft_replicas = 0;  // 0: one per usable draft GPU
  bool drafts = true;          // false: no draft model (no replica placed or needed)
};

struct GpuSlot {
  std::string worker;
  int gpu = 0;
  bool operator==(const GpuSlot&) const = default;
};

struct Placement {
  // Target groups: tensor_parallel_size GPUs of one worker each. Deterministic order (class
  // preference, then worker id, then GPU index).
  std::vector<std::vector<GpuSlot>> target_groups;
  std::vector<GpuSlot> draft_replicas;
  // Drafts that had to share target workers' spare GPUs (no draft-class GPU was usable).
  bool drafts_on_target_workers = false;
  // Workers left out and why (dead, class not listed, too little memory, too few GPUs).
  std::vector<std::string> notes;
};

// FailedPrecondition naming what is missing when no target group or no draft replica can be
// placed; InvalidArgument for a bad config.
absl::StatusOr<Placement> PlaceModels(const ClusterConfig& config, std::span<const WorkerInfo> workers);

// A KV store node (host memory), as it registers.
struct KvStoreInfo {
  std::string id;
  int64_t capacity_bytes = 0;
  int64_t used_bytes = 0;
  bool alive = true;
};

// A session's state as the coordinator knows it.
struct SessionPlace {
  // The first GPU of the target group whose cache is warm for it (a group's identity across
  // re-placements); unset for a new session.
  std::optional<GpuSlot> target;
  std::string kv_store;  // node holding its KV; empty: a new session
};

struct SessionLoad {
  int target_group = 0;
  int active_sessions = 0;
};

struct SessionAssignment {
  int target_group = 0;  // index into Placement::target_groups
  std::string kv_store;
  bool moved = false;  // a new target group for an existing session (its GPU cache is cold there)
};

// Where a session's next request runs. Affinity: a session stays on its target group while that
// group exists and is not more than `imbalance` sessions busier than the least busy one;
// otherwise (new, or its group died) the least busy group, lowest index on ties. KV: a
// session's store stays its store; its death is Unavailable (the KV is gone; the caller fails
// the request with that message); a new session goes to the live store with the most free
// bytes that fits `kv_bytes`, else ResourceExhausted naming the largest free space.
absl::StatusOr<SessionAssignment> AssignSession(const Placement& placement, std::span<const SessionLoad> load,
                                                std::span<const KvStoreInfo> stores, const SessionPlace& session,
                                                int64_t kv_bytes, int imbalance = 4);

}  // namespace scout::cluster
