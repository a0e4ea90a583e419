// What one CTA of the split attention kernels works on: (row group, split, sequence x KV head)
// from blockIdx, the slice of the block list it reads, and where each listed unit lives.
// Shared by the decode kernels (sparse_decode.cu) and SANTA (santa.cu).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/mma_utils.cuh"
#include "kernels/sparse_decode.h"

namespace scout::kernels {

struct SplitWork {
  int split, sh, s, kvh, group;
  int q0, nq, nrows;   // the sequence's first query row, its query tokens, rows of this KV head
  int row0;            // first row of this CTA's group
  int len;             // tokens in the cache
  int list_begin;      // into sel_blocks / sel_slots (0 when dense)
  int e0, e1;          // list entries [e0, e1) this split reads

  __device__ bool empty() const { return row0 >= nrows; }
  __device__ int logical(const SparseDecodeParams& p, int e) const {
    return p.sel_indptr != nullptr ? p.sel_blocks[list_begin + e] : e;
  }
  // Index of entry e's unit in p.kv, counted in units of [2][16][head_dim] (keys, then values):
  // a slot of the pool, or (physical block, KV head) of the paged cache.
  __device__ int64_t unit_index(const SparseDecodeParams& p, int e) const {
    if (p.sel_slots != nullptr) return p.sel_slots[list_begin + e];
    const int32_t phys = p.block_table[int64_t{s} * p.max_blocks_per_seq + logical(p, e)];
    return int64_t{phys} * p.num_kv_heads + kvh;
  }
  // Start of entry e's unit for this KV head: keys [16][head_dim], then values.
  __device__ const uint16_t* unit(const SparseDecodeParams& p, int e, int head_dim) const {
    return p.kv + unit_index(p, e) * (int64_t{2} * kKvBlockSize * head_dim);
  }
  // Query row r of this KV head: token r / group, head kvh * group + r % group.
  __device__ int64_t q_row(const SparseDecodeParams& p, int r) const {
    return int64_t{q0 + r / group} * p.num_heads + kvh * group + r % group;
  }
  __device__ int qpos(int r) const { return r < nrows ? len - nq + r / group : -1; }
};

__device__ inline SplitWork GetSplitWork(const SparseDecodeParams& p, int rows_per_cta, int blocks_per_split) {
  SplitWork w;
  w.split = blockIdx.y;
  w.sh = blockIdx.z;
  w.s = w.sh / p.num_kv_heads;
  w.kvh = w.sh % p.num_kv_heads;
  w.group = p.num_heads / p.num_kv_heads;
  w.q0 = p.q_indptr[w.s];
  w.nq = p.q_indptr[w.s + 1] - w.q0;
  w.nrows = w.nq * w.group;
  w.row0 = blockIdx.x * rows_per_cta;
  w.len = p.seq_lens[w.s];
  w.list_begin = 0;
  int list_len = (w.len + kKvBlockSize - 1) / kKvBlockSize;
  if (p.sel_indptr != nullptr) {
    const int stride = p.sel_seq_stride > 0 ? p.sel_seq_stride : p.num_kv_heads;
    const int idx = w.s * stride + w.kvh;
    w.list_begin = p.sel_indptr[idx];
    list_len = p.sel_indptr[idx + 1] - w.list_begin;
  }
  w.e0 = w.split * blocks_per_split;
  w.e1 = min(list_len, w.e0 + blocks_per_split);
  return w;
}

// The CTA's 16 query rows (zeros past the end) into swizzled shared memory, then each warp's
// A fragments for the k-steps of Q K^T. Ends with the barrier that makes q_s readable.
template <int HD>
__device__ inline void LoadQFragments(const SparseDecodeParams& p, const SplitWork& w, uint8_t* q_s,
                                      uint32_t (&qa)[HD / 16][4]) {
  using namespace mma;
  constexpr int CH = HD / 8;
  for (int idx = threadIdx.x; idx < 16 * CH; idx += blockDim.x) {
    const int r = idx / CH, c = idx % CH, row = w.row0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < w.nrows) v = *reinterpret_cast<const uint4*>(p.q + w.q_row(p, row) * HD + c * 8);
    *reinterpret_cast<uint4*>(q_s + Swz<HD>(r, c)) = v;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, m = lane >> 3, r = (m & 1) * 8 + (lane & 7);
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) LdMatrixX4(qa[kk], SmemAddr(q_s + Swz<HD>(r, 2 * kk + (m >> 1))));
}

// S (16 rows x 16 tokens of one block, as two m16n8 accumulators) = Q K^T from a swizzled K tile.
template <int HD>
__device__ inline void ScoreTile(const uint32_t (&qa)[HD / 16][4], const uint8_t* k_tile, float (&sc)[2][4]) {
  using namespace mma;
  const int lane = threadIdx.x & 31, m = lane >> 3, r = (m >> 1) * 8 + (lane & 7);
#pragma unroll
  for (int j = 0; j < 2; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    uint32_t b[4];
    LdMatrixX4(b, SmemAddr(k_tile + Swz<HD>(r, 2 * kk + (m & 1))));
    Mma16816(sc[0], qa[kk], b[0], b[1]);
    Mma16816(sc[1], qa[kk], b[2], b[3]);
  }
}

