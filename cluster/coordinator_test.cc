// The cluster in one process, over the real transports: a Coordinator, workers (CPU models
// behind WorkerService, each connected over the control channel by RunClusterMember) and KV
// store nodes (UCX). RemoteBackend must give the logits a local model gives, through worker and
// KV store deaths. tests/cluster_test.sh runs the same as separate processes.
#include "cluster/coordinator.h"

#include <cmath>
#include <thread>

#include "gtest/gtest.h"
#include "kvstore/remote_store.h"
#include "runtime/cpu_model.h"
#include "runtime/test_model.h"
#include "cluster/worker.h"

namespace scout::cluster {
namespace {

using runtime::CpuModel;
using runtime::SequenceInput;

// One member (worker or KV store node) connected to the coordinator on its own thread.
struct Member {
  std::unique_ptr<WorkerService> service;  // workers
  std::unique_ptr<kvstore::KvStoreServer> store;  // KV store nodes
  absl::Notification stop;
  std::thread thread;
  absl::Status result;
  bool write_after_reply = true;  // false: a pass's writes wait for the next request (lost if it stops)

  void Run(const MemberOptions& options) {
    thread = std::thread([this, options] {
      WorkerService* s = service.get();
      kvstore::KvStoreServer* st = store.get();
      result = RunClusterMember(
          options, s ? std::function<v1::BackendReply(const v1::BackendRequest&)>(
                           [s](const v1::BackendRequest& r) { return s->Handle(r); })
                     : nullptr,
          [s, st] {
            if (s) return s->Heartbeat();
            v1::Heartbeat h;
            h.set_units_held(st->units_held());
            return h;
          },
          [s] {
            if (s) s->Reset();
          },
          &stop, [s, flush = write_after_reply] {
            if (s && flush) s->Flush();
          });
    });
  }
  void Stop() {
    if (!stop.HasBeenNotified()) stop.Notify();
    if (thread.joinable()) thread.join();
  }
  ~Member() { Stop(); }
};

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = runtime::testing::FreshDir("cluster_model");
    runtime::testing::WriteRandomModel(dir_, runtime::testing::TinyConfig(), 7);
    absl::StatusOr<std::unique_ptr<CpuModel>> local = CpuModel::Load(dir_);
    ASSERT_TRUE(local.ok()) << local.status();
    local_ = std::move(*local);
    absl::StatusOr<std::unique_ptr<Coordinator>> c = Coordinator::Start(
        "127.0.0.1", 0,
        {.target_fingerprint = ModelFingerprint(local_->config()), .heartbeat_interval = absl::Milliseconds(100),
         .heartbeat_timeout = absl::Seconds(2), .call_timeout = absl::Seconds(20)});
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = std::move(*c);
    remote_ = std::make_unique<RemoteBackend>(coordinator_.get(), v1::ROLE_TARGET, local_->config());
  }
  void TearDown() override {
    for (auto& m : workers_) m->Stop();
    for (auto& m : stores_) m->Stop();
  }

  Member& AddWorker(const std::string& id, WorkerOptions options = {.kv_timeout = absl::Seconds(3)},
                    bool write_after_reply = true) {
    absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(dir_);
    EXPECT_TRUE(m.ok());
    auto member = std::make_unique<Member>();
    member->service = std::make_unique<WorkerService>(std::move(*m), options);
    member->write_after_reply = write_after_reply;
    MemberOptions o{.registration = member->service->Describe(), .coordinator_host = "127.0.0.1",
                    .coordinator_port = coordinator_->port(), .reconnect_interval = absl::Milliseconds(50)};
    o.registration.set_id(id);
    o.registration.set_role(v1::ROLE_TARGET);
    o.registration.set_gpu_class("cpu");
    member->Run(o);
    workers_.push_back(std::move(member));
    return *workers_.back();
  }

  Member& AddStore(const std::string& id, int64_t capacity_units = 100000) {
    auto member = std::make_unique<Member>();
    absl::StatusOr<std::unique_ptr<kvstore::KvStoreServer>> s =
        kvstore::KvStoreServer::Start("127.0.0.1", 0, local_->kv_unit_bytes(), capacity_units);
    EXPECT_TRUE(s.ok()) << s.status();
    member->store = std::move(*s);
    MemberOptions o{.coordinator_host = "127.0.0.1", .coordinator_port = coordinator_->port(),
                    .reconnect_interval = absl::Milliseconds(50)};
    o.registration.set_id(id);
    o.registration.set_role(v1::ROLE_KVSTORE);
    o.registration.set_kvstore_address(absl::StrCat("127.0.0.1:", member->store->port()));
    o.registration.set_kv_unit_bytes(static_cast<int64_t>(local_->kv_unit_bytes()));
    o.registration.set_capacity_units(100000);
    member->Run(o);
    stores_.push_back(std::move(member));
    return *stores_.back();
  }

