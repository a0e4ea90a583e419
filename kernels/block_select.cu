#include <cub/block/block_scan.cuh>

#include "kernels/block_select.cuh"

namespace scout::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerCta = kThreads / 32;
constexpr int kUnroll = 8;  // independent loads in flight per thread in every pass

// Order-preserving map of floats onto unsigned integers: a > b  <=>  Key(a) > Key(b).
__device__ __forceinline__ uint32_t Key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One CTA per (sequence, unit). Every pass keeps kUnroll loads per thread in flight: the passes
// are short and latency, not bandwidth, would bound them otherwise.
__global__ void __launch_bounds__(kThreads) BlockSelectKernel(BlockSelectParams p, uint32_t* scratch) {
  const int s = blockIdx.y, u = blockIdx.x;
  const int nb = p.num_blocks[s];
  const int list = s * p.num_units + u;
  const int begin = p.out_indptr[list];
  const int want = p.out_indptr[list + 1] - begin;
  uint32_t* keys = scratch + static_cast<size_t>(list) * BlockSelectKeyStride(p.max_blocks);
  const int h0 = p.map_indptr[u], h1 = p.map_indptr[u + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // 1. Scores: max over positions of the summed mass of the mapped draft heads.
  for (int base = 0; base < nb; base += kUnroll * kThreads) {
    float best[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) best[q] = -INFINITY;
    for (int pos = 0; pos < p.num_positions; ++pos) {
      float sum[kUnroll] = {};
      for (int i = h0; i < h1; ++i) {
        const float* row = p.mass + ((static_cast<size_t>(s) * p.num_positions + pos) * p.num_draft_heads +
                                     p.map_heads[i]) * p.max_blocks;
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) {
          const int b = base + q * kThreads + threadIdx.x;
          if (b < nb) sum[q] += row[b];
        }
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) best[q] = fmaxf(best[q], sum[q]);
    }
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      const int b = base + q * kThreads + threadIdx.x;
      if (b < nb) {
        const bool forced = b < p.sink_blocks || b >= nb - p.window_blocks;
        keys[b] = Key(forced ? INFINITY : best[q]);
      }
    }
  }
  __syncthreads();

  // 2. Radix select, most significant byte first: the want-th largest key, and how many keys
  //    equal to it the list still needs. Scores cluster in a few exponents, so the top byte's bins
  //    are hot: each warp keeps its own histogram, lanes with the same bin add once (match_any).
  __shared__ int warp_hist[kWarpsPerCta][256];
  __shared__ uint32_t sh_prefix;
  __shared__ int sh_need;
  uint32_t prefix = 0, mask = 0;
  int need = want;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kWarpsPerCta * 256; i += kThreads) (&warp_hist[0][0])[i] = 0;
    __syncthreads();
    for (int base = 0; base < nb; base += kUnroll * kThreads) {
      uint32_t k[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int b = base + q * kThreads + threadIdx.x;
        k[q] = b < nb ? keys[b] : 0u;
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int b = base + q * kThreads + threadIdx.x;
        const uint32_t bin = (b < nb && (k[q] & mask) == prefix) ? (k[q] >> shift) & 0xffu : 256u;
        const uint32_t peers = __match_any_sync(0xffffffffu, bin);
        if (bin != 256u && lane == __ffs(peers) - 1) warp_hist[warp][bin] += __popc(peers);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int acc = 0, digit = 255;
      for (; digit > 0; --digit) {
        int count = 0;
        for (int w = 0; w < kWarpsPerCta; ++w) count += warp_hist[w][digit];
        if (acc + count >= need) break;
        acc += count;
      }
      sh_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
      sh_need = need - acc;
    }
    __syncthreads();
    prefix = sh_prefix;
    need = sh_need;
    mask |= 0xffu << shift;
  }
  const uint32_t threshold = prefix;

  // 3. Ordered compaction in tiles of kUnroll consecutive keys per thread: keys above the
  //    threshold, and the first `need` equal to it, written in ascending block order.
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  int eq_base = 0, out_base = 0;
  for (int base = 0; base < nb; base += kUnroll * kThreads) {
    const int b0 = base + threadIdx.x * kUnroll;
    uint32_t k[kUnroll];
    int gt = 0, eq = 0;
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      k[q] = b0 + q < nb ? keys[b0 + q] : 0u;
      const bool in = b0 + q < nb;
      gt += in && k[q] > threshold;
      eq += in && k[q] == threshold;
    }
    int eq_before, eq_total;
    Scan(scan_storage).ExclusiveSum(eq, eq_before, eq_total);
    __syncthreads();
    const int eq_taken = max(0, min(eq, need - eq_base - eq_before));
    int out_at, out_total;
    Scan(scan_storage).ExclusiveSum(gt + eq_taken, out_at, out_total);
    __syncthreads();
    out_at += out_base;
    int eq_seen = 0;
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      if (b0 + q >= nb) break;
      bool take = k[q] > threshold;
      if (k[q] == threshold) take = eq_seen++ < eq_taken;
      if (take && out_at < want) p.out_blocks[begin + out_at++] = b0 + q;
    }
    eq_base += eq_total;
    out_base += out_total;
  }
}

