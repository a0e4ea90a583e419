// Per-sequence block tables over one BlockAllocator: which blocks hold a sequence's tokens.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstore/block_allocator.h"

namespace scout::kvstore {

using SequenceId = int64_t;

// Token t of a sequence lives in blocks[t / kBlockSize] at offset t % kBlockSize. The same block
// id addresses that block in every layer and KV head of the pool.
struct BlockTable {
  std::vector<int32_t> blocks;
  int64_t num_tokens = 0;
};

inline int64_t BlocksFor(int64_t num_tokens) { return (num_tokens + kBlockSize - 1) / kBlockSize; }

// Owns the allocator and every sequence's table. Not thread-safe.
class BlockTableManager {
 public:
  explicit BlockTableManager(int32_t num_blocks) : allocator_(num_blocks) {}
  BlockTableManager(const BlockTableManager&) = delete;
  BlockTableManager& operator=(const BlockTableManager&) = delete;

  // AlreadyExists if the id is taken.
  absl::Status AddSequence(SequenceId id);
  // Grows the sequence to num_tokens, allocating blocks as needed. All or nothing:
  // ResourceExhausted leaves the table as it was. InvalidArgument if num_tokens would shrink it.
  absl::Status Grow(SequenceId id, int64_t num_tokens);
  // Blocks that Grow(id, num_tokens) would allocate; NotFound for an unknown sequence.
  absl::StatusOr<int64_t> BlocksNeeded(SequenceId id, int64_t num_tokens) const;
  // Drops tokens at positions >= num_tokens (speculative rollback) and frees emptied blocks.
  absl::Status Truncate(SequenceId id, int64_t num_tokens);
  // Frees all blocks of the sequence and forgets it. NotFound if unknown.
  absl::Status Release(SequenceId id);

  // nullptr if unknown. Valid until the next mutating call.
  const BlockTable* Find(SequenceId id) const;
  const BlockAllocator& allocator() const { return allocator_; }
  size_t num_sequences() const { return tables_.size(); }

 private:
  absl::StatusOr<BlockTable*> Get(SequenceId id);

  BlockAllocator allocator_;
  absl::flat_hash_map<SequenceId, BlockTable> tables_;
};

}  // namespace scout::kvstore
