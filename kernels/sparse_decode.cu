#include <cuda_bf16.h>

#include <algorithm>
#include <cfloat>

#include "kernels/sparse_decode.cuh"

namespace scout::kernels {
namespace {

constexpr int kWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ void Bf16x8ToFloat(const uint4& raw, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// One CTA: rows [row0, row0 + ROWS) of one (sequence, KV head), list entries of one split.
// Within a warp, LANES lanes share a token (8 dims each) and the warp covers 32 / LANES tokens a
// load; the 4 warps take interleaved blocks. Scores use base-2 exponentials with the scale and
// log2(e) folded into q. Writes unnormalised partial output, running max and sum per row.
template <int HD, int ROWS>
__global__ void __launch_bounds__(kWarps * 32) SparseDecodeSplitKernel(SparseDecodeParams p, int blocks_per_split,
                                                                       int total_q_rows, float* ws_o, float* ws_ml) {
  constexpr int LANES = HD / 8;             // lanes per token
  constexpr int TOK_PER_LOAD = 32 / LANES;  // tokens a warp covers per 16-byte load
  constexpr int ITERS = kKvBlockSize / TOK_PER_LOAD;
  const int split = blockIdx.y;
  const int sh = blockIdx.z;
  const int s = sh / p.num_kv_heads, kvh = sh % p.num_kv_heads;
  const int group = p.num_heads / p.num_kv_heads;
  const int q0 = p.q_indptr[s], nq = p.q_indptr[s + 1] - q0;
  const int row0 = blockIdx.x * ROWS;
  if (row0 >= nq * group) return;
  const int len = p.seq_lens[s];
  int list_begin = 0, list_len = (len + kKvBlockSize - 1) / kKvBlockSize;
  if (p.sel_indptr != nullptr) {
    list_begin = p.sel_indptr[sh];
    list_len = p.sel_indptr[sh + 1] - list_begin;
  }
  const int e0 = split * blocks_per_split;
  const int e1 = min(list_len, e0 + blocks_per_split);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % LANES, tok = lane / LANES;

  float q[ROWS][8];
  int qpos[ROWS];
  const float qscale = p.scale * kLog2e;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = row0 + r;
    if (row < nq * group) {
      const int t = row / group, h = kvh * group + row % group;
      const uint4 raw = *reinterpret_cast<const uint4*>(p.q + ((int64_t)(q0 + t) * p.num_heads + h) * HD + sub * 8);
      Bf16x8ToFloat(raw, q[r]);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[r][j] *= qscale;
      qpos[r] = len - nq + t;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) q[r][j] = 0.0f;
      qpos[r] = -1;  // sees nothing
    }
  }
  float m[ROWS], l[ROWS], o[ROWS][8];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) o[r][j] = 0.0f;
  }

  const int32_t* table = p.block_table + (int64_t)s * p.max_blocks_per_seq;
  const int64_t block_stride = (int64_t)p.num_kv_heads * 2 * kKvBlockSize * HD;
  const uint16_t* head_base = p.kv + (int64_t)kvh * 2 * kKvBlockSize * HD;
  for (int e = e0 + warp; e < e1; e += kWarps) {
    const int logical = p.sel_indptr != nullptr ? p.sel_blocks[list_begin + e] : e;
    const uint16_t* kb = head_base + table[logical] * block_stride;
    uint4 kr[ITERS], vr[ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int off = (i * TOK_PER_LOAD + tok) * HD + sub * 8;
      kr[i] = __ldg(reinterpret_cast<const uint4*>(kb + off));
      vr[i] = __ldg(reinterpret_cast<const uint4*>(kb + kKvBlockSize * HD + off));
    }
    float sc[ROWS][ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      float kf[8];
      Bf16x8ToFloat(kr[i], kf);
      const int pos = logical * kKvBlockSize + i * TOK_PER_LOAD + tok;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float d = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) d = fmaf(q[r][j], kf[j], d);
#pragma unroll
        for (int off = LANES / 2; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
        sc[r][i] = (pos < len && pos <= qpos[r]) ? d : -INFINITY;
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float bm = sc[r][0];
#pragma unroll
      for (int i = 1; i < ITERS; ++i) bm = fmaxf(bm, sc[r][i]);
#pragma unroll
      for (int off = 16; off >= LANES; off >>= 1) bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, off));
      const float m_new = fmaxf(m[r], bm);
      if (m_new == -INFINITY) continue;  // uniform across the warp: nothing visible yet
      const float alpha = exp2f(m[r] - m_new);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int j = 0; j < 8; ++j) o[r][j] *= alpha;
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const float pr = exp2f(sc[r][i] - m_new);
        l[r] += pr;
        float vf[8];
        Bf16x8ToFloat(vr[i], vf);