// Dims [4c, 4c + 4) of query row x head rh from its combined (unnormalised) output, base-2 max
// and sum: bf16 output, and the log-sum-exp once per row (c == 0) if asked. A row that saw no
// key gets zeros and -inf.
template <int HD>
__device__ inline void StoreOutputChunk(const SparseDecodeParams& p, int64_t rh, int c, float4 acc, float mx,
                                        float sum) {
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(p.out + rh * HD + c * 4);
  dst[0] = __floats2bfloat162_rn(acc.x * inv, acc.y * inv);
  dst[1] = __floats2bfloat162_rn(acc.z * inv, acc.w * inv);
  if (p.lse != nullptr && c == 0) p.lse[rh] = sum > 0.0f ? mx + log2f(sum) : -INFINITY;
}

// Rows [0, nr) of the CTA's group: combines every split's partial (unnormalised output, max, sum)
// and writes bf16 output and, if asked, the log-sum-exp. Loads go through L2 (__ldcg): other CTAs
// wrote them. HD / 8 splits' loads are issued before any is used. Shared by the decode kernel's
// and SANTA's in-kernel merges.
template <int HD>
__device__ inline void MergeSplitsOfGroup(const SparseDecodeParams& p, const SplitWork& w, int nr, int num_splits,
                                          int total_q_rows, const float* ws_o, const float* ws_ml) {
  constexpr int C4 = HD / 4;
  constexpr int kChunk = HD / 8;  // registers: no more than the main loop needs
  const int64_t stride = (int64_t)total_q_rows * p.num_heads;
  for (int idx = threadIdx.x; idx < nr * C4; idx += blockDim.x) {
    const int r = idx / C4, c = idx % C4;
    const int64_t rh = w.q_row(p, w.row0 + r);
    float mx = -INFINITY, sum = 0.0f;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int sp0 = 0; sp0 < num_splits; sp0 += kChunk) {
      float m[kChunk], l[kChunk];
      float4 o[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int sp = sp0 + i;
        if (sp < num_splits) {
          const int64_t at = sp * stride + rh;
          m[i] = __ldcg(ws_ml + at * 2);
          l[i] = __ldcg(ws_ml + at * 2 + 1);
          o[i] = __ldcg(reinterpret_cast<const float4*>(ws_o + at * HD) + c);
        } else {
          m[i] = -INFINITY;
          l[i] = 0.0f;
          o[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const float mn = fmaxf(mx, m[i]);
        const float mu = mn == -INFINITY ? 0.0f : mn;  // nothing seen yet: keep zeros
        const float fa = exp2f(mx - mu), fb = exp2f(m[i] - mu);
        acc.x = acc.x * fa + o[i].x * fb;
        acc.y = acc.y * fa + o[i].y * fb;
        acc.z = acc.z * fa + o[i].z * fb;
        acc.w = acc.w * fa + o[i].w * fb;
        sum = sum * fa + l[i] * fb;
        mx = mn;
      }
    }
    StoreOutputChunk<HD>(p, rh, c, acc, mx, sum);
  }
}

// The merge kernels' CTA (one per query row and head, HD threads): combines the splits'
// partials for row x head blockIdx.x and writes bf16 (and the log-sum-exp if asked). ml: shared
// memory for num_splits (max, sum) pairs, loaded once by all threads; then each thread's pass
// over its dimension has independent loads only (no serial chain of dependent global loads per
// split, whose latency grows with the split count). Shared by the decode
// and SANTA merge kernels.
template <int HD>
__device__ inline void MergeSplitsOfRowHead(const SparseDecodeParams& p, int num_splits, int total_q_rows,
                                            const float* ws_o, const float* ws_ml, float* ml) {
  const int64_t rh = blockIdx.x;  // row * num_heads + head
  const int d = threadIdx.x;
  const int64_t stride = (int64_t)total_q_rows * p.num_heads;
  for (int sp = threadIdx.x; sp < num_splits; sp += blockDim.x) {
    ml[2 * sp] = ws_ml[(sp * stride + rh) * 2];
    ml[2 * sp + 1] = ws_ml[(sp * stride + rh) * 2 + 1];
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int sp = 0; sp < num_splits; ++sp) mx = fmaxf(mx, ml[2 * sp]);
  float acc = 0.0f, sum = 0.0f;
  if (mx != -INFINITY) {
    // 32 splits' loads in flight before any is used: the loop is latency-bound (8 at a time
    // would wait on L2 seven times at 49 splits).
    constexpr int kChunk = 32;
    for (int sp0 = 0; sp0 < num_splits; sp0 += kChunk) {
      float o[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) o[i] = sp0 + i < num_splits ? ws_o[((sp0 + i) * stride + rh) * HD + d] : 0.0f;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        if (sp0 + i < num_splits) {
          const float m = ml[2 * (sp0 + i)];
          const float f = m == -INFINITY ? 0.0f : exp2f(m - mx);
          acc += f * o[i];
          sum += f * ml[2 * (sp0 + i) + 1];
        }
      }
    }
  }
  const float v = sum > 0.0f ? acc / sum : 0.0f;
  reinterpret_cast<__nv_bfloat16*>(p.out)[rh * HD + d] = __float2bfloat16(v);
  if (p.lse != nullptr && d == 0) p.lse[rh] = sum > 0.0f ? mx + log2f(sum) : -INFINITY;
}

}  // namespace scout::kernels
