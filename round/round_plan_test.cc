#include "round/round_plan.h"

#include "gtest/gtest.h"
#include "kernels/block_select.h"

namespace scout::round {
namespace {

// Without dense layers the lists are BlockSelect's own offsets; a dense layer's lists hold every
// block; short contexts are capped at their blocks.
TEST(RoundPlanTest, ListOffsetsFollowBudgetsAndDenseLayers) {
  const std::vector<int32_t> nb = {3, 100, 1000};
  runtime::StsBudget budget{.budget_fraction = 0.1, .sink_blocks = 1, .window_blocks = 4};
  // Per-stream budgets of a fraction differ; SelectionOffsets takes one budget, so compare stream by stream.
  const std::vector<int32_t> off = StsListOffsets(nb, 2, 3, budget, 4);
  ASSERT_EQ(off.size(), 3u * 2 * 3 + 1);
  for (size_t s = 0; s < nb.size(); ++s) {
    const std::vector<int32_t> want = kernels::SelectionOffsets(
        {nb[s]}, 6, static_cast<int>(runtime::BudgetBlocks(budget, nb[s])), 1, 4);
    for (int u = 0; u < 6; ++u) EXPECT_EQ(off[s * 6 + u + 1] - off[s * 6 + u], want[u + 1] - want[u]) << s << " " << u;
  }
  EXPECT_EQ(off[1] - off[0], 3);      // capped at the context
  EXPECT_EQ(off[7] - off[6], 10);     // 10% of 100
  EXPECT_EQ(off[13] - off[12], 100);  // 10% of 1000
  budget.dense_layers = {-1};
  const std::vector<int32_t> dense = StsListOffsets(nb, 2, 3, budget, 4);
  for (int h = 0; h < 3; ++h) {
    EXPECT_EQ(dense[2 * 6 + 3 + h + 1] - dense[2 * 6 + 3 + h], 1000);  // stream 2, layer 1: every block
    EXPECT_EQ(dense[2 * 6 + h + 1] - dense[2 * 6 + h], 100);           // layer 0 as before
  }
  // A wider window raises short budgets to sinks + window.
  const std::vector<int32_t> wide = StsListOffsets({100}, 1, 1, {.budget_tokens = 16, .sink_blocks = 1}, 9);
  EXPECT_EQ(wide[1], 10);
}

TEST(RoundPlanTest, WindowReachesEveryStreamsNewTokens) {
  const runtime::StsBudget budget{.window_blocks = 4};
  // 5 new tokens at 160 (block 10): blocks after the pass 11; the window of 4 covers 7..10.
  EXPECT_EQ(VerifyWindowBlocks(budget, {160}, {11}), 4);
  // 80 new tokens from 100 (blocks 6..11): 12 blocks after, the window must reach back 6 blocks.
  EXPECT_EQ(VerifyWindowBlocks(budget, {160, 100}, {11, 12}), 6);
}

// Refresh every R rounds, at once for other streams or another map, and early when a stream's
// draft outgrows the blocks its lists cover.
TEST(RoundPlanTest, SparseDraftRefreshesOnSchedule) {
  SparseDraftPlan p;
  const std::vector<std::vector<int32_t>> map = {{0, 1}, {2, 3}}, other = {{0}, {1}};
  EXPECT_TRUE(p.StartRound({1, 2}, map, {1000, 2000}, 4, 4));
  // 4 rounds of 5 tokens: 20 tokens, 2 blocks, plus one.
  EXPECT_EQ(p.ahead_blocks(), 3);
  EXPECT_EQ(p.bound(), (std::vector<int32_t>{63 + 3, 125 + 3}));
  EXPECT_EQ(p.max_bound(), 128);
  EXPECT_FALSE(p.StartRound({1, 2}, map, {1005, 2005}, 4, 4));
  EXPECT_FALSE(p.StartRound({1, 2}, map, {1010, 2010}, 4, 4));
  EXPECT_FALSE(p.StartRound({1, 2}, map, {1015, 2015}, 4, 4));
  EXPECT_TRUE(p.StartRound({1, 2}, map, {1020, 2020}, 4, 4));  // the fourth round after
  EXPECT_TRUE(p.StartRound({2, 1}, map, {2025, 1025}, 4, 4));  // the batch changed order
  EXPECT_TRUE(p.StartRound({2, 1}, other, {2030, 1030}, 4, 4));
  EXPECT_FALSE(p.StartRound({2, 1}, other, {2030, 1030}, 4, 4));
  EXPECT_TRUE(p.StartRound({2, 1}, other, {2030 + 4 * 16, 1030}, 4, 4));  // past its bound (130 blocks)
  p.Invalidate();
  EXPECT_TRUE(p.StartRound({2, 1}, other, {2100, 1030}, 4, 4));
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(p.StartRound({2, 1}, other, {2100, 1030}, 1, 4));  // every round
}

}  // namespace
}  // namespace scout::round
