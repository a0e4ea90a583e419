#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/model_ops.cuh"

namespace scout::kernels {
namespace {

__device__ inline float Bf(uint16_t v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }
__device__ inline uint16_t ToBf(float f) { return __bfloat16_as_ushort(__float2bfloat16(f)); }

__device__ inline float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the CTA (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ inline float BlockSum(float v) {
  __shared__ float part[32];
  v = WarpSum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  float t = lane < warps ? part[lane] : 0.0f;
  return WarpSum(t);
}

__global__ void EmbedKernel(EmbedParams p) {
  const int r = blockIdx.x;
  const uint16_t* src = p.table + int64_t{p.tokens[r]} * p.dim;
  for (int i = threadIdx.x; i < p.dim; i += blockDim.x) p.out[int64_t{r} * p.dim + i] = Bf(src[i]);
}

__global__ void RmsNormKernel(RmsNormParams p) {
  const int r = blockIdx.x;
  const float* x = p.x + int64_t{r} * p.dim;
  float ss = 0;
  for (int i = threadIdx.x; i < p.dim; i += blockDim.x) ss += x[i] * x[i];
  ss = BlockSum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(p.dim) + p.eps);
  for (int i = threadIdx.x; i < p.dim; i += blockDim.x) p.out[int64_t{r} * p.dim + i] = ToBf(p.weight[i] * (x[i] * inv));
}

// One CTA per (row, head of q, k or v); thread i rotates the pair (i, i + half).
__global__ void RopeAppendKernel(RopeAppendParams p) {
  const int r = blockIdx.x, h = blockIdx.y, hd = p.head_dim, half = hd / 2, nh = p.num_heads, nkv = p.num_kv_heads;
  const int i = threadIdx.x;
  if (i >= half) return;
  const float* src = p.qkv + (int64_t{r} * (nh + 2 * nkv) + h) * hd;
  const int pos = p.positions[r];
  float a = src[i], b = src[i + half];
  if (p.bias != nullptr) {
    a += p.bias[h * hd + i];
    b += p.bias[h * hd + i + half];
  }
  if (h < nh + nkv) {
    const float angle = static_cast<float>(pos) * p.inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    s *= p.attention_scaling;
    c *= p.attention_scaling;
    const float ra = a * c - b * s, rb = b * c + a * s;
    a = ra;
    b = rb;
  }
  uint16_t* dst;
  if (h < nh) {
    dst = p.q + (int64_t{r} * nh + h) * hd;
  } else {
    const int kvh = h < nh + nkv ? h - nh : h - nh - nkv;
    const int kv_index = h < nh + nkv ? 0 : 1;
    const int64_t unit = p.unit_slots != nullptr ? int64_t{p.unit_slots[int64_t{r} * nkv + kvh]}
                                                 : int64_t{p.phys_blocks[r]} * nkv + kvh;
    dst = p.kv + (unit * 2 + kv_index) * kKvBlockSize * hd + (pos % kKvBlockSize) * hd;
  }
  dst[i] = ToBf(a);
  dst[i + half] = ToBf(b);
}

__global__ void AddBiasKernel(AddBiasParams p) {
  const int64_t n = int64_t{p.rows} * p.n;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < n; k += int64_t{gridDim.x} * blockDim.x) {
    p.y[k] += p.bias[k % p.n];
  }
}

__global__ void SiluMulKernel(SiluMulParams p) {
  const int64_t n = int64_t{p.rows} * p.inter;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < n; k += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = k / p.inter, j = k % p.inter;
    const float g = p.gate_up[r * 2 * p.inter + j], u = p.gate_up[r * 2 * p.inter + p.inter + j];
    p.out[k] = ToBf(g / (1.0f + expf(-g)) * u);
  }
}

// One thread per (row, dim); the row's weights are recomputed by each of its threads (two exp2 on
// a memory-bound pass).
__global__ void MergeAttentionKernel(MergeAttentionParams p) {
  const int64_t n = int64_t{p.rows} * p.head_dim;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < n; k += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = k / p.head_dim;
    const float lp = p.part_lse[r];
    float v;
    if (p.first) {
      v = Bf(p.part[k]);
    } else {
      v = p.acc[k];
      if (lp != -INFINITY) {
        const float la = p.acc_lse[r];
        const float m = fmaxf(la, lp);
        const float a = la == -INFINITY ? 0.0f : exp2f(la - m), b = exp2f(lp - m);
        v = (a * v + b * Bf(p.part[k])) / (a + b);
      }
    }
    p.acc[k] = v;
    if (p.out != nullptr) p.out[k] = ToBf(v);
  }
}

