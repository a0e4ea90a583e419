#include "eval/fidelity.h"

#include <filesystem>

#include "gtest/gtest.h"
#include "runtime/cpu_model.h"
#include "runtime/sts.h"
#include "runtime/test_model.h"

namespace scout::eval {
namespace {

using namespace scout::runtime;  // the backends and selections the fixture runs on

const std::filesystem::path kModels = std::filesystem::path(SCOUT_SOURCE_DIR) / "models";

// The fixture pair on 701 tokens of a repeated loop: what the fidelity tests run on.
struct FidelityFixture {
  std::unique_ptr<CpuModel> target, draft;
  std::vector<int32_t> ids = {256};
  HeadMap map;
  FidelityFixture() {
    auto t = CpuModel::Load(kModels / "scout-tiny-target");
    auto d = CpuModel::Load(kModels / "scout-tiny-draft");
    EXPECT_TRUE(t.ok() && d.ok());
    if (!t.ok() || !d.ok()) return;
    target = std::move(*t);
    draft = std::move(*d);
    for (int i = 0; i < 700; ++i) ids.push_back("for i in range(10):\n    print(i * i)\n"[i % 37]);
    map = DefaultHeadMap(target->config(), draft->config());
  }
};

// At a budget of the whole context every method reads every block: the same perplexity as
// dense, recall 1, Jaccard 1. Smaller budgets read fewer blocks.
TEST(FidelityTest, FullBudgetEqualsDense) {
  FidelityFixture f;
  ASSERT_TRUE(f.target != nullptr && f.draft != nullptr);
  CpuModel& target = *f.target;
  CpuModel& draft = *f.draft;
  const std::vector<int32_t>& ids = f.ids;
  const HeadMap& map = f.map;
  auto rows = RunFidelity(target, draft, map, ids,
                          {.context_tokens = 600, .eval_tokens = 40, .budgets = {1.0, 0.1}});
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->size(), 9u);
  const FidelityRow& dense = rows->front();
  for (size_t i = 1; i <= 4; ++i) {
    const FidelityRow& r = (*rows)[i];
    EXPECT_NEAR(r.perplexity, dense.perplexity, 1e-9 * dense.perplexity) << r.method;
    EXPECT_NEAR(r.recall, 1.0, 1e-5) << r.method;
    EXPECT_NEAR(r.jaccard_oracle, 1.0, 1e-12) << r.method;
  }
  for (size_t i = 5; i < 9; ++i) EXPECT_LT((*rows)[i].blocks_read, 0.3) << (*rows)[i].method;
  EXPECT_EQ(RunFidelity(target, draft, map, ids, {.context_tokens = 600, .eval_tokens = 400}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(FidelityTest, SantaVariantsRunAndConvergeToTheirExactMethod) {
  FidelityFixture f;
  ASSERT_TRUE(f.target != nullptr && f.draft != nullptr);
  CpuModel& target = *f.target;
  CpuModel& draft = *f.draft;
  const std::vector<int32_t>& ids = f.ids;
  const HeadMap& map = f.map;
  FidelityOptions o{.context_tokens = 600, .eval_tokens = 40, .budgets = {0.1},
                    .methods = {"dense+santa", "sts", "sts+santa"}};
  o.santa_samples = 4096;  // far more samples than keys: the estimate is all but exact
  auto many = RunFidelity(target, draft, map, ids, o);
  ASSERT_TRUE(many.ok()) << many.status();
  ASSERT_EQ(many->size(), 4u);
  const double dense = (*many)[0].perplexity;
  EXPECT_NEAR((*many)[1].perplexity, dense, 1e-3 * dense);                         // dense+santa
  EXPECT_NEAR((*many)[3].perplexity, (*many)[2].perplexity, 1e-3 * (*many)[2].perplexity);  // sts+santa vs sts
  o.santa_samples = 4;  // few samples: a visible cost
  auto few = RunFidelity(target, draft, map, ids, o);
  ASSERT_TRUE(few.ok());
  EXPECT_GT((*few)[1].perplexity, dense * 1.001);
  o.methods = {"dense"};
  EXPECT_EQ(RunFidelity(target, draft, map, ids, o).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace scout::eval
