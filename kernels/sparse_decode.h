// Paged decode attention over per-(sequence, KV head) block lists: dense (every block of the
// sequence) or STS block-sparse (the Selection). The parameter struct is shared by the CPU
// reference below and the CUDA kernel in sparse_decode.cuh.
#pragma once

#include <cstdint>

namespace scout::kernels {

inline constexpr int kKvBlockSize = 16;

#if defined(__CUDACC__)
#define SCOUT_HD __host__ __device__
#else
#define SCOUT_HD
#endif

// The one masking rule of every attention pass, kernel and reference: the query at position
// qpos sees the key at pos if it is not in its future and, with a sliding window, within the
// window's last keys (qpos - window < pos <= qpos).
SCOUT_HD inline bool KeyVisible(int pos, int qpos, int sliding_window) {
  return pos <= qpos && (sliding_window <= 0 || pos > qpos - sliding_window);
}

// Storage is bf16 (uint16_t bit patterns on the host side). Pointers are host memory for the
// reference and device memory for the kernel.
//
// Query row t of sequence s sits at position seq_lens[s] - (q_indptr[s+1] - q_indptr[s]) + t and
// sees the keys at positions <= its own (causal among the new tokens) that lie in its KV head's
// list. A row that sees no key outputs zeros.
struct SparseDecodeParams {
  const uint16_t* q = nullptr;          // [q_indptr[num_seqs]][num_heads][head_dim]
  uint16_t* out = nullptr;              // [q_indptr[num_seqs]][num_heads][head_dim]
  const uint16_t* kv = nullptr;         // [num_blocks][num_kv_heads][2 (K,V)][16][head_dim], one layer
  const int32_t* q_indptr = nullptr;    // [num_seqs + 1] first query row of each sequence
  const int32_t* seq_lens = nullptr;    // [num_seqs] tokens in the cache, the new ones included
  const int32_t* block_table = nullptr; // [num_seqs][max_blocks_per_seq] logical -> physical block
  int max_blocks_per_seq = 0;
  // Selection: logical block indices for (s, kv_head) at sel_blocks[sel_indptr[s * num_kv_heads +
  // kv_head] ...]; each index < ceil(seq_lens[s] / 16), no duplicates. nullptr: dense.
  const int32_t* sel_indptr = nullptr;  // [num_seqs * num_kv_heads + 1]
  const int32_t* sel_blocks = nullptr;
  // Optional, with a Selection: where each listed block sits in a pool of units (the GPU block
  // cache: kv is then [slots][2 (K,V)][16][head_dim], one (layer, KV head, block) per slot, and
  // block_table is not read). Parallel to sel_blocks.
  const int32_t* sel_slots = nullptr;
  // Entries of sel_indptr between consecutive sequences: the list of (s, kv_head) starts at
  // sel_indptr[s * sel_seq_stride + kv_head]. 0 means num_kv_heads (one layer's lists). A
  // whole-model selection, [num_seqs][layers][kv_heads], is read one layer at a time with
  // stride layers * kv_heads and sel_indptr offset by layer * kv_heads.
  int sel_seq_stride = 0;
  // Optional output: per query row and head, the log-sum-exp of its scores in base 2 over the
  // keys it saw, lse2 = log2(sum_j 2^(s_j * scale * log2(e))), so that p_j = 2^(s_j * scale *
  // log2(e) - lse2). -inf for a row that sees no key. [q_indptr[num_seqs]][num_heads].
  float* lse = nullptr;
  // Optional output (tensor-core plan only): for every query row, head and block of its list, the
  // base-2 log-sum-exp of its scores over that block's keys it sees (-inf if none), at
  // block_lse[(row * num_heads + head) * block_lse_stride + logical block]. With lse this gives
  // the attention mass per block, 2^(block_lse - lse), without reading the keys again.
  float* block_lse = nullptr;
  int block_lse_stride = 0;
  int num_seqs = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;                     // 64 or 128 on the GPU
  float scale = 0;                      // softmax scale, usually 1/sqrt(head_dim)
  // > 0: sliding-window attention (Mistral, Qwen2): a query at position p sees only the keys at
  // positions k with p - sliding_window < k <= p.
  int sliding_window = 0;
};

// Plain C++ reference: float32 scores and softmax, output rounded to bf16. If out_f32 is
// non-null it also receives the unrounded output ([rows][num_heads][head_dim]); if abs_out is
// non-null, sum_j p_j |v_j| per element, the scale that bounds rounding of the weights p (the
// tensor-core kernel rounds them to bf16 before multiplying by V).
void SparseDecodeRef(const SparseDecodeParams& p, float* out_f32 = nullptr, float* abs_out = nullptr);

}  // namespace scout::kernels
