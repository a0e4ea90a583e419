#include "kvstore/block_cache.h"

#include "absl/strings/str_cat.h"

namespace scout::kvstore {

BlockCache::BlockCache(int32_t num_slots, int num_layers, int num_kv_heads)
    : num_layers_(num_layers), num_kv_heads_(num_kv_heads), slots_(num_slots) {
  free_.reserve(num_slots);
  for (int32_t s = num_slots - 1; s >= 0; --s) free_.push_back(s);
}

int32_t* BlockCache::Entry(const UnitKey& key, bool create) {
  if (key.layer < 0 || key.layer >= num_layers_ || key.head < 0 || key.head >= num_kv_heads_ || key.block < 0) {
    return nullptr;
  }
  auto it = index_.find(key.session);
  if (it == index_.end()) {
    if (!create) return nullptr;
    it = index_.try_emplace(key.session, static_cast<size_t>(num_layers_) * num_kv_heads_).first;
  }
  std::vector<int32_t>& list = it->second[static_cast<size_t>(key.layer) * num_kv_heads_ + key.head];
  if (key.block >= static_cast<int32_t>(list.size())) {
    if (!create) return nullptr;
    list.resize(std::max<size_t>(key.block + 1, list.size() * 2), -1);
  }
  return &list[key.block];
}

const int32_t* BlockCache::Entry(const UnitKey& key) const {
  return const_cast<BlockCache*>(this)->Entry(key, /*create=*/false);
}

int32_t BlockCache::Find(const UnitKey& key) const {
  const int32_t* e = Entry(key);
  return e == nullptr ? -1 : *e;
}

void BlockCache::Unlink(int32_t slot) {
  Slot& s = slots_[slot];
  (s.prev >= 0 ? slots_[s.prev].next : lru_head_) = s.next;
  (s.next >= 0 ? slots_[s.next].prev : lru_tail_) = s.prev;
  s.prev = s.next = -1;
}

void BlockCache::PushFront(int32_t slot) {
  Slot& s = slots_[slot];
  s.prev = -1;
  s.next = lru_head_;
  if (lru_head_ >= 0) slots_[lru_head_].prev = slot;
  lru_head_ = slot;
  if (lru_tail_ < 0) lru_tail_ = slot;
}

absl::StatusOr<std::pair<int32_t, bool>> BlockCache::Acquire(const UnitKey& key, uint64_t step) {
  int32_t* entry = Entry(key, /*create=*/true);
  if (entry == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unit (layer ", key.layer, ", head ", key.head, ", block ",
                                                   key.block, ") outside the cache's ", num_layers_, " x ",
                                                   num_kv_heads_));
  }
  int32_t slot = *entry;
  const bool hit = slot >= 0;
  if (hit) {
    Unlink(slot);
  } else {
    if (!free_.empty()) {
      slot = free_.back();
      free_.pop_back();
    } else {
      // The least recently used entry that no step pins. Pinned entries were touched by a recent
      // step, so they sit near the front and the walk from the tail is short.
      for (int32_t s = lru_tail_; s >= 0; s = slots_[s].prev) {
        if (slots_[s].pins == 0) {
          slot = s;
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
      entry = Entry(key, /*create=*/true);  // Drop may not move it, but keep the pointer honest
    }
    Slot& s = slots_[slot];
    s.key = key;
    s.used = true;
    *entry = slot;
  }
  hit ? ++counters_.hits : ++counters_.misses;
  PushFront(slot);
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

void BlockCache::Unpin(uint64_t step, int64_t n) {
  auto it = pinned_by_step_.find(step);
  if (it == pinned_by_step_.end()) return;
  std::vector<int32_t>& pins = it->second;
  for (; n > 0 && !pins.empty(); --n) {
    --slots_[pins.back()].pins;
    pins.pop_back();
  }
  if (pins.empty()) pinned_by_step_.erase(it);
}

void BlockCache::Drop(int32_t slot) {
  Slot& s = slots_[slot];
  if (int32_t* e = Entry(s.key, /*create=*/false); e != nullptr) *e = -1;
  Unlink(slot);
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
  auto it = index_.find(session);
  if (it == index_.end()) return absl::OkStatus();
  for (const std::vector<int32_t>& list : it->second) {
    for (int32_t slot : list) {
      if (slot >= 0 && slots_[slot].pins > 0) {
        return absl::FailedPreconditionError(absl::StrCat("session ", session, " has units pinned by a step"));
      }
    }
  }
  for (const std::vector<int32_t>& list : it->second) {
    for (int32_t slot : list) {
      if (slot < 0) continue;
      Slot& s = slots_[slot];
      Unlink(slot);
      s.used = false;
      free_.push_back(slot);
    }
  }
  index_.erase(it);
  return absl::OkStatus();
}

}  // namespace scout::kvstore
