#include <algorithm>
#include <limits>
#include <numeric>

#include "kernels/block_select.h"
#include "kernels/sparse_decode.h"

namespace scout::kernels {

std::vector<int32_t> SelectionOffsets(const std::vector<int32_t>& num_blocks, int num_units, int budget_blocks,
                                      int sink_blocks, int window_blocks) {
  std::vector<int32_t> off(1, 0);
  for (int32_t nb : num_blocks) {
    const int32_t len = std::min(nb, std::max(budget_blocks, sink_blocks + window_blocks));
    for (int u = 0; u < num_units; ++u) off.push_back(off.back() + len);
  }
  return off;
}

void BlockSelectRef(const BlockSelectParams& p) {
  std::vector<float> score;
  std::vector<int32_t> order;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int nb = p.num_blocks[s];
    for (int u = 0; u < p.num_units; ++u) {
      score.assign(nb, 0.0f);
      for (int b = 0; b < nb; ++b) {
        float best = -std::numeric_limits<float>::infinity();
        for (int pos = 0; pos < p.num_positions; ++pos) {
          float sum = 0.0f;
          for (int i = p.map_indptr[u]; i < p.map_indptr[u + 1]; ++i) {
            const int64_t row = (int64_t{s} * p.num_positions + pos) * p.num_draft_heads + p.map_heads[i];
            sum += p.mass[row * p.max_blocks + b];
          }
          best = std::max(best, sum);
        }
        const bool forced = b < p.sink_blocks || b >= nb - p.window_blocks;
        score[b] = forced ? std::numeric_limits<float>::infinity() : best;
      }
      const int32_t begin = p.out_indptr[s * p.num_units + u], len = p.out_indptr[s * p.num_units + u + 1] - begin;
      order.resize(nb);
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + len, order.end(), [&](int32_t a, int32_t b) {
        return score[a] > score[b] || (score[a] == score[b] && a < b);
      });
      std::sort(order.begin(), order.begin() + len);
      std::copy(order.begin(), order.begin() + len, p.out_blocks + begin);
    }
  }
}

void BlockMassFromProbs(const float* probs, int rows, int context, int max_blocks, float* mass) {
  for (int r = 0; r < rows; ++r) {
    float* m = mass + int64_t{r} * max_blocks;
    std::fill(m, m + max_blocks, 0.0f);
    for (int t = 0; t < context; ++t) m[t / kKvBlockSize] += probs[int64_t{r} * context + t];
  }
}

}  // namespace scout::kernels
