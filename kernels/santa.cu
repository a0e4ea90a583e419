#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "kernels/mma_utils.cuh"
#include "kernels/santa.cuh"
#include "kernels/split_work.cuh"

namespace scout::kernels {
namespace {

using namespace mma;

constexpr int kWarps = 4;
constexpr int kRows = 16;  // = kSantaRowGroup
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxSplits = 256;  // split_mass lives in shared memory

template <int HD>
constexpr int ScoreSmemBytes() {
  return kRows * HD * 2 + kWarps * 2 * kKvBlockSize * HD * 2;  // Q tile + K stages
}

// Pass 1: base-2 scores of every listed key for the CTA's 16 rows (-inf where masked), and each
// split's running max and sum per row.
template <int HD>
__global__ void __launch_bounds__(kWarps * 32) SantaScoreKernel(SparseDecodeParams p, int blocks_per_split,
                                                                int total_q_rows, int score_stride, float* scores,
                                                                float* ws_ml) {
  constexpr int CH = HD / 8, KS = HD / 16, TILE = kKvBlockSize * HD * 2;
  extern __shared__ __align__(128) uint8_t smem[];
  const SplitWork w = GetSplitWork(p, kRows, blocks_per_split);
  if (w.empty()) return;
  const int split = w.split, sh = w.sh, rg = blockIdx.x, nrows = w.nrows, row0 = w.row0, len = w.len;
  const int e0 = w.e0, e1 = w.e1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  uint8_t* q_s = smem;
  uint8_t* k_s = smem + kRows * HD * 2 + warp * 2 * TILE;
  uint32_t qa[KS][4];
  LoadQFragments<HD>(p, w, q_s, qa);
  const int qp[2] = {w.qpos(row0 + g), w.qpos(row0 + g + 8)};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  auto issue = [&](int e, int stage) {
    if (e < e1) {
      const uint16_t* kb = w.unit(p, e, HD);
#pragma unroll
      for (int i = 0; i < kKvBlockSize * CH / 32; ++i) {
        const int idx = i * 32 + lane, r = idx / CH, c = idx % CH;
        CpAsync16(SmemAddr(k_s + stage * TILE + Swz<HD>(r, c)), kb + r * HD + c * 8);
      }
    }
    CpAsyncCommit();
  };
  const float qscale = p.scale * kLog2e;
  float* score_rows = scores + ((size_t)sh * gridDim.x + rg) * kRows * score_stride;
  issue(e0 + warp, 0);
  int stage = 0;
  for (int e = e0 + warp; e < e1; e += kWarps) {
    issue(e + kWarps, stage ^ 1);
    CpAsyncWait<1>();
    __syncwarp();
    const uint8_t* ks = k_s + stage * TILE;
    const int logical = w.logical(p, e);
    float sc[2][4];
    ScoreTile<HD>(qa, ks, sc);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int tok = 8 * j + 2 * t + (c & 1), r = g + 8 * (c >> 1);
        const int pos = logical * kKvBlockSize + tok;
        sc[j][c] = (pos < len && KeyVisible(pos, qp[c >> 1], p.sliding_window)) ? sc[j][c] * qscale : -INFINITY;
        if (row0 + r < nrows) score_rows[(size_t)r * score_stride + e * kKvBlockSize + tok] = sc[j][c];
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = fmaxf(fmaxf(sc[0][2 * i], sc[0][2 * i + 1]), fmaxf(sc[1][2 * i], sc[1][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[i], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 2; ++j) sum += exp2f(sc[j][2 * i] - m_use) + exp2f(sc[j][2 * i + 1] - m_use);
      l_run[i] = l_run[i] * exp2f(m_run[i] - m_use) + sum;
      m_run[i] = m_new;
    }
    __syncwarp();
    stage ^= 1;
  }
  CpAsyncWait<0>();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
  __shared__ float sm[kWarps][kRows], sl[kWarps][kRows];
  if (t == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      sm[warp][g + 8 * i] = m_run[i];
      sl[warp][g + 8 * i] = l_run[i];
    }
  }
  __syncthreads();
  if (threadIdx.x < kRows && row0 + threadIdx.x < nrows) {
    const int r = threadIdx.x, row = row0 + r;
    float mx = -INFINITY, sum = 0.0f;
    for (int wp = 0; wp < kWarps; ++wp) mx = fmaxf(mx, sm[wp][r]);
    if (mx != -INFINITY) {
      for (int wp = 0; wp < kWarps; ++wp) sum += exp2f(sm[wp][r] - mx) * sl[wp][r];
    }
    const int64_t out_row = (int64_t)split * total_q_rows * p.num_heads + w.q_row(p, row);
    ws_ml[out_row * 2] = mx;
    ws_ml[out_row * 2 + 1] = sum;
  }
}

// Pass 2: one CTA per (row group, split, sequence x KV head).
template <int HD>
__global__ void __launch_bounds__(kWarps * 32) SantaSampleKernel(SantaParams sp, int blocks_per_split, int num_splits,
                                                                 int total_q_rows, int score_stride,
                                                                 const float* scores, const float* ws_ml,
                                                                 float* ws_o) {
  constexpr int DPL = HD / 32;  // dims per lane
  const SparseDecodeParams& p = sp.attn;
  const SplitWork w = GetSplitWork(p, kRows, blocks_per_split);
  if (w.empty()) return;
  const int split = w.split, sh = w.sh, s = w.s, kvh = w.kvh, rg = blockIdx.x, row0 = w.row0;
  const int nr = min(kRows, w.nrows - row0);
  const int e0 = w.e0, e1 = w.e1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t stride = (int64_t)total_q_rows * p.num_heads;
  auto ml_index = [&](int sp_i, int r) { return (sp_i * stride + w.q_row(p, row0 + r)) * 2; };

  // Global normaliser per row (base 2), from every split's max and sum.
  __shared__ float L[kRows];
  __shared__ int valid_rows;
  __shared__ double split_mass[kMaxSplits];
  if (threadIdx.x < kRows) {
    const int r = threadIdx.x;
    float value = INFINITY;  // a row that sees nothing gets weight exp2(-inf) = 0 everywhere
    if (r < nr) {
      float mx = -INFINITY;
      for (int c = 0; c < num_splits; ++c) mx = fmaxf(mx, ws_ml[ml_index(c, r)]);
      if (mx != -INFINITY) {
        float sum = 0.0f;
        for (int c = 0; c < num_splits; ++c) {
          const float m = ws_ml[ml_index(c, r)];
          if (m != -INFINITY) sum += exp2f(m - mx) * ws_ml[ml_index(c, r) + 1];
        }
        value = mx + log2f(sum);
      }
    }
    L[r] = value;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int n = 0;
    for (int r = 0; r < nr; ++r) n += L[r] != INFINITY;
    valid_rows = n;
  }
  __syncthreads();
  const int R = valid_rows;
  float acc[kRows][DPL];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[r][d] = 0.0f;
  }
  if (R > 0) {
    // Each split's share of the mixture, from its maxima and sums.
    for (int c = threadIdx.x; c < num_splits; c += kWarps * 32) {
      double q = 0;
      for (int r = 0; r < nr; ++r) {
        if (L[r] == INFINITY) continue;
        const float m = ws_ml[ml_index(c, r)];
        if (m != -INFINITY) q += (double)ws_ml[ml_index(c, r) + 1] * exp2((double)m - L[r]);
      }
      split_mass[c] = q / R;
    }
    __syncthreads();
    __shared__ double before_sh, total_sh;
    if (threadIdx.x == 0) {
      double before = 0, total = 0;
      for (int c = 0; c < num_splits; ++c) {
        if (c < split) before += split_mass[c];
        total += split_mass[c];
      }
      before_sh = before;
      total_sh = total;
    }
    __syncthreads();
    const double total = total_sh;
    const double u = SantaUniform(sp.seed, s, kvh, rg);
    const double points_per_mass = sp.samples / total;
    const float* score_rows = scores + ((size_t)sh * gridDim.x + rg) * kRows * score_stride;
    using Scan = cub::BlockScan<double, kWarps * 32>;
    __shared__ typename Scan::TempStorage scan_storage;
    __shared__ int hit_count;
    __shared__ int hit_token[kWarps * 32];
    __shared__ float hit_weight[kWarps * 32][kRows];
    double base = before_sh;
    const int n_tokens = (e1 - e0) * kKvBlockSize;
    for (int c0 = 0; c0 < n_tokens; c0 += kWarps * 32) {
      if (threadIdx.x == 0) hit_count = 0;
      const int k = c0 + threadIdx.x;
      const int e = e0 + k / kKvBlockSize, tok = k % kKvBlockSize;
      double q = 0;
      float pr[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        pr[r] = 0.0f;
        if (k < n_tokens && r < nr && L[r] != INFINITY) {
          pr[r] = exp2f(score_rows[(size_t)r * score_stride + e * kKvBlockSize + tok] - L[r]);
          q += pr[r];
        }
      }
      q /= R;
      double cum, chunk_total;
      Scan(scan_storage).InclusiveSum(q, cum, chunk_total);
      __syncthreads();
      const double hi = (base + cum) * points_per_mass, lo = (base + cum - q) * points_per_mass;
      const long hits = q > 0 ? max(0L, (long)ceil(hi - u) - (long)ceil(lo - u)) : 0L;
      if (hits > 0) {
        const int slot = atomicAdd(&hit_count, 1);
        hit_token[slot] = k;
        const float w = (float)(hits / (sp.samples * q) * total);
#pragma unroll
        for (int r = 0; r < kRows; ++r) hit_weight[slot][r] = w * pr[r];
      }
      __syncthreads();
      // Warps share the hits: one value row each, lanes across its dims.
      for (int h = warp; h < hit_count; h += kWarps) {
        const int kk = hit_token[h];
        const int ee = e0 + kk / kKvBlockSize, tt = kk % kKvBlockSize;
        const uint16_t* unit = w.unit(p, ee, HD);
        const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(unit + (kKvBlockSize + tt) * HD) + lane * DPL;
        float vf[DPL];
#pragma unroll
        for (int d = 0; d < DPL; ++d) vf[d] = __bfloat162float(v[d]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float w = hit_weight[h][r];
#pragma unroll
          for (int d = 0; d < DPL; ++d) acc[r][d] = fmaf(w, vf[d], acc[r][d]);
        }
      }
      base += chunk_total;
      __syncthreads();
    }
  }
  // Sum the warps' partials through shared memory, write this split's (normalised) part.
  __shared__ float part[kWarps][kRows][HD];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int d = 0; d < DPL; ++d) part[warp][r][lane * DPL + d] = acc[r][d];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nr * HD; idx += kWarps * 32) {
    const int r = idx / HD, d = idx % HD;
    const float v = part[0][r][d] + part[1][r][d] + part[2][r][d] + part[3][r][d];
    ws_o[((int64_t)split * stride + w.q_row(p, row0 + r)) * HD + d] = v;
  }
}