  // Runs the same pass on the local model and over the cluster; their logits must agree.
  void PassBoth(const std::vector<SequenceInput>& batch) {
    std::vector<float> want, got;
    ASSERT_TRUE(local_->Forward(batch, &want).ok());
    absl::Status s = remote_->Forward(batch, &got);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(want.size(), got.size());
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      num += (want[i] - got[i]) * (want[i] - got[i]);
      den += want[i] * want[i];
    }
    // The same CPU code on both sides; batches split across workers may round differently.
    EXPECT_LT(std::sqrt(num / den), 1e-5);
  }

  // Prefills three sequences and decodes `steps` tokens of each, all batched.
  void Drive(const std::vector<int64_t>& seqs, int prompt, int steps, uint32_t seed) {
    std::vector<std::vector<int32_t>> prompts;
    for (size_t i = 0; i < seqs.size(); ++i) prompts.push_back(runtime::testing::RandomTokens(prompt + 5 * i, 40, seed + i));
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (!local_->SequenceLength(seqs[i]).ok()) {
        ASSERT_TRUE(local_->AddSequence(seqs[i]).ok());
        ASSERT_TRUE(remote_->AddSequence(seqs[i]).ok());
      }
      PassBoth({SequenceInput{.seq = seqs[i], .tokens = prompts[i]}});
    }
    for (int step = 0; step < steps; ++step) {
      std::vector<std::vector<int32_t>> next;
      for (size_t i = 0; i < seqs.size(); ++i) next.push_back({static_cast<int32_t>((seed + step * 7 + i) % 40)});
      std::vector<SequenceInput> batch;
      for (size_t i = 0; i < seqs.size(); ++i) batch.push_back({.seq = seqs[i], .tokens = next[i]});
      PassBoth(batch);
    }
  }

  bool EventuallyCounted(const std::function<bool(const ClusterCounters&)>& done) {
    for (int i = 0; i < 100; ++i) {
      if (done(coordinator_->counters())) return true;
      absl::SleepFor(absl::Milliseconds(50));
    }
    return false;
  }

  std::filesystem::path dir_;
  std::unique_ptr<CpuModel> local_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<RemoteBackend> remote_;
  std::vector<std::unique_ptr<Member>> workers_, stores_;
};

TEST_F(ClusterTest, SpreadsSequencesOverWorkersAndMatchesALocalModel) {
  AddWorker("t0");
  AddWorker("t1");
  AddStore("kv0");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 2, absl::Seconds(10)));
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_KVSTORE, 1, absl::Seconds(10)));
  Drive({1, 2, 3, 4}, 37, 20, 11);
  EXPECT_NE(remote_->WorkerOf(1), remote_->WorkerOf(2));
  // Rollback (speculative rejection) and all-logits rows go through too.
  ASSERT_TRUE(local_->TruncateSequence(2, 40).ok());
  ASSERT_TRUE(remote_->TruncateSequence(2, 40).ok());
  const std::vector<int32_t> toks = {3, 1, 4, 1, 5};
  PassBoth({SequenceInput{.seq = 2, .tokens = toks, .all_logits = true},
            SequenceInput{.seq = 1, .tokens = std::span(toks).first(2), .all_logits = true}});
  EXPECT_EQ(*remote_->SequenceLength(2), 45);
  // SANTA reaches the worker (sampled value rows, so the logits differ from exact attention's).
  PassBoth({SequenceInput{.seq = 3, .tokens = toks, .all_logits = true, .santa_samples = 2, .santa_seed = 9}});
  EXPECT_TRUE(EventuallyCounted([](const ClusterCounters& c) { return c.kv_bytes_written > 0; }));
  EXPECT_EQ(remote_->kv_cache_usage().total_blocks, 2 * local_->kv_cache_usage().total_blocks);
}

