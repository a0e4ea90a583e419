#include "round/round_plan.h"

#include <algorithm>

#include "kvstore/block_table.h"

namespace scout::round {

std::vector<int32_t> StsListOffsets(const std::vector<int32_t>& nb, int layers, int kv_heads,
                                    const runtime::StsBudget& budget, int window_blocks) {
  std::vector<int32_t> off{0};
  for (int32_t n : nb) {
    const int32_t len = static_cast<int32_t>(
        std::min<int64_t>(n, std::max<int64_t>(runtime::BudgetBlocks(budget, n), budget.sink_blocks + window_blocks)));
    for (int l = 0; l < layers; ++l) {
      const int32_t unit_len = budget.IsDenseLayer(l, layers) ? n : len;
      for (int h = 0; h < kv_heads; ++h) off.push_back(off.back() + unit_len);
    }
  }
  return off;
}

int VerifyWindowBlocks(const runtime::StsBudget& budget, const std::vector<int64_t>& first_new,
                       const std::vector<int32_t>& nb) {
  int window = budget.window_blocks;
  for (size_t s = 0; s < nb.size(); ++s) {
    window = std::max<int>(window, nb[s] - static_cast<int>(first_new[s] / kvstore::kBlockSize));
  }
  return window;
}

bool SparseDraftPlan::StartRound(const std::vector<kvstore::SequenceId>& seqs,
                                 const std::vector<std::vector<int32_t>>& map_units, const std::vector<int32_t>& draft_end,
                                 int refresh_rounds, int k) {
  bool refresh = !valid_ || seqs != seqs_ || map_units != map_units_ || rounds_since_ + 1 >= refresh_rounds;
  for (size_t s = 0; s < draft_end.size() && !refresh; ++s) refresh = kvstore::BlocksFor(draft_end[s]) > bound_[s];
  if (!refresh) {
    ++rounds_since_;
    return false;
  }
  // Each round adds at most k + 1 tokens to a stream's draft.
  ahead_ = static_cast<int>(kvstore::BlocksFor(int64_t{std::max(refresh_rounds, 1)} * (k + 1))) + 1;
  valid_ = true;
  seqs_ = seqs;
  map_units_ = map_units;
  rounds_since_ = 0;
  bound_.resize(draft_end.size());
  for (size_t s = 0; s < draft_end.size(); ++s) bound_[s] = static_cast<int32_t>(kvstore::BlocksFor(draft_end[s])) + ahead_;
  max_bound_ = bound_.empty() ? 0 : *std::max_element(bound_.begin(), bound_.end());
  return true;
}

}  // namespace scout::round