template <int HD>
__global__ void SantaMergeKernel(SparseDecodeParams p, int num_splits, int total_q_rows, const float* ws_o) {
  const int64_t rh = blockIdx.x;
  const int d = threadIdx.x;
  const int64_t stride = (int64_t)total_q_rows * p.num_heads;
  float sum = 0.0f;
  for (int c = 0; c < num_splits; ++c) sum += ws_o[(c * stride + rh) * HD + d];
  reinterpret_cast<__nv_bfloat16*>(p.out)[rh * HD + d] = __float2bfloat16(sum);
}

template <int HD>
cudaError_t Launch(const SantaParams& sp, const SantaPlan& plan, void* workspace, cudaStream_t stream) {
  static const cudaError_t attr = cudaFuncSetAttribute(SantaScoreKernel<HD>,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize, ScoreSmemBytes<HD>());
  if (attr != cudaSuccess) return attr;
  const SparseDecodePlan& sp_plan = plan.split;
  const int rows = sp_plan.total_q_rows;
  float* ws_o = static_cast<float*>(workspace);
  float* ws_ml = ws_o + (size_t)sp_plan.num_splits * rows * sp.attn.num_heads * HD;
  float* scores = ws_ml + (size_t)sp_plan.num_splits * rows * sp.attn.num_heads * 2;
  const dim3 grid(sp_plan.row_groups, sp_plan.num_splits, sp.attn.num_seqs * sp.attn.num_kv_heads);
  SantaScoreKernel<HD><<<grid, kWarps * 32, ScoreSmemBytes<HD>(), stream>>>(
      sp.attn, sp_plan.blocks_per_split, rows, plan.score_stride, scores, ws_ml);
  SantaSampleKernel<HD><<<grid, kWarps * 32, 0, stream>>>(sp, sp_plan.blocks_per_split, sp_plan.num_splits, rows,
                                                          plan.score_stride, scores, ws_ml, ws_o);
  if (rows > 0) SantaMergeKernel<HD><<<rows * sp.attn.num_heads, HD, 0, stream>>>(sp.attn, sp_plan.num_splits, rows, ws_o);
  return cudaGetLastError();
}

}  // namespace

