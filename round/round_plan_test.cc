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

// Streams group by what their launches share; a stream near its context limit, or proposing
// nothing, drafts alone with its own k; the others draft the group's largest k.
TEST(RoundPlanTest, StreamsGroupByTheirLaunches) {
  runtime::HeadMap map, other_map;
  SpeculativeOptions dense{.num_speculative_tokens = 4};
  SpeculativeOptions sts{.num_speculative_tokens = 4, .head_map = &map, .sts_budget = {.budget_fraction = 0.1}};
  SpeculativeOptions sts_b = sts, sts_other_budget = sts, sts_other_map = sts, sampled = dense, santa = sts;
  sts_other_budget.sts_budget.budget_fraction = 0.2;
  sts_other_map.head_map = &other_map;
  sampled.sampling.temperature = 0.7f;
  santa.santa_samples = 256;
  SpeculativeOptions sd = sts;
  sd.draft_head_map = &map;
  SpeculativeOptions sd_other_interval = sd;
  sd_other_interval.draft_refresh_rounds = 4;
  const std::vector<StreamRound> streams = {
      {.options = &dense, .k = 4, .room = 1000},           // 0
      {.options = &sts, .k = 4, .room = 1000},             // 1
      {.options = &sts_b, .k = 2, .room = 1000},           // 2: same launches as 1, proposes 2
      {.options = &sts_other_budget, .k = 4, .room = 1000},  // 3
      {.options = &sts_other_map, .k = 4, .room = 1000},   // 4
      {.options = &sampled, .k = 4, .room = 1000},         // 5
      {.options = &santa, .k = 4, .room = 1000},           // 6
      {.options = &sd, .k = 4, .room = 1000},              // 7
      {.options = &sd_other_interval, .k = 4, .room = 1000},  // 8
      {.options = &sts, .k = 3, .room = 3},                // 9: 3 tokens of room left
      {.options = &sts, .k = 0, .room = 0},                // 10: the target only checks its pending token
      {.options = &dense, .k = 4, .room = 500},            // 11: joins 0
  };
  const std::vector<RoundGroup> g = PlanRoundGroups(streams);
  ASSERT_EQ(g.size(), 10u);
  EXPECT_EQ(g[0].members, (std::vector<int>{0, 11}));
  EXPECT_EQ(g[1].members, (std::vector<int>{1, 2}));
  EXPECT_EQ(g[1].k, 4);
  for (size_t i = 2; i < 8; ++i) EXPECT_EQ(g[i].members.size(), 1u) << i;
  EXPECT_EQ(g[8].members, (std::vector<int>{9}));
  EXPECT_TRUE(g[8].own_k);
  EXPECT_EQ(g[8].k, 3);
  EXPECT_EQ(g[9].members, (std::vector<int>{10}));
  EXPECT_EQ(g[9].k, 0);
  EXPECT_TRUE(PlanRoundGroups({}).empty());
}

}  // namespace
}  // namespace scout::round
