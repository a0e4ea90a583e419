// What every backend checks before a forward pass changes any state, and the one rule on lists
// that every backend applies: new tokens always see their own blocks.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstore/block_table.h"
#include "runtime/backend.h"
#include "runtime/model_config.h"

namespace scout::runtime {

struct BatchShape {
  std::vector<int64_t> start;  // per input: tokens in the cache before this pass
  int64_t total_tokens = 0;    // new tokens over the batch
  int64_t logit_rows = 0;
  int64_t blocks_needed = 0;   // blocks the pass allocates
};

// The checks ModelBackend::Forward promises, in its error vocabulary (InvalidArgument,
// NotFound, OutOfRange, ResourceExhausted), before any state changes.
absl::StatusOr<BatchShape> CheckBatch(const ModelConfig& config, const kvstore::BlockTableManager& tables,
                                      std::span<const SequenceInput> batch);

// ModelBackend::WriteKvUnits's check: every unit's layer, KV head and block (of num_blocks) in
// range, OutOfRange naming the first that is not.
absl::Status CheckKvUnits(const ModelConfig& config, SequenceId seq, int64_t num_blocks,
                          std::span<const KvUnitRef> units);

// Grows every sequence of the batch by its new tokens; cannot fail after CheckBatch.
absl::Status GrowForBatch(kvstore::BlockTableManager& tables, std::span<const SequenceInput> batch,
                          const BatchShape& shape);

// For one sequence and one layer: the num_kv_heads lists at indptr/blocks (ascending logical
// blocks) with the blocks that hold the new tokens [start, start + n) put in place of any listed
// at or after the first of them. Appends to out_blocks and pushes one end offset per list.
void ListsWithNewBlocks(const int32_t* indptr, const int32_t* blocks, int64_t num_kv_heads, int64_t start, int64_t n,
                        std::vector<int32_t>* out_indptr, std::vector<int32_t>* out_blocks);

}  // namespace scout::runtime
