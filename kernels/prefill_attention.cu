#include "kernels/prefill_attention.cuh"

#include <cuda_bf16.h>

#include <atomic>
#include <cmath>

#include "kernels/mma_utils.cuh"
#include "kernels/prefill_tiles.cuh"
#include "kernels/wgmma.cuh"

namespace scout::kernels {
namespace {

using namespace mma;
using namespace prefill_tiles;

// mma.sync kernel. One CTA: the 128 query rows of a TileWork. Q stays in shared memory and is read per key tile (32 rows a
// warp do not fit in registers beside S and O). K of the next tile loads while P V runs, V of
// this tile while S and the softmax run.
template <int HD, int BN>
__global__ void __launch_bounds__(kThreads) PrefillAttentionKernel(SparseDecodeParams p) {
  static_assert(BN % kKvBlockSize == 0 && BN % 16 == 0);
  constexpr int CH = HD / 8;   // 16-byte chunks per row
  constexpr int KS = HD / 16;  // k-steps of Q K^T
  constexpr int NT = HD / 8;   // n-tiles of O
  constexpr int ST = BN / 8;   // n-tiles of S
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* q_s = smem;
  uint8_t* k_s = smem + BM * HD * 2;
  uint8_t* v_s = k_s + BN * HD * 2;

  TileWork w;
  if (!GetTileWork(p, BN, &w)) return;
  const int group = w.group, kvh = w.kvh, q0 = w.q0, rows = w.rows, row0 = w.row0, first_pos = w.first_pos;
  const int qpos_min = w.qpos_min, qpos_max = w.qpos_max, window = p.sliding_window;
  const int kt_last = w.kt_last, kt_first = w.kt_first, num_blocks = w.num_blocks;
  const int32_t* table = w.table;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;

  // Query rows past the tile's end load as zeros and are not stored.
  for (int idx = tid; idx < BM * CH; idx += kThreads) {
    const int r = idx / CH, c = idx % CH, row = row0 + r;
    const bool ok = r < rows;
    const int64_t qr = ok ? static_cast<int64_t>(q0 + row / group) * p.num_heads + kvh * group + row % group : 0;
    CpAsync16Zfill(SmemAddr(q_s + Swz<HD>(r, c)), p.q + qr * HD + c * 8, ok);
  }
  // K (which 0) or V (1) of key tile kt; blocks past the sequence's last load as zeros (their
  // keys are in every row's future: masked, and P V must not meet NaN garbage). A thread copies
  // chunk c_kv of rows r_kv + 8 i (HD 128) or r_kv + 16 i (HD 64): in shared memory a fixed stride
  // apart (the swizzle depends on the row mod 8 only).
  constexpr int kRowsPerPass = kThreads / CH;
  constexpr int kPasses = BN / kRowsPerPass;
  const int c_kv = tid % CH, r_kv = tid / CH;
  const uint32_t kv_dst0 = Swz<HD>(r_kv, c_kv);
  const int64_t head_stride = 2 * kKvBlockSize * HD;  // one (block, KV head) unit
  const uint16_t* kv_head = p.kv + kvh * head_stride + c_kv * 8;
  auto load_kv = [&](int kt, int which, uint8_t* dst) {
    const uint32_t d = SmemAddr(dst) + kv_dst0;
    const uint16_t* base = kv_head + which * kKvBlockSize * HD;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int r = i * kRowsPerPass + r_kv;
      const int b = kt * (BN / kKvBlockSize) + r / kKvBlockSize;
      const bool ok = b < num_blocks;
      const int phys = ok ? table[b] : 0;
      const uint16_t* src = base + static_cast<int64_t>(phys) * p.num_kv_heads * head_stride + (r % kKvBlockSize) * HD;
      CpAsync16Zfill(d + i * kRowsPerPass * CH * 16, src, ok);
    }
    CpAsyncCommit();
  };
  load_kv(kt_last, 0, k_s);  // with Q in the same group

