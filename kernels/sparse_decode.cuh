// CUDA paged decode attention over dense or STS block lists (flash-decoding: the list is split
// across CTAs, partial results merged by log-sum-exp). Parameters: kernels/sparse_decode.h.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/sparse_decode.h"

namespace scout::kernels {

// Host-side launch plan; a pure function of shapes, so it is computed once per step.
struct SparseDecodePlan {
  int rows_per_cta = 0;      // query rows (query tokens x heads of one KV head) a CTA handles
  int row_groups = 0;        // CTAs along the rows of one (sequence, KV head)
  int num_splits = 0;        // CTAs along the block list
  int blocks_per_split = 0;  // list entries each split reads
  int total_q_rows = 0;      // q_indptr[num_seqs]
  size_t workspace_bytes = 0;
};

// max_q_rows: most query tokens of any sequence; max_list_blocks: longest block list (dense: the
// longest sequence's blocks); total_q_rows: q_indptr[num_seqs]; num_sms: the device's SM count.
// num_splits 0 chooses enough CTAs to fill the device.
SparseDecodePlan PlanSparseDecode(int num_seqs, int num_heads, int num_kv_heads, int max_q_tokens,
                                  int max_list_blocks, int total_q_rows, int head_dim, int num_sms,
                                  int num_splits = 0);

// Runs on `stream`. workspace: plan.workspace_bytes of device memory. Returns
// cudaErrorInvalidValue for head dims other than 64 and 128 or a group above 8 query heads per
// KV head times query tokens above 64 rows; launch errors otherwise.
cudaError_t SparseDecode(const SparseDecodeParams& p, const SparseDecodePlan& plan, void* workspace,
                         cudaStream_t stream);

}  // namespace scout::kernels