// The log-sum-exps after the rows: each row's new value is read by its head_dim threads above
// before any is written.
__global__ void MergeLseKernel(MergeAttentionParams p) {
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < p.rows; r += gridDim.x * blockDim.x) {
    const float lp = p.part_lse[r];
    if (p.first) {
      p.acc_lse[r] = lp;
    } else if (lp != -INFINITY) {
      const float la = p.acc_lse[r];
      const float m = fmaxf(la, lp);
      const float a = la == -INFINITY ? 0.0f : exp2f(la - m), b = exp2f(lp - m);
      p.acc_lse[r] = m + log2f(a + b);
    }
  }
}

// (value, index) with the reference's order: larger wins, NaN loses, lower index breaks ties.
__device__ inline bool Better(float v, int i, float bv, int bi) {
  if (isnan(v)) return false;
  if (isnan(bv)) return true;
  return v > bv || (v == bv && i < bi);
}

__global__ void ArgmaxKernel(ArgmaxParams p) {
  const float* x = p.logits + int64_t{blockIdx.x} * p.vocab;
  float bv = NAN;
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
    if (Better(x[i], i, bv, bi)) {
      bv = x[i];
      bi = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (Better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  __shared__ float sv[32];
  __shared__ int si[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < blockDim.x / 32; ++w) {
      if (Better(sv[w], si[w], bv, bi)) {
        bv = sv[w];
        bi = si[w];
      }
    }
    p.out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;  // all NaN: index 0, as the reference
  }
}

constexpr int kMassRows = 16;         // query rows per CTA
constexpr int kMassWarps = 4;
constexpr int kMassBlocksPerWarp = 4;

// CTA: (a range of blocks, sequence x KV head, a group of 16 query rows). A warp reads one
// block's 16 keys at a time: lane l holds token l / 2, half (l % 2) of the dimensions.
template <int HD>
__global__ void __launch_bounds__(kMassWarps * 32) BlockMassKernel(BlockMassParams bp) {
  const SparseDecodeParams& p = bp.attn;
  constexpr int kHalf = HD / 2;
  __shared__ float q_s[kMassRows][HD];
  __shared__ float lse_s[kMassRows];
  const int sh = blockIdx.y, s = sh / p.num_kv_heads, kvh = sh % p.num_kv_heads;
  const int group = p.num_heads / p.num_kv_heads;
  const int q0 = p.q_indptr[s], nq = p.q_indptr[s + 1] - q0, nrows = nq * group, len = p.seq_lens[s];
  const int row0 = blockIdx.z * kMassRows;
  if (row0 >= nrows) return;
  const int rows = min(kMassRows, nrows - row0);
  const float qscale = p.scale * 1.4426950408889634f;
  for (int idx = threadIdx.x; idx < kMassRows * HD; idx += blockDim.x) {
    const int r = idx / HD, d = idx % HD, row = row0 + r;
    float v = 0.0f;
    if (r < rows) v = Bf(p.q[(int64_t{q0 + row / group} * p.num_heads + kvh * group + row % group) * HD + d]) * qscale;
    q_s[r][d] = v;
  }
  if (threadIdx.x < kMassRows) {
    const int row = row0 + threadIdx.x;
    lse_s[threadIdx.x] = threadIdx.x < rows ? p.lse[int64_t{q0 + row / group} * p.num_heads + kvh * group + row % group]
                                            : -INFINITY;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tok = lane / 2, part = lane % 2;
  // Dense: entries are blocks 0..nb-1; with a selection, the KV head's list.
  int n_entries = (len + kKvBlockSize - 1) / kKvBlockSize;
  const int32_t* list = nullptr;
  if (p.sel_indptr != nullptr) {
    const int idx = s * (p.sel_seq_stride > 0 ? p.sel_seq_stride : p.num_kv_heads) + kvh;
    list = p.sel_blocks + p.sel_indptr[idx];
    n_entries = p.sel_indptr[idx + 1] - p.sel_indptr[idx];
  }
  const int e_begin = blockIdx.x * kMassWarps * kMassBlocksPerWarp;
  if (p.block_lse != nullptr) {  // the attention pass left each block's log-sum-exp: no key reads
    const int e_end = min(n_entries, e_begin + kMassWarps * kMassBlocksPerWarp);
    for (int idx = threadIdx.x; idx < rows * (e_end - e_begin); idx += blockDim.x) {
      const int r = idx / (e_end - e_begin), e = e_begin + idx % (e_end - e_begin);
      const int b = list != nullptr ? list[e] : e;
      const int row = row0 + r, t = row / group, h = kvh * group + row % group;
      const float bl = p.block_lse[(int64_t{q0 + t} * p.num_heads + h) * p.block_lse_stride + b];
      const float lse = lse_s[r];
      bp.mass[s * bp.mass_seq_stride + t * bp.mass_token_stride + (bp.mass_head_offset + h) * bp.mass_head_stride + b] =
          (bl == -INFINITY || lse == -INFINITY) ? 0.0f : exp2f(bl - lse);
    }
    return;
  }
  for (int e = e_begin + warp; e < min(n_entries, e_begin + kMassWarps * kMassBlocksPerWarp); e += kMassWarps) {
    const int b = list != nullptr ? list[e] : e;
    const int32_t phys = p.block_table[int64_t{s} * p.max_blocks_per_seq + b];
    const uint16_t* key = p.kv + (int64_t{phys} * p.num_kv_heads + kvh) * 2 * kKvBlockSize * HD + tok * HD + part * kHalf;
    float k[kHalf];
#pragma unroll
    for (int c = 0; c < kHalf / 8; ++c) {
      const uint4 u = reinterpret_cast<const uint4*>(key)[c];
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        k[c * 8 + 2 * j] = __uint_as_float(w[j] << 16);
        k[c * 8 + 2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
      }
    }
    const int pos = b * kKvBlockSize + tok;
    for (int r = 0; r < rows; ++r) {
      const int row = row0 + r;
      float dot = 0.0f;
#pragma unroll
      for (int d = 0; d < kHalf; ++d) dot += q_s[r][part * kHalf + d] * k[d];
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      const int qpos = len - nq + row / group;
      const float lse = lse_s[r];
      float e = (KeyVisible(pos, qpos, p.sliding_window) && lse != -INFINITY) ? exp2f(dot - lse) : 0.0f;
      if (part == 1) e = 0.0f;  // each token counted once
      e = WarpSum(e);
      if (lane == 0) {
        const int t = row / group, h = kvh * group + row % group;
        bp.mass[s * bp.mass_seq_stride + t * bp.mass_token_stride + (bp.mass_head_offset + h) * bp.mass_head_stride + b] = e;
      }
    }
  }
}

__global__ void RandomFillKernel(RandomFillParams p) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < p.n; i += int64_t{gridDim.x} * blockDim.x) {
    p.out[i] = ToBf(RandomUniform(p.seed, i, p.scale, p.offset));
  }
}