  // This thread's rows: warp rows [32 warp, 32 warp + 32), m-tile mi, half h: row g + 8 h.
  int qpos[2][2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * kWarpRows + mi * 16 + g + 8 * h;
      qpos[mi][h] = r < rows ? first_pos + (row0 + r) / group : -1;
    }
  }
  float o[2][NT][4];
  float m_run[2][2], l_run[2][2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int j = 0; j < NT; ++j) o[mi][j][0] = o[mi][j][1] = o[mi][j][2] = o[mi][j][3] = 0.0f;
    m_run[mi][0] = m_run[mi][1] = -INFINITY;
    l_run[mi][0] = l_run[mi][1] = 0.0f;
  }
  const float qscale = p.scale * kLog2e;

  for (int kt = kt_last; kt >= kt_first; --kt) {
    // The ldmatrix addresses are recomputed from a lane id the compiler cannot see through:
    // hoisted out of the loop, the 80 of them took the registers O needs (spills at head dim 128).
    int lv = lane;
    asm volatile("" : "+r"(lv));
    const int lm = lv >> 3;
    const int a_row = (lm & 1) * 8 + (lv & 7), a_chunk = lm >> 1;  // ldmatrix lanes of an A (Q) tile
    const int b_row = (lm >> 1) * 8 + (lv & 7), b_chunk = lm & 1;  // of a K tile (B, non-transposed)
    CpAsyncWait<0>();
    __syncthreads();  // K (and at first Q) landed for all; every warp is done with the last V
    load_kv(kt, 1, v_s);

    float sc[2][ST][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int j = 0; j < ST; ++j) sc[mi][j][0] = sc[mi][j][1] = sc[mi][j][2] = sc[mi][j][3] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t qa[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        LdMatrixX4(qa[mi], SmemAddr(q_s + Swz<HD>(warp * kWarpRows + mi * 16 + a_row, 2 * kk + a_chunk)));
      }
#pragma unroll
      for (int jj = 0; jj < BN / 16; ++jj) {
        uint32_t b[4];
        LdMatrixX4(b, SmemAddr(k_s + Swz<HD>(jj * 16 + b_row, 2 * kk + b_chunk)));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          Mma16816(sc[mi][2 * jj], qa[mi], b[0], b[1]);
          Mma16816(sc[mi][2 * jj + 1], qa[mi], b[2], b[3]);
        }
      }
    }

    // Scale to base 2; mask only the tiles that cross a row's causal edge or window start.
    const int k0 = kt * BN;
    const bool need_mask = k0 + BN - 1 > qpos_min || (window > 0 && k0 <= qpos_max - window);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int j = 0; j < ST; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int pos = k0 + 8 * j + 2 * t + (c & 1);
          const bool visible = !need_mask || KeyVisible(pos, qpos[mi][c >> 1], window);
          sc[mi][j][c] = visible ? sc[mi][j][c] * qscale : -INFINITY;
        }
      }
    }
    // Online softmax per row (a row's 4 lanes hold its 64 scores).
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < ST; ++j) mx = fmaxf(mx, fmaxf(sc[mi][j][2 * h], sc[mi][j][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[mi][h], mx);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: keep zeros
        const float alpha = exp2f(m_run[mi][h] - m_use);
        m_run[mi][h] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < ST; ++j) {
#pragma unroll
          for (int c = 2 * h; c < 2 * h + 2; ++c) {
            sc[mi][j][c] = exp2f(sc[mi][j][c] - m_use);
            sum += sc[mi][j][c];
          }
        }
        l_run[mi][h] = l_run[mi][h] * alpha + sum;  // this lane's part; the row's 4 lanes add at the end
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          o[mi][j][2 * h] *= alpha;
          o[mi][j][2 * h + 1] *= alpha;
        }
      }
    }

    // P as the A operand of P V, bf16 (the fp32 scores die here: registers for O).
    uint32_t pa[2][BN / 16][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        pa[mi][kk][0] = PackBf16(sc[mi][2 * kk][0], sc[mi][2 * kk][1]);
        pa[mi][kk][1] = PackBf16(sc[mi][2 * kk][2], sc[mi][2 * kk][3]);
        pa[mi][kk][2] = PackBf16(sc[mi][2 * kk + 1][0], sc[mi][2 * kk + 1][1]);
        pa[mi][kk][3] = PackBf16(sc[mi][2 * kk + 1][2], sc[mi][2 * kk + 1][3]);
      }
    }

    CpAsyncWait<0>();
    __syncthreads();  // V landed for all; every warp is done with K
    if (kt > kt_first) load_kv(kt - 1, 0, k_s);

