// CUDA SANTA (see santa.h): three launches over the split plan of the decode kernel.
//   1. scores: S = QK^T on the tensor cores for every listed key (K read once, V not at all),
//      written to a scores buffer, with each split's running max and sum;
//   2. sample: per split, the global softmax normaliser and the split's share of the mixture
//      from (1)'s maxima and sums, then a scan of the split's tokens places the systematic
//      points; only the value rows that receive a point are read, weighted and summed;
//   3. merge: the splits' normalised partial outputs are added and rounded to bf16.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/santa.h"
#include "kernels/sparse_decode.cuh"

namespace scout::kernels {

struct SantaPlan {
  SparseDecodePlan split;   // rows_per_cta is 16
  int score_stride = 0;     // floats per row of the scores buffer: max_list_blocks * 16
  size_t workspace_bytes = 0;
};

// As PlanSparseDecode, with the tensor-core row groups; ctas_per_sm from SparseDecodeCtasPerSm(hd, 16).
SantaPlan PlanSanta(int num_seqs, int num_heads, int num_kv_heads, int max_q_tokens, int max_list_blocks,
                    int total_q_rows, int head_dim, int num_sms, int ctas_per_sm);

// cudaErrorInvalidValue for head dims other than 64 and 128, samples < 1, or more than 256 splits.
cudaError_t Santa(const SantaParams& p, const SantaPlan& plan, void* workspace, cudaStream_t stream);

}  // namespace scout::kernels
