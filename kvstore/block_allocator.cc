#include "kvstore/block_allocator.h"

#include <algorithm>
#include <bit>

#include "absl/strings/str_cat.h"

namespace scout::kvstore {

BlockAllocator::BlockAllocator(int32_t capacity)
    : capacity_(capacity), num_free_(capacity), free_((static_cast<size_t>(capacity) + 63) / 64, ~uint64_t{0}) {
  if (capacity % 64 != 0) free_.back() = (uint64_t{1} << (capacity % 64)) - 1;
}

int32_t BlockAllocator::TakeLowest() {
  while (free_[lowest_word_] == 0) ++lowest_word_;
  uint64_t& word = free_[lowest_word_];
  const int bit = std::countr_zero(word);
  word &= word - 1;
  --num_free_;
  return static_cast<int32_t>(lowest_word_ * 64 + bit);
}

int32_t BlockAllocator::LowestFree() const {
  if (num_free_ == 0) return -1;
  size_t w = lowest_word_;
  while (free_[w] == 0) ++w;
  return static_cast<int32_t>(w * 64 + std::countr_zero(free_[w]));
}

absl::StatusOr<int32_t> BlockAllocator::Allocate() {
  if (num_free_ == 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV pool exhausted: all ", capacity(), " blocks are in use"));
  }
  return TakeLowest();
}

absl::Status BlockAllocator::AllocateMany(int64_t n, std::vector<int32_t>* out) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("cannot allocate ", n, " blocks"));
  if (n > num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV pool exhausted: need ", n, " blocks, ",
                                                     num_free(), " of ", capacity(), " free"));
  }
  for (int64_t i = 0; i < n; ++i) out->push_back(TakeLowest());
  return absl::OkStatus();
}

absl::Status BlockAllocator::Free(int32_t id) {
  if (id < 0 || id >= capacity()) {
    return absl::OutOfRangeError(absl::StrCat("block ", id, " outside pool of ", capacity()));
  }
  if (!is_allocated(id)) return absl::FailedPreconditionError(absl::StrCat("block ", id, " is not allocated"));
  free_[id >> 6] |= uint64_t{1} << (id & 63);
  ++num_free_;
  lowest_word_ = std::min(lowest_word_, static_cast<size_t>(id >> 6));
  return absl::OkStatus();
}

}  // namespace scout::kvstore
