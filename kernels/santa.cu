#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <atomic>

#include "kernels/mma_utils.cuh"
#include "kernels/santa.cuh"
#include "kernels/split_work.cuh"

namespace scout::kernels {
namespace {

using namespace mma;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;  // = kSantaRowGroup
constexpr float kLog2e = 1.4426950408889634f;
// Plan limits: a split's logits take at most 32 KiB and a split at most 64 blocks (1024 keys),
// so that three CTAs of the Llama-3.1-8B shapes fit on an SM.
constexpr int kMaxLogitBytes = 32 << 10;
constexpr int kMaxSplitBlocks = 64;
constexpr int kTargetCtasPerSm = 3;

template <int HD>
constexpr int kStageBytes = kWarps * 2 * kKvBlockSize * HD * 2;  // two K tiles per warp

int SmemBytes(int head_dim, int logit_rows, int blocks_per_split) {
  const int keys = blocks_per_split * kKvBlockSize;
  return kRows * head_dim * 2 + kWarps * 2 * kKvBlockSize * head_dim * 2 + logit_rows * (keys + 4) * 4 + keys * 8 +
         blocks_per_split * 8;
}
const int kSmemLimit = SmemBytes(128, kRows, kMaxSplitBlocks);

struct FusedArgs {
  int blocks_per_split = 0;
  int total_q_rows = 0;
  int num_splits = 0;
  int points = 0;      // per split
  int logit_rows = 0;  // rows of shared logits
  uint64_t seed = 0;
  float* ws_o = nullptr;   // [num_splits][total_q_rows x heads][HD]
  float* ws_ml = nullptr;  // [num_splits][total_q_rows x heads][2]: base-2 max, sum
  unsigned int* counters = nullptr;
  bool in_kernel_merge = false;
};

// One CTA per (row group, split, sequence x KV head); see santa.cuh. Dynamic shared memory:
// Q tile | K stages (then the sampled value rows) | logits [logit_rows][keys + 4] (then e_r(j))
// | q(j) (then each hit key's weight factor) | compacted hit keys | the split's units.
template <int HD>
__global__ void __launch_bounds__(kThreads) SantaFusedKernel(SparseDecodeParams p, FusedArgs a) {
  constexpr int CH = HD / 8, KS = HD / 16, TILE = kKvBlockSize * HD * 2;
  constexpr int PER_LANE = kKvBlockSize * CH / 32;  // 16-byte chunks of a K tile per lane
  constexpr int kVBatch = kStageBytes<HD> / (HD * 2);
  constexpr int kOut = kRows * HD / kThreads;  // output elements per thread
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ float red[kWarps][kRows];
  __shared__ float s_m[kRows], s_l[kRows], s_inv[kRows];
  using DScan = cub::BlockScan<double, kThreads>;
  using IScan = cub::BlockScan<int, kThreads>;
  __shared__ typename DScan::TempStorage dscan;
  __shared__ typename IScan::TempStorage iscan;
  const SplitWork w = GetSplitWork(p, kRows, a.blocks_per_split);
  if (w.empty()) return;
  const int nr = min(kRows, w.nrows - w.row0);
  const int keys_max = a.blocks_per_split * kKvBlockSize, lstride = keys_max + 4;
  const int nk = max(0, w.e1 - w.e0) * kKvBlockSize;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  uint8_t* q_s = smem;
  uint8_t* kst = smem + kRows * HD * 2;
  float* logits = reinterpret_cast<float*>(kst + kStageBytes<HD>);
  float* qbuf = logits + a.logit_rows * lstride;
  int* hit_key = reinterpret_cast<int*>(qbuf + keys_max);
  int64_t* unit_of = reinterpret_cast<int64_t*>(hit_key + keys_max);  // [blocks_per_split], for the values

  // 1. Scores of the split's keys on the tensor cores: each warp takes every kWarps-th block,
  // K only, two blocks in flight by cp.async. Base-2 logits of the valid rows go to shared memory.
  uint32_t qa[KS][4];
  LoadQFragments<HD>(p, w, q_s, qa);
  const int qp[2] = {w.qpos(w.row0 + g), w.qpos(w.row0 + g + 8)};
  const float qscale = p.scale * kLog2e;
  uint8_t* kw = kst + warp * 2 * TILE;
  const int n = w.e1 - w.e0 > warp ? (w.e1 - w.e0 - warp + kWarps - 1) / kWarps : 0;
  // Units and logical blocks looked up 32 entries at a time, one per lane (two dependent loads
  // each), as the dense kernel does.
  int64_t batch_unit = 0;
  int batch_logical = 0, next_logical = 0;
  auto issue = [&](int k, int stage) {
    if (k < n) {
      if ((k & 31) == 0 && k + lane < n) {
        const int e = w.e0 + warp + kWarps * (k + lane);
        batch_logical = w.logical(p, e);
        batch_unit = w.unit_index(p, e);
      }
      next_logical = __shfl_sync(0xffffffffu, batch_logical, k & 31);
      const int64_t unit = __shfl_sync(0xffffffffu, batch_unit, k & 31);
      if (lane == 0) unit_of[warp + kWarps * k] = unit;
      const uint16_t* kb = p.kv + unit * (2 * kKvBlockSize * HD);
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) {
        const int idx = i * 32 + lane, r = idx / CH, c = idx % CH;
        CpAsync16(SmemAddr(kw + stage * TILE + Swz<HD>(r, c)), kb + r * HD + c * 8);
      }
    }
    CpAsyncCommit();
  };
  float m_run[2] = {-INFINITY, -INFINITY};
  issue(0, 0);
  for (int k = 0; k < n; ++k) {
    const int stage = k & 1, logical = next_logical;
    issue(k + 1, stage ^ 1);
    CpAsyncWait<1>();
    __syncwarp();
    float sc[2][4];
    ScoreTile<HD>(qa, kw + stage * TILE, sc);
    const int key0 = (warp + kWarps * k) * kKvBlockSize;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int tok = 8 * j + 2 * t + (c & 1), r = g + 8 * (c >> 1);
        const int pos = logical * kKvBlockSize + tok;
        const float x =
            (pos < w.len && KeyVisible(pos, qp[c >> 1], p.sliding_window)) ? sc[j][c] * qscale : -INFINITY;
        if (r < nr) logits[r * lstride + key0 + tok] = x;
        m_run[c >> 1] = fmaxf(m_run[c >> 1], x);
      }
    }
    __syncwarp();  // every lane is done with this stage before a later copy overwrites it
  }
  CpAsyncWait<0>();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    m_run[i] = fmaxf(m_run[i], __shfl_xor_sync(0xffffffffu, m_run[i], 1));
    m_run[i] = fmaxf(m_run[i], __shfl_xor_sync(0xffffffffu, m_run[i], 2));
    if (t == 0) red[warp][g + 8 * i] = m_run[i];
  }
  __syncthreads();
  if (tid < kRows) {
    float mx = -INFINITY;
    for (int wp = 0; wp < kWarps; ++wp) mx = fmaxf(mx, red[wp][tid]);
    s_m[tid] = tid < nr ? mx : -INFINITY;
  }
  __syncthreads();

  // 2. e_r(j) = 2^(s_rj - m_r) in place and l_r; then the mixture q(j) of the R rows that see a key.
  float lsum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) lsum[r] = 0.0f;
  for (int k = tid; k < nk; k += kThreads) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < nr) {
        float* x = logits + r * lstride + k;
        const float e = s_m[r] == -INFINITY ? 0.0f : exp2f(*x - s_m[r]);
        *x = e;
        lsum[r] += e;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) lsum[r] += __shfl_xor_sync(0xffffffffu, lsum[r], off);
  }
  __syncthreads();  // red is free again
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) red[warp][r] = lsum[r];
  }
  __syncthreads();
  if (tid < kRows) {
    float l = 0.0f;
    for (int wp = 0; wp < kWarps; ++wp) l += red[wp][tid];
    s_l[tid] = l;
  }
  __syncthreads();
  int valid = 0;
  for (int r = 0; r < nr; ++r) valid += s_l[r] > 0.0f;
  if (tid < kRows) s_inv[tid] = tid < nr && s_l[tid] > 0.0f ? 1.0f / (valid * s_l[tid]) : 0.0f;
  __syncthreads();
  for (int k = tid; k < nk; k += kThreads) {
    float q = 0.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < nr) q = fmaf(logits[r * lstride + k], s_inv[r], q);
    }
    qbuf[k] = q;
  }
  __syncthreads();

  // 3. Systematic points on q's cumulative distribution: each thread takes a contiguous range of
  // keys, a block scan gives the mass before it. A hit key's q(j) becomes its weight factor
  // h_j / (n q(j) / total); the hit keys are compacted in key order.
  const int per = (nk + kThreads - 1) / kThreads;
  const int k0 = min(nk, tid * per), k1 = min(nk, k0 + per);
  double local = 0;
  for (int k = k0; k < k1; ++k) local += qbuf[k];
  double before, total;
  DScan(dscan).ExclusiveSum(local, before, total);
  int my_hits = 0;
  if (total > 0) {
    const double u = SantaUniform(a.seed, w.s, w.kvh, blockIdx.x, w.split);
    const double scale = a.points / total;
    double cum = before;
    long long prev = (long long)ceil(cum * scale - u);
    for (int k = k0; k < k1; ++k) {
      const float q = qbuf[k];
      cum += q;
      const long long next = (long long)ceil(cum * scale - u);
      float f = 0.0f;
      if (next > prev && q > 0.0f) {
        f = (float)((double)(next - prev) / (scale * q));
        ++my_hits;
      }
      prev = next;
      qbuf[k] = f;
    }
  }
  int at, n_hit;
  IScan(iscan).ExclusiveSum(my_hits, at, n_hit);
  if (my_hits > 0) {
    for (int k = k0; k < k1; ++k) {
      if (qbuf[k] > 0.0f) hit_key[at++] = k;
    }
  }
  __syncthreads();

  // 4. The sampled value rows, kVBatch at a time, through cp.async into the K stages; each thread
  // accumulates kOut (row, dim) outputs: o_r += factor(j) e_r(j) v_j.
  float acc[kOut];
