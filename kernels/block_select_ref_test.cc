#include <set>

#include "gtest/gtest.h"
#include "kernels/block_select.h"
#include "kernels/block_select_problem.h"

namespace scout::kernels {
namespace {

// A naive float64 formulation: score every block, sort all by (score desc, index asc), keep
// forced blocks first.
std::vector<std::set<int32_t>> NaiveSelect(const SelectProblem& pr) {
  const BlockSelectParams& p = pr.p;
  std::vector<std::set<int32_t>> out;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int nb = p.num_blocks[s];
    for (int u = 0; u < p.num_units; ++u) {
      std::vector<std::pair<double, int>> scored;
      std::set<int32_t> chosen;
      for (int b = 0; b < nb; ++b) {
        if (b < p.sink_blocks || b >= nb - p.window_blocks) {
          chosen.insert(b);
          continue;
        }
        double best = -1e300;
        for (int pos = 0; pos < p.num_positions; ++pos) {
          double sum = 0;
          for (int i = p.map_indptr[u]; i < p.map_indptr[u + 1]; ++i) {
            sum += p.mass[((size_t(s) * p.num_positions + pos) * p.num_draft_heads + p.map_heads[i]) * p.max_blocks + b];
          }
          best = std::max(best, sum);
        }
        scored.push_back({-best, b});
      }
      std::sort(scored.begin(), scored.end());
      const size_t len = p.out_indptr[s * p.num_units + u + 1] - p.out_indptr[s * p.num_units + u];
      for (size_t i = 0; chosen.size() < len; ++i) chosen.insert(scored[i].second);
      out.push_back(chosen);
    }
  }
  return out;
}

TEST(BlockSelectRefTest, MatchesNaiveFormulaAsSets) {
  struct Case {
    std::vector<int32_t> nb;
    int budget, sinks, window;
  };
  const Case cases[] = {{{1}, 4, 1, 4, }, {{5}, 3, 1, 1}, {{17, 40}, 8, 1, 4}, {{1000}, 100, 1, 4},
                        {{300, 7, 64}, 2, 1, 4}, {{513}, 513, 2, 2}};
  uint32_t seed = 1;
  for (const Case& c : cases) {
    // Quantized masses make float and double sums exact, so even ties must agree.
    SelectProblem pr = MakeSelectProblem(c.nb, 4, 12, 6, c.budget, c.sinks, c.window, 3, /*quantized=*/true, seed++);
    BlockSelectRef(pr.p);
    std::vector<std::set<int32_t>> want = NaiveSelect(pr);
    for (size_t list = 0; list + 1 < pr.out_indptr.size(); ++list) {
      std::vector<int32_t> got(pr.out_blocks.begin() + pr.out_indptr[list], pr.out_blocks.begin() + pr.out_indptr[list + 1]);
      ASSERT_TRUE(std::is_sorted(got.begin(), got.end()));
      EXPECT_EQ(std::set<int32_t>(got.begin(), got.end()), want[list]) << "list " << list;
      EXPECT_EQ(std::set<int32_t>(got.begin(), got.end()).size(), got.size()) << "duplicates";
    }
  }
}

TEST(BlockSelectRefTest, PicksTheMappedHeadsHotBlocks) {
  // 2 draft heads, 1 position, 20 blocks. Unit 0 maps to head 1 only; head 1 is hot on blocks 7
  // and 11, head 0 on block 3.
  std::vector<float> mass(2 * 20, 0.01f);
  mass[0 * 20 + 3] = 0.9f;
  mass[1 * 20 + 7] = 0.5f;
  mass[1 * 20 + 11] = 0.4f;
  std::vector<int32_t> nb = {20}, indptr = {0, 1}, heads = {1};
  std::vector<int32_t> off = SelectionOffsets(nb, 1, 5, 1, 2);
  ASSERT_EQ(off.back(), 5);
  std::vector<int32_t> out(5);
  BlockSelectRef({.mass = mass.data(), .num_blocks = nb.data(), .map_indptr = indptr.data(), .map_heads = heads.data(),
                  .out_indptr = off.data(), .out_blocks = out.data(), .num_seqs = 1, .num_positions = 1,
                  .num_draft_heads = 2, .max_blocks = 20, .num_units = 1, .budget_blocks = 5, .sink_blocks = 1,
                  .window_blocks = 2});
  EXPECT_EQ(out, (std::vector<int32_t>{0, 7, 11, 18, 19}));
}

TEST(BlockSelectRefTest, BlockMassSumsEachSixteenTokens) {
  std::vector<float> probs(35);
  for (int i = 0; i < 35; ++i) probs[i] = float(i);
  std::vector<float> mass(4, -1.0f);
  BlockMassFromProbs(probs.data(), 1, 35, 4, mass.data());
  EXPECT_EQ(mass, (std::vector<float>{120.0f, 376.0f, 99.0f, 0.0f}));
}

}  // namespace
}  // namespace scout::kernels