TEST_F(ClusterTest, AWorkersSequencesAreAdoptedFromTheKvStoreWhenItDies) {
  Member& t0 = AddWorker("t0");
  AddWorker("t1");
  AddStore("kv0");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 2, absl::Seconds(10)));
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_KVSTORE, 1, absl::Seconds(10)));
  Drive({1, 2, 3}, 50, 10, 3);
  const std::string before = remote_->WorkerOf(1) == "t0" ? "t0" : remote_->WorkerOf(2);
  ASSERT_EQ(before, "t0");
  t0.Stop();  // its connection closes, as a killed process's does
  Drive({1, 2, 3}, 3, 10, 5);
  for (int64_t s : {1, 2, 3}) EXPECT_EQ(remote_->WorkerOf(s), "t1");
  const ClusterCounters c = coordinator_->counters();
  EXPECT_GE(c.failovers, 1);
  EXPECT_GE(c.adopted_tokens, 60);
  // Whole blocks were home; only each sequence's partial last block ran again.
  EXPECT_LE(c.replayed_tokens, 3 * 15);
  // Bytes moved come with the workers' heartbeats.
  EXPECT_TRUE(EventuallyCounted([](const ClusterCounters& c) { return c.kv_bytes_read > 0; }));
  // The adopter took the units under a new session and freed the old one: the node holds each
  // sequence's whole blocks once (2 layers x 2 KV heads a block) and its length record.
  int64_t want = 0;
  for (int64_t s : {1, 2, 3}) want += *remote_->SequenceLength(s) / 16 * 4 + 1;
  Member& kv = *stores_[0];
  for (int i = 0; i < 100 && kv.store->units_held() != want; ++i) absl::SleepFor(absl::Milliseconds(20));
  EXPECT_EQ(kv.store->units_held(), want);
}

TEST_F(ClusterTest, WithoutAKvStoreSequencesAreRebuiltFromTheirTokens) {
  Member& t0 = AddWorker("t0");
  AddWorker("t1");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 2, absl::Seconds(10)));
  Drive({1, 2}, 40, 5, 9);
  t0.Stop();
  Drive({1, 2}, 2, 5, 13);
  const ClusterCounters c = coordinator_->counters();
  EXPECT_EQ(c.adopted_tokens, 0);
  EXPECT_GE(c.replayed_tokens, 40);
}

TEST_F(ClusterTest, WhenAKvStoreDiesItsSequencesMoveHomeAndSurviveALaterWorkerDeath) {
  Member& t0 = AddWorker("t0");
  AddWorker("t1");
  Member& kv0 = AddStore("kv0");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 2, absl::Seconds(10)));
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_KVSTORE, 1, absl::Seconds(10)));
  Drive({1, 2}, 40, 3, 21);  // homes on kv0, the only node
  AddStore("kv1");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_KVSTORE, 2, absl::Seconds(10)));
  kv0.Stop();
  kv0.store.reset();  // the node's memory is gone
  // The coordinator sees kv0 go before the next pass.
  for (int i = 0; i < 100 && coordinator_->Members(v1::ROLE_KVSTORE)[0].alive; ++i) absl::SleepFor(absl::Milliseconds(20));
  Drive({1, 2}, 2, 3, 23);
  EXPECT_GE(coordinator_->counters().rehomed, 2);
  t0.Stop();
  Drive({1, 2}, 2, 3, 29);
  const ClusterCounters c = coordinator_->counters();
  EXPECT_GE(c.adopted_tokens, 32);
  EXPECT_LE(c.replayed_tokens, 2 * 15);
}

// A Selection naming the same blocks in every (layer, KV head) list.
kvstore::Selection SameBlocks(const runtime::ModelConfig& c, const std::vector<int32_t>& blocks) {
  kvstore::Selection sel;
  sel.num_layers = static_cast<int>(c.num_hidden_layers);
  sel.num_kv_heads = static_cast<int>(c.num_key_value_heads);
  sel.indptr.push_back(0);
  for (int list = 0; list < sel.num_layers * sel.num_kv_heads; ++list) {
    sel.blocks.insert(sel.blocks.end(), blocks.begin(), blocks.end());
    sel.indptr.push_back(static_cast<int32_t>(sel.blocks.size()));
  }
  return sel;
}

