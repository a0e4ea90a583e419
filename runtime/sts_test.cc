#include "runtime/sts.h"

#include <fstream>
#include <random>
#include <set>

#include "gtest/gtest.h"
#include "runtime/cpu_model.h"
#include "runtime/test_model.h"

namespace scout::runtime {
namespace {

const std::filesystem::path kModels = std::filesystem::path(SCOUT_SOURCE_DIR) / "models";

TEST(StsSelectionTest, AlwaysHoldsSinksAndWindowWithinBudget) {
  auto target = LoadModelConfig(kModels / "scout-tiny-target");
  auto draft = LoadModelConfig(kModels / "scout-tiny-draft");
  ASSERT_TRUE(target.ok() && draft.ok());
  HeadMap map = DefaultHeadMap(*target, *draft);
  ASSERT_EQ(map.units.size(), 12u);  // 6 layers x 2 KV heads
  EXPECT_EQ(map.units[11], (std::vector<int32_t>{9, 10, 11}));  // target layer 5 -> draft layer 3
  std::mt19937 rng(5);
  std::exponential_distribution<float> expo(1.0f);
  for (int64_t nb : {1, 3, 6, 40, 257}) {
    for (double frac : {0.02, 0.1, 0.5, 1.0}) {
      const int rows = 4;
      const int64_t mass_blocks = std::max<int64_t>(1, nb - 1);  // the draft saw one block less
      std::vector<float> mass(12 * rows * mass_blocks);
      for (float& m : mass) m = expo(rng);
      StsBudget budget{.budget_fraction = frac, .sink_blocks = 1, .window_blocks = 4};
      kvstore::Selection sel = BuildStsSelection(map, mass, rows, mass_blocks, nb, budget);
      ASSERT_EQ(sel.indptr.size(), 13u);
      for (int u = 0; u < 12; ++u) {
        std::vector<int32_t> list(sel.blocks.begin() + sel.indptr[u], sel.blocks.begin() + sel.indptr[u + 1]);
        ASSERT_TRUE(std::is_sorted(list.begin(), list.end()));
        std::set<int32_t> set(list.begin(), list.end());
        ASSERT_EQ(set.size(), list.size());
        EXPECT_EQ(static_cast<int64_t>(list.size()), BudgetBlocks(budget, nb));
        EXPECT_TRUE(set.count(0)) << "sink missing";
        for (int64_t b = std::max<int64_t>(0, nb - 4); b < nb; ++b) EXPECT_TRUE(set.count(b)) << "window block " << b;
      }
    }
  }
}

TEST(StsSelectionTest, DenseLayersReadEveryBlockAndTheRestAreUnchanged) {
  auto target = LoadModelConfig(kModels / "scout-tiny-target");
  auto draft = LoadModelConfig(kModels / "scout-tiny-draft");
  ASSERT_TRUE(target.ok() && draft.ok());
  const HeadMap map = DefaultHeadMap(*target, *draft);
  std::mt19937 rng(9);
  std::exponential_distribution<float> expo(1.0f);
  const int rows = 5;
  const int64_t nb = 100;
  std::vector<float> mass(12 * rows * nb);
  for (float& m : mass) m = expo(rng);
  StsBudget sparse{.budget_fraction = 0.1};
  StsBudget dense2 = sparse;
  dense2.dense_layers = *ParseDenseLayers("0,1");
  const kvstore::Selection a = BuildStsSelection(map, mass, rows, nb, nb, sparse);
  const kvstore::Selection b = BuildStsSelection(map, mass, rows, nb, nb, dense2);
  for (int u = 0; u < 12; ++u) {
    std::vector<int32_t> la(a.blocks.begin() + a.indptr[u], a.blocks.begin() + a.indptr[u + 1]);
    std::vector<int32_t> lb(b.blocks.begin() + b.indptr[u], b.blocks.begin() + b.indptr[u + 1]);
    if (u / 2 < 2) {  // layers 0 and 1 of 2 KV heads each
      ASSERT_EQ(static_cast<int64_t>(lb.size()), nb);
      for (int64_t i = 0; i < nb; ++i) EXPECT_EQ(lb[i], i);
    } else {
      EXPECT_EQ(la, lb) << "unit " << u;
    }
  }
  // Window and oracle lists follow the same rule.
  const kvstore::Selection w = BuildWindowSelection(*target, nb, dense2);
  EXPECT_EQ(w.indptr[1] - w.indptr[0], nb);
  EXPECT_EQ(w.indptr[5] - w.indptr[4], BudgetBlocks(dense2, nb));
  // Negative indices count from the last layer.
  StsBudget last = sparse;
  last.dense_layers = *ParseDenseLayers("-1");
  EXPECT_TRUE(last.IsDenseLayer(5, 6));
  EXPECT_FALSE(last.IsDenseLayer(0, 6));
  const kvstore::Selection l = BuildStsSelection(map, mass, rows, nb, nb, last);
  EXPECT_EQ(l.indptr[12] - l.indptr[11], nb);
  EXPECT_EQ(l.indptr[11] - l.indptr[10], nb);
  EXPECT_EQ(l.indptr[10] - l.indptr[9], BudgetBlocks(last, nb));
  EXPECT_FALSE(ParseDenseLayers("0,x").ok());
}

TEST(HeadMapTest, RoundTripsAndRejectsMismatchedFiles) {
  auto target = LoadModelConfig(kModels / "scout-tiny-target");
  auto draft = LoadModelConfig(kModels / "scout-tiny-draft");
  ASSERT_TRUE(target.ok() && draft.ok());
  std::filesystem::path dir = testing::FreshDir("maps");
  HeadMap map = DefaultHeadMap(*target, *draft);
  map.units[3] = {0, 7};
  ASSERT_TRUE(SaveHeadMap(dir / "ok.json", map).ok());
  absl::StatusOr<HeadMap> back = LoadHeadMap(dir / "ok.json", *target, *draft);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->units, map.units);
  // Swapped models: the file's target shape does not match.
  absl::StatusOr<HeadMap> swapped = LoadHeadMap(dir / "ok.json", *draft, *target);
  EXPECT_EQ(swapped.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(swapped.status().message().find("ok.json"), std::string::npos);
  EXPECT_NE(swapped.status().message().find("\"target\""), std::string::npos) << swapped.status();
  // A head id past the draft's, and a missing field.
  map.units[0] = {12};
  ASSERT_TRUE(SaveHeadMap(dir / "range.json", map).ok());
  EXPECT_NE(LoadHeadMap(dir / "range.json", *target, *draft).status().message().find("draft head 12"), std::string::npos);
  std::ofstream(dir / "partial.json") << R"({"target": {"layers": 6, "kv_heads": 2}})";
  EXPECT_EQ(LoadHeadMap(dir / "partial.json", *target, *draft).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadHeadMap(dir / "missing.json", *target, *draft).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace scout::runtime
