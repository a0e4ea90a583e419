// Block ids of a paged KV pool: a free list over [0, capacity).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace scout::kvstore {

// Tokens per KV block. A block of one KV head in one layer holds kBlockSize keys and values.
inline constexpr int kBlockSize = 16;

// Hands out block ids, the lowest free ones first, so a sequence's blocks stay in ascending runs
// of consecutive ids even after other sequences come and go: the decode kernel reads a sequence
// laid out in consecutive blocks faster than one scattered over the pool (docs/BENCHMARKS.md).
// Not thread-safe: the owner serialises calls.
class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t capacity);
  BlockAllocator(const BlockAllocator&) = delete;
  BlockAllocator& operator=(const BlockAllocator&) = delete;

  // ResourceExhausted when no block is free.
  absl::StatusOr<int32_t> Allocate();
  // All or nothing: appends n ids (ascending) to *out, or returns ResourceExhausted and changes nothing.
  absl::Status AllocateMany(int64_t n, std::vector<int32_t>* out);
  // OutOfRange for an id outside the pool, FailedPrecondition for a block that is not allocated.
  absl::Status Free(int32_t id);

  int32_t capacity() const { return capacity_; }
  int32_t num_free() const { return num_free_; }
  int32_t num_used() const { return capacity() - num_free(); }
  // The id Allocate would hand out next, -1 when none is free.
  int32_t LowestFree() const;
  bool is_allocated(int32_t id) const { return id >= 0 && id < capacity() && !(free_[id >> 6] >> (id & 63) & 1); }

 private:
  int32_t TakeLowest();  // a free block must exist

  int32_t capacity_ = 0;
  int32_t num_free_ = 0;
  std::vector<uint64_t> free_;  // bit set: block free
  size_t lowest_word_ = 0;      // no free block below this word
};

}  // namespace scout::kvstore