SantaPlan PlanSanta(int num_seqs, int num_heads, int num_kv_heads, int max_q_tokens, int max_list_blocks,
                    int total_q_rows, int head_dim, int num_sms, int ctas_per_sm) {
  SantaPlan plan;
  plan.split = PlanSparseDecode(num_seqs, num_heads, num_kv_heads, max_q_tokens, max_list_blocks, total_q_rows,
                                head_dim, num_sms, ctas_per_sm, 0, kRows);
  plan.split.num_splits = std::min(plan.split.num_splits, kMaxSplits);
  plan.split.blocks_per_split = std::max(1, (max_list_blocks + plan.split.num_splits - 1) / plan.split.num_splits);
  plan.score_stride = std::max(1, max_list_blocks) * kKvBlockSize;
  const size_t partial = sizeof(float) * (size_t)plan.split.num_splits * total_q_rows * num_heads * (head_dim + 2);
  const size_t score_bytes = sizeof(float) * (size_t)num_seqs * num_kv_heads * plan.split.row_groups * kRows *
                             plan.score_stride;
  plan.workspace_bytes = partial + score_bytes;
  return plan;
}

cudaError_t Santa(const SantaParams& p, const SantaPlan& plan, void* workspace, cudaStream_t stream) {
  if (p.samples < 1 || plan.split.num_splits > kMaxSplits || plan.split.rows_per_cta != kRows) return cudaErrorInvalidValue;
  if (p.attn.head_dim == 64) return Launch<64>(p, plan, workspace, stream);
  if (p.attn.head_dim == 128) return Launch<128>(p, plan, workspace, stream);
  return cudaErrorInvalidValue;
}

}  // namespace scout::kernels