// One warp per output: lanes stream 16-byte chunks of the weight row (read once, not kept in
// cache), the few x rows come from L1/L2, partial sums meet in a warp reduction.
template <int ROWS>
__global__ void __launch_bounds__(256) GemvKernel(GemvParams p) {
  const int o = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (o >= p.out) return;
  const uint4* w = reinterpret_cast<const uint4*>(p.w + int64_t{o} * p.in);
  const int chunks = p.in / 8;
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
#pragma unroll 4
  for (int c = lane; c < chunks; c += 32) {
    uint4 wv;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(wv.x), "=r"(wv.y), "=r"(wv.z), "=r"(wv.w)
                 : "l"(w + c));
    const uint32_t wu[4] = {wv.x, wv.y, wv.z, wv.w};
    float wf[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wf[2 * j] = __uint_as_float(wu[j] << 16);
      wf[2 * j + 1] = __uint_as_float(wu[j] & 0xffff0000u);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const uint4 xv = __ldg(reinterpret_cast<const uint4*>(p.x + int64_t{r} * p.in) + c);
      const uint32_t xu[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[r] = fmaf(__uint_as_float(xu[j] << 16), wf[2 * j], acc[r]);
        acc[r] = fmaf(__uint_as_float(xu[j] & 0xffff0000u), wf[2 * j + 1], acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float v = WarpSum(acc[r]);
    if (lane == 0) {
      float& y = p.y[int64_t{r} * p.out + o];
      y = v + (p.beta != 0.0f ? p.beta * y : 0.0f);
    }
  }
}

int GridFor(int64_t n, int threads) {
  const int64_t g = (n + threads - 1) / threads;
  return static_cast<int>(g < 65536 * 8 ? (g > 0 ? g : 1) : 65536 * 8);
}

}  // namespace

cudaError_t Embed(const EmbedParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  EmbedKernel<<<p.rows, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t RmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  RmsNormKernel<<<p.rows, p.dim >= 1024 ? 1024 : 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t RopeAppend(const RopeAppendParams& p, cudaStream_t stream) {
  if (p.head_dim % 2 != 0 || p.head_dim > 256) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const dim3 grid(p.rows, p.num_heads + 2 * p.num_kv_heads);
  RopeAppendKernel<<<grid, ((p.head_dim / 2 + 31) / 32) * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t AddBias(const AddBiasParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return cudaSuccess;
  AddBiasKernel<<<GridFor(int64_t{p.rows} * p.n, 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t SiluMul(const SiluMulParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  SiluMulKernel<<<GridFor(int64_t{p.rows} * p.inter, 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t MergeAttention(const MergeAttentionParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  MergeAttentionKernel<<<GridFor(int64_t{p.rows} * p.head_dim, 256), 256, 0, stream>>>(p);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  MergeLseKernel<<<GridFor(p.rows, 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t Argmax(const ArgmaxParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  ArgmaxKernel<<<p.rows, 1024, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t BlockMass(const BlockMassParams& p, int max_blocks, int max_q_tokens, cudaStream_t stream) {
  const SparseDecodeParams& a = p.attn;
  if (a.head_dim != 64 && a.head_dim != 128) return cudaErrorInvalidValue;
  if (a.num_seqs == 0 || max_blocks == 0 || max_q_tokens == 0) return cudaSuccess;
  const int rows = max_q_tokens * (a.num_heads / a.num_kv_heads);
  const int per_cta = kMassWarps * kMassBlocksPerWarp;
  const dim3 grid((max_blocks + per_cta - 1) / per_cta, a.num_seqs * a.num_kv_heads, (rows + kMassRows - 1) / kMassRows);
  if (a.head_dim == 64) {
    BlockMassKernel<64><<<grid, kMassWarps * 32, 0, stream>>>(p);
  } else {
    BlockMassKernel<128><<<grid, kMassWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t Gemv(const GemvParams& p, cudaStream_t stream) {
  if (p.rows < 1 || p.rows > kGemvMaxRows || p.in % 8 != 0 || p.in <= 0 || p.out < 0) return cudaErrorInvalidValue;
  if (p.out == 0) return cudaSuccess;
  const int blocks = (p.out + 7) / 8;  // 8 warps a CTA, one output each
  switch (p.rows) {
    case 1: GemvKernel<1><<<blocks, 256, 0, stream>>>(p); break;
    case 2: GemvKernel<2><<<blocks, 256, 0, stream>>>(p); break;
    case 3: GemvKernel<3><<<blocks, 256, 0, stream>>>(p); break;
    case 4: GemvKernel<4><<<blocks, 256, 0, stream>>>(p); break;
    case 5: GemvKernel<5><<<blocks, 256, 0, stream>>>(p); break;
    case 6: GemvKernel<6><<<blocks, 256, 0, stream>>>(p); break;
    case 7: GemvKernel<7><<<blocks, 256, 0, stream>>>(p); break;
    default: GemvKernel<8><<<blocks, 256, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

cudaError_t RandomFill(const RandomFillParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  RandomFillKernel<<<GridFor(p.n, 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace scout::kernels
