#include <climits>
#include <cmath>

#include "kernels/model_ops.h"
#include "kernels/sampling.cuh"

namespace scout::kernels {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

// Order-preserving map of a float to an unsigned key: a < b exactly when key(a) < key(b).
__device__ uint32_t OrderKey(float v) {
  // -0 and +0 compare equal (ties go by index, as the reference's float comparisons do).
  const uint32_t b = __float_as_uint(v + 0.0f);
  return (b & 0x80000000u) != 0 ? ~b : (b | 0x80000000u);
}
__device__ float KeyValue(uint32_t k) { return __uint_as_float((k & 0x80000000u) != 0 ? (k & 0x7fffffffu) : ~k); }

// Sum over the CTA, returned to every thread. `shared` holds kWarps values.
template <typename T>
__device__ T BlockSum(T v, T* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kWarps; ++w) total += shared[w];
  return total;
}

// Sum of v over the threads before this one.
__device__ int BlockExclusiveScan(int v, int* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == 31) shared[warp] = x;
  __syncthreads();
  int base = 0;
  for (int w = 0; w < warp; ++w) base += shared[w];
  return base + x - v;
}

// (score, index): larger score wins, the lower index on ties. Returned to every thread.
__device__ void BlockArgmax(double* score, int* index, double* ss, int* si) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double os = __shfl_xor_sync(0xffffffffu, *score, o);
    const int oi = __shfl_xor_sync(0xffffffffu, *index, o);
    if (os > *score || (os == *score && oi < *index)) {
      *score = os;
      *index = oi;
    }
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) {
    ss[threadIdx.x / 32] = *score;
    si[threadIdx.x / 32] = *index;
  }
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) {
    if (ss[w] > *score || (ss[w] == *score && si[w] < *index)) {
      *score = ss[w];
      *index = si[w];
    }
  }
}

// Each thread owns a contiguous range of the row, so that "ties in index order" is a scan over
// threads and then a walk through the range.
__global__ void __launch_bounds__(kThreads) SampleKernel(SampleParams p) {
  __shared__ double sd[kWarps];
  __shared__ int si[kWarps];
  __shared__ int sc[kWarps];
  const float* x = p.logits + int64_t{blockIdx.x} * p.vocab;
  const SampleRowParams rp = p.row[blockIdx.x];
  const int chunk = (p.vocab + kThreads - 1) / kThreads;
  const int lo = min(p.vocab, static_cast<int>(threadIdx.x) * chunk), hi = min(p.vocab, lo + chunk);

  // The largest logit, lowest index on ties: the greedy token, and the softmax shift.
  double best = -INFINITY;
  int best_i = INT_MAX;
  for (int i = lo; i < hi; ++i) {
    const double v = x[i];
    if (v > best || (v == best && i < best_i)) {
      best = v;
      best_i = i;
    }
  }
  BlockArgmax(&best, &best_i, sd, si);
  if (rp.temperature == 0.0f) {
    if (threadIdx.x == 0) p.out[blockIdx.x] = best_i;
    return;
  }
  const double m = best, inv_t = 1.0 / static_cast<double>(rp.temperature);

  // Top-k: the k-th largest key, bit by bit; ties at it kept in index order up to k.
  uint32_t tau_k = 0;
  int ties_k = INT_MAX;  // everything kept
  if (rp.top_k > 0 && rp.top_k < p.vocab) {
    uint32_t prefix = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t c = prefix | (1u << bit);
      int n = 0;
      for (int i = lo; i < hi; ++i) n += OrderKey(x[i]) >= c;
      if (BlockSum(n, sc) >= rp.top_k) prefix = c;
    }
    tau_k = prefix;
    int gt = 0;
    for (int i = lo; i < hi; ++i) gt += OrderKey(x[i]) > tau_k;
    ties_k = rp.top_k - BlockSum(gt, sc);
  }
  int tie_count = 0;
  for (int i = lo; i < hi; ++i) tie_count += OrderKey(x[i]) == tau_k;
  const int tie_base_k = BlockExclusiveScan(tie_count, sc);
  // Walks this thread's range calling f(i, key, weight) for the tokens top-k keeps.
  auto for_kept_k = [&](auto f) {
    int rank = tie_base_k;
    for (int i = lo; i < hi; ++i) {
      const uint32_t key = OrderKey(x[i]);
      if (key < tau_k) continue;
      if (key == tau_k && rank++ >= ties_k) continue;
      f(i, key);
    }
  };
  auto weight = [&](int i) { return exp((static_cast<double>(x[i]) - m) * inv_t); };

  // Top-p: the key at which the mass of the larger kept tokens first reaches top_p, bit by bit;
  // ties at it kept in index order until it does.
  uint32_t tau_p = 0;
  int need_p = INT_MAX;
  if (rp.top_p < 1.0f) {
    double z = 0;
    for_kept_k([&](int i, uint32_t) { z += weight(i); });
    const double target = static_cast<double>(rp.top_p) * BlockSum(z, sd);
    uint32_t prefix = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t c = prefix | (1u << bit);
      double f = 0;
      for_kept_k([&](int i, uint32_t key) {
        if (key >= c) f += weight(i);
      });
      if (BlockSum(f, sd) >= target) prefix = c;
    }
    tau_p = prefix;
    double above = 0;
    for_kept_k([&](int i, uint32_t key) {
      if (key > tau_p) above += weight(i);
    });
    const double mass_above = BlockSum(above, sd);
    const double w_tau = exp((static_cast<double>(KeyValue(tau_p)) - m) * inv_t);
    need_p = max(1, static_cast<int>(ceil((target - mass_above) / w_tau)));
  }
  int tie_p = 0;
  for_kept_k([&](int, uint32_t key) { tie_p += key == tau_p; });
  int rank_p = BlockExclusiveScan(tie_p, sc);

  // Gumbel-max over the kept tokens.
  best = -INFINITY;
  best_i = INT_MAX;
  for_kept_k([&](int i, uint32_t key) {
    if (key < tau_p) return;
    if (key == tau_p && rank_p++ >= need_p) return;
    const double u = RandomUniform(rp.seed, i, 0.5f, 0.5f);
    const double score = (static_cast<double>(x[i]) - m) * inv_t - log(-log(u));
    if (best_i == INT_MAX || score > best || (score == best && i < best_i)) {
      best = score;
      best_i = i;
    }
  });
  BlockArgmax(&best, &best_i, sd, si);
  if (threadIdx.x == 0) p.out[blockIdx.x] = best_i == INT_MAX ? 0 : best_i;
}

}  // namespace

cudaError_t Sample(const SampleParams& p, cudaStream_t stream) {
  if (p.vocab < 1) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  SampleKernel<<<p.rows, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace scout::kernels
