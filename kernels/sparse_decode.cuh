// CUDA paged decode attention over dense or STS block lists (flash-decoding: the list is split
// across CTAs, partial results merged by log-sum-exp). Parameters: kernels/sparse_decode.h.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/sparse_decode.h"

namespace scout::kernels {

// How the splits' partial results become the output (tensor-core kernel; the CUDA-core kernel
// always uses kKernel).
enum class SparseDecodeMerge {
  kKernel,     // a second kernel, one CTA per (query row, head)
  kKernelPdl,  // the same, launched as a programmatic dependent launch (its start overlaps the splits)
  kInKernel,   // the last split CTA of each (sequence, KV head, row group) to finish merges: one
               // launch (plus a memset of the arrival counters in the workspace, unless the caller
               // keeps them: SparseDecode's counters)
};

// Defaults, the fastest measured (docs/BENCHMARKS.md); the merge is the planner's choice.
inline constexpr int kSparseDecodeDefaultStages = 2;
inline constexpr bool kSparseDecodeDefaultEvictFirst = false;

inline constexpr int kTimelineStamps = 10;

// Host-side launch plan; a pure function of shapes, so it is computed once per step.
struct SparseDecodePlan {
  int rows_per_cta = 0;      // query rows (query tokens x heads of one KV head) a CTA handles:
                             // 1, 2, 4 on CUDA cores; 16 on the tensor cores
  int row_groups = 0;        // CTAs along the rows of one (sequence, KV head)
  int num_splits = 0;        // CTAs along the block list
  int blocks_per_split = 0;  // list entries each split reads
  int total_q_rows = 0;      // q_indptr[num_seqs]
  // The benchmark overrides these to compare.
  int stages = kSparseDecodeDefaultStages;  // tensor-core kernel: blocks each warp has in flight through
                                            // cp.async, 2..4
  // PlanSparseDecode: kInKernel where one CTA's 128 threads merge a group's rows in one pass
  // (rows x head_dim <= 512: decode at GQA group 4, head dim 128), kKernelPdl otherwise. Not used
  // by the tensor-core kernel with one split: each CTA then writes its rows' output itself.
  SparseDecodeMerge merge = SparseDecodeMerge::kKernelPdl;
  // K/V read by ld.global.cs, L2 evict-first (read once per step, they give way before anything
  // else in L2); the tensor-core kernel then stages them through registers one block ahead
  // instead of cp.async, and needs stages == 2. (cp.async's own cache-policy operand dies of an
  // illegal instruction with ptxas 13.0: seen here, and triton-lang/triton#11660.)
  bool kv_evict_first = kSparseDecodeDefaultEvictFirst;
  int num_counters = 0;        // arrival counters of kInKernel: row_groups x num_seqs x num_kv_heads
  // Instrumentation (attention_bench --timeline), tensor-core kernel: when set, thread 0 of every
  // CTA writes kTimelineStamps values at timeline[cta * kTimelineStamps], cta = blockIdx.x +
  // gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z): %globaltimer (ns) at entry [0], when warp
  // 0's first unit landed [1], when warp 0 left its loop [2], when all four warps had [3], when
  // the warps' results were in shared memory [4], when the CTA's output or partial was stored [5],
  // when it had arrived (in-kernel merge) [6], when its merge ended [7] (0 where not reached);
  // then the SM id [8] and warp 0's unit count [9]. A CTA past its group's rows writes nothing.
  unsigned long long* timeline = nullptr;
  size_t workspace_bytes = 0;  // the splits' partials, then the counters
};

// max_q_tokens: most query tokens of any sequence; max_list_blocks: longest block list (dense:
// the longest sequence's blocks); total_q_rows: q_indptr[num_seqs]; num_sms: the device's SM
// count; ctas_per_sm: resident CTAs per SM (SparseDecodeCtasPerSm). num_splits 0 splits each
// (sequence, KV head) list num_sms / (num_seqs x num_kv_heads) ways (at least once): about one CTA
// per SM and row group, measured faster at batch 1 than filling every resident slot
// (docs/BENCHMARKS.md), and never more than one wave of resident CTAs. rows_per_cta 0 takes
// SparseDecodeRowsPerCta; 16 forces the tensor cores.
SparseDecodePlan PlanSparseDecode(int num_seqs, int num_heads, int num_kv_heads, int max_q_tokens,
                                  int max_list_blocks, int total_q_rows, int head_dim, int num_sms,
                                  int ctas_per_sm, int num_splits = 0, int rows_per_cta = 0);

// Rows per CTA the plan uses by default: 16, the tensor-core kernel.
int SparseDecodeRowsPerCta();

// Rows per CTA of the CUDA-core kernel for these shapes (1, 2 or 4), or 0 where it does not
// apply (more than 4 query rows per KV head).
int SparseDecodeCudaCoreRows(int num_heads, int num_kv_heads, int max_q_tokens);

// Resident CTAs per SM of the split kernel for this head dim and row count (and, for the
// tensor-core kernel, cp.async stages; 0: the default), from the CUDA occupancy calculator; 0
// for unsupported shapes.
int SparseDecodeCtasPerSm(int head_dim, int rows_per_cta, int stages = 0);

// Runs on `stream`. workspace: plan.workspace_bytes of device memory. KV slots past a sequence's
// length inside its last block are read and weighted by zero, so they must hold finite values
// (pools start zeroed). The workspace needs no initial contents. The in-kernel merge's arrival
// counters: with counters nullptr, the workspace's, zeroed by a memset on `stream` first; else
// counters, at least plan.num_counters of them, zero before the first launch and left zero by
// every launch (the merging CTA resets its group's), so launches after it on the same stream and
// graph replays need no memset (one operation less a step). Such a
// buffer must not be shared by launches that may run at the same time. Returns
// cudaErrorInvalidValue for head dims other than 64 and 128, for stages outside 2..4 and for
// kv_evict_first with stages other than 2 (tensor-core kernel); launch errors otherwise.
cudaError_t SparseDecode(const SparseDecodeParams& p, const SparseDecodePlan& plan, void* workspace,
                         cudaStream_t stream, unsigned int* counters = nullptr);

}  // namespace scout::kernels
