// The one shape of a step's block lists, from the selection kernel through the prefetch planner
// to the attention kernels: a batch's lists, flat, with a view that kernel parameters are built
// from. One sequence's lists are a batch of one.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace scout::kvstore {

// Sequence s of the batch, layer l, KV head h reads the ascending logical blocks
// blocks[indptr[u] .. indptr[u + 1]), u = (s * num_layers + l) * num_kv_heads + h. Optionally
// `slots`, parallel to blocks: the unit of a GPU block cache each listed block is read from (the
// host KV tier fills them when it plans a step).
struct Selection {
  int num_seqs = 1;
  int num_layers = 0;
  int num_kv_heads = 0;
  std::vector<int32_t> indptr;  // [num_seqs * num_layers * num_kv_heads + 1]
  std::vector<int32_t> blocks;
  std::vector<int32_t> slots;   // empty, or parallel to blocks

  int num_lists() const { return num_seqs * num_layers * num_kv_heads; }
  int List(int seq, int layer, int head) const { return (seq * num_layers + layer) * num_kv_heads + head; }
  int MaxList() const {
    int most = 0;
    for (size_t u = 0; u + 1 < indptr.size(); ++u) most = std::max(most, indptr[u + 1] - indptr[u]);
    return most;
  }
};

// A Selection where it lies (host or device memory), not owned, with the sizes a kernel's plan
// takes: what the attention kernels' list parameters are built from (the CUDA backend's
// SetLists), and how lists made on the GPU (kernels::BlockSelect) are handed to a step.
struct SelectionView {
  const int32_t* indptr = nullptr;
  const int32_t* blocks = nullptr;
  const int32_t* slots = nullptr;  // optional
  int num_seqs = 0;
  int num_layers = 0;
  int num_kv_heads = 0;
  int max_list_blocks = 0;  // longest list
  // Lists may name blocks below this bound past a sequence's end (a window sized for the last of
  // several steps): they hold no visible key and are skipped by the causal mask. 0: none.
  int block_bound = 0;

  // Entries of indptr between one sequence's lists and the next's.
  int seq_stride() const { return num_layers * num_kv_heads; }
  // Layer l's lists of every sequence start here (stride seq_stride()); head_offset picks a
  // tensor-parallel shard's first KV head.
  const int32_t* layer_indptr(int layer, int head_offset = 0) const {
    return indptr + static_cast<int64_t>(layer) * num_kv_heads + head_offset;
  }
};

inline SelectionView ViewOf(const Selection& s) {
  return {.indptr = s.indptr.data(), .blocks = s.blocks.data(), .slots = s.slots.empty() ? nullptr : s.slots.data(),
          .num_seqs = s.num_seqs, .num_layers = s.num_layers, .num_kv_heads = s.num_kv_heads,
          .max_list_blocks = s.MaxList()};
}

}  // namespace scout::kvstore
