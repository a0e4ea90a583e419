#include "kvstore/block_table.h"

#include <map>
#include <random>
#include <set>

#include "gtest/gtest.h"
#include "kvstore/kv_pool.h"

namespace scout::kvstore {
namespace {

TEST(BlockAllocatorTest, ExhaustionIsCleanAndAllOrNothing) {
  BlockAllocator a(4);
  std::vector<int32_t> ids;
  ASSERT_TRUE(a.AllocateMany(3, &ids).ok());
  absl::Status s = a.AllocateMany(2, &ids);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("need 2 blocks, 1 of 4 free"), std::string::npos) << s;
  EXPECT_EQ(ids.size(), 3u);
  EXPECT_EQ(a.num_free(), 1);
  EXPECT_EQ(a.Free(ids[0]).code(), absl::StatusCode::kOk);
  EXPECT_EQ(a.Free(ids[0]).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(a.Free(7).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(a.Free(-1).code(), absl::StatusCode::kOutOfRange);
}

// The lowest free ids go first, so a sequence's blocks come in ascending runs even after churn;
// pools of any size (a partial last word of the free bit set included) hand out every id once.
TEST(BlockAllocatorTest, HandsOutTheLowestFreeIdsFirst) {
  BlockAllocator a(200);
  std::vector<int32_t> ids;
  ASSERT_TRUE(a.AllocateMany(150, &ids).ok());
  for (int32_t i = 0; i < 150; ++i) ASSERT_EQ(ids[i], i);
  for (int32_t id : {120, 7, 64, 8, 63}) ASSERT_TRUE(a.Free(id).ok());
  std::vector<int32_t> again;
  ASSERT_TRUE(a.AllocateMany(7, &again).ok());
  EXPECT_EQ(again, (std::vector<int32_t>{7, 8, 63, 64, 120, 150, 151}));
  EXPECT_TRUE(a.is_allocated(151));
  EXPECT_FALSE(a.is_allocated(152));
  std::vector<int32_t> rest;
  ASSERT_TRUE(a.AllocateMany(48, &rest).ok());
  EXPECT_EQ(rest.front(), 152);
  EXPECT_EQ(rest.back(), 199);
  EXPECT_EQ(a.num_free(), 0);
  EXPECT_EQ(a.Allocate().status().code(), absl::StatusCode::kResourceExhausted);
  BlockAllocator empty(0);
  EXPECT_EQ(empty.Allocate().status().code(), absl::StatusCode::kResourceExhausted);
}

// Random operation sequences against a plain map of sequence -> length (leveldb's ModelDB
// pattern). After every step: each table has exactly ceil(len/16) blocks, no block belongs to two
// sequences, and allocator counts add up.
TEST(BlockTableManagerTest, MatchesModelOnRandomOperations) {
  for (uint32_t seed = 1; seed <= 20; ++seed) {
    std::mt19937 rng(seed);
    const int32_t kBlocks = 64;
    BlockTableManager m(kBlocks);
    std::map<SequenceId, int64_t> model;
    for (int step = 0; step < 2000; ++step) {
      int op = std::uniform_int_distribution<int>(0, 9)(rng);
      SequenceId id = std::uniform_int_distribution<SequenceId>(0, 7)(rng);
      bool known = model.count(id) > 0;
      int64_t used = 0;
      for (auto& [sid, len] : model) used += BlocksFor(len);
      if (op <= 1) {
        absl::Status s = m.AddSequence(id);
        EXPECT_EQ(s.ok(), !known) << s;
        if (!known) model[id] = 0;
      } else if (op <= 5) {
        int64_t add = std::uniform_int_distribution<int64_t>(0, 70)(rng);
        int64_t target = (known ? model[id] : 0) + add;
        absl::Status s = m.Grow(id, target);
        if (!known) {
          EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
        } else {
          bool fits = used - BlocksFor(model[id]) + BlocksFor(target) <= kBlocks;
          EXPECT_EQ(s.ok(), fits) << s;
          if (!fits) {
            EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
          }
          if (fits) model[id] = target;
        }
      } else if (op <= 7) {
        int64_t len = known ? model[id] : 0;
        int64_t target = std::uniform_int_distribution<int64_t>(0, len + 3)(rng);
        absl::Status s = m.Truncate(id, target);
        if (!known) {
          EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
        } else if (target > len) {
          EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
        } else {
          EXPECT_TRUE(s.ok()) << s;
          model[id] = target;
        }
      } else {
        absl::Status s = m.Release(id);
        EXPECT_EQ(s.ok(), known);
        model.erase(id);
      }
      // Invariants.
      std::set<int32_t> seen;
      int64_t blocks = 0;
      ASSERT_EQ(m.num_sequences(), model.size());
      for (auto& [sid, len] : model) {
        const BlockTable* t = m.Find(sid);
        ASSERT_NE(t, nullptr);
        ASSERT_EQ(t->num_tokens, len);
        ASSERT_EQ(static_cast<int64_t>(t->blocks.size()), BlocksFor(len));
        for (int32_t b : t->blocks) {
          ASSERT_TRUE(seen.insert(b).second) << "block " << b << " shared";
          ASSERT_TRUE(m.allocator().is_allocated(b));
        }
        blocks += BlocksFor(len);
      }
      ASSERT_EQ(m.allocator().num_used(), blocks);
    }
  }
}

TEST(KvPoolTest, LayoutKeepsEachHeadBlockContiguous) {
  auto pool = KvPool::Create({.num_layers = 2, .num_kv_heads = 3, .head_dim = 8, .num_blocks = 5});
  ASSERT_TRUE(pool.ok());
  KvPool& p = **pool;
  EXPECT_EQ(p.values(1, 2, 1) - p.keys(1, 2, 1), kBlockSize * 8);
  EXPECT_EQ(p.keys(1, 2, 2) - p.keys(1, 2, 1), 2 * kBlockSize * 8);
  EXPECT_EQ(p.keys(1, 3, 0) - p.keys(1, 2, 0), p.block_stride());
  EXPECT_EQ(p.keys(1, 0, 0), p.layer(1));
  EXPECT_EQ(p.bytes(), size_t{2} * 5 * 3 * 2 * 16 * 8 * 4);
  EXPECT_EQ(KvPool::Create({.num_layers = 0, .num_kv_heads = 1, .head_dim = 8, .num_blocks = 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace scout::kvstore
