// The scheduling policy without a model: admission by batch room and by KV, eviction order and
// triggers, and what a failed pass does to the requests in it.
#include "scheduler/policy.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/backend.h"

namespace scout::scheduler::policy {
namespace {

TEST(PolicyTest, AdmitsInArrivalOrderWithinRoomAndOneRequestASession) {
  const std::vector<std::string> waiting = {"a", "", "a", "busy", "b", "", ""};
  auto busy = [](const std::string& s) { return s == "busy"; };
  // The second "a" waits behind the first; "busy" waits for its running request; one-offs go.
  EXPECT_EQ(AdmitInOrder(waiting, 10, busy), (std::vector<size_t>{0, 1, 4, 5, 6}));
  EXPECT_EQ(AdmitInOrder(waiting, 3, busy), (std::vector<size_t>{0, 1, 4}));
  EXPECT_TRUE(AdmitInOrder(waiting, 0, busy).empty());
  EXPECT_TRUE(AdmitInOrder({}, 4, busy).empty());
}

TEST(PolicyTest, KvAdmissionWaitsForRunningRequestsOrEvictsWhenNothingRuns) {
  // Fits in what the running requests leave: starts.
  EXPECT_EQ(AdmitByKv({.need = 4, .free_blocks = 10, .reserved = 6, .others_running = true}), KvAdmission::kStart);
  // Fits in the free blocks but not beside what running requests may still take: waits.
  EXPECT_EQ(AdmitByKv({.need = 5, .free_blocks = 10, .reserved = 6, .others_running = true}), KvAdmission::kDefer);
  // Requests run (nothing reserved: they are at their end): waits for them to leave.
  EXPECT_EQ(AdmitByKv({.need = 12, .free_blocks = 10, .reserved = 0, .others_running = true}), KvAdmission::kDefer);
  // Nothing runs and it does not fit: idle sessions give way first.
  EXPECT_EQ(AdmitByKv({.need = 12, .free_blocks = 10}), KvAdmission::kEvictFirst);
  EXPECT_EQ(AdmitByKv({.need = 10, .free_blocks = 10}), KvAdmission::kStart);
  // Over max_model_len: starts, to fail with the length error rather than wait forever.
  EXPECT_EQ(AdmitByKv({.need = 50, .free_blocks = 10, .reserved = 6, .others_running = true, .fits_in_limit = false}),
            KvAdmission::kStart);
}

TEST(PolicyTest, EvictsLeastRecentlyUsedFirstByTimeoutOrPressure) {
  const auto t0 = std::chrono::steady_clock::time_point{} + std::chrono::hours(1);
  std::vector<IdleSession> idle = {{.id = "new", .last_used = t0 + std::chrono::seconds(30)},
                                   {.id = "old", .last_used = t0},
                                   {.id = "mid", .last_used = t0 + std::chrono::seconds(10)},
                                   {.id = "also-old", .last_used = t0}};
  OrderForEviction(idle);
  std::vector<std::string> order;
  for (const IdleSession& s : idle) order.push_back(s.id);
  EXPECT_EQ(order, (std::vector<std::string>{"also-old", "old", "mid", "new"}));
  const auto now = t0 + std::chrono::seconds(40);
  // Timeout only: idle longer than 20 s.
  EXPECT_TRUE(ShouldEvict(idle[2], now, 20, 0, 0));   // mid: 30 s
  EXPECT_FALSE(ShouldEvict(idle[3], now, 20, 0, 0));  // new: 10 s
  EXPECT_FALSE(ShouldEvict(idle[0], now, 0, 0, 0));   // no timeout, no pressure
  // Pressure: while fewer blocks are free than wanted, whatever the age.
  EXPECT_TRUE(ShouldEvict(idle[3], now, 0, 8, 7));
  EXPECT_FALSE(ShouldEvict(idle[3], now, 0, 8, 8));
}

TEST(PolicyTest, AFailedPassEndsOneTheNewestOrAll) {
  auto in_pass = [](int64_t id) { return id == 7; };
  absl::Status lost = absl::UnavailableError("its KV store node died");
  lost.SetPayload(runtime::kFailedSequencePayload, absl::Cord("7"));
  PassFailure f = OnFailedPass(lost, 3, in_pass);
  EXPECT_EQ(f.action, PassFailure::kEndOne);
  EXPECT_EQ(f.sequence, 7);
  // Alone in the pass, or a sequence the pass does not hold: everything ends.
  EXPECT_EQ(OnFailedPass(lost, 1, in_pass).action, PassFailure::kEndAll);
  absl::Status other = lost;
  other.SetPayload(runtime::kFailedSequencePayload, absl::Cord("8"));
  EXPECT_EQ(OnFailedPass(other, 3, in_pass).action, PassFailure::kEndAll);
  // A full pool: the newest gives way; a full GPU block cache: the newest sits out.
  absl::Status full = absl::ResourceExhaustedError("KV pool full");
  EXPECT_EQ(OnFailedPass(full, 2, in_pass).action, PassFailure::kEndNewest);
  EXPECT_EQ(OnFailedPass(full, 1, in_pass).action, PassFailure::kEndAll);
  absl::Status cache = full;
  cache.SetPayload(runtime::kGpuBlockCacheFullPayload, absl::Cord("1"));
  EXPECT_EQ(OnFailedPass(cache, 2, in_pass).action, PassFailure::kSitOutNewest);
  EXPECT_EQ(OnFailedPass(absl::InternalError("bad"), 4, in_pass).action, PassFailure::kEndAll);
}

}  // namespace
}  // namespace scout::scheduler::policy
