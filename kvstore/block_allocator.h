// Block ids of a paged KV pool: a free list over [0, capacity).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace scout::kvstore {

// Tokens per KV block. A block of one KV head in one layer holds kBlockSize keys and values.
inline constexpr int kBlockSize = 16;

// Hands out block ids. Ids are reused LIFO so that recently freed (cache-warm) blocks go first.
// Not thread-safe: the owner serialises calls.
class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t capacity);
  BlockAllocator(const BlockAllocator&) = delete;
  BlockAllocator& operator=(const BlockAllocator&) = delete;

  // ResourceExhausted when no block is free.
  absl::StatusOr<int32_t> Allocate();
  // All or nothing: appends n ids to *out, or returns ResourceExhausted and changes nothing.
  absl::Status AllocateMany(int64_t n, std::vector<int32_t>* out);
  // OutOfRange for an id outside the pool, FailedPrecondition for a block that is not allocated.
  absl::Status Free(int32_t id);

  int32_t capacity() const { return static_cast<int32_t>(in_use_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return capacity() - num_free(); }
  bool is_allocated(int32_t id) const { return id >= 0 && id < capacity() && in_use_[id]; }

 private:
  std::vector<int32_t> free_;  // stack of free ids
  std::vector<bool> in_use_;
};

}  // namespace scout::kvstore
