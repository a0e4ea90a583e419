// STS block selection: the draft's attention, summed per 16-token block, picks for every target
// (layer, KV head) the KV blocks its sparse attention reads. Shared by the C++ reference below
// and the CUDA kernel in block_select.cuh.
#pragma once

#include <cstdint>
#include <vector>

namespace scout::kernels {

// Unit u is one target (layer, KV head). Its score for block b of sequence s is
//   max over draft positions p of  sum over draft heads d in map(u) of  mass[s][p][d][b],
// the soft union over the k speculative positions of the mapped heads' attention on that block.
// The list keeps the first sink_blocks and the last window_blocks blocks, then fills up to
// budget_blocks with the highest scores (ties to the lower block index), sorted ascending.
struct BlockSelectParams {
  const float* mass = nullptr;          // [num_seqs][num_positions][num_draft_heads][max_blocks]
  const int32_t* num_blocks = nullptr;  // [num_seqs] blocks in each sequence's context
  const int32_t* map_indptr = nullptr;  // [num_units + 1]
  const int32_t* map_heads = nullptr;   // draft head indices (layer * heads + head), per unit
  const int32_t* out_indptr = nullptr;  // [num_seqs * num_units + 1], from SelectionOffsets
  int32_t* out_blocks = nullptr;        // lists of (seq, unit) at out_indptr[s * num_units + u]
  int num_seqs = 0;
  int num_positions = 0;
  int num_draft_heads = 0;
  int max_blocks = 0;
  int num_units = 0;
  int budget_blocks = 0;                // total per list, sinks and window included
  int sink_blocks = 1;
  int window_blocks = 4;
};

// List sizes are min(num_blocks[s], max(budget, sinks + window)): fixed per sequence, so the
// offsets are known on the host before any kernel runs.
std::vector<int32_t> SelectionOffsets(const std::vector<int32_t>& num_blocks, int num_units, int budget_blocks,
                                      int sink_blocks, int window_blocks);

// Plain C++ reference.
void BlockSelectRef(const BlockSelectParams& p);

// Sums token-level attention probabilities [rows][context] into block masses [rows][max_blocks]
// (blocks past the context are zero): the reference for what the draft's attention pass writes
// (kernels::BlockMass, from each block's log-sum-exp) in its tests.
void BlockMassFromProbs(const float* probs, int rows, int context, int max_blocks, float* mass);

}  // namespace scout::kernels
