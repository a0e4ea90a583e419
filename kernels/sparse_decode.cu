#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cfloat>

#include "kernels/mma_utils.cuh"
#include "kernels/sparse_decode.cuh"
#include "kernels/split_work.cuh"

namespace scout::kernels {
namespace {

using namespace mma;

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
                                                                       int total_q_rows, float* ws_o, float* ws_ml,
                                                                       bool evict_first) {
  constexpr int LANES = HD / 8;             // lanes per token
  constexpr int TOK_PER_LOAD = 32 / LANES;  // tokens a warp covers per 16-byte load
  constexpr int ITERS = kKvBlockSize / TOK_PER_LOAD;
  const SplitWork w = GetSplitWork(p, ROWS, blocks_per_split);
  if (w.empty()) return;
  const int split = w.split, kvh = w.kvh, group = w.group, q0 = w.q0, nq = w.nq, row0 = w.row0, len = w.len;
  const int e0 = w.e0, e1 = w.e1;
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

  for (int e = e0 + warp; e < e1; e += kWarps) {
    const int logical = w.logical(p, e);
    const uint16_t* kb = w.unit(p, e, HD);
    uint4 kr[ITERS], vr[ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int off = (i * TOK_PER_LOAD + tok) * HD + sub * 8;
      const uint4* kp = reinterpret_cast<const uint4*>(kb + off);
      const uint4* vp = reinterpret_cast<const uint4*>(kb + kKvBlockSize * HD + off);
      kr[i] = evict_first ? __ldcs(kp) : __ldg(kp);  // ld.global.cs: L2 evict-first
      vr[i] = evict_first ? __ldcs(vp) : __ldg(vp);
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
        sc[r][i] = (pos < len && KeyVisible(pos, qpos[r], p.sliding_window)) ? d : -INFINITY;
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
    for (int wp = 0; wp < kWarps; ++wp) mx = fmaxf(mx, sm_m[wp][r]);
    float acc = 0.0f, sum = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int wp = 0; wp < kWarps; ++wp) {
        const float f = exp2f(sm_m[wp][r] - mx);
        acc += f * sm_o[wp][r][d];
        sum += f * sm_l[wp][r];
      }
    }
    const int64_t out_row = (int64_t)split * total_q_rows * p.num_heads + w.q_row(p, row);
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
  extern __shared__ float ml[];  // [num_splits][2]
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent launch this may start before the splits finish: wait
  // for them (a no-op for an ordinary launch).
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  MergeSplitsOfRowHead<HD>(p, num_splits, total_q_rows, ws_o, ws_ml, ml);
}

// ---- Tensor-core variant for many query rows (speculative verification, large GQA groups) ----

constexpr int kMmaRows = 16;

template <int HD>
constexpr int MmaSmemBytes(int stages) {
  return kMmaRows * HD * 2 + kWarps * stages * 2 /*K,V*/ * kKvBlockSize * HD * 2;
}

struct MmaArgs {
  int blocks_per_split = 0;
  int total_q_rows = 0;
  int num_splits = 0;
  float* ws_o = nullptr;
  float* ws_ml = nullptr;
  unsigned int* counters = nullptr;  // kInKernel: [row_groups x num_seqs x num_kv_heads], zeroed
  bool in_kernel_merge = false;
  bool trigger_dependents = false;  // kKernelPdl: let the merge kernel start early
  bool direct = false;  // one split: each CTA writes the output itself, no partials, no merge
  unsigned long long* timeline = nullptr;  // SparseDecodePlan::timeline
};

__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned int SmId() {
  unsigned int id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

// Same contract and output as SparseDecodeSplitKernel with 16 rows per CTA: each warp takes a
// 16-token block at a time, S = Q K^T and O += P V on the tensor cores (m16n8k16), K and V staged
// through shared memory: by cp.async STAGES blocks deep, or with LDCS (STAGES 2) by ld.global.cs
// (L2 evict-first) into registers one block ahead, then stored. With in_kernel_merge the last CTA
// of the group to finish also merges the splits (MergeSplitsOfGroup).
template <int HD, int STAGES, bool LDCS>
__global__ void __launch_bounds__(kWarps * 32) SparseDecodeMmaKernel(SparseDecodeParams p, MmaArgs a) {
  static_assert(!LDCS || STAGES == 2, "the register path holds one block ahead: two stages");
  constexpr int CH = HD / 8;        // 16-byte chunks per row
  constexpr int KS = HD / 16;       // k-steps of Q K^T
  constexpr int NT = HD / 8;        // n-tiles of O
  constexpr int TILE = kKvBlockSize * HD * 2;
  constexpr int PER_LANE = 2 * kKvBlockSize * CH / 32;  // 16-byte chunks of a K/V unit per lane
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int stage_logical[kWarps][STAGES];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (a.trigger_dependents) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  const unsigned long long t_entry = a.timeline != nullptr ? GlobalTimer() : 0;
  const SplitWork w = GetSplitWork(p, kMmaRows, a.blocks_per_split);
  if (w.empty()) return;  // a CTA past its group's rows (stamps none)
  unsigned long long* stamp = nullptr;
  if (a.timeline != nullptr && threadIdx.x == 0) {
    stamp = a.timeline + (blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)) * kTimelineStamps;
    stamp[0] = t_entry;
    for (int i = 1; i < kTimelineStamps; ++i) stamp[i] = 0;
    stamp[8] = SmId();
  }
  const int split = w.split, nrows = w.nrows, row0 = w.row0;
  const int len = w.len, e0 = w.e0, e1 = w.e1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  uint8_t* q_s = smem;
  uint8_t* kv_s = smem + kMmaRows * HD * 2 + warp * STAGES * 2 * TILE;

  // The warp reads entries e0 + warp + kWarps * k, k < n. Their units and logical blocks are
  // looked up 32 at a time, one per lane, ahead of the copies: each lookup is two dependent loads
  // (list entry, block table) that would otherwise stall every issue.
  const int n = e1 - e0 > warp ? (e1 - e0 - warp + kWarps - 1) / kWarps : 0;
  int64_t batch_unit = 0;
  int batch_logical = 0;
  auto lookup = [&](int k0) {
    const int k = k0 + lane;
    if (k < n) {
      const int e = e0 + warp + kWarps * k;
      batch_logical = w.logical(p, e);
      batch_unit = w.unit_index(p, e);
    }
  };
  // Entry k's unit; lookups happen in order of k, all lanes together.
  auto unit_of = [&](int k, int* logical) {
    if ((k & 31) == 0) lookup(k);
    *logical = __shfl_sync(0xffffffffu, batch_logical, k & 31);
    return p.kv + __shfl_sync(0xffffffffu, batch_unit, k & 31) * (2 * kKvBlockSize * HD);
  };
  // Chunk i of a lane: source offset in the unit and destination in a (swizzled) stage.
  auto chunk_src = [&](int i) {
    const int idx = i * 32 + lane, which = idx / (kKvBlockSize * CH), rem = idx % (kKvBlockSize * CH);
    return which * kKvBlockSize * HD + (rem / CH) * HD + (rem % CH) * 8;
  };
  auto chunk_dst = [&](int i) {
    const int idx = i * 32 + lane, which = idx / (kKvBlockSize * CH), rem = idx % (kKvBlockSize * CH);
    return which * TILE + Swz<HD>(rem / CH, rem % CH);
  };
  auto issue = [&](int k, int stage) {  // cp.async path
    if (k < n) {
      int logical;
      const uint16_t* kb = unit_of(k, &logical);
      if (lane == 0) stage_logical[warp][stage] = logical;
      uint8_t* dst = kv_s + stage * 2 * TILE;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) CpAsync16(SmemAddr(dst + chunk_dst(i)), kb + chunk_src(i));
    }
    CpAsyncCommit();
  };
  uint4 held[LDCS ? PER_LANE : 1];  // register path: the next unit, in flight
  int held_logical = 0;
  auto load_held = [&](int k) {
    if constexpr (LDCS) {
      if (k < n) {
        const uint16_t* kb = unit_of(k, &held_logical);
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) held[i] = __ldcs(reinterpret_cast<const uint4*>(kb + chunk_src(i)));
      }
    }
  };
  auto store_held = [&](int stage) {
    if constexpr (LDCS) {
      uint8_t* dst = kv_s + stage * 2 * TILE;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) *reinterpret_cast<uint4*>(dst + chunk_dst(i)) = held[i];
      if (lane == 0) stage_logical[warp][stage] = held_logical;
    }
  };
  // K/V loads start before the query tile loads, so that the two latencies overlap.
  if constexpr (LDCS) {
    load_held(0);
  } else {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s, s);
  }
  uint32_t qa[KS][4];
  LoadQFragments<HD>(p, w, q_s, qa);
  const int qp[2] = {w.qpos(row0 + g), w.qpos(row0 + g + 8)};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  if constexpr (LDCS) {
    if (n > 0) {
      store_held(0);
      load_held(1);
    }
    __syncwarp();
  }

  const float qscale = p.scale * kLog2e;
  int stage = 0, next_stage = STAGES - 1;
  for (int k = 0; k < n; ++k) {
    if constexpr (!LDCS) {
      issue(k + STAGES - 1, next_stage);
      next_stage = next_stage == STAGES - 1 ? 0 : next_stage + 1;
      CpAsyncWait<STAGES - 1>();
      __syncwarp();
    }
    if (stamp != nullptr && k == 0) stamp[1] = GlobalTimer();
    const uint8_t* ks = kv_s + stage * 2 * TILE;
    const uint8_t* vs = ks + TILE;
    const int logical = stage_logical[warp][stage];
    float sc[2][4];
    ScoreTile<HD>(qa, ks, sc);
    // Mask, scale to base 2, online softmax per row (rows g and g + 8 of the tile).
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int pos = logical * kKvBlockSize + 8 * j + 2 * t + (c & 1);
        sc[j][c] = (pos < len && KeyVisible(pos, qp[c >> 1], p.sliding_window)) ? sc[j][c] * qscale : -INFINITY;
      }
    }
    float pv[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = fmaxf(fmaxf(sc[0][2 * i], sc[0][2 * i + 1]), fmaxf(sc[1][2 * i], sc[1][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[i], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: keep zeros
      const float alpha = exp2f(m_run[i] - m_use);
      m_run[i] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          pv[j][2 * i + c] = exp2f(sc[j][2 * i + c] - m_use);
          sum += pv[j][2 * i + c];
        }
      }
      l_run[i] = l_run[i] * alpha + sum;
      if (p.block_lse != nullptr) {  // this block's own log-sum-exp for the row (STS's signal)
        float bs = sum + __shfl_xor_sync(0xffffffffu, sum, 1);
        bs += __shfl_xor_sync(0xffffffffu, bs, 2);
        const int row = row0 + g + 8 * i;
        if (t == 0 && row < nrows) {
          p.block_lse[w.q_row(p, row) * p.block_lse_stride + logical] = bs > 0.0f ? m_use + log2f(bs) : -INFINITY;
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        o[j][2 * i] *= alpha;
        o[j][2 * i + 1] *= alpha;
      }
    }
    const uint32_t pa[4] = {PackBf16(pv[0][0], pv[0][1]), PackBf16(pv[0][2], pv[0][3]), PackBf16(pv[1][0], pv[1][1]),
                            PackBf16(pv[1][2], pv[1][3])};
    {
      const int m = lane >> 3, r = (m & 1) * 8 + (lane & 7);
#pragma unroll
      for (int jj = 0; jj < NT / 2; ++jj) {
        uint32_t b[4];
        LdMatrixX4Trans(b, SmemAddr(vs + Swz<HD>(r, 2 * jj + (m >> 1))));
        Mma16816(o[2 * jj], pa, b[0], b[1]);
        Mma16816(o[2 * jj + 1], pa, b[2], b[3]);
      }
    }
    __syncwarp();  // every lane is done with this stage before a later copy overwrites it
    if constexpr (LDCS) {
      if (k + 1 < n) {
        store_held(stage ^ 1);  // waits for the unit in flight
        load_held(k + 2);
      }
      __syncwarp();
    }
    stage = stage == STAGES - 1 ? 0 : stage + 1;
  }
  CpAsyncWait<0>();
  if (stamp != nullptr) {
    stamp[2] = GlobalTimer();
    stamp[9] = n;
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
  // Merge the four warps through shared memory (the K/V stages are free now). Only the group's
  // rows that exist are stored and merged (4 of 16 at q = 1, GQA group 4), rows padded by 8 floats
  // so that a warp's fragment stores fall in distinct banks, and each thread merges 4 dims at a
  // time (an unpadded per-element merge was slower: docs/BENCHMARKS.md).
  __syncthreads();
  if (stamp != nullptr) stamp[3] = GlobalTimer();
  constexpr int SO = HD + 8;
  static_assert(kWarps * kMmaRows * (SO + 2) * 4 <= kWarps * 2 * 2 * kKvBlockSize * HD * 2,
                "the warps' partials fit in two stages of K/V");
  float* so = reinterpret_cast<float*>(smem + kMmaRows * HD * 2);  // [warp][row][SO]
  float* sm = so + kWarps * kMmaRows * SO;                          // [warp][row]
  float* sl = sm + kWarps * kMmaRows;
  const int nr = min(kMmaRows, nrows - row0);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (g + 8 * i < nr) {
        *reinterpret_cast<float2*>(so + (warp * kMmaRows + g + 8 * i) * SO + 8 * j + 2 * t) =
            make_float2(o[j][2 * i], o[j][2 * i + 1]);
      }
    }
  }
  if (t == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      sm[warp * kMmaRows + g + 8 * i] = m_run[i];
      sl[warp * kMmaRows + g + 8 * i] = l_run[i];
    }
  }
  __syncthreads();
  if (stamp != nullptr) stamp[4] = GlobalTimer();
  constexpr int C4 = HD / 4;
  for (int idx = threadIdx.x; idx < nr * C4; idx += kWarps * 32) {
    const int r = idx / C4, c = idx % C4, row = row0 + r;
    float mx = -INFINITY;
#pragma unroll
    for (int wp = 0; wp < kWarps; ++wp) mx = fmaxf(mx, sm[wp * kMmaRows + r]);
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float sum = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int wp = 0; wp < kWarps; ++wp) {
        const float f = exp2f(sm[wp * kMmaRows + r] - mx);
        const float4 v = *reinterpret_cast<const float4*>(so + (wp * kMmaRows + r) * SO + 4 * c);
        acc.x += f * v.x;
        acc.y += f * v.y;
        acc.z += f * v.z;
        acc.w += f * v.w;
        sum += f * sl[wp * kMmaRows + r];
      }
    }
    if (a.direct) {  // the only split: normalise and write the output as the merges would
      StoreOutputChunk<HD>(p, w.q_row(p, row), c, acc, mx, sum);
      continue;
    }
    const int64_t out_row = (int64_t)split * a.total_q_rows * p.num_heads + w.q_row(p, row);
    *reinterpret_cast<float4*>(a.ws_o + out_row * HD + 4 * c) = acc;
    if (c == 0) {
      a.ws_ml[out_row * 2] = mx;
      a.ws_ml[out_row * 2 + 1] = sum;
    }
  }
  if (a.direct || !a.in_kernel_merge) {
    if (stamp != nullptr) stamp[5] = GlobalTimer();
    return;
  }
  // Arrive; the last of the group's num_splits CTAs merges. The barrier orders every thread's
  // partial stores before thread 0's arrival, an atomic with release and acquire semantics at GPU
  // scope (cumulative over what the barrier ordered before it); in the last CTA the barrier after
  // it orders its acquire before every thread's reads of the others' partials (one release by
  // thread 0 instead of a __threadfence in every thread, as in the CUDA samples'
  // threadFenceReduction: the same ordering, fewer fences).
  __shared__ bool last;
  __syncthreads();
  if (stamp != nullptr) stamp[5] = GlobalTimer();
  if (threadIdx.x == 0) {
    unsigned int arrived;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
                 : "=r"(arrived)
                 : "l"(a.counters + blockIdx.z * gridDim.x + blockIdx.x)
                 : "memory");
    last = arrived == static_cast<unsigned int>(a.num_splits) - 1;
    // Every CTA of the group has arrived: the counter is back to zero for the next launch.
    if (last) a.counters[blockIdx.z * gridDim.x + blockIdx.x] = 0;
  }
  __syncthreads();
  if (stamp != nullptr) stamp[6] = GlobalTimer();
  if (!last) return;
  MergeSplitsOfGroup<HD>(p, w, min(kMmaRows, nrows - row0), a.num_splits, a.total_q_rows, a.ws_o, a.ws_ml);
  if (a.timeline != nullptr) {
    __syncthreads();
    if (stamp != nullptr) stamp[7] = GlobalTimer();
  }
}