#pragma unroll
  for (int i = 0; i < kOut; ++i) acc[i] = 0.0f;
  const uint16_t* vbuf = reinterpret_cast<const uint16_t*>(kst);
  for (int b0 = 0; b0 < n_hit; b0 += kVBatch) {
    const int nb = min(kVBatch, n_hit - b0);
    for (int idx = tid; idx < nb * CH; idx += kThreads) {
      const int h = idx / CH, c = idx % CH, key = hit_key[b0 + h];
      // Units from phase 1's lookups: no dependent global loads before the copies.
      const uint16_t* src = p.kv + unit_of[key / kKvBlockSize] * (2 * kKvBlockSize * HD) +
                            (kKvBlockSize + key % kKvBlockSize) * HD + c * 8;
      CpAsync16(SmemAddr(kst + (h * HD + c * 8) * 2), src);
    }
    CpAsyncCommit();
    CpAsyncWait<0>();
    __syncthreads();
    for (int h = 0; h < nb; ++h) {
      const int key = hit_key[b0 + h];
      const float f = qbuf[key];
#pragma unroll
      for (int i = 0; i < kOut; ++i) {
        const int idx = tid + kThreads * i, r = idx / HD, d = idx % HD;
        if (r < nr) {
          const float v = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(vbuf)[h * HD + d]);
          acc[i] = fmaf(f * logits[r * lstride + key], v, acc[i]);
        }
      }
    }
    __syncthreads();  // the stage region is refilled by the next batch
  }
  const int64_t stride = (int64_t)a.total_q_rows * p.num_heads;