// ---- Keys in registers, for lists up to kRegThreads * 16 blocks (128k tokens) ----

constexpr int kRegThreads = 512;
constexpr int kRegWarps = kRegThreads / 32;

// Same contract and result as BlockSelectKernel, one CTA per (sequence, unit), with each thread's
// K scores kept in registers from the mass pass to the compaction: no scratch round trips. Thread t
// holds blocks 4 * (j * kRegThreads + t) + i (chunk j < K / 4, i < 4): the mass rows are read as
// coalesced float4 (rows start 16-byte aligned: max_blocks % 4 == 0), every chunk of a row in flight
// at once, and marked L2 evict-first (read once). Radix select as BlockSelectKernel, with the
// digit found by a block scan instead of one thread; compaction with one scan per chunk: the
// output slot of a kept block is (#keys above the threshold before it) + min(#keys equal to it
// before it, need).
template <int K>
__global__ void __launch_bounds__(kRegThreads, 2) BlockSelectRegKernel(BlockSelectParams p) {
  constexpr int C = K / 4;
  const int s = blockIdx.y, u = blockIdx.x;
  const int nb = p.num_blocks[s];
  const int list = s * p.num_units + u;
  const int begin = p.out_indptr[list];
  const int want = p.out_indptr[list + 1] - begin;
  if (want <= 0) return;
  const int h0 = p.map_indptr[u], h1 = p.map_indptr[u + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // 1. Scores: max over positions of the summed mass of the mapped draft heads.
  float best[K];
#pragma unroll
  for (int k = 0; k < K; ++k) best[k] = -INFINITY;
  for (int pos = 0; pos < p.num_positions; ++pos) {
    float sum[K];
#pragma unroll
    for (int k = 0; k < K; ++k) sum[k] = 0.0f;
    for (int i = h0; i < h1; ++i) {
      const float4* row = reinterpret_cast<const float4*>(
          p.mass + ((static_cast<size_t>(s) * p.num_positions + pos) * p.num_draft_heads + p.map_heads[i]) * p.max_blocks);
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const int c = j * kRegThreads + threadIdx.x;
        if (4 * c < nb) {
          const float4 v = __ldcs(row + c);
          sum[4 * j] += v.x;
          sum[4 * j + 1] += v.y;
          sum[4 * j + 2] += v.z;
          sum[4 * j + 3] += v.w;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) best[k] = fmaxf(best[k], sum[k]);
  }
  uint32_t key[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int b = 4 * ((k / 4) * kRegThreads + threadIdx.x) + k % 4;
    const bool forced = b < p.sink_blocks || b >= nb - p.window_blocks;
    key[k] = Key(forced ? INFINITY : best[k]);
  }
  auto valid = [&](int k) { return 4 * ((k / 4) * kRegThreads + threadIdx.x) + k % 4 < nb; };

  // 2. Radix select, most significant byte first (see BlockSelectKernel).
  using Scan = cub::BlockScan<int, kRegThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int warp_hist[kRegWarps][256];
  __shared__ uint32_t sh_prefix;
  __shared__ int sh_need;
  uint32_t prefix = 0, mask = 0;
  int need = want;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kRegWarps * 256; i += kRegThreads) (&warp_hist[0][0])[i] = 0;
    // Kept when no digit qualifies (want above the valid keys): the threshold stays defined.
    // (Thread 0 writes the values every thread read last round, so a late reader sees the same.)
    if (threadIdx.x == 0) {
      sh_prefix = prefix;
      sh_need = need;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint32_t bin = (valid(k) && (key[k] & mask) == prefix) ? (key[k] >> shift) & 0xffu : 256u;
      const uint32_t peers = __match_any_sync(0xffffffffu, bin);
      if (bin != 256u && lane == __ffs(peers) - 1) warp_hist[warp][bin] += __popc(peers);
    }
    __syncthreads();
    // Thread t < 256 counts digit 255 - t: an inclusive scan gives the keys at or above each digit.
    const int digit = 255 - static_cast<int>(threadIdx.x);
    int count = 0;
    if (threadIdx.x < 256) {
#pragma unroll
      for (int w = 0; w < kRegWarps; ++w) count += warp_hist[w][digit];
    }
    int at_or_above;
    Scan(scan_storage).InclusiveSum(count, at_or_above);
    if (threadIdx.x < 256 && at_or_above - count < need && at_or_above >= need) {
      sh_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
      sh_need = need - (at_or_above - count);
    }
    __syncthreads();
    prefix = sh_prefix;
    need = sh_need;
    mask |= 0xffu << shift;
  }
  const uint32_t threshold = prefix;

  // 3. Ordered compaction, chunk by chunk (ascending block order is chunk, thread, element).
  int gt_base = 0, eq_base = 0;
#pragma unroll
  for (int j = 0; j < C; ++j) {
    int gt = 0, eq = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int k = 4 * j + i;
      gt += valid(k) && key[k] > threshold;
      eq += valid(k) && key[k] == threshold;
    }
    int before, total;
    __syncthreads();  // scan_storage reuse
    Scan(scan_storage).ExclusiveSum(gt | (eq << 16), before, total);
    int gt_before = gt_base + (before & 0xffff), eq_before = eq_base + (before >> 16);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int k = 4 * j + i;
      if (!valid(k)) continue;
      const int b = 4 * (j * kRegThreads + threadIdx.x) + i;
      if (key[k] > threshold) {
        p.out_blocks[begin + gt_before + min(eq_before, need)] = b;
        ++gt_before;
      } else if (key[k] == threshold) {
        if (eq_before < need) p.out_blocks[begin + gt_before + eq_before] = b;
        ++eq_before;
      }
    }
    gt_base += total & 0xffff;
    eq_base += total >> 16;
  }
}

}  // namespace

cudaError_t BlockSelect(const BlockSelectParams& p, void* scratch, cudaStream_t stream) {
  if (p.num_seqs <= 0 || p.num_units <= 0 || p.max_blocks <= 0 || p.num_positions <= 0) return cudaErrorInvalidValue;
  const dim3 grid(p.num_units, p.num_seqs);
  const bool rows_aligned = p.max_blocks % 4 == 0 && reinterpret_cast<uintptr_t>(p.mass) % 16 == 0;
  if (rows_aligned && p.max_blocks <= 4 * kRegThreads) {
    BlockSelectRegKernel<4><<<grid, kRegThreads, 0, stream>>>(p);
  } else if (rows_aligned && p.max_blocks <= 8 * kRegThreads) {
    BlockSelectRegKernel<8><<<grid, kRegThreads, 0, stream>>>(p);
  } else if (rows_aligned && p.max_blocks <= 16 * kRegThreads) {
    BlockSelectRegKernel<16><<<grid, kRegThreads, 0, stream>>>(p);
  } else {
    BlockSelectKernel<<<grid, kThreads, 0, stream>>>(p, static_cast<uint32_t*>(scratch));
  }
  return cudaGetLastError();
}

}  // namespace scout::kernels