template <int HD, int STAGES, bool LDCS = false>
cudaError_t LaunchMma(const SparseDecodeParams& p, const SparseDecodePlan& plan, const MmaArgs& a,
                      cudaStream_t stream) {
  // The shared-memory limit is a per-device attribute: set once for each device this process
  // launches on (a second GPU of a tensor-parallel worker needs its own).
  static std::atomic<uint64_t> set_on{0};
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || (set_on.load(std::memory_order_acquire) & bit) == 0) {
    const cudaError_t attr = cudaFuncSetAttribute(SparseDecodeMmaKernel<HD, STAGES, LDCS>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize, MmaSmemBytes<HD>(STAGES));
    if (attr != cudaSuccess) return attr;
    set_on.fetch_or(bit, std::memory_order_acq_rel);
  }
  const dim3 grid(plan.row_groups, plan.num_splits, p.num_seqs * p.num_kv_heads);
  SparseDecodeMmaKernel<HD, STAGES, LDCS><<<grid, kWarps * 32, MmaSmemBytes<HD>(STAGES), stream>>>(p, a);
  return cudaGetLastError();
}

template <int HD>
cudaError_t LaunchMmaStages(const SparseDecodeParams& p, const SparseDecodePlan& plan, const MmaArgs& a,
                            cudaStream_t stream) {
  if (plan.kv_evict_first) return plan.stages == 2 ? LaunchMma<HD, 2, true>(p, plan, a, stream) : cudaErrorInvalidValue;
  switch (plan.stages) {
    case 2: return LaunchMma<HD, 2>(p, plan, a, stream);
    case 3: return LaunchMma<HD, 3>(p, plan, a, stream);
    case 4: return LaunchMma<HD, 4>(p, plan, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <int HD, int STAGES>
int MmaCtasPerSm() {
  int n = 0;
  if (cudaFuncSetAttribute(SparseDecodeMmaKernel<HD, STAGES, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           MmaSmemBytes<HD>(STAGES)) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, SparseDecodeMmaKernel<HD, STAGES, false>, kWarps * 32,
                                                    MmaSmemBytes<HD>(STAGES)) != cudaSuccess) {
    return 0;
  }
  return n;
}

template <int HD>
cudaError_t LaunchMerge(const SparseDecodeParams& p, const SparseDecodePlan& plan, const float* ws_o,
                        const float* ws_ml, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(plan.total_q_rows * p.num_heads);
  cfg.blockDim = dim3(HD);
  cfg.dynamicSmemBytes = 2 * sizeof(float) * plan.num_splits;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  if (plan.rows_per_cta == kMmaRows && plan.merge == SparseDecodeMerge::kKernelPdl) {
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, SparseDecodeMergeKernel<HD>, p, plan.num_splits, plan.total_q_rows, ws_o, ws_ml);
}

}  // namespace

int SparseDecodeRowsPerCta() {
  // The tensor-core kernel wins at every shape measured (docs/BENCHMARKS.md), even with 4 of its
  // 16 rows used: its cp.async double buffering keeps more bytes in flight. The CUDA-core kernel
  // (1, 2 or 4 rows) stays as the simpler variant to check against.
  return 16;
}

int SparseDecodeCudaCoreRows(int num_heads, int num_kv_heads, int max_q_tokens) {
  const int rows = max_q_tokens * (num_heads / num_kv_heads);
  return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 0;
}

int SparseDecodeCtasPerSm(int head_dim, int rows_per_cta, int stages) {
  if (stages == 0) stages = kSparseDecodeDefaultStages;
  int n = 0;
  const void* fn = nullptr;
  switch (head_dim * 100 + rows_per_cta) {
    case 6401: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<64, 1>); break;
    case 6402: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<64, 2>); break;
    case 6404: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<64, 4>); break;
    case 12801: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<128, 1>); break;
    case 12802: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<128, 2>); break;
    case 12804: fn = reinterpret_cast<const void*>(SparseDecodeSplitKernel<128, 4>); break;
    case 6416:
      return stages == 2 ? MmaCtasPerSm<64, 2>() : stages == 3 ? MmaCtasPerSm<64, 3>()
                                                 : stages == 4 ? MmaCtasPerSm<64, 4>() : 0;
    case 12816:
      return stages == 2 ? MmaCtasPerSm<128, 2>() : stages == 3 ? MmaCtasPerSm<128, 3>()
                                                  : stages == 4 ? MmaCtasPerSm<128, 4>() : 0;
    default: return 0;
  }
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, kWarps * 32, 0) != cudaSuccess) return 0;
  return n;
}

