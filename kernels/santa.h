// SANTA: sampled value aggregation. Scores are exact over every key the list names; instead of
// summing every value row, S rows are drawn by systematic sampling from the softmax and averaged
// with importance weights, an unbiased estimate of the attention output that reads S value rows
// instead of all of them. Shared by the C++ reference below and the CUDA kernels (santa.cuh).
#pragma once

#include <cstdint>

#include "kernels/sparse_decode.h"

namespace scout::kernels {

// Query rows of one (sequence, KV head) are taken in groups of 16 (a CTA's tile on the GPU); a
// group shares one sample set drawn from the mixture of its rows' softmaxes,
//   q_j = (1/R) sum_r p_rj,
// with S systematic points (u + i) / S, i < S, on q's cumulative distribution, u uniform in
// [0, 1) from SantaUniform. Row r's estimate is (1/S) sum_i p_r(j_i) / q(j_i) * v(j_i): unbiased
// for each row, exact when one token holds all the mass.
struct SantaParams {
  SparseDecodeParams attn;  // q, out, kv, lists, as for SparseDecode
  int samples = 256;        // S per (sequence, KV head, row group)
  uint64_t seed = 0;        // vary per step and layer; sequence, head and group are mixed in
};

inline constexpr int kSantaRowGroup = 16;

#ifdef __CUDACC__
#define SCOUT_HOST_DEVICE __host__ __device__
#else
#define SCOUT_HOST_DEVICE
#endif

// u in [0, 1) for one (sequence, KV head, row group): splitmix64 of the seed and the indices.
SCOUT_HOST_DEVICE inline float SantaUniform(uint64_t seed, int seq, int kv_head, int row_group) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (1 + static_cast<uint64_t>(seq) * 1000003ull +
                                                static_cast<uint64_t>(kv_head) * 7919ull + row_group);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-24f;
}

// Plain C++ reference of the estimator (double precision weights). out_f32 optional.
void SantaRef(const SantaParams& p, float* out_f32 = nullptr);

}  // namespace scout::kernels
