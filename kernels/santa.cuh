// CUDA SANTA (see santa.h): one fused launch over a split plan of the list. Each CTA takes one
// (row group of 16 query rows, split, sequence x KV head), like the dense tensor-core decode
// kernel: it reads only the keys of its split through the tensor cores into shared-memory
// logits, takes the split's per-row max and sum, draws the split's systematic sample from the
// mixture of its rows' local softmaxes, reads only the sampled value rows and writes the split's
// partial (max, sum, estimate); the last CTA of a group merges the splits by log-sum-exp (or a
// merge kernel does, for groups of many rows). Keys cost 4 bytes of shared memory per row, never
// a round trip through global memory.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/santa.h"
#include "kernels/sparse_decode.cuh"

namespace scout::kernels {

struct SantaPlan {
  SparseDecodePlan split;  // rows_per_cta 16; num_splits and blocks_per_split sized for shared memory
  int logit_rows = 0;      // rows of a group that can see keys: min(16, max_q_tokens x GQA group)
  int smem_bytes = 0;      // dynamic shared memory of a CTA
  size_t workspace_bytes = 0;
  SantaSplits splits() const { return {split.num_splits, split.blocks_per_split}; }
};

// Splits so that a split's logits (logit_rows x 16 x blocks_per_split floats) fit in 32 KiB and
// a split holds at most 128 blocks, and, where the lists are few, enough of them for about three
// CTAs per SM (each reads only K, so it needs more in flight than the dense kernel). ctas_per_sm
// is not used (kept for the callers of the old plan).
SantaPlan PlanSanta(int num_seqs, int num_heads, int num_kv_heads, int max_q_tokens, int max_list_blocks,
                    int total_q_rows, int head_dim, int num_sms, int ctas_per_sm);

// Runs on `stream`; workspace: plan.workspace_bytes, no initial contents needed (the arrival
// counters are zeroed by a memset on `stream`). KV slots past a sequence's end inside its last
// block must hold finite values. cudaErrorInvalidValue for head dims other than 64 and 128,
// samples < 1, or a plan not from PlanSanta; launch errors otherwise.
cudaError_t Santa(const SantaParams& p, const SantaPlan& plan, void* workspace, cudaStream_t stream);

}  // namespace scout::kernels