#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int jj = 0; jj < HD / 16; ++jj) {
        uint32_t b[4];
        LdMatrixX4Trans(b, SmemAddr(v_s + Swz<HD>(kk * 16 + a_row, 2 * jj + a_chunk)));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          Mma16816(o[mi][2 * jj], pa[mi][kk], b[0], b[1]);
          Mma16816(o[mi][2 * jj + 1], pa[mi][kk], b[2], b[3]);
        }
      }
    }
  }

  // Normalise and store the rows that exist; a row that saw no key gets zeros and -inf.
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[mi][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int r = warp * kWarpRows + mi * 16 + g + 8 * h;
      if (r >= rows) continue;
      const int row = row0 + r;
      const int64_t rh = static_cast<int64_t>(q0 + row / group) * p.num_heads + kvh * group + row % group;
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(p.out + rh * HD);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        dst[4 * j + t] = __floats2bfloat162_rn(o[mi][j][2 * h] * inv, o[mi][j][2 * h + 1] * inv);
      }
      if (p.lse != nullptr && t == 0) p.lse[rh] = l > 0.0f ? m_run[mi][h] + log2f(l) : -INFINITY;
    }
  }
}


// wgmma kernel (sm_90a). Two warpgroups, 64 of the tile's 128 rows each; key tiles of BN = 128.
// The wgmma kernel: S = Q K^T and O += P V by wgmma, K and V of the next tile loading into the
// other of two shared-memory stages while this one computes (the helpers: prefill_tiles.cuh).
template <int HD, int BN>
__global__ void __launch_bounds__(kWgThreads, 1) PrefillWgmmaKernel(SparseDecodeParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t q_addr = SmemAddr(smem);
  const uint32_t kv_addr = q_addr + BM * HD * 2;  // stage st: K at kv_addr + st * 2 * BN * HD * 2, V after it
  constexpr uint32_t kTileBytes = BN * HD * 2;

  TileWork w;
  if (!GetTileWork(p, BN, &w)) return;
  const int group = w.group, rows = w.rows, row0 = w.row0, window = p.sliding_window;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;  // warpgroup: rows [64 wg, 64 wg + 64)

  LoadQSw128<HD>(p, w, q_addr, tid);
  auto load_tile = [&](int kt, int st) {
    LoadKvSw128<HD, BN>(p, w, kt, kv_addr + st * 2 * kTileBytes, tid);
  };
  const int n_tiles = w.kt_last - w.kt_first + 1;  // tile i is key tile kt_last - i
  load_tile(w.kt_last, 0);
  CpAsyncCommit();  // with Q
  if (n_tiles > 1) load_tile(w.kt_last - 1, 1);
  CpAsyncCommit();

  int qpos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    qpos[h] = r < rows ? w.first_pos + (row0 + r) / group : -1;
  }
  float o[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  const float qscale = p.scale * kLog2e;
  const uint32_t q_wg = q_addr + wg * 64 * 128;

  for (int i = 0; i < n_tiles; ++i) {
    const int kt = w.kt_last - i, st = i & 1;
    CpAsyncWait<1>();  // tile i (and Q) landed for this thread's copies
    wgmma::FenceProxyAsync();
    __syncthreads();  // ... and for everyone's
    const uint32_t k_st = kv_addr + st * 2 * kTileBytes, v_st = k_st + kTileBytes;

    float sc[BN / 2];
    wgmma::Fence();
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      MmaSS<BN>(sc, wgmma::DescK(q_wg + (kk & 3) * 32 + (kk >> 2) * BM * 128),
                wgmma::DescK(k_st + (kk & 3) * 32 + (kk >> 2) * BN * 128), kk > 0);
    }
    wgmma::Commit();
    wgmma::Wait<0>();
    wgmma::FenceRegs(sc);

    uint32_t pa[BN / 16][4];
    float alpha[2];
    SoftmaxTile<HD, BN>(sc, o, m_run, l_run, pa, kt * BN, w, qpos, window, qscale, t, alpha);
    wgmma::Fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) MmaRST<HD>(o, pa[kk], wgmma::DescMN(v_st + kk * 2048, BN));
    wgmma::Commit();
    wgmma::Wait<0>();
    wgmma::FenceRegs(o);

    __syncthreads();  // every warpgroup is done with stage st
    if (i + 2 < n_tiles) load_tile(kt - 2, st);
    CpAsyncCommit();
  }
  CpAsyncWait<0>();
  StoreWgRows<HD>(p, w, o, m_run, l_run, warp, g, t);