// The remote tier: homes hold sequences whole (partial block and length too), so an adopter
// runs nothing again, and it fetches only the units each pass reads: a sparse pass the blocks
// its Selection lists (and the block its token goes into), a dense pass the rest.
TEST_F(ClusterTest, RemoteTierAdoptsWithoutRunningAgainAndFetchesOnlyWhatPassesRead) {
  const WorkerOptions tier{.kv_timeout = absl::Seconds(3), .remote_tier = true};
  AddWorker("t0", tier);
  AddWorker("t1", tier);
  AddStore("kv0");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 2, absl::Seconds(10)));
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_KVSTORE, 1, absl::Seconds(10)));
  Drive({1}, 100, 3, 41);  // 103 tokens: 6 whole blocks and 7 tokens of a seventh
  // A rejected speculative token: the home's length follows the truncation.
  const std::vector<int32_t> extra = {7, 8};
  PassBoth({SequenceInput{.seq = 1, .tokens = extra}});
  ASSERT_TRUE(local_->TruncateSequence(1, 103).ok());
  ASSERT_TRUE(remote_->TruncateSequence(1, 103).ok());
  const std::string first = remote_->WorkerOf(1);
  workers_[first == "t0" ? 0 : 1]->Stop();
  const runtime::ModelConfig& c = local_->config();
  const int64_t lists = c.num_hidden_layers * c.num_key_value_heads;
  // Block 6, where the token goes (it holds 7 tokens), is not listed: it comes all the same.
  const kvstore::Selection sel = SameBlocks(c, {0, 2, 4});
  const std::vector<int32_t> one = {9};
  PassBoth({SequenceInput{.seq = 1, .tokens = one, .selection = &sel}});
  EXPECT_EQ(remote_->WorkerOf(1), first == "t0" ? "t1" : "t0");
  ClusterCounters n = coordinator_->counters();
  EXPECT_EQ(n.adopted_tokens, 103);
  EXPECT_EQ(n.replayed_tokens, 0);
  const int64_t unit = static_cast<int64_t>(local_->kv_unit_bytes());
  // Blocks 0, 2, 4 and 6 of every list came over; nothing else.
  EXPECT_TRUE(EventuallyCounted([&](const ClusterCounters& k) { return k.kv_bytes_read == 4 * lists * unit; }))
      << coordinator_->counters().kv_bytes_read << " bytes read, want " << 4 * lists * unit;
  // A dense pass reads every block: the other three of each list come then, once.
  PassBoth({SequenceInput{.seq = 1, .tokens = one}});
  PassBoth({SequenceInput{.seq = 1, .tokens = one}});
  EXPECT_TRUE(EventuallyCounted([&](const ClusterCounters& k) { return k.kv_bytes_read == 7 * lists * unit; }))
      << coordinator_->counters().kv_bytes_read << " bytes read, want " << 7 * lists * unit;
}

// A sequence whose KV is partly only on a KV store node that dies is rebuilt from its tokens
// (the coordinator holds them) and the pass runs again; the worker's other sequence goes on.
// The rebuild runs every token densely, so the reference does the same (the token verified under
// a Selection gets slightly different KV that way).
TEST_F(ClusterTest, RemoteTierSequenceWhoseNodeDiesIsRebuiltFromItsTokens) {
  const WorkerOptions tier{.kv_timeout = absl::Seconds(3), .remote_tier = true};
  Member& t0 = AddWorker("t0", tier);
  AddStore("kv0");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 1, absl::Seconds(10)));
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_KVSTORE, 1, absl::Seconds(10)));
  std::vector<int32_t> tokens = runtime::testing::RandomTokens(60, 40, 43);
  ASSERT_TRUE(local_->AddSequence(1).ok());
  ASSERT_TRUE(remote_->AddSequence(1).ok());
  PassBoth({SequenceInput{.seq = 1, .tokens = tokens}});
  const std::vector<int32_t> one = {5};
  PassBoth({SequenceInput{.seq = 1, .tokens = one}});
  t0.Stop();
  for (int i = 0; i < 100 && coordinator_->Members(v1::ROLE_TARGET)[0].alive; ++i) absl::SleepFor(absl::Milliseconds(20));
  AddWorker("t1", tier);
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 1, absl::Seconds(10)));
  const kvstore::Selection sel = SameBlocks(local_->config(), {0, 3});
  PassBoth({SequenceInput{.seq = 1, .tokens = one, .selection = &sel}});  // adopted, blocks 1 and 2 still away
  ASSERT_EQ(remote_->WorkerOf(1), "t1");
  EXPECT_EQ(coordinator_->counters().replayed_tokens, 0);
  tokens.insert(tokens.end(), {5, 5});
  Drive({2}, 40, 1, 47);  // a sequence computed on t1 itself
  Member& kv0 = *stores_[0];
  kv0.Stop();
  kv0.store.reset();
  for (int i = 0; i < 100 && coordinator_->Members(v1::ROLE_KVSTORE)[0].alive; ++i) absl::SleepFor(absl::Milliseconds(20));
  ASSERT_TRUE(local_->ReleaseSequence(1).ok());
  ASSERT_TRUE(local_->AddSequence(1).ok());
  std::vector<float> unused;
  SequenceInput again{.seq = 1, .tokens = tokens};
  ASSERT_TRUE(local_->Forward({&again, 1}, &unused).ok());
  PassBoth({SequenceInput{.seq = 2, .tokens = one}, SequenceInput{.seq = 1, .tokens = one}});
  EXPECT_EQ(coordinator_->counters().replayed_tokens, 62);  // all of sequence 1, and only it
  PassBoth({SequenceInput{.seq = 2, .tokens = one}, SequenceInput{.seq = 1, .tokens = one}});
}

