// Bookkeeping of the GPU block cache: which (session, layer, KV head, block) unit each slot of a
// fixed GPU pool holds, LRU eviction, and pins that keep in-flight steps' units in place.
// Pure host code: the bytes move in the copy engine.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstore/block_table.h"

namespace scout::kvstore {

struct UnitKey {
  SequenceId session = 0;
  int32_t layer = 0;
  int32_t head = 0;
  int32_t block = 0;  // logical block of the session

  bool operator==(const UnitKey& o) const {
    return session == o.session && layer == o.layer && head == o.head && block == o.block;
  }
  template <typename H>
  friend H AbslHashValue(H h, const UnitKey& k) {
    return H::combine(std::move(h), k.session, k.layer, k.head, k.block);
  }
};

struct CacheCounters {
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t evictions = 0;
};

// Not thread-safe: the planner's thread owns it. Every operation is O(1) (plus the pins of a
// step on release): the planner calls Acquire for every selected unit of every step, hundreds of
// thousands at long context, so lookups index per-(session, layer, head) arrays rather than hash
// each unit, and the LRU order is an intrusive list over the slot array.
class BlockCache {
 public:
  BlockCache(int32_t num_slots, int num_layers, int num_kv_heads);
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  // Slot holding the unit, or -1.
  int32_t Find(const UnitKey& key) const;
  // Gives the unit a slot and pins it for `step` until ReleaseStep(step). Hit: {slot, true}.
  // Miss: a free slot, else the least recently used unpinned one is evicted: {slot, false}, and
  // the caller must fill it before the step reads it. ResourceExhausted when every slot is pinned.
  absl::StatusOr<std::pair<int32_t, bool>> Acquire(const UnitKey& key, uint64_t step);
  // Unpins what `step` pinned (idempotent).
  void ReleaseStep(uint64_t step);
  // Unpins the last n pins `step` took (a plan that failed half way gives back only its own).
  void Unpin(uint64_t step, int64_t n);
  // Forgets a unit (its host bytes changed, or a failed plan never filled it). FailedPrecondition
  // if a step still pins it. OK if absent.
  absl::Status Invalidate(const UnitKey& key);
  // Forgets every unit of a session. FailedPrecondition (and nothing dropped) if any is pinned.
  absl::Status EraseSession(SequenceId session);

  int32_t num_slots() const { return static_cast<int32_t>(slots_.size()); }
  int32_t num_used() const { return num_slots() - static_cast<int32_t>(free_.size()); }
  const CacheCounters& counters() const { return counters_; }
  // Key held by a slot (for checks); valid only if the slot is in use.
  const UnitKey& key_of(int32_t slot) const { return slots_[slot].key; }
  bool in_use(int32_t slot) const { return slots_[slot].used; }

 private:
  struct Slot {
    UnitKey key;
    bool used = false;
    int32_t pins = 0;
    int32_t prev = -1;  // LRU neighbours: prev is more recently used
    int32_t next = -1;
  };
  void Drop(int32_t slot);
  void Unlink(int32_t slot);
  void PushFront(int32_t slot);
  // The slot entry of a unit in the per-session index, grown on demand; nullptr if absent and
  // !create.
  int32_t* Entry(const UnitKey& key, bool create);
  const int32_t* Entry(const UnitKey& key) const;

  int num_layers_;
  int num_kv_heads_;
  std::vector<Slot> slots_;
  std::vector<int32_t> free_;
  int32_t lru_head_ = -1;  // most recently used
  int32_t lru_tail_ = -1;
  // session -> [layer * heads + head] -> block -> slot (-1: not cached)
  absl::flat_hash_map<SequenceId, std::vector<std::vector<int32_t>>> index_;
  absl::flat_hash_map<uint64_t, std::vector<int32_t>> pinned_by_step_;
  CacheCounters counters_;
};

}  // namespace scout::kvstore
