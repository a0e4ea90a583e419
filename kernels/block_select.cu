#include <cub/block/block_scan.cuh>

#include "kernels/block_select.cuh"

namespace scout::kernels {
namespace {

constexpr int kThreads = 256;

// Order-preserving map of floats onto unsigned integers: a > b  <=>  Key(a) > Key(b).
__device__ __forceinline__ uint32_t Key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kThreads) BlockSelectKernel(BlockSelectParams p, uint32_t* scratch) {
  const int s = blockIdx.y, u = blockIdx.x;
  const int nb = p.num_blocks[s];
  const int list = s * p.num_units + u;
  const int begin = p.out_indptr[list];
  const int want = p.out_indptr[list + 1] - begin;
  uint32_t* keys = scratch + static_cast<size_t>(list) * p.max_blocks;
  const int h0 = p.map_indptr[u], h1 = p.map_indptr[u + 1];

  // 1. Scores: max over positions of the summed mass of the mapped draft heads.
  for (int b = threadIdx.x; b < nb; b += kThreads) {
    float best = -INFINITY;
    for (int pos = 0; pos < p.num_positions; ++pos) {
      float sum = 0.0f;
      for (int i = h0; i < h1; ++i) {
        const size_t row = (static_cast<size_t>(s) * p.num_positions + pos) * p.num_draft_heads + p.map_heads[i];
        sum += p.mass[row * p.max_blocks + b];
      }
      best = fmaxf(best, sum);
    }
    const bool forced = b < p.sink_blocks || b >= nb - p.window_blocks;
    keys[b] = Key(forced ? INFINITY : best);
  }
  __syncthreads();

  // 2. Radix select, most significant byte first: the want-th largest key `prefix`, and how many
  //    keys equal to it the list still needs.
  __shared__ int hist[256];
  __shared__ uint32_t sh_prefix;
  __shared__ int sh_need;
  uint32_t prefix = 0, mask = 0;
  int need = want;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int b = threadIdx.x; b < nb; b += kThreads) {
      const uint32_t k = keys[b];
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 0xff], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int acc = 0, digit = 255;
      for (; digit > 0; --digit) {
        if (acc + hist[digit] >= need) break;
        acc += hist[digit];
      }
      sh_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
      sh_need = need - acc;
    }
    __syncthreads();
    prefix = sh_prefix;
    need = sh_need;
    mask |= 0xffu << shift;
    __syncthreads();
  }
  const uint32_t threshold = prefix;

  // 3. Ordered compaction: keys above the threshold, and the first `need` equal to it.
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int chunk = (nb + kThreads - 1) / kThreads;
  const int b0 = min(nb, threadIdx.x * chunk), b1 = min(nb, b0 + chunk);
  int gt = 0, eq = 0;
  for (int b = b0; b < b1; ++b) {
    gt += keys[b] > threshold;
    eq += keys[b] == threshold;
  }
  int eq_before;
  Scan(scan_storage).ExclusiveSum(eq, eq_before);
  __syncthreads();
  const int eq_taken = max(0, min(eq, need - eq_before));
  int out_at;
  Scan(scan_storage).ExclusiveSum(gt + eq_taken, out_at);
  int eq_seen = 0;
  for (int b = b0; b < b1; ++b) {
    const uint32_t k = keys[b];
    bool take = k > threshold;
    if (k == threshold) take = eq_seen++ < eq_taken;
    if (take && out_at < want) p.out_blocks[begin + out_at++] = b;
  }
}

}  // namespace

cudaError_t BlockSelect(const BlockSelectParams& p, void* scratch, cudaStream_t stream) {
  if (p.num_seqs <= 0 || p.num_units <= 0 || p.max_blocks <= 0 || p.num_positions <= 0) return cudaErrorInvalidValue;
  BlockSelectKernel<<<dim3(p.num_units, p.num_seqs), kThreads, 0, stream>>>(p, static_cast<uint32_t*>(scratch));
  return cudaGetLastError();
}

}  // namespace scout::kernels
