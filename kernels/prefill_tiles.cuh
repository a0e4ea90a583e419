// The prefill attention kernels' shared pieces (kernels/prefill_attention.cu, its only user):
// the tile shape and a CTA's work (TileWork), and the wgmma kernels' loads into 128-byte-swizzled
// shared memory, MMA wrappers, the online softmax of a tile and the output store.
#pragma once

#include <cuda_bf16.h>

#include <cmath>

#include "kernels/mma_utils.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/wgmma.cuh"

namespace scout::kernels::prefill_tiles {

using namespace mma;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int BM = kPrefillRowsPerCta;
constexpr int kWarpRows = BM / kWarps;  // 32: two m16 tiles a warp
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kWarpRows == 32);

template <int HD, int BN>
constexpr int SmemBytes() {
  return (BM + 2 * BN) * HD * 2;  // Q tile, one K tile, one V tile
}


// The query tile a CTA takes: rows [row0, row0 + rows) of (sequence s, KV head blockIdx.y), rows
// being (token, query head of the KV head) pairs, token-major. The tiles of all sequences are
// numbered in order and taken in reverse: the last rows of a causal sequence see the most keys,
// so they start first. Key tiles of bn keys [kt_first, kt_last] hold every key a row sees.
struct TileWork {
  int group, kvh, q0, nq, len, row0, rows, first_pos, qpos_min, qpos_max, kt_first, kt_last, num_blocks;
  const int32_t* table;
};

