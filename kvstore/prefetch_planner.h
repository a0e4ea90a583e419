// Planning one step's prefetch: the Selection and the cache state give the transfers to make and
// the slot table the attention kernels read. Pure host code, tested without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstore/block_cache.h"
#include "kvstore/host_store.h"
#include "kvstore/selection.h"

namespace scout::kvstore {

// One unit to move host -> GPU slot.
struct Transfer {
  const std::byte* src = nullptr;  // unit in the host store
  int32_t slot = 0;                // destination slot in the GPU pool
};

struct PrefetchPlan {
  std::vector<Transfer> transfers;  // grouped by layer, in layer order
  std::vector<int32_t> layer_begin; // [num_layers + 1] first transfer of each layer
  // Parallel to the planned sequence's Selection::blocks (of the planned layers only, from the
  // first of them): the slot each block is read from.
  std::vector<int32_t> slots;
  int64_t hits = 0;
  int64_t misses = 0;
};

// Pins every selected unit in `cache` for `step` (release with cache.ReleaseStep(step) once the
// step's attention is done) and lists the misses. InvalidArgument for a selection that is not
// ascending, repeats a block, or names a block the session does not have; NotFound for an unknown
// session; ResourceExhausted when the cache cannot hold the step (then nothing stays pinned and
// no unit this plan claimed remains in the cache).
absl::StatusOr<PrefetchPlan> PlanPrefetch(const Selection& selection, SequenceId session, const HostKvStore& store,
                                          BlockCache& cache, uint64_t step);
// The same for layers [layer_first, layer_last) only, with their own cache: a model that gives
// each layer its own cache (a share of the GPU pool) plans its layers on several threads at once
// (calls on distinct caches may run concurrently; the store is only read). The plan's
// layer_begin still spans every layer (empty outside the range).
absl::StatusOr<PrefetchPlan> PlanPrefetchLayers(const Selection& selection, SequenceId session,
                                                const HostKvStore& store, BlockCache& cache, uint64_t step,
                                                int layer_first, int layer_last);
// The same for sequence `seq` of a batch's selection (its lists only; plan.slots parallel to
// them): a step plans each of its sequences from the one batch-flat Selection.
absl::StatusOr<PrefetchPlan> PlanPrefetchLayers(const Selection& selection, int seq, SequenceId session,
                                                const HostKvStore& store, BlockCache& cache, uint64_t step,
                                                int layer_first, int layer_last);

// The CPU copy engine: performs the transfers of layers [layer_first, layer_last) with memcpy
// into `pool` (num_slots units of unit_bytes). Used by CPU builds and tests.
void ExecutePrefetchOnHost(const PrefetchPlan& plan, size_t unit_bytes, std::byte* pool, int layer_first,
                           int layer_last);

// The write path. New tokens' keys and values are produced on the GPU, into the GPU slots of the
// units they fall in, and written back to the host store at once, so that a session's KV
// survives the eviction of all its GPU blocks.
struct AppendPlan {
  int64_t first_token = 0;        // the session's length before the append
  int64_t num_tokens = 0;
  int32_t first_block = 0;        // first logical block the new tokens touch
  int32_t num_blocks = 0;
  // [layer][head][block - first_block]: where the kernel writes token t's K and V rows (row
  // t % 16 of the unit's K half and V half).
  std::vector<int32_t> slots;
  // Partially filled units not in the cache: their earlier tokens, host -> slot, before the
  // kernel writes (Transfer::src is the host unit).
  std::vector<Transfer> fetch;
  // Every touched unit, slot -> host (Transfer::src is the destination host unit), after the
  // kernel.
  std::vector<Transfer> flush;
};

// Reserves the tokens in the store (ResourceExhausted if it is full: nothing changes) and gives
// every touched (layer, head, block) unit a slot pinned for `step`. ResourceExhausted from the
// cache rolls the reservation back. Release with cache.ReleaseStep(step) after the flush.
absl::StatusOr<AppendPlan> PlanAppend(SequenceId session, int64_t num_tokens, HostKvStore& store, BlockCache& cache,
                                      uint64_t step);
// PlanAppend's second half for layers [layer_first, layer_last) and their own cache, once the
// caller has reserved tokens [first_token, first_token + num_tokens) in the store: slots is then
// [layer - layer_first][head][block - first_block]. On ResourceExhausted the plan's own pins are
// given back and its claimed units forgotten; the reservation is the caller's to undo.
absl::StatusOr<AppendPlan> PlanAppendLayers(SequenceId session, int64_t first_token, int64_t num_tokens,
                                            const HostKvStore& store, BlockCache& cache, uint64_t step,
                                            int layer_first, int layer_last);

// CPU copy engine halves of the write path.
void ExecuteFetchOnHost(const AppendPlan& plan, size_t unit_bytes, std::byte* pool);
void ExecuteFlushOnHost(const AppendPlan& plan, size_t unit_bytes, const std::byte* pool);

}  // namespace scout::kvstore
