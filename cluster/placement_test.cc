// Placement and session assignment as pure functions of the cluster's state.
#include "cluster/placement.h"

#include <algorithm>
#include <random>

#include "gtest/gtest.h"

namespace scout::cluster {
namespace {

constexpr int64_t kGiB = int64_t{1} << 30;

ClusterConfig Config(int tp) {
  return {.tensor_parallel_size = tp, .target_bytes_per_gpu = 60 * kGiB, .draft_bytes_per_gpu = 12 * kGiB,
          .target_classes = {"H200", "H100-80GB"}, .draft_classes = {"L4", "A10"}};
}

TEST(PlacementTest, TargetsOnLargeGpusDraftsOnCheapOnes) {
  const std::vector<WorkerInfo> workers = {
      {.id = "big-b", .gpu_class = "H100-80GB", .num_gpus = 2, .gpu_memory_bytes = 80 * kGiB},
      {.id = "cheap-1", .gpu_class = "L4", .num_gpus = 1, .gpu_memory_bytes = 24 * kGiB},
      {.id = "big-a", .gpu_class = "H100-80GB", .num_gpus = 2, .gpu_memory_bytes = 80 * kGiB},
      {.id = "huge", .gpu_class = "H200", .num_gpus = 4, .gpu_memory_bytes = 141 * kGiB},
      {.id = "cheap-0", .gpu_class = "A10", .num_gpus = 2, .gpu_memory_bytes = 24 * kGiB},
      {.id = "odd", .gpu_class = "T4", .num_gpus = 1, .gpu_memory_bytes = 16 * kGiB},
  };
  absl::StatusOr<Placement> p = PlaceModels(Config(2), workers);
  ASSERT_TRUE(p.ok()) << p.status();
  // Preferred class first (H200), then worker id; TP groups of consecutive GPUs of one worker.
  const std::vector<std::vector<GpuSlot>> want_targets = {
      {{"huge", 0}, {"huge", 1}}, {{"huge", 2}, {"huge", 3}}, {{"big-a", 0}, {"big-a", 1}}, {{"big-b", 0}, {"big-b", 1}}};
  EXPECT_EQ(p->target_groups, want_targets);
  const std::vector<GpuSlot> want_drafts = {{"cheap-1", 0}, {"cheap-0", 0}, {"cheap-0", 1}};  // L4 preferred
  EXPECT_EQ(p->draft_replicas, want_drafts);
  EXPECT_FALSE(p->drafts_on_target_workers);
  ASSERT_EQ(p->notes.size(), 1u);
  EXPECT_NE(p->notes[0].find("odd"), std::string::npos);
  // The order workers registered in does not matter.
  std::vector<WorkerInfo> shuffled = workers;
  std::mt19937 rng(3);
  for (int i = 0; i < 10; ++i) {
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    absl::StatusOr<Placement> q = PlaceModels(Config(2), shuffled);
    ASSERT_TRUE(q.ok());
    EXPECT_EQ(q->target_groups, p->target_groups);
    EXPECT_EQ(q->draft_replicas, p->draft_replicas);
  }
  ClusterConfig capped = Config(2);
  capped.max_draft_replicas = 2;
  EXPECT_EQ(PlaceModels(capped, workers)->draft_replicas.size(), 2u);
}

TEST(PlacementTest, SmallDeadAndShortWorkersAreLeftOutWithReasons) {
  const std::vector<WorkerInfo> workers = {
      {.id = "one-gpu", .gpu_class = "H100-80GB", .num_gpus = 1, .gpu_memory_bytes = 80 * kGiB},
      {.id = "small", .gpu_class = "H100-80GB", .num_gpus = 2, .gpu_memory_bytes = 40 * kGiB},
      {.id = "dead", .gpu_class = "H100-80GB", .num_gpus = 4, .gpu_memory_bytes = 80 * kGiB, .alive = false},
      {.id = "ok", .gpu_class = "H100-80GB", .num_gpus = 3, .gpu_memory_bytes = 80 * kGiB},
  };
  absl::StatusOr<Placement> p = PlaceModels(Config(2), workers);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->target_groups.size(), 1u);
  EXPECT_EQ(p->target_groups[0], (std::vector<GpuSlot>{{"ok", 0}, {"ok", 1}}));
  // No draft-class GPU: the draft takes the target worker's spare GPU, as on a 2-GPU host.
  EXPECT_TRUE(p->drafts_on_target_workers);
  EXPECT_EQ(p->draft_replicas, (std::vector<GpuSlot>{{"ok", 2}, {"one-gpu", 0}}));
  std::string notes;
  for (const std::string& n : p->notes) notes += n + "\n";
  EXPECT_NE(notes.find("dead: not alive"), std::string::npos) << notes;
  EXPECT_NE(notes.find("small: 42949672960 bytes per GPU"), std::string::npos) << notes;
  EXPECT_NE(notes.find("one-gpu: 1 GPUs, a target group needs 2"), std::string::npos) << notes;
  // Nothing can hold a group: an error naming why.
  absl::StatusOr<Placement> none = PlaceModels(Config(4), std::vector<WorkerInfo>(workers.begin(), workers.begin() + 2));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(none.status().message().find("needs 4"), std::string::npos) << none.status();
  // Groups fill every GPU and no draft GPU exists: refused, by name.
  absl::StatusOr<Placement> no_draft = PlaceModels(Config(2), std::vector<WorkerInfo>{workers[1]});
  EXPECT_EQ(no_draft.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::vector<WorkerInfo> exact = {{.id = "x", .gpu_class = "H100-80GB", .num_gpus = 2, .gpu_memory_bytes = 80 * kGiB}};
  no_draft = PlaceModels(Config(2), exact);
  EXPECT_EQ(no_draft.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(no_draft.status().message().find("no GPU for a draft replica"), std::string::npos);
  EXPECT_EQ(PlaceModels(Config(0), exact).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PlacementTest, SessionsKeepTheirGroupAndStoreUntilTheyCannot) {
  const std::vector<WorkerInfo> workers = {
      {.id = "a", .gpu_class = "H100-80GB", .num_gpus = 2, .gpu_memory_bytes = 80 * kGiB},
      {.id = "b", .gpu_class = "H100-80GB", .num_gpus = 2, .gpu_memory_bytes = 80 * kGiB},
      {.id = "c", .gpu_class = "L4", .num_gpus = 1, .gpu_memory_bytes = 24 * kGiB},
  };
  absl::StatusOr<Placement> p = PlaceModels(Config(1), workers);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->target_groups.size(), 4u);  // a0 a1 b0 b1
  std::vector<KvStoreInfo> stores = {{.id = "kv-0", .capacity_bytes = 200 * kGiB, .used_bytes = 150 * kGiB},
                                     {.id = "kv-1", .capacity_bytes = 200 * kGiB, .used_bytes = 20 * kGiB}};
  std::vector<SessionLoad> load = {{0, 3}, {1, 1}, {2, 0}, {3, 2}};
  // A new session: the least busy group, the store with the most room.
  absl::StatusOr<SessionAssignment> a = AssignSession(*p, load, stores, {}, 10 * kGiB);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->target_group, 2);
  EXPECT_EQ(a->kv_store, "kv-1");
  EXPECT_FALSE(a->moved);
  // An existing session stays where its cache is warm, even on a busier group...
  SessionPlace warm{.target = GpuSlot{"a", 0}, .kv_store = "kv-0"};
  a = AssignSession(*p, load, stores, warm, 0);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->target_group, 0);
  EXPECT_EQ(a->kv_store, "kv-0");
  EXPECT_FALSE(a->moved);
  // ...until that group is too busy,
  load[0].active_sessions = 9;
  a = AssignSession(*p, load, stores, warm, 0);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->target_group, 2);
  EXPECT_TRUE(a->moved);
  // or its worker dies: re-placed without it, the session moves to a live group, KV kept.
  std::vector<WorkerInfo> after = workers;
  after[0].alive = false;
  absl::StatusOr<Placement> q = PlaceModels(Config(1), after);
  ASSERT_TRUE(q.ok());
  ASSERT_EQ(q->target_groups.size(), 2u);
  a = AssignSession(*q, {}, stores, warm, 0);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(q->target_groups[a->target_group].front().worker, "b");
  EXPECT_TRUE(a->moved);
  EXPECT_EQ(a->kv_store, "kv-0");
  // A dead KV store: its sessions fail with a clear error; new sessions use the others.
  stores[0].alive = false;
  a = AssignSession(*q, {}, stores, warm, 0);
  EXPECT_EQ(a.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(a.status().message().find("kv-0"), std::string::npos);
  a = AssignSession(*q, {}, stores, {}, 10 * kGiB);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->kv_store, "kv-1");
  // Admission by KV capacity: nothing has room.
  a = AssignSession(*q, {}, stores, {}, 500 * kGiB);
  EXPECT_EQ(a.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(a.status().message().find("the most free is"), std::string::npos);
}

TEST(PlacementTest, WithoutADraftModelNoReplicaIsNeeded) {
  const std::vector<WorkerInfo> workers = {{.id = "a", .gpu_class = "H100", .num_gpus = 2, .gpu_memory_bytes = 80}};
  ClusterConfig config{.target_classes = {"H100"}, .draft_classes = {"L4"}, .drafts = false};
  absl::StatusOr<Placement> p = PlaceModels(config, workers);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->target_groups.size(), 2u);
  EXPECT_TRUE(p->draft_replicas.empty());
  config.drafts = true;  // the same cluster with a draft: its spare GPUs are none, so it fails
  config.tensor_parallel_size = 2;
  EXPECT_EQ(PlaceModels(config, workers).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace scout::cluster