// A worker that dies between replying and writing its pass leaves its home's length record
// behind the coordinator's count: the adopter trusts the record and runs the rest again. Workers
// with and without the remote tier adopt from each other's homes.
TEST_F(ClusterTest, HomesAreTrustedUpToTheirLengthRecordAcrossKindsOfWorker) {
  const WorkerOptions tier{.kv_timeout = absl::Seconds(3), .remote_tier = true};
  Member& t0 = AddWorker("t0", tier, /*write_after_reply=*/false);
  AddStore("kv0");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 1, absl::Seconds(10)));
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_KVSTORE, 1, absl::Seconds(10)));
  Drive({1}, 50, 4, 51);  // 54 tokens
  // Two tokens rolled back and two others in their place: the home's record comes down to 54
  // before the last pass, whose write never happens (the home's rows 54 and 55 are the old ones).
  const std::vector<int32_t> rejected = {1, 2}, accepted = {3, 4};
  PassBoth({SequenceInput{.seq = 1, .tokens = rejected}});
  ASSERT_TRUE(local_->TruncateSequence(1, 54).ok());
  ASSERT_TRUE(remote_->TruncateSequence(1, 54).ok());
  PassBoth({SequenceInput{.seq = 1, .tokens = accepted}});
  t0.Stop();
  for (int i = 0; i < 100 && coordinator_->Members(v1::ROLE_TARGET)[0].alive; ++i) absl::SleepFor(absl::Milliseconds(20));
  Member& t1 = AddWorker("t1");  // no remote tier: whole blocks
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 1, absl::Seconds(10)));
  const std::vector<int32_t> one = {6};
  PassBoth({SequenceInput{.seq = 1, .tokens = one}});
  ClusterCounters n = coordinator_->counters();
  EXPECT_EQ(n.adopted_tokens, 54);
  EXPECT_EQ(n.replayed_tokens, 2);
  // On t1: a rollback below the home's record, then more tokens; its home follows.
  Drive({1}, 30, 3, 53);  // 90 tokens
  ASSERT_TRUE(local_->TruncateSequence(1, 40).ok());
  ASSERT_TRUE(remote_->TruncateSequence(1, 40).ok());
  Drive({1}, 20, 2, 57);  // 62 tokens, different from the 40..61 before
  t1.Stop();
  for (int i = 0; i < 100 && coordinator_->Members(v1::ROLE_TARGET)[1].alive; ++i) absl::SleepFor(absl::Milliseconds(20));
  AddWorker("t2", tier);
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 1, absl::Seconds(10)));
  PassBoth({SequenceInput{.seq = 1, .tokens = one}});
  n = coordinator_->counters();
  EXPECT_EQ(n.adopted_tokens, 54 + 48);  // t1's whole blocks
  EXPECT_EQ(n.replayed_tokens, 2 + 14);
  Drive({1}, 3, 3, 59);
}

// Regression: heartbeats waited for the request being served, so a pass longer than the
// heartbeat timeout (a long prefill) got a busy worker declared dead.
TEST_F(ClusterTest, AWorkerBusyPastTheHeartbeatTimeoutIsNotTakenForDead) {
  absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(dir_);
  ASSERT_TRUE(m.ok());
  WorkerService service(std::move(*m));
  MemberOptions o{.registration = service.Describe(), .coordinator_host = "127.0.0.1",
                  .coordinator_port = coordinator_->port()};
  o.registration.set_id("slow");
  o.registration.set_role(v1::ROLE_TARGET);
  absl::Notification stop;
  std::thread t([&] {
    (void)RunClusterMember(
        o,
        [&service](const v1::BackendRequest& r) {
          if (r.op_case() == v1::BackendRequest::kForward) absl::SleepFor(absl::Milliseconds(2600));
          return service.Handle(r);
        },
        [&service] { return service.Heartbeat(); }, [&service] { service.Reset(); }, &stop);
  });
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 1, absl::Seconds(10)));
  ASSERT_TRUE(local_->AddSequence(1).ok());
  ASSERT_TRUE(remote_->AddSequence(1).ok());
  const std::vector<int32_t> toks = runtime::testing::RandomTokens(9, 40, 2);
  PassBoth({SequenceInput{.seq = 1, .tokens = toks}});  // 2.6 s, past the 2 s heartbeat timeout
  EXPECT_TRUE(coordinator_->Members(v1::ROLE_TARGET)[0].alive);
  EXPECT_EQ(coordinator_->counters().failovers, 0);
  stop.Notify();
  t.join();
}