#pragma unroll
  for (int i = 0; i < kOut; ++i) {
    const int idx = tid + kThreads * i, r = idx / HD, d = idx % HD;
    if (r < nr) {
      const int64_t out_row = w.split * stride + w.q_row(p, w.row0 + r);
      a.ws_o[out_row * HD + d] = acc[i];
      if (d == 0) {
        a.ws_ml[out_row * 2] = s_m[r];
        a.ws_ml[out_row * 2 + 1] = s_l[r];
      }
    }
  }
  if (!a.in_kernel_merge) return;
  // Arrive; the last of the group's num_splits CTAs merges (threadFenceReduction, as the dense
  // kernel does).
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const unsigned int arrived = atomicAdd(a.counters + blockIdx.z * gridDim.x + blockIdx.x, 1u);
    last = arrived == static_cast<unsigned int>(a.num_splits) - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  MergeSplitsOfGroup<HD>(p, w, nr, a.num_splits, a.total_q_rows, a.ws_o, a.ws_ml);
}

// One CTA per (query row, head), HD threads: combines the splits' partials, writes bf16.
template <int HD>
__global__ void SantaMergeKernel(SparseDecodeParams p, int num_splits, int total_q_rows, const float* ws_o,
                                 const float* ws_ml) {
  extern __shared__ float ml[];  // [num_splits][2]
  MergeSplitsOfRowHead<HD>(p, num_splits, total_q_rows, ws_o, ws_ml, ml);
}

