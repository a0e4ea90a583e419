#include "kvstore/block_cache.h"

#include "absl/strings/str_cat.h"

namespace scout::kvstore {

BlockCache::BlockCache(int32_t num_slots) : slots_(num_slots) {
  free_.reserve(num_slots);
  for (int32_t s = num_slots - 1; s >= 0; --s) free_.push_back(s);
}

int32_t BlockCache::Find(const UnitKey& key) const {
  auto it = index_.find(key);
  return it == index_.end() ? -1 : it->second;
}

absl::StatusOr<std::pair<int32_t, bool>> BlockCache::Acquire(const UnitKey& key, uint64_t step) {
  int32_t slot = Find(key);
  bool hit = slot >= 0;
  if (hit) {
    lru_.erase(slots_[slot].lru_pos);
  } else {
    if (!free_.empty()) {
      slot = free_.back();
      free_.pop_back();
    } else {
      // The least recently used entry that no step pins. Pinned entries were touched by a recent
      // step, so they sit near the front and the scan from the back is short.
      for (auto it = lru_.rbegin(); it != lru_.rend(); ++it) {
        if (slots_[*it].pins == 0) {
          slot = *it;
          break;
        }
      }
      if (slot < 0) {
        return absl::ResourceExhaustedError(absl::StrCat("GPU block cache: all ", num_slots(),
                                                         " slots are pinned by in-flight steps"));
      }
      Drop(slot);
      free_.pop_back();  // Drop returned it to the free list
      ++counters_.evictions;
    }
    Slot& s = slots_[slot];
    s.key = key;
    s.used = true;
    index_[key] = slot;
  }
  hit ? ++counters_.hits : ++counters_.misses;
  lru_.push_front(slot);
  slots_[slot].lru_pos = lru_.begin();
  ++slots_[slot].pins;
  pinned_by_step_[step].push_back(slot);
  return std::make_pair(slot, hit);
}

void BlockCache::ReleaseStep(uint64_t step) {
  auto it = pinned_by_step_.find(step);
  if (it == pinned_by_step_.end()) return;
  for (int32_t slot : it->second) --slots_[slot].pins;
  pinned_by_step_.erase(it);
}

void BlockCache::Drop(int32_t slot) {
  Slot& s = slots_[slot];
  index_.erase(s.key);
  lru_.erase(s.lru_pos);
  s.used = false;
  free_.push_back(slot);
}

absl::Status BlockCache::Invalidate(const UnitKey& key) {
  const int32_t slot = Find(key);
  if (slot < 0) return absl::OkStatus();
  if (slots_[slot].pins > 0) {
    return absl::FailedPreconditionError(absl::StrCat("unit (session ", key.session, ", layer ", key.layer, ", head ",
                                                      key.head, ", block ", key.block, ") is pinned by a step"));
  }
  Drop(slot);
  return absl::OkStatus();
}

absl::Status BlockCache::EraseSession(SequenceId session) {
  std::vector<int32_t> drop;
  for (const auto& [key, slot] : index_) {
    if (key.session != session) continue;
    if (slots_[slot].pins > 0) {
      return absl::FailedPreconditionError(absl::StrCat("session ", session, " has units pinned by a step"));
    }
    drop.push_back(slot);
  }
  for (int32_t slot : drop) Drop(slot);
  return absl::OkStatus();
}

}  // namespace scout::kvstore
