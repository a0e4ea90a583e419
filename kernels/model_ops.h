// The small per-layer operations of a Llama decode step on the GPU backend: embedding lookup,
// RMSNorm, RoPE with the KV append into the paged cache, SwiGLU, greedy argmax, the draft's
// attention mass per KV block (STS's signal) and deterministic random fill for production-shape
// benchmark weights. Parameter structs are shared by the plain C++ references below and the CUDA
// kernels in model_ops.cuh; pointers are host memory for the references, device memory for the
// kernels. Storage is bf16 (uint16_t bit patterns), arithmetic float32.
#pragma once

#include <cstdint>

#include "kernels/sparse_decode.h"

namespace scout::kernels {

// out[r][:] = float(table[tokens[r]][:])
struct EmbedParams {
  const uint16_t* table = nullptr;  // [vocab][dim]
  const int32_t* tokens = nullptr;  // [rows]
  float* out = nullptr;             // [rows][dim]
  int rows = 0;
  int dim = 0;
};
void EmbedRef(const EmbedParams& p);

// out = bf16(weight * (x * rsqrt(mean(x^2) + eps))), as transformers' LlamaRMSNorm in float32.
struct RmsNormParams {
  const float* x = nullptr;       // [rows][dim]
  const float* weight = nullptr;  // [dim]
  uint16_t* out = nullptr;        // [rows][dim]
  int rows = 0;
  int dim = 0;
  float eps = 1e-6f;
};
void RmsNormRef(const RmsNormParams& p);
// The same in float32, as the CPU backend runs it (RmsNormRef is this rounded to bf16); out may
// be x.
void RmsNormF32(const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* out);

// Row r of qkv holds num_heads query vectors, then num_kv_heads keys, then num_kv_heads values
// for the token at positions[r]. Rotates queries and keys (rotate-half pairing, angle =
// float(position) * inv_freq[i] in float32, as transformers), writes the queries to q and the
// keys and values into the paged cache slot of that position: kv is one layer,
// [blocks][num_kv_heads][2 (K,V)][16][head_dim], and phys_blocks[r] the row's physical block.
struct RopeAppendParams {
  const float* qkv = nullptr;          // [rows][(num_heads + 2 * num_kv_heads) * head_dim]
  const int32_t* positions = nullptr;  // [rows]
  const int32_t* phys_blocks = nullptr;  // [rows]
  const float* inv_freq = nullptr;     // [head_dim / 2]
  uint16_t* q = nullptr;               // [rows][num_heads][head_dim]
  uint16_t* kv = nullptr;
  int rows = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  const float* bias = nullptr;     // optional [(num_heads + 2 * num_kv_heads) * head_dim], added first (Qwen2)
  float attention_scaling = 1.0f;  // cos and sin are multiplied by it (YaRN)
  // Optional, instead of phys_blocks: kv is a pool of units ([units][2 (K,V)][16][head_dim], one
  // (layer, KV head, block) each: the GPU block cache of the host KV tier) and row r's keys and
  // values of KV head h go to unit unit_slots[r * num_kv_heads + h].
  const int32_t* unit_slots = nullptr;  // [rows][num_kv_heads]
};
void RopeAppendRef(const RopeAppendParams& p);

// y[r][j] += bias[j]
struct AddBiasParams {
  float* y = nullptr;            // [rows][n]
  const float* bias = nullptr;   // [n]
  int rows = 0;
  int n = 0;
};
void AddBiasRef(const AddBiasParams& p);

// out[r][j] = bf16(silu(gate_up[r][j]) * gate_up[r][inter + j])
struct SiluMulParams {
  const float* gate_up = nullptr;  // [rows][2 * inter]
  uint16_t* out = nullptr;         // [rows][inter]
  int rows = 0;
  int inter = 0;
};
void SiluMulRef(const SiluMulParams& p);
// The same in float32, as the CPU backend runs it (SiluMulRef is this rounded to bf16).
void SiluMulF32(const float* gate_up, int64_t rows, int64_t inter, float* out);

// out[r] = the index of the largest of logits[r][:], the lowest index among ties (greedy
// sampling on the GPU). NaN never wins.
struct ArgmaxParams {
  const float* logits = nullptr;  // [rows][vocab]
  int32_t* out = nullptr;         // [rows]
  int rows = 0;
  int vocab = 0;
};
void ArgmaxRef(const ArgmaxParams& p);

// The attention probability each query row of an attention pass put on each KV block of its
// sequence, from the pass's own log-sum-exp (SparseDecodeParams::lse): for row t of sequence s
// and head h, mass = sum over the block's keys at positions <= the row's position of
// 2^(q.k * scale * log2(e) - lse2). Dense: every block of the sequence; with a selection in
// attn (sel_indptr, sel_blocks, sel_seq_stride; no sel_slots), only the blocks of the row's KV
// head's list, whose masses then sum to one. Written to
// mass[s * mass_seq_stride + t * mass_token_stride + (mass_head_offset + h) * mass_head_stride + b]
// for those blocks b; other entries are left as they are.
// With attn.block_lse set (the attention pass wrote it), the mass is 2^(block_lse - lse) and the
// keys are not read again.
struct BlockMassParams {
  SparseDecodeParams attn;  // q, kv, q_indptr, seq_lens, block_table, shapes, scale, lse (read)
  float* mass = nullptr;
  int64_t mass_seq_stride = 0;
  int64_t mass_token_stride = 0;
  int64_t mass_head_stride = 0;
  int mass_head_offset = 0;
};
void BlockMassRef(const BlockMassParams& p);

// Attention over the keys in segments (a context longer than the GPU holds at once): merges one
// segment's output, normalised over that segment's keys, and its log2-sum-exp
// (SparseDecodeParams::lse) into a float32 accumulator of the segments before it, as the decode
// kernel's splits merge: with m = max(acc_lse, part_lse), a = 2^(acc_lse - m), b = 2^(part_lse - m),
// acc = (a * acc + b * part) / (a + b) and acc_lse = m + log2(a + b). A part_lse of -inf (a row
// that saw no key of the segment) leaves the row as it was. first: the accumulator is the part.
// out (optional): the merged rows as bf16, for the last segment.
struct MergeAttentionParams {
  const uint16_t* part = nullptr;   // [rows][head_dim] bf16 (rows: tokens * heads)
  const float* part_lse = nullptr;  // [rows]
  float* acc = nullptr;             // [rows][head_dim]
  float* acc_lse = nullptr;         // [rows]
  uint16_t* out = nullptr;          // [rows][head_dim] or nullptr
  int rows = 0;
  int head_dim = 0;
  bool first = false;
};
void MergeAttentionRef(const MergeAttentionParams& p);

// y[r][o] = sum_i x[r][i] * w[o][i] + beta * y[r][o] for a few rows (decode steps): the weight
// matrix streamed once at memory speed, where a general GEMM tiles for many rows. in % 8 == 0,
// rows 1..8, 16-byte aligned x and w.
struct GemvParams {
  const uint16_t* w = nullptr;  // [out][in] bf16, as nn.Linear stores it
  const uint16_t* x = nullptr;  // [rows][in] bf16
  float* y = nullptr;           // [rows][out]
  int rows = 0;
  int in = 0;
  int out = 0;
  float beta = 0.0f;
};
void GemvRef(const GemvParams& p);
inline constexpr int kGemvMaxRows = 8;

// Deterministic pseudo-random bf16 values, uniform in [-scale, scale) + offset, element i from a
// hash of (seed, i): the same numbers on the host and the device, whatever the launch shape.
struct RandomFillParams {
  uint16_t* out = nullptr;
  int64_t n = 0;
  uint64_t seed = 0;
  float scale = 1.0f;
  float offset = 0.0f;
};
void RandomFillRef(const RandomFillParams& p);

// The value RandomFill draws for element i, before the bf16 rounding.
SCOUT_HD inline float RandomUniform(uint64_t seed, int64_t i, float scale, float offset) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i);  // splitmix64
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);  // [0, 1), exact
  return (2.0f * u - 1.0f) * scale + offset;
}

}  // namespace scout::kernels