template <int HD>
cudaError_t Launch(const SantaParams& sp, const SantaPlan& plan, void* workspace, cudaStream_t stream) {
  // The shared-memory limit is a per-device attribute: set once for each device.
  static std::atomic<uint64_t> set_on{0};
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || (set_on.load(std::memory_order_acquire) & bit) == 0) {
    const cudaError_t attr =
        cudaFuncSetAttribute(SantaFusedKernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemLimit);
    if (attr != cudaSuccess) return attr;
    set_on.fetch_or(bit, std::memory_order_acq_rel);
  }
  const SparseDecodePlan& sp_plan = plan.split;
  const SparseDecodeParams& p = sp.attn;
  const int rows = sp_plan.total_q_rows;
  FusedArgs a;
  a.blocks_per_split = sp_plan.blocks_per_split;
  a.total_q_rows = rows;
  a.num_splits = sp_plan.num_splits;
  a.points = SantaSamplesPerSplit(sp.samples, sp_plan.num_splits);
  a.logit_rows = plan.logit_rows;
  a.seed = sp.seed;
  a.ws_o = static_cast<float*>(workspace);
  a.ws_ml = a.ws_o + (size_t)sp_plan.num_splits * rows * p.num_heads * HD;
  a.counters = reinterpret_cast<unsigned int*>(a.ws_ml + (size_t)sp_plan.num_splits * rows * p.num_heads * 2);
  a.in_kernel_merge = sp_plan.merge == SparseDecodeMerge::kInKernel;
  if (a.in_kernel_merge && sp_plan.num_counters > 0) {
    if (cudaError_t e = cudaMemsetAsync(a.counters, 0, sizeof(unsigned int) * sp_plan.num_counters, stream);
        e != cudaSuccess) {
      return e;
    }
  }
  const dim3 grid(sp_plan.row_groups, sp_plan.num_splits, p.num_seqs * p.num_kv_heads);
  SantaFusedKernel<HD><<<grid, kThreads, plan.smem_bytes, stream>>>(p, a);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess || a.in_kernel_merge) return e;
  SantaMergeKernel<HD><<<rows * p.num_heads, HD, 2 * sizeof(float) * sp_plan.num_splits, stream>>>(
      p, sp_plan.num_splits, rows, a.ws_o, a.ws_ml);
  return cudaGetLastError();
}

}  // namespace

SantaPlan PlanSanta(int num_seqs, int num_heads, int num_kv_heads, int max_q_tokens, int max_list_blocks,
                    int total_q_rows, int head_dim, int num_sms, int ctas_per_sm) {
  (void)ctas_per_sm;
  SantaPlan plan;
  const int rows = max_q_tokens * (num_heads / std::max(1, num_kv_heads));
  plan.logit_rows = std::clamp(rows, 1, kRows);
  SparseDecodePlan& s = plan.split;
  s.rows_per_cta = kRows;
  s.row_groups = std::max(1, (rows + kRows - 1) / kRows);
  s.total_q_rows = total_q_rows;
  const int lists = std::max(1, num_seqs * num_kv_heads);
  const int list_blocks = std::max(1, max_list_blocks);
  const int fit = std::max(1, std::min(kMaxSplitBlocks, kMaxLogitBytes / (plan.logit_rows * kKvBlockSize * 4)));
  // As many splits as shared memory needs; more where the lists are few, up to about
  // kTargetCtasPerSm CTAs per SM, while every warp keeps a block of each split.
  const int needed = (list_blocks + fit - 1) / fit;
  const int wanted = std::min(num_sms * kTargetCtasPerSm / (lists * s.row_groups), (list_blocks + kWarps - 1) / kWarps);
  const int splits = std::max({1, needed, wanted});
  s.blocks_per_split = (list_blocks + splits - 1) / splits;
  s.num_splits = (list_blocks + s.blocks_per_split - 1) / s.blocks_per_split;
  s.num_counters = num_seqs * num_kv_heads * s.row_groups;
  // The last CTA merges where its 128 threads take a group's (row, 4 dims) in one pass, as in the
  // dense plan; otherwise a merge kernel.
  s.merge = rows * head_dim <= kThreads * 4 ? SparseDecodeMerge::kInKernel : SparseDecodeMerge::kKernel;
  plan.smem_bytes = SmemBytes(head_dim, plan.logit_rows, s.blocks_per_split);
  const size_t partials = sizeof(float) * (size_t)s.num_splits * total_q_rows * num_heads * (head_dim + 2);
  s.workspace_bytes = partials + sizeof(unsigned int) * (size_t)s.num_counters;
  plan.workspace_bytes = s.workspace_bytes;
  return plan;
}

cudaError_t Santa(const SantaParams& p, const SantaPlan& plan, void* workspace, cudaStream_t stream) {
  if (p.samples < 1 || plan.split.rows_per_cta != kRows || plan.logit_rows < 1 || plan.smem_bytes > kSmemLimit ||
      plan.split.blocks_per_split > kMaxSplitBlocks) {
    return cudaErrorInvalidValue;
  }
  if (p.attn.head_dim != 64 && p.attn.head_dim != 128) return cudaErrorInvalidValue;
  if (plan.split.total_q_rows == 0 || p.attn.num_seqs == 0) return cudaSuccess;
  return p.attn.head_dim == 64 ? Launch<64>(p, plan, workspace, stream) : Launch<128>(p, plan, workspace, stream);
}

}  // namespace scout::kernels