// Review finding: when a write failed and no other node fitted, the worker was never told and
// tried its home again after every pass (against a dead node, a connect timeout each time). Now
// the sequences lose their home, the worker stops writing, the node stays alive (a refusal is
// not a death), and passes go on.
TEST_F(ClusterTest, AFullKvStoreLeavesSequencesWithoutAHomeAndStaysAlive) {
  AddWorker("t0");
  AddStore("tiny", /*capacity_units=*/8);  // 2 layers x 2 heads: two blocks of one sequence
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 1, absl::Seconds(10)));
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_KVSTORE, 1, absl::Seconds(10)));
  Drive({1, 2}, 70, 20, 41);  // each sequence fills 5+ blocks: the node refuses
  EXPECT_TRUE(coordinator_->Members(v1::ROLE_KVSTORE)[0].alive);
  EXPECT_EQ(coordinator_->counters().rehomed, 0);
  const absl::Time t = absl::Now();
  Drive({1, 2}, 3, 20, 43);  // no write is retried against the full node
  EXPECT_LT(absl::Now() - t, absl::Seconds(5));
}

// Review finding: a sequence released while its worker was dead left its units on the node.
TEST_F(ClusterTest, ReleasingASequenceWhoseWorkerDiedFreesItsHome) {
  Member& t0 = AddWorker("t0");
  Member& kv = AddStore("kv0");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 1, absl::Seconds(10)));
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_KVSTORE, 1, absl::Seconds(10)));
  Drive({1}, 60, 4, 51);  // 4 whole blocks home
  for (int i = 0; i < 100 && kv.store->units_held() == 0; ++i) absl::SleepFor(absl::Milliseconds(20));
  ASSERT_GT(kv.store->units_held(), 0);
  AddWorker("t1");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 2, absl::Seconds(10)));
  t0.Stop();
  for (int i = 0; i < 100 && coordinator_->Alive(coordinator_->Members(v1::ROLE_TARGET)[0].key); ++i) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_TRUE(remote_->ReleaseSequence(1).ok());
  EXPECT_EQ(kv.store->units_held(), 0);  // t1 freed them
}

TEST_F(ClusterTest, NoLiveWorkerIsAClearErrorNotAHang) {
  EXPECT_EQ(remote_->Health().code(), absl::StatusCode::kUnavailable);
  absl::Status s = remote_->AddSequence(1);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("no live target worker"), std::string::npos) << s;
  Member& t0 = AddWorker("t0");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 1, absl::Seconds(10)));
  EXPECT_TRUE(remote_->Health().ok());
  ASSERT_TRUE(remote_->AddSequence(1).ok());
  t0.Stop();
  const std::vector<int32_t> toks = {1, 2};
  std::vector<float> logits;
  const absl::Time t = absl::Now();
  s = remote_->Forward(std::vector<SequenceInput>{{.seq = 1, .tokens = toks}}, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_LT(absl::Now() - t, absl::Seconds(5));
}

