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

namespace {

bool SameBudget(const runtime::StsBudget& a, const runtime::StsBudget& b) {
  return a.budget_tokens == b.budget_tokens && a.budget_fraction == b.budget_fraction && a.sink_blocks == b.sink_blocks &&
         a.window_blocks == b.window_blocks && a.dense_layers == b.dense_layers;
}

// Whether two streams' rounds are the same launches (see RoundGroup).
bool SameLaunches(const SpeculativeOptions& a, const SpeculativeOptions& b) {
  if (a.head_map != b.head_map || a.draft_head_map != b.draft_head_map || a.santa_samples != b.santa_samples ||
      (a.sampling.temperature == 0) != (b.sampling.temperature == 0)) {
    return false;
  }
  if (a.head_map != nullptr && !SameBudget(a.sts_budget, b.sts_budget)) return false;
  if (a.draft_head_map != nullptr &&
      (!SameBudget(a.draft_budget, b.draft_budget) || a.draft_refresh_rounds != b.draft_refresh_rounds)) {
    return false;
  }
  return true;
}

}  // namespace

std::vector<RoundGroup> PlanRoundGroups(std::span<const StreamRound> streams) {
  int max_k = 0;
  for (const StreamRound& s : streams) max_k = std::max(max_k, s.k);
  std::vector<RoundGroup> groups;
  for (int i = 0; i < static_cast<int>(streams.size()); ++i) {
    const StreamRound& s = streams[i];
    const bool own_k = s.room < max_k || s.k == 0;
    auto g = std::find_if(groups.begin(), groups.end(), [&](const RoundGroup& x) {
      return x.own_k == own_k && (!own_k || x.k == s.k) && SameLaunches(*streams[x.members[0]].options, *s.options);
    });
    if (g == groups.end()) {
      groups.push_back({.k = s.k, .own_k = own_k});
      g = groups.end() - 1;
    }
    g->members.push_back(i);
    g->k = std::max(g->k, s.k);
  }
  return groups;
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
