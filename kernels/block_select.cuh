// CUDA STS block selection (see block_select.h for what it computes): one CTA per (sequence,
// target unit) scores the blocks, finds the budget-th largest score by radix select, and writes
// the chosen block ids in ascending order.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/block_select.h"

namespace scout::kernels {

// Keys of one (sequence, unit) start on 16-byte boundaries.
__host__ __device__ inline int BlockSelectKeyStride(int max_blocks) { return (max_blocks + 3) & ~3; }

// Device scratch the kernel needs: one 32-bit key per (sequence, unit, block).
inline size_t BlockSelectScratchBytes(const BlockSelectParams& p) {
  return sizeof(uint32_t) * static_cast<size_t>(p.num_seqs) * p.num_units * BlockSelectKeyStride(p.max_blocks);
}

// All pointers in p are device memory. Returns launch errors; cudaErrorInvalidValue for
// non-positive shapes.
cudaError_t BlockSelect(const BlockSelectParams& p, void* scratch, cudaStream_t stream);

}  // namespace scout::kernels