#pragma unroll
        for (int j = 0; j < 8; ++j) o[r][j] = fmaf(pr, vf[j], o[r][j]);
      }
    }
  }
  // Sum the token groups of the warp (same max everywhere in the warp).
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int off = 16; off >= LANES; off >>= 1) {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], off);
#pragma unroll
      for (int j = 0; j < 8; ++j) o[r][j] += __shfl_xor_sync(0xffffffffu, o[r][j], off);
    }
  }
  // Merge the warps through shared memory.
  __shared__ float sm_m[kWarps][ROWS], sm_l[kWarps][ROWS];
  __shared__ float sm_o[kWarps][ROWS][HD];
  if (tok == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int j = 0; j < 8; ++j) sm_o[warp][r][sub * 8 + j] = o[r][j];
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      sm_m[warp][r] = m[r];
      sm_l[warp][r] = l[r];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < ROWS * HD; idx += kWarps * 32) {
    const int r = idx / HD, d = idx % HD;
    const int row = row0 + r;
    if (row >= nq * group) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][r]);
    float acc = 0.0f, sum = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(sm_m[w][r] - mx);
        acc += f * sm_o[w][r][d];
        sum += f * sm_l[w][r];
      }
    }
    const int t = row / group, h = kvh * group + row % group;
    const int64_t out_row = (int64_t)split * total_q_rows * p.num_heads + (int64_t)(q0 + t) * p.num_heads + h;
    ws_o[out_row * HD + d] = acc;
    if (d == 0) {
      ws_ml[out_row * 2] = mx;
      ws_ml[out_row * 2 + 1] = sum;
    }
  }
}

// One CTA per (query row, head): combines the splits and writes bf16.
template <int HD>
__global__ void SparseDecodeMergeKernel(SparseDecodeParams p, int num_splits, int total_q_rows, const float* ws_o,
                                        const float* ws_ml) {
  const int64_t rh = blockIdx.x;  // row * num_heads + head
  const int d = threadIdx.x;
  const int64_t stride = (int64_t)total_q_rows * p.num_heads;
  float mx = -INFINITY;
  for (int sp = 0; sp < num_splits; ++sp) mx = fmaxf(mx, ws_ml[(sp * stride + rh) * 2]);
  float acc = 0.0f, sum = 0.0f;
  if (mx != -INFINITY) {
    for (int sp = 0; sp < num_splits; ++sp) {
      const float m = ws_ml[(sp * stride + rh) * 2];
      if (m == -INFINITY) continue;
      const float f = exp2f(m - mx);
      acc += f * ws_o[(sp * stride + rh) * HD + d];
      sum += f * ws_ml[(sp * stride + rh) * 2 + 1];
    }
  }
  const float v = sum > 0.0f ? acc / sum : 0.0f;
  reinterpret_cast<__nv_bfloat16*>(p.out)[rh * HD + d] = __float2bfloat16(v);
}

}  // namespace

int SparseDecodeRowsPerCta(int num_heads, int num_kv_heads, int max_q_tokens) {
  const int rows = max_q_tokens * (num_heads / num_kv_heads);
  return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
}