__device__ inline bool GetTileWork(const SparseDecodeParams& p, int bn, TileWork* w) {
  w->group = p.num_heads / p.num_kv_heads;
  w->kvh = blockIdx.y;
  int tile = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
  int s = 0;
  for (; s < p.num_seqs; ++s) {
    const int tiles = ((p.q_indptr[s + 1] - p.q_indptr[s]) * w->group + BM - 1) / BM;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (s >= p.num_seqs) return false;  // the grid is an upper bound on the tiles
  w->q0 = p.q_indptr[s];
  w->nq = p.q_indptr[s + 1] - w->q0;
  w->len = p.seq_lens[s];
  w->row0 = tile * BM;
  w->rows = min(BM, w->nq * w->group - w->row0);
  w->first_pos = w->len - w->nq;  // position of the sequence's first query token
  w->qpos_min = w->first_pos + w->row0 / w->group;
  w->qpos_max = w->first_pos + (w->row0 + w->rows - 1) / w->group;
  w->kt_last = w->qpos_max / bn;
  w->kt_first = p.sliding_window > 0 ? max(0, w->qpos_min - p.sliding_window + 1) / bn : 0;
  w->num_blocks = (w->len + kKvBlockSize - 1) / kKvBlockSize;
  w->table = p.block_table + static_cast<int64_t>(s) * p.max_blocks_per_seq;
  return true;
}

// S = Q K^T and O += P V by wgmma: Q and K from shared memory, P from registers (the S
// accumulator's layout is the A fragment's), V as a transposed B. K and V of the next tile load
// by cp.async into the other of two stages while this one computes. Tiles in shared memory are
// in the 128-byte swizzle wgmma reads (kernels/wgmma.cuh).
constexpr int kWgThreads = 256;
constexpr int kWgKeys = 128;

template <int HD, int BN>
constexpr int WgSmemBytes() {
  return 1024 + (BM * HD + 2 * 2 * BN * HD) * 2;  // alignment slack, Q, two stages of K and V
}

// Byte offset of 16-byte chunk c of row r in a swizzled tile of `rows` rows.
[[maybe_unused]] __device__ __forceinline__ uint32_t Sw128(int r, int c, int rows) {
  return static_cast<uint32_t>((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// This thread's share of a CTA's (kWgThreads) copies of its 128 query rows into a swizzled tile
// (rows past the tile's end as zeros), by cp.async.
template <int HD>
__device__ __forceinline__ void LoadQSw128(const SparseDecodeParams& p, const TileWork& w, uint32_t q_addr, int tid) {
  constexpr int CH = HD / 8;
  for (int idx = tid; idx < BM * CH; idx += kWgThreads) {
    const int r = idx / CH, c = idx % CH, row = w.row0 + r;
    const bool ok = r < w.rows;
    const int64_t qr =
        ok ? static_cast<int64_t>(w.q0 + row / w.group) * p.num_heads + w.kvh * w.group + row % w.group : 0;
    CpAsync16Zfill(q_addr + Sw128(r, c, BM), p.q + qr * HD + c * 8, ok);
  }
}

// This thread's share of the copies of key tile kt's K and V (BN keys, 16-token blocks from the
// block table) into swizzled tiles at k_dst and k_dst + BN * HD * 2. Blocks past the sequence's
// last load as zeros: their keys are in every row's future (masked), and P V must not meet NaN
// garbage.
template <int HD, int BN>
__device__ __forceinline__ void LoadKvSw128(const SparseDecodeParams& p, const TileWork& w, int kt, uint32_t k_dst,
                                            int tid) {
  constexpr int CH = HD / 8;
  constexpr int64_t kHeadStride = 2 * kKvBlockSize * HD;  // one (block, KV head) unit
  const uint16_t* kv_head = p.kv + w.kvh * kHeadStride;
#pragma unroll 4
  for (int idx = tid; idx < 2 * BN * CH; idx += kWgThreads) {
    const int which = idx / (BN * CH), rem = idx % (BN * CH), r = rem / CH, c = rem % CH;
    const int b = kt * (BN / kKvBlockSize) + r / kKvBlockSize;
    const bool ok = b < w.num_blocks;
    const int phys = ok ? w.table[b] : 0;
    const uint16_t* src = kv_head + static_cast<int64_t>(phys) * p.num_kv_heads * kHeadStride +
                          (which * kKvBlockSize + r % kKvBlockSize) * HD + c * 8;
    CpAsync16Zfill(k_dst + which * BN * HD * 2 + Sw128(r, c, BN), src, ok);
  }
}

template <int N>
__device__ __forceinline__ void MmaSS(float (&d)[N / 2], uint64_t a, uint64_t b, bool accumulate) {
  if constexpr (N == 128) {
    wgmma::WgmmaSS128(d, a, b, accumulate);
  } else {
    wgmma::WgmmaSS64(d, a, b, accumulate);
  }
}
template <int N>
__device__ __forceinline__ void MmaRST(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {
  if constexpr (N == 128) {
    wgmma::WgmmaRS128T(d, a, b, true);
  } else {
    wgmma::WgmmaRS64T(d, a, b, true);
  }
}

// Masks a warpgroup tile of scores S (this thread's rows g and g + 8 of its warp, the layout of
// kernels/wgmma.cuh) for keys [k0, k0 + BN), updates the rows' online softmax (running max and
// this lane's part of the sum, base 2), rescales O, and leaves P in bf16 as the A fragments of
// P V. Only tiles crossing a row's causal edge or window start are masked.
// With RESCALE false O is left alone and the rows' factors come back in alpha (the caller
// rescales O once an MMA still accumulating into it is done).
template <int HD, int BN, bool RESCALE = true>
__device__ __forceinline__ void SoftmaxTile(float (&sc)[BN / 2], float (&o)[HD / 2], float (&m_run)[2],
                                            float (&l_run)[2], uint32_t (&pa)[BN / 16][4], int k0,
                                            const TileWork& w, const int (&qpos)[2], int window, float qscale,
                                            int t, float (&alpha_out)[2]) {
  const bool need_mask = k0 + BN - 1 > w.qpos_min || (window > 0 && k0 <= w.qpos_max - window);
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int pos = k0 + 8 * j + 2 * t + (c & 1);
      const bool visible = !need_mask || KeyVisible(pos, qpos[c >> 1], window);
      sc[4 * j + c] = visible ? sc[4 * j + c] * qscale : -INFINITY;
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(sc[4 * j + 2 * h], sc[4 * j + 2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_run[h], mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: keep zeros
    const float alpha = exp2f(m_run[h] - m_use);
    m_run[h] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      sc[4 * j + 2 * h] = exp2f(sc[4 * j + 2 * h] - m_use);
      sc[4 * j + 2 * h + 1] = exp2f(sc[4 * j + 2 * h + 1] - m_use);
      sum += sc[4 * j + 2 * h] + sc[4 * j + 2 * h + 1];
    }
    l_run[h] = l_run[h] * alpha + sum;
    alpha_out[h] = alpha;
    if constexpr (RESCALE) {
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) {
        o[4 * j + 2 * h] *= alpha;
        o[4 * j + 2 * h + 1] *= alpha;
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    pa[kk][0] = PackBf16(sc[8 * kk + 0], sc[8 * kk + 1]);
    pa[kk][1] = PackBf16(sc[8 * kk + 2], sc[8 * kk + 3]);
    pa[kk][2] = PackBf16(sc[8 * kk + 4], sc[8 * kk + 5]);
    pa[kk][3] = PackBf16(sc[8 * kk + 6], sc[8 * kk + 7]);
  }
}

// Normalises a warpgroup's O and stores this thread's rows (and their log-sum-exp if asked); a row
// that saw no key gets zeros and -inf.
template <int HD>
__device__ __forceinline__ void StoreWgRows(const SparseDecodeParams& p, const TileWork& w, const float (&o)[HD / 2],
                                            const float (&m_run)[2], const float (&l_run)[2], int warp, int g, int t) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = warp * 16 + g + 8 * h;
    if (r >= w.rows) continue;
    const int row = w.row0 + r;
    const int64_t rh = static_cast<int64_t>(w.q0 + row / w.group) * p.num_heads + w.kvh * w.group + row % w.group;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(p.out + rh * HD);
#pragma unroll
    for (int j = 0; j < HD / 8; ++j) {
      dst[4 * j + t] = __floats2bfloat162_rn(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
    }
    if (p.lse != nullptr && t == 0) p.lse[rh] = l > 0.0f ? m_run[h] + log2f(l) : -INFINITY;
  }
}

}  // namespace scout::kernels::prefill_tiles
