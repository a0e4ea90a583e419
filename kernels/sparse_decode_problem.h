// Test and benchmark helper: random decode-attention problems in the layout of sparse_decode.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/bf16.h"
#include "kernels/sparse_decode.h"

namespace scout::kernels {

struct DecodeShape {
  std::vector<int> seq_lens;  // per sequence, new tokens included
  std::vector<int> q_tokens;  // per sequence
  int num_heads = 32;
  int num_kv_heads = 8;
  int head_dim = 128;
  // < 0: dense (no lists). Otherwise each (seq, KV head) keeps this fraction of its blocks at
  // random, plus the first block (sink) and the last (the new tokens).
  double keep_fraction = -1;
  bool always_keep_last = true;
  int sliding_window = 0;  // > 0: SparseDecodeParams::sliding_window
  // true: every sequence's blocks scattered over a shuffled pool (a pool after long churn);
  // false: each sequence's blocks in order, one after the other (a session prefilled at once).
  bool shuffle_blocks = true;
};

// Host buffers of one problem. params() points into them.
struct DecodeProblem {
  DecodeShape shape;
  std::vector<uint16_t> q, out, kv;
  std::vector<int32_t> q_indptr, seq_lens, block_table, sel_indptr, sel_blocks;
  int max_blocks_per_seq = 0;
  int num_blocks = 0;
  // Unit-pool form (MakeUnitPool): the listed blocks copied to shuffled slots of unit_kv.
  std::vector<uint16_t> unit_kv;
  std::vector<int32_t> sel_slots;

  SparseDecodeParams params() {
    if (!sel_slots.empty()) {
      SparseDecodeParams p = PagedParams();
      p.kv = unit_kv.data();
      p.sel_slots = sel_slots.data();
      return p;
    }
    return PagedParams();
  }
  SparseDecodeParams PagedParams() {
    return {.q = q.data(), .out = out.data(), .kv = kv.data(), .q_indptr = q_indptr.data(),
            .seq_lens = seq_lens.data(), .block_table = block_table.data(),
            .max_blocks_per_seq = max_blocks_per_seq,
            .sel_indptr = shape.keep_fraction < 0 ? nullptr : sel_indptr.data(),
            .sel_blocks = shape.keep_fraction < 0 ? nullptr : sel_blocks.data(),
            .num_seqs = static_cast<int>(seq_lens.size()), .num_heads = shape.num_heads,
            .num_kv_heads = shape.num_kv_heads, .head_dim = shape.head_dim,
            .scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim)), .sliding_window = shape.sliding_window};
  }
  int total_q_rows() const { return q_indptr.back(); }
  int max_q_tokens() const { return *std::max_element(shape.q_tokens.begin(), shape.q_tokens.end()); }
  int max_list_blocks() const {
    int best = 0;
    if (shape.keep_fraction < 0) {
      for (int len : seq_lens) best = std::max(best, (len + kKvBlockSize - 1) / kKvBlockSize);
    } else {
      for (size_t i = 0; i + 1 < sel_indptr.size(); ++i) best = std::max(best, sel_indptr[i + 1] - sel_indptr[i]);
    }
    return best;
  }
};

// fill_values=false leaves q, out and kv empty: benchmarks allocate and fill them on the device.
inline DecodeProblem MakeDecodeProblem(const DecodeShape& shape, uint32_t seed, bool fill_values = true) {
  DecodeProblem pr;
  pr.shape = shape;
  std::mt19937 rng(seed);
  const int n = static_cast<int>(shape.seq_lens.size());
  pr.seq_lens.assign(shape.seq_lens.begin(), shape.seq_lens.end());
  pr.q_indptr.assign(1, 0);
  for (int s = 0; s < n; ++s) pr.q_indptr.push_back(pr.q_indptr.back() + shape.q_tokens[s]);
  for (int len : shape.seq_lens) pr.max_blocks_per_seq = std::max(pr.max_blocks_per_seq, (len + kKvBlockSize - 1) / kKvBlockSize);
  // Physical blocks: every sequence's blocks scattered over a shuffled pool with a few spare.
  int used = 0;
  for (int len : shape.seq_lens) used += (len + kKvBlockSize - 1) / kKvBlockSize;
  pr.num_blocks = used + 3;
  std::vector<int32_t> ids(pr.num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  if (shape.shuffle_blocks) std::shuffle(ids.begin(), ids.end(), rng);
  pr.block_table.assign(static_cast<size_t>(n) * pr.max_blocks_per_seq, -1);
  int next = 0;
  for (int s = 0; s < n; ++s) {
    for (int b = 0; b < (shape.seq_lens[s] + kKvBlockSize - 1) / kKvBlockSize; ++b) {
      pr.block_table[static_cast<size_t>(s) * pr.max_blocks_per_seq + b] = ids[next++];
    }
  }
  if (shape.keep_fraction >= 0) {
    pr.sel_indptr.assign(1, 0);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (int s = 0; s < n; ++s) {
      const int nb = (shape.seq_lens[s] + kKvBlockSize - 1) / kKvBlockSize;
      for (int h = 0; h < shape.num_kv_heads; ++h) {
        for (int b = 0; b < nb; ++b) {
          const bool keep = b == 0 || (b == nb - 1 && shape.always_keep_last) || u(rng) < shape.keep_fraction;
          if (keep) pr.sel_blocks.push_back(b);
        }
        pr.sel_indptr.push_back(static_cast<int32_t>(pr.sel_blocks.size()));
      }
    }
  }
  if (!fill_values) return pr;
  const size_t rows = static_cast<size_t>(pr.q_indptr.back()) * shape.num_heads * shape.head_dim;
  pr.q.assign(rows, 0);
  pr.out.assign(rows, 0xffff);  // NaN: poisoned until written
  pr.kv.assign(static_cast<size_t>(pr.num_blocks) * shape.num_kv_heads * 2 * kKvBlockSize * shape.head_dim, 0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint16_t& x : pr.q) x = FloatToBf16(1.5f * normal(rng));  // sharper than unit: peaked softmax
  for (uint16_t& x : pr.kv) x = FloatToBf16(normal(rng));
  return pr;
}

// Copies every listed (sequence, KV head, block) unit of a sparse problem into its own slot of a
// unit pool, in shuffled slot order, as the GPU block cache holds them.
inline void MakeUnitPool(DecodeProblem& pr, uint32_t seed) {
  const int hd = pr.shape.head_dim, kvh = pr.shape.num_kv_heads;
  const size_t unit = size_t{2} * kKvBlockSize * hd;
  const size_t n = pr.sel_blocks.size();
  std::vector<int32_t> slots(n + 5);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937(seed));
  pr.sel_slots.assign(slots.begin(), slots.begin() + n);
  pr.unit_kv.assign((n + 5) * unit, FloatToBf16(1e4f));  // unlisted slots: values that would show
  for (size_t s = 0; s + 1 < pr.sel_indptr.size(); ++s) {
    const int seq = static_cast<int>(s) / kvh, h = static_cast<int>(s) % kvh;
    for (int32_t i = pr.sel_indptr[s]; i < pr.sel_indptr[s + 1]; ++i) {
      const int32_t phys = pr.block_table[static_cast<size_t>(seq) * pr.max_blocks_per_seq + pr.sel_blocks[i]];
      const uint16_t* src = pr.kv.data() + (static_cast<size_t>(phys) * kvh + h) * unit;
      std::copy(src, src + unit, pr.unit_kv.begin() + pr.sel_slots[i] * unit);
    }
  }
}

}  // namespace scout::kernels