TEST_F(ClusterTest, ModelErrorsPassThroughAndUndoThePassEverywhere) {
  AddWorker("t0");
  AddWorker("t1");
  ASSERT_TRUE(coordinator_->WaitForMembers(v1::ROLE_TARGET, 2, absl::Seconds(10)));
  Drive({1, 2}, 20, 1, 31);
  ASSERT_NE(remote_->WorkerOf(1), remote_->WorkerOf(2));
  const std::vector<int32_t> good = {5}, bad = {99};  // vocab is 40
  std::vector<float> logits;
  absl::Status s = remote_->Forward(std::vector<SequenceInput>{{.seq = 1, .tokens = good}, {.seq = 2, .tokens = bad}}, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  // Neither sequence moved: the good half was undone on its worker.
  EXPECT_EQ(*remote_->SequenceLength(1), 21);
  Drive({1, 2}, 1, 3, 37);
}

TEST_F(ClusterTest, PlacementChoosesWhichRegisteredWorkersServe) {
  absl::StatusOr<std::unique_ptr<Coordinator>> c = Coordinator::Start(
      "127.0.0.1", 0,
      {.target_fingerprint = ModelFingerprint(local_->config()), .heartbeat_interval = absl::Milliseconds(100),
       .placement = ClusterConfig{.target_bytes_per_gpu = int64_t{40} << 30, .target_classes = {"H100"},
                                  .draft_classes = {"L4"}, .drafts = false}});
  ASSERT_TRUE(c.ok());
  RemoteBackend remote(c->get(), v1::ROLE_TARGET, local_->config());
  std::vector<std::unique_ptr<Member>> workers;
  for (auto [id, cls] : {std::pair{"spare", "H100"}, std::pair{"big", "H100"}}) {
    absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(dir_);
    ASSERT_TRUE(m.ok());
    auto member = std::make_unique<Member>();
    member->service = std::make_unique<WorkerService>(std::move(*m));
    MemberOptions o{.registration = member->service->Describe(), .coordinator_host = "127.0.0.1",
                    .coordinator_port = (*c)->port()};
    o.registration.set_id(id);
    o.registration.set_role(v1::ROLE_TARGET);
    o.registration.set_gpu_class(cls);
    o.registration.set_num_gpus(1);
    // The spare's GPU holds too little for the target (placement's memory rule): it stands by.
    o.registration.set_gpu_memory_bytes(std::string(id) == "spare" ? 1 : int64_t{80} << 30);
    member->Run(o);
    workers.push_back(std::move(member));
  }
  ASSERT_TRUE((*c)->WaitForMembers(v1::ROLE_TARGET, 2, absl::Seconds(10)));
  for (int64_t seq = 1; seq <= 4; ++seq) {
    ASSERT_TRUE(remote.AddSequence(seq).ok());
    EXPECT_EQ(remote.WorkerOf(seq), "big");
  }
  const std::vector<std::string> notes = (*c)->PlacementNotes();
  ASSERT_FALSE(notes.empty());
  EXPECT_NE(notes.front().find("spare"), std::string::npos) << notes.front();
  // Without a worker of a listed class, nothing serves: a clear error, not a hang.
  workers[1]->Stop();
  for (int i = 0; i < 100 && remote.Health().ok(); ++i) absl::SleepFor(absl::Milliseconds(20));
  EXPECT_EQ(remote.Health().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(remote.AddSequence(9).code(), absl::StatusCode::kUnavailable);
  for (auto& w : workers) w->Stop();
}

// Placement binds: a worker whose GPU count contradicts the target groups' size, or whose GPU
// class the placement does not use for its role, is refused naming both sides; a placed worker
// is told its GPUs in the group and the draft paired with it, a spare why it stands by.
TEST_F(ClusterTest, PlacementBindsWhatWorkersAreToldAndRefusesContradictions) {
  absl::StatusOr<std::unique_ptr<Coordinator>> c = Coordinator::Start(
      "127.0.0.1", 0,
      {.target_fingerprint = ModelFingerprint(local_->config()), .heartbeat_interval = absl::Milliseconds(100),
       .placement = ClusterConfig{.tensor_parallel_size = 2, .target_classes = {"H100"}, .draft_classes = {"L4"},
                                  .drafts = false}});
  ASSERT_TRUE(c.ok());
  auto try_register = [&](const std::string& id, const std::string& cls, int gpus,
                          v1::Assignment* told) -> absl::Status {
    absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(dir_);
    if (!m.ok()) return m.status();
    WorkerService service(std::move(*m));
    absl::Notification stop, registered;
    MemberOptions o{.registration = service.Describe(), .coordinator_host = "127.0.0.1", .coordinator_port = (*c)->port()};
    o.registration.set_id(id);
    o.registration.set_role(v1::ROLE_TARGET);
    o.registration.set_gpu_class(cls);
    o.registration.set_num_gpus(gpus);
    o.registration.set_gpu_memory_bytes(int64_t{80} << 30);
    o.on_assignment = [&](const v1::Assignment& a) {
      if (told != nullptr) *told = a;
      if (!registered.HasBeenNotified()) registered.Notify();
    };
    absl::Status result;
    std::thread t([&] {
      result = RunClusterMember(o, [&](const v1::BackendRequest& r) { return service.Handle(r); }, nullptr, nullptr, &stop);
      if (!registered.HasBeenNotified()) registered.Notify();
    });
    registered.WaitForNotificationWithTimeout(absl::Seconds(10));
    stop.Notify();
    t.join();
    return result;
  };
  absl::Status one_gpu = try_register("narrow", "H100", 1, nullptr);
  EXPECT_EQ(one_gpu.code(), absl::StatusCode::kFailedPrecondition) << one_gpu;
  for (const char* want : {"narrow", "runs on 1 GPU", "target groups of 2", "--tensor-parallel-size 2"}) {
    EXPECT_NE(one_gpu.message().find(want), std::string::npos) << want << " in " << one_gpu;
  }
  absl::Status t4 = try_register("old", "T4", 2, nullptr);
  EXPECT_EQ(t4.code(), absl::StatusCode::kFailedPrecondition) << t4;
  for (const char* want : {"old", "T4", "target_classes: [H100]"}) {
    EXPECT_NE(t4.message().find(want), std::string::npos) << want << " in " << t4;
  }
  v1::Assignment told;
  absl::Status pair = try_register("pair", "H100", 2, &told);
  EXPECT_TRUE(pair.ok()) << pair;
  EXPECT_TRUE(told.placed());
  EXPECT_TRUE(told.serving());
  EXPECT_EQ(told.tensor_parallel_size(), 2);
  EXPECT_EQ(std::vector<int>(told.gpus().begin(), told.gpus().end()), (std::vector<int>{0, 1}));
}

// A placed worker hears when its assignment changes: a target that registered before any draft
// stood by (no draft replica, no placement); once a draft registers it is told it serves, with
// that draft; when the draft dies, it is told it stands by again.
TEST_F(ClusterTest, WorkersAreToldWhenThePlacementChangesThem) {
  const std::string fp = ModelFingerprint(local_->config());
  absl::StatusOr<std::unique_ptr<Coordinator>> c = Coordinator::Start(
      "127.0.0.1", 0,
      {.target_fingerprint = fp, .draft_fingerprint = fp, .heartbeat_interval = absl::Milliseconds(100),
       .placement = ClusterConfig{.target_classes = {"H100"}, .draft_classes = {"L4"}}});
  ASSERT_TRUE(c.ok());
  absl::Mutex mu;
  std::vector<v1::Assignment> heard;
  auto member = [&](const std::string& id, v1::Role role, const std::string& cls, bool listen) {
    absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(dir_);
    EXPECT_TRUE(m.ok());
    auto w = std::make_unique<Member>();
    w->service = std::make_unique<WorkerService>(std::move(*m));
    MemberOptions o{.registration = w->service->Describe(), .coordinator_host = "127.0.0.1",
                    .coordinator_port = (*c)->port()};
    o.registration.set_id(id);
    o.registration.set_role(role);
    o.registration.set_gpu_class(cls);
    o.registration.set_num_gpus(1);
    o.registration.set_gpu_memory_bytes(int64_t{80} << 30);
    if (listen) {
      o.on_assignment = [&](const v1::Assignment& a) {
        absl::MutexLock lock(&mu);
        heard.push_back(a);
      };
    }
    w->Run(o);
    return w;
  };
  auto last = [&]() {
    absl::MutexLock lock(&mu);
    return heard.empty() ? v1::Assignment() : heard.back();
  };
  auto wait_for = [&](bool serving) {
    for (int i = 0; i < 200 && !(last().placed() && last().serving() == serving); ++i) absl::SleepFor(absl::Milliseconds(20));
    return last();
  };
  std::unique_ptr<Member> target = member("t", v1::ROLE_TARGET, "H100", true);
  v1::Assignment a = wait_for(false);
  EXPECT_TRUE(a.placed());
  EXPECT_FALSE(a.serving());
  EXPECT_FALSE(a.note().empty());
  std::unique_ptr<Member> draft = member("d", v1::ROLE_DRAFT, "L4", false);
  a = wait_for(true);
  EXPECT_TRUE(a.serving()) << a.note();
  EXPECT_EQ(a.draft(), "d");
  EXPECT_EQ(std::vector<int>(a.gpus().begin(), a.gpus().end()), std::vector<int>{0});
  draft->Stop();
  a = wait_for(false);
  EXPECT_FALSE(a.serving());
  target->Stop();
}

TEST_F(ClusterTest, AWorkerOfAnotherModelIsRefusedByName) {
  auto other = runtime::testing::TinyConfig();
  other.num_hidden_layers = 3;
  const std::filesystem::path d = runtime::testing::FreshDir("other_model");
  runtime::testing::WriteRandomModel(d, other, 1);
  absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(d);
  ASSERT_TRUE(m.ok());
  WorkerService service(std::move(*m));
  MemberOptions o{.registration = service.Describe(), .coordinator_host = "127.0.0.1",
                  .coordinator_port = coordinator_->port()};
  o.registration.set_id("wrong");
  o.registration.set_role(v1::ROLE_TARGET);
  absl::Notification stop;
  absl::Status s = RunClusterMember(o, nullptr, nullptr, nullptr, &stop);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("layers=3"), std::string::npos) << s;
}

}  // namespace
}  // namespace scout::cluster