int SparseDecodeCtasPerSm(int head_dim, int rows_per_cta) {
  int n = 0;
  const void* fn = nullptr;
  switch (head_dim * 100 + rows_per_cta) {
    case 6401: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<64, 1>); break;
    case 6402: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<64, 2>); break;
    case 6404: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<64, 4>); break;
    case 6408: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<64, 8>); break;
    case 12801: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<128, 1>); break;
    case 12802: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<128, 2>); break;
    case 12804: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<128, 4>); break;
    case 12808: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<128, 8>); break;
    default: return 0;
  }
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, kWarps * 32, 0) != cudaSuccess) return 0;
  return n;
}

SparseDecodePlan PlanSparseDecode(int num_seqs, int num_heads, int num_kv_heads, int max_q_tokens,
                                  int max_list_blocks, int total_q_rows, int head_dim, int num_sms, int ctas_per_sm,
                                  int num_splits) {
  SparseDecodePlan plan;
  const int rows = max_q_tokens * (num_heads / num_kv_heads);
  plan.rows_per_cta = SparseDecodeRowsPerCta(num_heads, num_kv_heads, max_q_tokens);
  plan.row_groups = (rows + plan.rows_per_cta - 1) / plan.rows_per_cta;
  const int base_ctas = std::max(1, num_seqs * num_kv_heads * plan.row_groups);
  if (num_splits <= 0) {
    // One full wave of resident CTAs, and at least one block per warp in every split.
    const int slots = std::max(1, num_sms * std::max(1, ctas_per_sm));
    num_splits = std::max(1, std::min(slots / base_ctas, (max_list_blocks + kWarps - 1) / kWarps));
  }
  plan.num_splits = num_splits;
  plan.total_q_rows = total_q_rows;
  plan.blocks_per_split = std::max(1, (max_list_blocks + num_splits - 1) / num_splits);
  plan.workspace_bytes = sizeof(float) * static_cast<size_t>(num_splits) * total_q_rows * num_heads * (head_dim + 2);
  return plan;
}

cudaError_t SparseDecode(const SparseDecodeParams& p, const SparseDecodePlan& plan, void* workspace,
                         cudaStream_t stream) {
  if ((p.head_dim != 64 && p.head_dim != 128) || p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  const int total_q_rows = plan.total_q_rows;
  float* ws_o = static_cast<float*>(workspace);
  float* ws_ml = ws_o + static_cast<size_t>(plan.num_splits) * total_q_rows * p.num_heads * p.head_dim;
  const dim3 grid(plan.row_groups, plan.num_splits, p.num_seqs * p.num_kv_heads);
  const dim3 block(kWarps * 32);
#define SCOUT_SPLIT(HD, ROWS)                                                                              \
  SparseDecodeSplitKernel<HD, ROWS><<<grid, block, 0, stream>>>(p, plan.blocks_per_split, total_q_rows, ws_o, \
                                                                 ws_ml)
  const int key = p.head_dim * 100 + plan.rows_per_cta;
  switch (key) {
    case 6401: SCOUT_SPLIT(64, 1); break;
    case 6402: SCOUT_SPLIT(64, 2); break;
    case 6404: SCOUT_SPLIT(64, 4); break;
    case 6408: SCOUT_SPLIT(64, 8); break;
    case 12801: SCOUT_SPLIT(128, 1); break;
    case 12802: SCOUT_SPLIT(128, 2); break;
    case 12804: SCOUT_SPLIT(128, 4); break;
    case 12808: SCOUT_SPLIT(128, 8); break;
    default: return cudaErrorInvalidValue;
  }
#undef SCOUT_SPLIT
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (total_q_rows == 0) return cudaSuccess;
  if (p.head_dim == 64) {
    SparseDecodeMergeKernel<64><<<total_q_rows * p.num_heads, 64, 0, stream>>>(p, plan.num_splits, total_q_rows, ws_o, ws_ml);
  } else {
    SparseDecodeMergeKernel<128><<<total_q_rows * p.num_heads, 128, 0, stream>>>(p, plan.num_splits, total_q_rows, ws_o, ws_ml);
  }
  return cudaGetLastError();
}

}  // namespace scout::kernels
