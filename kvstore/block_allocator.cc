#include "kvstore/block_allocator.h"

#include "absl/strings/str_cat.h"

namespace scout::kvstore {

BlockAllocator::BlockAllocator(int32_t capacity) : in_use_(capacity, false) {
  free_.reserve(capacity);
  for (int32_t id = capacity - 1; id >= 0; --id) free_.push_back(id);
}

absl::StatusOr<int32_t> BlockAllocator::Allocate() {
  if (free_.empty()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV pool exhausted: all ", capacity(), " blocks are in use"));
  }
  int32_t id = free_.back();
  free_.pop_back();
  in_use_[id] = true;
  return id;
}

absl::Status BlockAllocator::AllocateMany(int64_t n, std::vector<int32_t>* out) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("cannot allocate ", n, " blocks"));
  if (n > num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV pool exhausted: need ", n, " blocks, ",
                                                     num_free(), " of ", capacity(), " free"));
  }
  for (int64_t i = 0; i < n; ++i) {
    int32_t id = free_.back();
    free_.pop_back();
    in_use_[id] = true;
    out->push_back(id);
  }
  return absl::OkStatus();
}

absl::Status BlockAllocator::Free(int32_t id) {
  if (id < 0 || id >= capacity()) {
    return absl::OutOfRangeError(absl::StrCat("block ", id, " outside pool of ", capacity()));
  }
  if (!in_use_[id]) return absl::FailedPreconditionError(absl::StrCat("block ", id, " is not allocated"));
  in_use_[id] = false;
  free_.push_back(id);
  return absl::OkStatus();
}

}  // namespace scout::kvstore