SparseDecodePlan PlanSparseDecode(int num_seqs, int num_heads, int num_kv_heads, int max_q_tokens,
                                  int max_list_blocks, int total_q_rows, int head_dim, int num_sms, int ctas_per_sm,
                                  int num_splits, int rows_per_cta) {
  SparseDecodePlan plan;
  const int rows = max_q_tokens * (num_heads / num_kv_heads);
  plan.rows_per_cta = rows_per_cta > 0 ? rows_per_cta : SparseDecodeRowsPerCta();
  plan.row_groups = (rows + plan.rows_per_cta - 1) / plan.rows_per_cta;
  const int base_ctas = std::max(1, num_seqs * num_kv_heads * plan.row_groups);
  if (num_splits <= 0) {
    // num_sms / lists splits, at most one wave, at least one block per warp in every split
    // (fewer splits than resident slots: the merge costs more than the extra parallelism gives
    // at batch 1; docs/BENCHMARKS.md).
    const int lists = std::max(1, num_seqs * num_kv_heads);
    const int wave = std::max(1, num_sms * std::max(1, ctas_per_sm) / base_ctas);
    num_splits = std::max(1, std::min({num_sms / lists, wave, (max_list_blocks + kWarps - 1) / kWarps}));
  }
  plan.num_splits = num_splits;
  plan.total_q_rows = total_q_rows;
  plan.blocks_per_split = std::max(1, (max_list_blocks + num_splits - 1) / num_splits);
  plan.num_counters = num_seqs * num_kv_heads * plan.row_groups;
  // The in-kernel merge gives each of a CTA's 128 threads one (row, 4 dims) to combine across the
  // splits: one pass when rows x head_dim <= 512. Beyond that it serialises (q = 5 at 128k: 48.1
  // us against 44.9 with the merge kernel), so the merge kernel runs instead.
  plan.merge = rows * head_dim <= kWarps * 32 * 4 ? SparseDecodeMerge::kInKernel : SparseDecodeMerge::kKernelPdl;
  const size_t partials = sizeof(float) * static_cast<size_t>(num_splits) * total_q_rows * num_heads * (head_dim + 2);
  plan.workspace_bytes = partials + sizeof(unsigned int) * static_cast<size_t>(plan.num_counters);
  return plan;
}