#else
  __trap();  // built without sm_90a: the host never launches this (WgmmaAvailable)
#endif
}

// The same tiles, the two warpgroups decoupled (FlashAttention-3's ping-pong, without a producer
// warp): K and V stream through three stages guarded by mbarriers (full: every thread's share of
// the tile's cp.async landed; empty: every thread is done with it), so no block-wide barrier is
// left in the loop; each thread loads its share of the tile two ahead once both warpgroups are
// done with the tile three back. Two named barriers make the warpgroups take turns issuing Q K^T,
// so that one's softmax runs while the other's MMAs occupy the tensor cores.
constexpr int kPpStages = 3;

template <int HD, int BN>
constexpr int PpSmemBytes() {
  return 1024 + (BM * HD + kPpStages * 2 * BN * HD) * 2 + 2 * kPpStages * 8;
}

template <int HD, int BN, bool OVERLAP>
__global__ void __launch_bounds__(kWgThreads, 1) PrefillPingPongKernel(SparseDecodeParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr uint32_t kTileBytes = BN * HD * 2;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t q_addr = SmemAddr(smem);
  const uint32_t kv_addr = q_addr + BM * HD * 2;  // stage st: K at kv_addr + st * 2 * kTileBytes, V after it
  const uint32_t bars = kv_addr + kPpStages * 2 * kTileBytes;
  auto full = [&](int st) { return bars + 8 * st; };
  auto empty = [&](int st) { return bars + 8 * (kPpStages + st); };

  TileWork w;
  if (!GetTileWork(p, BN, &w)) return;  // the whole CTA
  const int group = w.group, rows = w.rows, row0 = w.row0, window = p.sliding_window;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;  // warpgroup: rows [64 wg, 64 wg + 64)
  if (tid == 0) {
    for (int st = 0; st < kPpStages; ++st) {
      wgmma::MbarInit(full(st), kWgThreads);
      wgmma::MbarInit(empty(st), kWgThreads);
    }
  }
  __syncthreads();  // the barriers are initialised for everyone

  LoadQSw128<HD>(p, w, q_addr, tid);
  // This thread's share of key tile kt into stage st, then its arrival on full(st) once it lands.
  auto load_tile = [&](int kt, int st) {
    LoadKvSw128<HD, BN>(p, w, kt, kv_addr + st * 2 * kTileBytes, tid);
    wgmma::MbarArriveOnCpAsync(full(st));
  };
  const int n_tiles = w.kt_last - w.kt_first + 1;  // tile i is key tile kt_last - i, in stage i % 3
  load_tile(w.kt_last, 0);                          // with Q
  if (n_tiles > 1) load_tile(w.kt_last - 1, 1);

  int qpos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    qpos[h] = r < rows ? w.first_pos + (row0 + r) / group : -1;
  }
  float o[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  const float qscale = p.scale * kLog2e;
  const uint32_t q_wg = q_addr + wg * 64 * 128;
  // Turns: warpgroup 0 issues first; each issues its Q K^T after the other's (barrier 1 + wg is
  // its own, arrived on by the other). Every sync meets one arrival: warpgroup 1 arrives once up
  // front and skips its last.
  constexpr int kPair = 2 * 128;
  if (wg == 1) wgmma::BarArrive(1, kPair);

  auto issue_qk = [&](float (&sc)[BN / 2], uint32_t k_st) {
    wgmma::Fence();
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      MmaSS<BN>(sc, wgmma::DescK(q_wg + (kk & 3) * 32 + (kk >> 2) * BM * 128),
                wgmma::DescK(k_st + (kk & 3) * 32 + (kk >> 2) * BN * 128), kk > 0);
    }
    wgmma::Commit();
  };
  auto issue_pv = [&](const uint32_t (&pa)[BN / 16][4], uint32_t v_st) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) MmaRST<HD>(o, pa[kk], wgmma::DescMN(v_st + kk * 2048, BN));
    wgmma::Commit();
  };
  auto stage_k = [&](int st) { return kv_addr + st * 2 * kTileBytes; };

  if constexpr (!OVERLAP) {
    for (int i = 0; i < n_tiles; ++i) {
      const int kt = w.kt_last - i, st = i % kPpStages;
      if (i + 2 < n_tiles) {
        const int ls = (i + 2) % kPpStages;
        if (i >= 1) wgmma::MbarWait(empty(ls), ((i - 1) / kPpStages) & 1);  // tile i - 1 is done everywhere
        load_tile(kt - 2, ls);
      }
      wgmma::MbarWait(full(st), (i / kPpStages) & 1);
      wgmma::FenceProxyAsync();  // the tile's cp.async writes, visible to wgmma's reads
      float sc[BN / 2];
      wgmma::BarSync(1 + wg, kPair);
      issue_qk(sc, stage_k(st));
      if (!(wg == 1 && i == n_tiles - 1)) wgmma::BarArrive(2 - wg, kPair);
      wgmma::Wait<0>();
      wgmma::FenceRegs(sc);
      uint32_t pa[BN / 16][4];
      float alpha[2];
      SoftmaxTile<HD, BN>(sc, o, m_run, l_run, pa, kt * BN, w, qpos, window, qscale, t, alpha);
      wgmma::Fence();
      issue_pv(pa, stage_k(st) + kTileBytes);
      wgmma::Wait<0>();
      wgmma::FenceRegs(o);
      wgmma::MbarArrive(empty(st));
    }
  } else {
    // Q K^T of tile i is issued together with P V of tile i - 1; the softmax of tile i runs while
    // that P V still accumulates, and O is rescaled once it is done. A stage is free once its
    // tile's P V is.
    // Tile 0 alone, so that no wait on the MMAs below is conditional (ptxas serialises every
    // wgmma of a function where one might not be waited for before its registers are read).
    uint32_t pa_prev[BN / 16][4];
    int prev_st = 0;
    {
      wgmma::MbarWait(full(0), 0);
      wgmma::FenceProxyAsync();
      float sc[BN / 2];
      wgmma::BarSync(1 + wg, kPair);
      issue_qk(sc, stage_k(0));
      if (!(wg == 1 && n_tiles == 1)) wgmma::BarArrive(2 - wg, kPair);
      wgmma::Wait<0>();
      wgmma::FenceRegs(sc);
      float alpha[2];
      SoftmaxTile<HD, BN>(sc, o, m_run, l_run, pa_prev, w.kt_last * BN, w, qpos, window, qscale, t, alpha);
      if (2 < n_tiles) load_tile(w.kt_last - 2, 2);
    }
    for (int i = 1; i < n_tiles; ++i) {
      const int kt = w.kt_last - i, st = i % kPpStages;
      wgmma::MbarWait(full(st), (i / kPpStages) & 1);
      wgmma::FenceProxyAsync();
      float sc[BN / 2];
      wgmma::BarSync(1 + wg, kPair);
      issue_qk(sc, stage_k(st));
      issue_pv(pa_prev, stage_k(prev_st) + kTileBytes);
      if (!(wg == 1 && i == n_tiles - 1)) wgmma::BarArrive(2 - wg, kPair);
      wgmma::Wait<1>();  // Q K^T done; P V of the tile before may still run
      wgmma::FenceRegs(sc);
      uint32_t pa[BN / 16][4];
      float alpha[2];
      SoftmaxTile<HD, BN, false>(sc, o, m_run, l_run, pa, kt * BN, w, qpos, window, qscale, t, alpha);
      wgmma::Wait<0>();
      wgmma::FenceRegs(o);
      wgmma::FenceRegs(pa_prev);
      wgmma::MbarArrive(empty(prev_st));
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) {
        o[4 * j] *= alpha[0];
        o[4 * j + 1] *= alpha[0];
        o[4 * j + 2] *= alpha[1];
        o[4 * j + 3] *= alpha[1];
      }
      // Tile i + 2 into the stage of tile i - 1, free once both warpgroups are done with it.
      if (i + 2 < n_tiles) {
        wgmma::MbarWait(empty((i + 2) % kPpStages), ((i - 1) / kPpStages) & 1);
        load_tile(kt - 2, (i + 2) % kPpStages);
      }
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
        for (int c = 0; c < 4; ++c) pa_prev[kk][c] = pa[kk][c];
      }
      prev_st = st;
    }
    wgmma::Fence();
    issue_pv(pa_prev, stage_k(prev_st) + kTileBytes);
    wgmma::Wait<0>();
    wgmma::FenceRegs(o);
    wgmma::FenceRegs(pa_prev);
  }
  StoreWgRows<HD>(p, w, o, m_run, l_run, warp, g, t);
