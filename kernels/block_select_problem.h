// Test and benchmark helper: random block-selection problems (block_select.h layout).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/block_select.h"

namespace scout::kernels {

struct SelectProblem {
  std::vector<float> mass;
  std::vector<int32_t> num_blocks, map_indptr, map_heads, out_indptr, out_blocks;
  BlockSelectParams p;
};

// Masses are multiples of 1/256 when `quantized` (exact float sums, many ties), else continuous.
// Each unit maps to 1..max_heads_per_unit distinct draft heads.
inline SelectProblem MakeSelectProblem(std::vector<int32_t> num_blocks, int positions, int draft_heads, int units,
                                       int budget, int sinks, int window, int max_heads_per_unit, bool quantized,
                                       uint32_t seed) {
  SelectProblem pr;
  std::mt19937 rng(seed);
  pr.num_blocks = num_blocks;
  const int max_blocks = *std::max_element(num_blocks.begin(), num_blocks.end());
  pr.mass.resize(num_blocks.size() * positions * draft_heads * size_t(max_blocks));
  std::exponential_distribution<float> expo(1.0f);  // heavy-ish tail: a few blocks dominate
  for (float& m : pr.mass) {
    float x = expo(rng);
    m = quantized ? std::floor(x * 4.0f) / 256.0f : x * x;
  }
  pr.map_indptr.push_back(0);
  for (int u = 0; u < units; ++u) {
    int n = std::uniform_int_distribution<int>(1, max_heads_per_unit)(rng);
    std::vector<int32_t> heads(draft_heads);
    for (int i = 0; i < draft_heads; ++i) heads[i] = i;
    std::shuffle(heads.begin(), heads.end(), rng);
    pr.map_heads.insert(pr.map_heads.end(), heads.begin(), heads.begin() + std::min(n, draft_heads));
    pr.map_indptr.push_back(static_cast<int32_t>(pr.map_heads.size()));
  }
  pr.out_indptr = SelectionOffsets(num_blocks, units, budget, sinks, window);
  pr.out_blocks.assign(pr.out_indptr.back(), -1);
  pr.p = {.mass = pr.mass.data(), .num_blocks = pr.num_blocks.data(), .map_indptr = pr.map_indptr.data(),
          .map_heads = pr.map_heads.data(), .out_indptr = pr.out_indptr.data(), .out_blocks = pr.out_blocks.data(),
          .num_seqs = static_cast<int>(num_blocks.size()), .num_positions = positions,
          .num_draft_heads = draft_heads, .max_blocks = max_blocks, .num_units = units,
          .budget_blocks = budget, .sink_blocks = sinks, .window_blocks = window};
  return pr;
}

}  // namespace scout::kernels
