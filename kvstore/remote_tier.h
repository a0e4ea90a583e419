// The remote tier in front of the local one. A target worker's host store (HostKvStore) holds
// only the units of its sessions that it fetched or wrote; every unit lives on a KV store node
// (KvStoreClient). Before a step's local prefetch (PlanPrefetch, the same planner as without a
// remote tier), the units its Selection names that the host store lacks come over UCX in one
// request; the units a step appends go back to the node once written.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "kvstore/host_store.h"
#include "kvstore/prefetch_planner.h"
#include "kvstore/remote_store.h"

namespace scout::kvstore {

class RemoteTier {
 public:
  // Both outlive the tier. The store's layout gives the unit size the client was made for.
  RemoteTier(HostKvStore* local, KvStoreClient* remote) : local_(local), remote_(remote) {}

  // Makes every unit `selection` names hold the node's bytes in the local store (the session must
  // have reserved its blocks there). Returns how many units came over the network.
  // Errors of the node (NotFound for a unit it lacks, Unavailable when it is gone) pass through;
  // units of a failed fetch stay missing.
  absl::StatusOr<int64_t> Fetch(const Selection& selection, SequenceId session);
  // Sends blocks [first_block, first_block + num_blocks) of the session, every layer and KV
  // head, from the local store to the node (after a step wrote them), and counts them present.
  absl::Status WriteBack(SequenceId session, int32_t first_block, int32_t num_blocks);
  // Forgets which units of the session the local store holds (it was released or truncated
  // there; the node keeps its copy).
  void Forget(SequenceId session) { present_.erase(session); }

  int64_t units_fetched() const { return units_fetched_; }

 private:
  std::vector<bool>& Present(SequenceId session, int layer, int head);

  HostKvStore* local_;
  KvStoreClient* remote_;
  // session -> [layer * heads + head] -> block -> the local store holds the node's bytes
  absl::flat_hash_map<SequenceId, std::vector<std::vector<bool>>> present_;
  std::vector<std::byte> staging_;
  int64_t units_fetched_ = 0;
};

}  // namespace scout::kvstore