#else
  __trap();  // built without sm_90a: the host never launches this (WgmmaAvailable)
#endif
}

// 1 where this module's code for the current device has the wgmma kernel.
__global__ void WgmmaProbeKernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

enum class Variant { kMma, kWgmma, kPingPong, kOverlap };

template <int HD, int BN, Variant V>
cudaError_t Launch(const SparseDecodeParams& p, int total_q_rows, cudaStream_t stream) {
  int smem = 0, threads = 0;
  const void* kernel = nullptr;
  if constexpr (V == Variant::kPingPong || V == Variant::kOverlap) {
    smem = PpSmemBytes<HD, BN>();
    threads = kWgThreads;
    kernel = reinterpret_cast<const void*>(PrefillPingPongKernel<HD, BN, V == Variant::kOverlap>);
  } else if constexpr (V == Variant::kWgmma) {
    smem = WgSmemBytes<HD, BN>();
    threads = kWgThreads;
    kernel = reinterpret_cast<const void*>(PrefillWgmmaKernel<HD, BN>);
  } else {
    smem = SmemBytes<HD, BN>();
    threads = kThreads;
    kernel = reinterpret_cast<const void*>(PrefillAttentionKernel<HD, BN>);
  }
  // Per launch: the attribute is the current device's (a draft on another GPU needs its own), and
  // setting it is no stream operation (allowed while a graph is captured).
  const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  const int group = p.num_heads / p.num_kv_heads;
  const long long tiles = (static_cast<long long>(total_q_rows) * group + BM - 1) / BM + p.num_seqs;
  if (tiles > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.num_kv_heads));
  if constexpr (V == Variant::kPingPong || V == Variant::kOverlap) {
    PrefillPingPongKernel<HD, BN, V == Variant::kOverlap><<<grid, threads, smem, stream>>>(p);
  } else if constexpr (V == Variant::kWgmma) {
    PrefillWgmmaKernel<HD, BN><<<grid, threads, smem, stream>>>(p);
  } else {
    PrefillAttentionKernel<HD, BN><<<grid, threads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

// Whether the wgmma kernel runs on the current device: a Hopper GPU and this module's code for it
// built for sm_90a (a build for plain sm_90 has no wgmma). Probed once per device with a kernel
// on a stream of its own; never while `stream` is being captured (then false, once).
bool WgmmaAvailable(cudaStream_t stream) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> state[kMaxDevices];  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return false;
  const int known = state[dev].load();
  if (known != 0) return known == 1;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess || capturing != cudaStreamCaptureStatusNone) {
    return false;
  }
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major != 9) {
    state[dev] = 2;
    return false;
  }
  int result = 0;
  int* flag = nullptr;
  cudaStream_t probe = nullptr;
  bool ok = cudaStreamCreateWithFlags(&probe, cudaStreamNonBlocking) == cudaSuccess &&
            cudaMalloc(&flag, sizeof(int)) == cudaSuccess;
  if (ok) {
    WgmmaProbeKernel<<<1, 1, 0, probe>>>(flag);
    ok = cudaGetLastError() == cudaSuccess &&
         cudaMemcpyAsync(&result, flag, sizeof(int), cudaMemcpyDeviceToHost, probe) == cudaSuccess &&
         cudaStreamSynchronize(probe) == cudaSuccess;
  }
  if (flag != nullptr) cudaFree(flag);
  if (probe != nullptr) cudaStreamDestroy(probe);
  state[dev] = ok && result == 1 ? 1 : 2;
  return state[dev] == 1;
}

}  // namespace

