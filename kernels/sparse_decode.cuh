// CUDA paged decode attention over dense or STS block lists (flash-decoding: the list is split
// across CTAs, partial results merged by log-sum-exp). Parameters: kernels/sparse_decode.h.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/sparse_decode.h"

namespace scout::kernels {

// Host-side launch plan; a pure function of shapes, so it is computed once per step.
struct SparseDecodePlan {
  int rows_per_cta = 0;      // query rows (query tokens x heads of one KV head) a CTA handles:
                             // 1, 2, 4 on CUDA cores; 16 on the tensor cores
  int row_groups = 0;        // CTAs along the rows of one (sequence, KV head)
  int num_splits = 0;        // CTAs along the block list
  int blocks_per_split = 0;  // list entries each split reads
  int total_q_rows = 0;      // q_indptr[num_seqs]
  size_t workspace_bytes = 0;
};

// max_q_tokens: most query tokens of any sequence; max_list_blocks: longest block list (dense:
// the longest sequence's blocks); total_q_rows: q_indptr[num_seqs]; num_sms: the device's SM
// count; ctas_per_sm: resident CTAs per SM (SparseDecodeCtasPerSm). num_splits 0 splits the lists
// so that the grid fills the resident slots once: a second, partial wave would leave most SMs
// idle while it runs. rows_per_cta 0 takes SparseDecodeRowsPerCta; 16 forces the tensor cores.
SparseDecodePlan PlanSparseDecode(int num_seqs, int num_heads, int num_kv_heads, int max_q_tokens,
                                  int max_list_blocks, int total_q_rows, int head_dim, int num_sms,
                                  int ctas_per_sm, int num_splits = 0, int rows_per_cta = 0);

// Rows per CTA the plan uses by default: 16, the tensor-core kernel.
int SparseDecodeRowsPerCta(int num_heads, int num_kv_heads, int max_q_tokens);

// Rows per CTA of the CUDA-core kernel for these shapes (1, 2 or 4), or 0 where it does not
// apply (more than 4 query rows per KV head).
int SparseDecodeCudaCoreRows(int num_heads, int num_kv_heads, int max_q_tokens);

// Resident CTAs per SM of the split kernel for this head dim and row count, from the CUDA
// occupancy calculator; 0 for unsupported shapes.
int SparseDecodeCtasPerSm(int head_dim, int rows_per_cta);

// Runs on `stream`. workspace: plan.workspace_bytes of device memory. KV slots past a sequence's
// length inside its last block are read and weighted by zero, so they must hold finite values
// (pools start zeroed). Returns cudaErrorInvalidValue for head dims other than 64 and 128;
// launch errors otherwise.
cudaError_t SparseDecode(const SparseDecodeParams& p, const SparseDecodePlan& plan, void* workspace,
                         cudaStream_t stream);

}  // namespace scout::kernels
