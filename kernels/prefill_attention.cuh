// CUDA prefill attention over the paged KV layout: FlashAttention-style query tiles on the tensor
// cores for steps with many query rows (prompt chunks). Same parameters and result as the dense
// case of SparseDecode (kernels/sparse_decode.h), whose reference, SparseDecodeRef, is this
// kernel's reference too: causal among the new tokens, sliding window, GQA, head dims 64 and 128.
//
// A CTA takes 128 query rows of one (sequence, KV head): the rows are (token, query head of the
// KV head) pairs, token-major, so the KV head's K and V tiles are loaded once for all its query
// heads. It walks the keys the rows can see in tiles (16-token blocks looked up in the block
// table), S = Q K^T and O += P V on the tensor cores (wgmma on sm_90a, else mma.sync; bf16, fp32
// accumulate) with an online softmax. The decode kernel stays for decode and
// verification: it splits long lists across CTAs, which few query rows need.
#pragma once

#include <cuda_runtime.h>

#include "kernels/sparse_decode.h"

namespace scout::kernels {

inline constexpr int kPrefillRowsPerCta = 128;

// Which kernel runs. kAuto: the fastest wgmma one (kWgmmaOverlap) where the device and the build
// have it (Hopper, sm_90a),
// else mma.sync with 32-key tiles at head dim 128 (64 spills registers; the benchmark compares
// them) and 64-key tiles at head dim 64.
enum class PrefillKernel {
  kAuto,
  kWgmmaPingPong,  // kWgmma with mbarrier stages and the warpgroups taking turns
  kWgmmaOverlap,   // kWgmmaPingPong with each tile's Q K^T issued beside the last tile's P V
  kWgmma,  // two warpgroups, 128-key tiles, wgmma.mma_async; cudaErrorNotSupported without sm_90a
  kMma32,  // mma.sync, 4 warps of 32 rows, 32-key tiles (head dim 128 only)
  kMma64,  // the same with 64-key tiles
};

// Whether PrefillAttention runs these parameters: dense (no Selection, no unit pool, no per-block
// log-sum-exp), head dim 64 or 128, query heads a multiple of KV heads. The optional lse output
// is written.
bool PrefillAttentionSupports(const SparseDecodeParams& p);

// Whether a dense step should take the prefill kernel rather than the decode kernel: its query
// tiles fill the GPU (at least one CTA per SM), or the longest sequence brings at least
// kPrefillMinQ tokens. Below that the decode kernel, which splits each sequence's keys across
// CTAs, keeps the SMs busy (the crossover measured by bench/prefill_bench, docs/BENCHMARKS.md).
inline constexpr int kPrefillMinQ = 1024;
bool PrefillAttentionPays(int num_heads, int num_kv_heads, int total_q_rows, int max_q_tokens, int num_sms);

// Runs on `stream`; total_q_rows is q_indptr[num_seqs] (the grid is sized from it: no host reads
// of device arrays). KV slots past a sequence's length inside its last block must hold finite
// values, as for SparseDecode. Returns cudaErrorInvalidValue where !PrefillAttentionSupports(p),
// launch errors otherwise.
cudaError_t PrefillAttention(const SparseDecodeParams& p, int total_q_rows, cudaStream_t stream,
                             PrefillKernel kernel = PrefillKernel::kAuto);

}  // namespace scout::kernels
