// SANTA: sampled value aggregation. Scores are exact over every key the list names; instead of
// summing every value row, value rows are drawn by systematic sampling from the softmax and
// weighted by importance, an unbiased estimate of the attention output that reads the sampled
// value rows instead of all of them. Shared by the C++ reference below, the CUDA kernel
// (santa.cuh) and the CPU backend (attention_cpu.h).
#pragma once

#include <cstdint>

#include "kernels/sparse_decode.h"

namespace scout::kernels {

// The estimator. Query rows of one (sequence, KV head) are taken in groups of 16 (a CTA's tile
// on the GPU); the list is cut into splits of `blocks_per_split` consecutive entries (the GPU
// plan's, SantaSplits). For one row group and split c, with s_rj the scaled logit of row r and
// key j of the split (masked keys excluded):
//   m_r = max_j s_rj,  e_r(j) = exp(s_rj - m_r),  l_r = sum_j e_r(j),
//   q(j) = (1/R) sum_r e_r(j) / l_r        (the mixture of the R rows that see a key of the split),
// and n = SantaSamplesPerSplit(S, num_splits) systematic points (u + i) / n, i < n, on q's
// cumulative distribution in list order (q scaled by its computed total), u = SantaUniform(seed,
// sequence, KV head, row group, c). Key j receiving h_j points adds
//   o_r += h_j * e_r(j) / (n q(j)) * v_j,
// so E[o_r] = sum_j e_r(j) v_j: the split's exact unnormalised output. The splits' partials
// (m_r, l_r, o_r) are merged by log-sum-exp, out_r = sum_c e^(m_rc - M) o_rc / sum_c e^(m_rc - M)
// l_rc, with an exact denominator: the output is unbiased. The row group's heads share the sampled
// value rows. A key holding at least 1/n of q's mass is hit deterministically (floor or ceil of
// n q(j)), so peaked attention is nearly exact; flat attention over many keys is not.
//
// One split (SantaSplits{}) is the whole-list estimator: the CPU backend (SantaAttentionCpu)
// uses it, having no kernel plan; the GPU kernel's splits are those of its plan.
struct SantaParams {
  SparseDecodeParams attn;  // q, out, kv, lists, as for SparseDecode
  int samples = 256;        // S per (sequence, KV head, row group), spread over the splits
  uint64_t seed = 0;        // vary per step and layer; sequence, head, group and split are mixed in
};

// How the lists are cut: list entries [c * blocks_per_split, (c + 1) * blocks_per_split) form
// split c, c < num_splits (a shorter list leaves trailing splits empty).
struct SantaSplits {
  int num_splits = 1;
  int blocks_per_split = 1 << 30;
};

inline constexpr int kSantaRowGroup = 16;

#ifdef __CUDACC__
#define SCOUT_HOST_DEVICE __host__ __device__
#else
#define SCOUT_HOST_DEVICE
#endif

// Points each split draws: ceil(S / num_splits), at least 1.
SCOUT_HOST_DEVICE inline int SantaSamplesPerSplit(int samples, int num_splits) {
  const int n = (samples + num_splits - 1) / num_splits;
  return n < 1 ? 1 : n;
}

// u in [0, 1) for one (sequence, KV head, row group, split): splitmix64 of the seed and the
// indices. Split 0 gives the value of the whole-list estimator's single split.
SCOUT_HOST_DEVICE inline float SantaUniform(uint64_t seed, int seq, int kv_head, int row_group, int split = 0) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (1 + static_cast<uint64_t>(seq) * 1000003ull +
                                                static_cast<uint64_t>(kv_head) * 7919ull + row_group) +
               static_cast<uint64_t>(split) * 0xd1b54a32d192ed03ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-24f;
}

// Plain C++ reference of the estimator with the given splits (double precision scores and
// weights), output rounded to bf16; out_f32 optional ([rows][num_heads][head_dim], unrounded).
void SantaRef(const SantaParams& p, const SantaSplits& splits, float* out_f32 = nullptr);
// The whole-list estimator (one split).
inline void SantaRef(const SantaParams& p, float* out_f32 = nullptr) { SantaRef(p, SantaSplits{}, out_f32); }

}  // namespace scout::kernels