cudaError_t SparseDecode(const SparseDecodeParams& p, const SparseDecodePlan& plan, void* workspace,
                         cudaStream_t stream, unsigned int* kept_counters) {
  if ((p.head_dim != 64 && p.head_dim != 128) || p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.block_lse != nullptr && plan.rows_per_cta != kMmaRows) return cudaErrorInvalidValue;  // tensor-core kernel only
  const int total_q_rows = plan.total_q_rows;
  float* ws_o = static_cast<float*>(workspace);
  float* ws_ml = ws_o + static_cast<size_t>(plan.num_splits) * total_q_rows * p.num_heads * p.head_dim;
  unsigned int* counters =
      kept_counters != nullptr
          ? kept_counters
          : reinterpret_cast<unsigned int*>(ws_ml + static_cast<size_t>(plan.num_splits) * total_q_rows * p.num_heads * 2);
  const dim3 grid(plan.row_groups, plan.num_splits, p.num_seqs * p.num_kv_heads);
  const dim3 block(kWarps * 32);
  const bool mma = plan.rows_per_cta == kMmaRows;
  // With one split there is nothing to merge: the tensor-core CTA writes the output (the plan's
  // merge is not used: no partials, fence, arrival or merge kernel).
  const bool direct = mma && plan.num_splits == 1;
  const bool in_kernel = mma && !direct && plan.merge == SparseDecodeMerge::kInKernel;
#define SCOUT_SPLIT(HD, ROWS)                                                                              \
  SparseDecodeSplitKernel<HD, ROWS><<<grid, block, 0, stream>>>(p, plan.blocks_per_split, total_q_rows, ws_o, \
                                                                 ws_ml, plan.kv_evict_first)
  const int key = p.head_dim * 100 + plan.rows_per_cta;
  if (mma) {
    // A plan the kernels cannot run is refused before anything is queued.
    if (plan.kv_evict_first ? plan.stages != 2 : (plan.stages < 2 || plan.stages > 4)) return cudaErrorInvalidValue;
    if (in_kernel && plan.num_counters > 0 && kept_counters == nullptr) {
      if (cudaError_t e = cudaMemsetAsync(counters, 0, sizeof(unsigned int) * plan.num_counters, stream); e != cudaSuccess) {
        return e;
      }
    }
    MmaArgs a;
    a.blocks_per_split = plan.blocks_per_split;
    a.total_q_rows = total_q_rows;
    a.num_splits = plan.num_splits;
    a.ws_o = ws_o;
    a.ws_ml = ws_ml;
    a.counters = counters;
    a.in_kernel_merge = in_kernel;
    a.trigger_dependents = !direct && plan.merge == SparseDecodeMerge::kKernelPdl;
    a.direct = direct;
    a.timeline = plan.timeline;
    const cudaError_t e = p.head_dim == 64 ? LaunchMmaStages<64>(p, plan, a, stream)
                                           : LaunchMmaStages<128>(p, plan, a, stream);
    if (e != cudaSuccess) return e;
  } else {
    switch (key) {
      case 6401: SCOUT_SPLIT(64, 1); break;
      case 6402: SCOUT_SPLIT(64, 2); break;
      case 6404: SCOUT_SPLIT(64, 4); break;
      case 12801: SCOUT_SPLIT(128, 1); break;
      case 12802: SCOUT_SPLIT(128, 2); break;
      case 12804: SCOUT_SPLIT(128, 4); break;
      default: return cudaErrorInvalidValue;
    }
  }
#undef SCOUT_SPLIT
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (total_q_rows == 0 || in_kernel || direct) return cudaSuccess;
  return p.head_dim == 64 ? LaunchMerge<64>(p, plan, ws_o, ws_ml, stream)
                          : LaunchMerge<128>(p, plan, ws_o, ws_ml, stream);
}

}  // namespace scout::kernels
