#include "eval/calibrate.h"

#include <algorithm>

#include "kernels/block_select.h"
#include "eval/fidelity.h"

namespace scout::eval {
namespace {

struct StoredRound {
  int64_t pos, rows, nb;
  std::vector<float> draft_mass, target_mass;
};

// The STS list for one unit whose draft heads are `heads`.
std::vector<int32_t> SelectFor(const StoredRound& r, std::span<const int32_t> heads, int num_draft_heads,
                               const StsBudget& budget) {
  // BlockSelectRef wants [rows][draft heads][nb]; the stored masses are [draft heads][rows][nb].
  std::vector<float> m(static_cast<size_t>(r.rows) * num_draft_heads * r.nb, 0.0f);
  for (int32_t d : heads) {
    for (int64_t row = 0; row < r.rows; ++row) {
      const float* from = r.draft_mass.data() + (d * r.rows + row) * r.nb;
      std::copy(from, from + r.nb, m.begin() + (row * num_draft_heads + d) * r.nb);
    }
  }
  const int32_t nb = static_cast<int32_t>(r.nb);
  const int len = static_cast<int>(BudgetBlocks(budget, r.nb));
  std::vector<int32_t> indptr = {0, static_cast<int32_t>(heads.size())};
  std::vector<int32_t> out_indptr = {0, len};
  std::vector<int32_t> out(len);
  kernels::BlockSelectRef({.mass = m.data(), .num_blocks = &nb, .map_indptr = indptr.data(), .map_heads = heads.data(),
                           .out_indptr = out_indptr.data(), .out_blocks = out.data(), .num_seqs = 1,
                           .num_positions = static_cast<int>(r.rows), .num_draft_heads = num_draft_heads,
                           .max_blocks = nb, .num_units = 1, .budget_blocks = len, .sink_blocks = budget.sink_blocks,
                           .window_blocks = budget.window_blocks});
  return out;
}

}  // namespace

absl::StatusOr<CalibrationReport> CalibrateHeadMap(ModelBackend& target, ModelBackend& draft,
                                                   std::span<const int32_t> ids, const CalibrateOptions& o) {
  const ModelConfig& tc = target.config();
  std::vector<StoredRound> rounds;
  absl::Status walked = WalkRounds(target, draft, ids, o.context_tokens, o.calib_tokens, o.num_speculative_tokens,
                                   [&](const Round& r) {
                                     rounds.push_back({r.pos, r.rows, r.nb, *r.draft_mass, *r.target_mass});
                                     return absl::OkStatus();
                                   });
  if (!walked.ok()) return walked;
  const StsBudget budget{.budget_fraction = o.budget_fraction, .sink_blocks = o.sink_blocks,
                         .window_blocks = o.window_blocks};
  HeadMap def = DefaultHeadMap(tc, draft.config());
  const int num_draft_heads = def.draft_layers * def.draft_heads;
  auto coverage = [&](int layer, int kv_head, std::span<const int32_t> heads) {
    double total = 0;
    for (const StoredRound& sr : rounds) {
      const Round r{.pos = sr.pos, .rows = sr.rows, .nb = sr.nb, .tokens = {}, .draft_mass = &sr.draft_mass,
                    .target_mass = &sr.target_mass, .logits = nullptr};
      total += CapturedMass(tc, r, layer, kv_head, SelectFor(sr, heads, num_draft_heads, budget));
    }
    return total / std::max<size_t>(1, rounds.size());
  };
  CalibrationReport report{.map = def, .unit_recall = {}, .default_recall = {}};
  for (int l = 0; l < def.target_layers; ++l) {
    for (int h = 0; h < def.target_kv_heads; ++h) {
      const int u = l * def.target_kv_heads + h;
      report.default_recall.push_back(coverage(l, h, def.units[u]));
      std::vector<int32_t> chosen;
      double best = -1;
      while (static_cast<int>(chosen.size()) < o.max_heads_per_unit) {
        int32_t best_head = -1;
        double best_with = best;
        for (int32_t d = 0; d < num_draft_heads; ++d) {
          if (std::find(chosen.begin(), chosen.end(), d) != chosen.end()) continue;
          std::vector<int32_t> trial = chosen;
          trial.push_back(d);
          const double c = coverage(l, h, trial);
          if (c > best_with + 1e-4) {
            best_with = c;
            best_head = d;
          }
        }
        if (best_head < 0) break;
        chosen.push_back(best_head);
        best = best_with;
      }
      report.map.units[u] = chosen;
      report.unit_recall.push_back(best);
    }
  }
  return report;
}

}  // namespace scout::eval