bool PrefillAttentionSupports(const SparseDecodeParams& p) {
  return p.sel_indptr == nullptr && p.sel_slots == nullptr && p.block_lse == nullptr &&
         (p.head_dim == 64 || p.head_dim == 128) && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0;
}

bool PrefillAttentionPays(int num_heads, int num_kv_heads, int total_q_rows, int max_q_tokens, int num_sms) {
  if (num_kv_heads <= 0 || max_q_tokens < 16) return false;
  const long long tiles = (static_cast<long long>(total_q_rows) * (num_heads / num_kv_heads) + BM - 1) / BM;
  return tiles * num_kv_heads >= num_sms || max_q_tokens >= kPrefillMinQ;
}

cudaError_t PrefillAttention(const SparseDecodeParams& p, int total_q_rows, cudaStream_t stream,
                             PrefillKernel kernel) {
  if (!PrefillAttentionSupports(p) || total_q_rows < 0) return cudaErrorInvalidValue;
  if (total_q_rows == 0 || p.num_seqs == 0) return cudaSuccess;
  if (kernel == PrefillKernel::kAuto) {
    // The fastest measured (docs/BENCHMARKS.md: 1.15x the plain wgmma kernel on the H200).
    kernel = WgmmaAvailable(stream) ? PrefillKernel::kWgmmaOverlap
                                    : (p.head_dim == 128 ? PrefillKernel::kMma32 : PrefillKernel::kMma64);
  }
  const bool hd128 = p.head_dim == 128;
  const int q = total_q_rows;
  switch (kernel) {
    case PrefillKernel::kWgmmaPingPong:
      if (!WgmmaAvailable(stream)) return cudaErrorNotSupported;
      return hd128 ? Launch<128, kWgKeys, Variant::kPingPong>(p, q, stream)
                   : Launch<64, kWgKeys, Variant::kPingPong>(p, q, stream);
    case PrefillKernel::kWgmmaOverlap:
      if (!WgmmaAvailable(stream)) return cudaErrorNotSupported;
      return hd128 ? Launch<128, kWgKeys, Variant::kOverlap>(p, q, stream)
                   : Launch<64, kWgKeys, Variant::kOverlap>(p, q, stream);
    case PrefillKernel::kWgmma:
      if (!WgmmaAvailable(stream)) return cudaErrorNotSupported;
      return hd128 ? Launch<128, kWgKeys, Variant::kWgmma>(p, q, stream) : Launch<64, kWgKeys, Variant::kWgmma>(p, q, stream);
    case PrefillKernel::kMma32:
      if (!hd128) return cudaErrorInvalidValue;
      return Launch<128, 32, Variant::kMma>(p, q, stream);
    case PrefillKernel::kMma64:
      return hd128 ? Launch<128, 64, Variant::kMma>(p, q, stream) : Launch<64, 64, Variant::kMma>(p, q, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace scout::kernels
