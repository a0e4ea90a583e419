// Paged attention on the CPU: the reference that the CUDA kernels are checked against, and what
// the CPU backend runs.
#pragma once

#include <cstdint>

namespace scout::kernels {

// Attention of num_tokens new query tokens of one sequence over its paged KV cache.
// Query token t sits at position context_len - num_tokens + t and attends to positions <= its own
// (causal among the new tokens; all earlier tokens visible, or those within sliding_window). GQA: query head h reads KV head
// h / (num_heads / num_kv_heads).
struct PagedAttentionParams {
  const float* q = nullptr;          // [num_tokens][num_heads][head_dim]
  float* out = nullptr;              // [num_tokens][num_heads][head_dim]
  const float* kv_layer = nullptr;   // [num_blocks][num_kv_heads][2 (K,V)][block_size][head_dim]
  const int32_t* block_table = nullptr;  // [ceil(context_len / block_size)] block ids
  int64_t context_len = 0;           // tokens in the cache, the new ones included
  int num_tokens = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 16;
  float scale = 0;                   // usually 1/sqrt(head_dim)
  // Optional Selection: KV head h reads only the logical blocks sel_blocks[sel_indptr[h] ..
  // sel_indptr[h + 1]) (ascending, each < ceil(context_len / block_size)); a query row that sees
  // none of their positions outputs zeros. nullptr: every block.
  const int32_t* sel_indptr = nullptr;  // [num_kv_heads + 1]
  const int32_t* sel_blocks = nullptr;
  // Sliding window: > 0 restricts the query at position p to keys at positions k with
  // p - sliding_window < k <= p (sliding_window keys, its own included: transformers'
  // sliding_window_overlay). 0: every earlier position.
  int64_t sliding_window = 0;
  // Optional output: the attention probability each query row puts on each logical block,
  // [num_heads][num_tokens][ceil(context_len / block_size)], zero for blocks it did not read.
  float* block_mass = nullptr;
  // SANTA (kernels/santa.h) instead of the exact value sum: > 0 draws this many value rows per
  // (KV head, group of 16 query rows) by systematic sampling from the rows' mixed softmax, with
  // the same rows, groups and uniform (SantaUniform(santa_seed, 0, kv_head, group)) as SantaRef.
  // Scores stay exact. Vary santa_seed per step and layer.
  int santa_samples = 0;
  uint64_t santa_seed = 0;
};

// Single precision, softmax in float32 with the row maximum subtracted; GEMMs through CBLAS.
// Thread-compatible: concurrent calls must not share `out`. With santa_samples > 0, runs
// SantaAttentionCpu.
void PagedAttentionCpu(const PagedAttentionParams& p);

// The SANTA estimate over float32 keys and values (rows t * group + g of a KV head, as in
// SantaRef); block_mass, when asked for, is the exact softmax's.
void SantaAttentionCpu(const PagedAttentionParams& p);

// The same function computed naively in double precision: the ground truth for tests.
void PagedAttentionNaiveF64(const PagedAttentionParams& p);

}  // namespace scout::kernels
