// The device round (CudaRound) on the fixture pair (ctest label gpu: runs on the GPU machine):
// against plain greedy decoding and against the host round on the same CUDA models.
#include "round/cuda_round.h"

#include <algorithm>
#include <cstdlib>
#include <memory>

#include "gtest/gtest.h"
#include "runtime/cuda_model.h"
#include "text/tokenizer.h"

namespace scout::round {
namespace {

using runtime::CudaModel;
using runtime::CudaModelOptions;

const std::filesystem::path kModels =
    std::filesystem::path(std::getenv("SCOUT_SOURCE_DIR") ? std::getenv("SCOUT_SOURCE_DIR") : SCOUT_SOURCE_DIR) / "models";

std::unique_ptr<CudaModel> Load(const std::string& name, CudaModelOptions o = {.kv_budget_tokens = 16384}) {
  absl::StatusOr<std::unique_ptr<CudaModel>> m = CudaModel::Load(kModels / name, o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

// BOS and the first `bytes` bytes of the long golden prompt (byte-level fixture tokens).
std::vector<int32_t> Prompt(size_t bytes, size_t skip = 0) {
  absl::StatusOr<std::string> text = runtime::ReadFile(kModels / "goldens" / "long_prompt.txt");
  EXPECT_TRUE(text.ok());
  std::vector<int32_t> p = {256};
  if (!text.ok()) return p;
  EXPECT_LE(skip + bytes, text->size()) << "the golden prompt is shorter";
  skip = std::min(skip, text->size());
  for (char c : text->substr(skip, bytes)) p.push_back(static_cast<unsigned char>(c));
  return p;
}

struct Fixture {
  std::unique_ptr<CudaModel> target = Load("scout-tiny-target");
  std::unique_ptr<CudaModel> draft = Load("scout-tiny-draft");
  runtime::HeadMap map, self;
  Fixture() {
    if (target && draft) {
      map = runtime::DefaultHeadMap(target->config(), draft->config());
      self = runtime::SelfHeadMap(draft->config());
    }
  }
};

std::vector<int32_t> Greedy(runtime::ModelBackend& m, const std::vector<int32_t>& prompt, int64_t n) {
  absl::StatusOr<runtime::GenerateResult> r = runtime::Generate(m, 900, prompt, {.max_tokens = n});
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->tokens : std::vector<int32_t>{};
}

absl::StatusOr<SpeculativeResult> RunStream(SpeculativeRound& round, runtime::ModelBackend& t, runtime::ModelBackend& d,
                                      SequenceId seq, const std::vector<int32_t>& prompt, const SpeculativeOptions& o) {
  SpeculativeStream s(t, d, seq, prompt, o);
  if (absl::Status st = s.Begin(); !st.ok()) return st;
  SpeculativeStream* const one[] = {&s};
  while (!s.done()) {
    if (absl::Status st = round.Run(one); !st.ok()) return st;
  }
  if (absl::Status st = s.Finish(); !st.ok()) return st;
  return s.result();
}

TEST(CudaRoundTest, MakeRoundPicksTheDeviceRound) {
  Fixture f;
  ASSERT_TRUE(f.target && f.draft);
  EXPECT_STREQ(MakeRound(*f.target, *f.draft)->name(), "cuda");
}

// Exact rejection sampling with greedy params: every configuration of the round emits the
// target's own greedy tokens, only the acceptance changes.
TEST(CudaRoundTest, GreedyEqualsTargetGreedyInEveryMode) {
  Fixture f;
  ASSERT_TRUE(f.target && f.draft);
  const std::vector<int32_t> prompt = Prompt(3000);
  const std::vector<int32_t> want = Greedy(*f.target, prompt, 60);
  ASSERT_EQ(want.size(), 60u);
  CudaRound round(*f.target, *f.draft);
  struct Mode {
    const char* name;
    SpeculativeOptions o;
  };
  std::vector<Mode> modes;
  modes.push_back({"dense", {.num_speculative_tokens = 4, .max_tokens = 60}});
  modes.push_back({"sts-full", {.num_speculative_tokens = 4, .max_tokens = 60, .head_map = &f.map,
                                .sts_budget = {.budget_fraction = 1.0}}});
  modes.push_back({"sts-10%-sparse-draft-3", {.num_speculative_tokens = 4, .max_tokens = 60, .head_map = &f.map,
                                              .sts_budget = {.budget_fraction = 0.1, .dense_layers = {-1}},
                                              .draft_head_map = &f.self, .draft_budget = {.budget_fraction = 0.1},
                                              .draft_refresh_rounds = 3}});
  modes.push_back({"k1", {.num_speculative_tokens = 1, .max_tokens = 60}});
  // SANTA with more samples than the context has rows draws every row: exact attention.
  modes.push_back({"sts-full-santa", {.num_speculative_tokens = 3, .max_tokens = 60, .head_map = &f.map,
                                      .sts_budget = {.budget_fraction = 1.0}, .santa_samples = 1 << 24}});
  for (const Mode& m : modes) {
    absl::StatusOr<SpeculativeResult> r = RunStream(round, *f.target, *f.draft, 1, prompt, m.o);
    ASSERT_TRUE(r.ok()) << m.name << ": " << r.status();
    EXPECT_EQ(r->tokens, want) << m.name;
    EXPECT_GT(r->draft_accepted, 0) << m.name;
    if (m.o.head_map != nullptr) {
      EXPECT_GT(r->context_blocks, 0) << m.name;
      if (m.o.sts_budget.budget_fraction == 1.0) EXPECT_EQ(r->selected_blocks, r->context_blocks) << m.name;
    }
    if (m.o.draft_head_map != nullptr) {
      EXPECT_LT(r->draft_selected_blocks, r->draft_context_blocks) << m.name;
      EXPECT_LT(double(r->selected_blocks) / r->context_blocks, 0.35) << m.name;  // 5 of 6 layers at ~10%
    }
    EXPECT_EQ(f.target->block_tables().num_sequences(), 0u);
    EXPECT_EQ(f.draft->block_tables().num_sequences(), 0u);
  }
}

// Step graphs (kept per shape, replayed with new index arrays) give exactly the plain launches'
// tokens and acceptance; most steps replay a graph.
TEST(CudaRoundTest, StepGraphsGiveThePlainLaunchesTokens) {
  Fixture f;
  ASSERT_TRUE(f.target && f.draft);
  const std::vector<int32_t> prompt = Prompt(2000, 300);
  SpeculativeOptions o{.num_speculative_tokens = 4, .max_tokens = 80, .head_map = &f.map,
                       .sts_budget = {.budget_fraction = 0.1}, .draft_head_map = &f.self,
                       .draft_budget = {.budget_fraction = 0.2}, .draft_refresh_rounds = 3};
  CudaRound plain(*f.target, *f.draft, /*use_graphs=*/false);
  absl::StatusOr<SpeculativeResult> want = RunStream(plain, *f.target, *f.draft, 1, prompt, o);
  ASSERT_TRUE(want.ok()) << want.status();
  const runtime::CudaModel::StepGraphStats t0 = f.target->step_graph_stats(), d0 = f.draft->step_graph_stats();
  EXPECT_EQ(t0.captures + t0.replays + d0.captures + d0.replays, 0);
  CudaRound graphed(*f.target, *f.draft);
  absl::StatusOr<SpeculativeResult> got = RunStream(graphed, *f.target, *f.draft, 2, prompt, o);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->tokens, want->tokens);
  EXPECT_EQ(got->draft_accepted, want->draft_accepted);
  EXPECT_EQ(got->selected_blocks, want->selected_blocks);
  const runtime::CudaModel::StepGraphStats t = f.target->step_graph_stats(), d = f.draft->step_graph_stats();
  std::printf("step graphs: target %lld captured, %lld replayed; draft %lld captured, %lld replayed\n",
              static_cast<long long>(t.captures), static_cast<long long>(t.replays),
              static_cast<long long>(d.captures), static_cast<long long>(d.replays));
  EXPECT_GT(t.replays, t.captures);
  EXPECT_GT(d.replays, d.captures);
}

// The device round against the host round on the same models: the same drafts, the same
// selections (BlockSelect against BuildStsSelection over the same masses), so the same
// acceptance, round for round.
TEST(CudaRoundTest, StsAcceptanceMatchesTheHostRound) {
  Fixture f;
  ASSERT_TRUE(f.target && f.draft);
  const std::vector<int32_t> prompt = Prompt(3000, 1500);
  SpeculativeOptions o{.num_speculative_tokens = 4, .max_tokens = 48, .head_map = &f.map,
                       .sts_budget = {.budget_fraction = 0.1}};
  CudaRound device(*f.target, *f.draft);
  HostRound host(*f.target, *f.draft);
  absl::StatusOr<SpeculativeResult> d = RunStream(device, *f.target, *f.draft, 1, prompt, o);
  absl::StatusOr<SpeculativeResult> h = RunStream(host, *f.target, *f.draft, 2, prompt, o);
  ASSERT_TRUE(d.ok() && h.ok()) << d.status() << h.status();
  EXPECT_EQ(d->tokens, h->tokens);
  EXPECT_EQ(d->rounds, h->rounds);
  EXPECT_EQ(d->draft_accepted, h->draft_accepted);
  EXPECT_EQ(d->selected_blocks, h->selected_blocks);
  EXPECT_EQ(d->context_blocks, h->context_blocks);
  std::printf("STS 10%%: device round %lld of %lld accepted, host round %lld of %lld\n",
              static_cast<long long>(d->draft_accepted), static_cast<long long>(d->draft_proposed),
              static_cast<long long>(h->draft_accepted), static_cast<long long>(h->draft_proposed));
}

// Logprobs and penalties: the device round reads the target's rows back for a stream that asks;
// each emitted token comes with its logprob, and greedy (penalised or not) it gives the host
// round's tokens and logprobs on the same models.
TEST(CudaRoundTest, LogprobsAndPenaltiesMatchTheHostRound) {
  Fixture f;
  ASSERT_TRUE(f.target && f.draft);
  const std::vector<int32_t> prompt = Prompt(800);
  for (float temperature : {0.0f, 0.8f}) {
    for (bool penalised : {false, true}) {
      std::vector<runtime::TokenLogprobs> dl, hl;
      SpeculativeOptions o{.num_speculative_tokens = 4, .max_tokens = 32,
                           .sampling = {.temperature = temperature, .seed = 3}, .logprobs = 2};
      if (penalised) o.penalties = {.presence = 0.5f, .frequency = 1.0f, .repetition = 1.3f};
      SpeculativeOptions od = o, oh = o;
      od.on_logprobs = [&](runtime::TokenLogprobs lp) { dl.push_back(std::move(lp)); };
      oh.on_logprobs = [&](runtime::TokenLogprobs lp) { hl.push_back(std::move(lp)); };
      CudaRound device(*f.target, *f.draft);
      HostRound host(*f.target, *f.draft);
      absl::StatusOr<SpeculativeResult> d = RunStream(device, *f.target, *f.draft, 1, prompt, od);
      absl::StatusOr<SpeculativeResult> h = RunStream(host, *f.target, *f.draft, 2, prompt, oh);
      ASSERT_TRUE(d.ok() && h.ok()) << d.status() << h.status();
      ASSERT_EQ(dl.size(), d->tokens.size());
      ASSERT_EQ(hl.size(), h->tokens.size());
      for (size_t i = 0; i < dl.size(); ++i) {
        EXPECT_EQ(dl[i].chosen.token, d->tokens[i]);
        EXPECT_LE(dl[i].chosen.logprob, 0.0f);
        ASSERT_EQ(dl[i].top.size(), 2u);
      }
      if (temperature > 0) continue;  // the two rounds draw their samples differently
      EXPECT_EQ(d->tokens, h->tokens) << (penalised ? "penalised" : "");
      for (size_t i = 0; i < std::min(dl.size(), hl.size()); ++i) {
        EXPECT_NEAR(dl[i].chosen.logprob, hl[i].chosen.logprob, 1e-4) << i;
        EXPECT_EQ(dl[i].top[0].token, hl[i].top[0].token) << i;
      }
    }
  }
}

// Batched rounds: greedy and sampled streams of different k, STS and dense, in one round (they
// run as groups); each gives what it gives alone. Sampled rows are drawn from per-row seeds, so
// they do not depend on the batch either.
TEST(CudaRoundTest, BatchedRoundsEqualEachStreamAlone) {
  Fixture f;
  ASSERT_TRUE(f.target && f.draft);
  std::vector<std::vector<int32_t>> prompts = {Prompt(700), Prompt(300, 1000), Prompt(1200, 3000), Prompt(500, 4000)};
  std::vector<SpeculativeOptions> options(4);
  options[0] = {.num_speculative_tokens = 4, .max_tokens = 40};
  options[1] = {.num_speculative_tokens = 2, .max_tokens = 33, .head_map = &f.map, .sts_budget = {.budget_fraction = 0.2}};
  options[2] = {.num_speculative_tokens = 4, .max_tokens = 50, .head_map = &f.map, .sts_budget = {.budget_fraction = 0.2}};
  options[3] = {.num_speculative_tokens = 3, .max_tokens = 45, .sampling = {.temperature = 0.8f, .seed = 11}};
  CudaRound round(*f.target, *f.draft);
  std::vector<std::vector<int32_t>> alone;
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<SpeculativeResult> r = RunStream(round, *f.target, *f.draft, 100 + i, prompts[i], options[i]);
    ASSERT_TRUE(r.ok()) << r.status();
    alone.push_back(r->tokens);
  }
  // The sampled stream again: the same seed, the same tokens.
  absl::StatusOr<SpeculativeResult> again = RunStream(round, *f.target, *f.draft, 150, prompts[3], options[3]);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->tokens, alone[3]);
  std::vector<std::unique_ptr<SpeculativeStream>> streams;
  std::vector<SpeculativeStream*> ptrs;
  for (int i = 0; i < 4; ++i) {
    streams.push_back(std::make_unique<SpeculativeStream>(*f.target, *f.draft, 200 + i, prompts[i], options[i]));
    ASSERT_TRUE(streams.back()->Begin().ok());
    ptrs.push_back(streams.back().get());
  }
  while (std::any_of(ptrs.begin(), ptrs.end(), [](SpeculativeStream* s) { return !s->done(); })) {
    absl::Status st = round.Run(ptrs);
    ASSERT_TRUE(st.ok()) << st;
  }
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(streams[i]->Finish().ok());
    EXPECT_EQ(streams[i]->result().tokens, alone[i]) << "stream " << i;
  }
}

// A target whose KV pool cannot hold two streams: the round that runs out fails as a whole, the
// newest stream leaves, and the other carries on to exactly what it gives alone.
TEST(CudaRoundTest, FullKvPoolFailsTheRoundAndTheOtherStreamCarriesOn) {
  std::unique_ptr<CudaModel> small = Load("scout-tiny-target", {.kv_budget_tokens = 8 * 16});
  std::unique_ptr<CudaModel> draft = Load("scout-tiny-draft");
  ASSERT_TRUE(small && draft);
  const std::vector<int32_t> p0 = Prompt(40), p1 = Prompt(30, 500);
  SpeculativeOptions o{.num_speculative_tokens = 4, .max_tokens = 70};
  CudaRound round(*small, *draft);
  absl::StatusOr<SpeculativeResult> want = RunStream(round, *small, *draft, 1, p0, o);
  ASSERT_TRUE(want.ok()) << want.status();
  auto a = std::make_unique<SpeculativeStream>(*small, *draft, 2, p0, o);
  auto b = std::make_unique<SpeculativeStream>(*small, *draft, 3, p1, o);
  ASSERT_TRUE(a->Begin().ok());
  ASSERT_TRUE(b->Begin().ok());
  std::vector<SpeculativeStream*> both = {a.get(), b.get()};
  int failures = 0;
  while (!a->done()) {
    absl::Status st = round.Run(both);
    if (!st.ok()) {
      ASSERT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
      ASSERT_EQ(both.size(), 2u) << "one stream alone fits";
      ++failures;
      b.reset();
      both.pop_back();
    }
  }
  EXPECT_EQ(failures, 1);
  ASSERT_TRUE(a->Finish().ok());
  EXPECT_EQ(a->result().tokens, want->tokens);
}

// The target's KV in the host tier: the lists go through the host to plan the prefetch; the
// tokens are the GPU-resident target's.
TEST(CudaRoundTest, HostKvTierTargetGivesTheResidentTargetsTokens) {
  Fixture f;
  ASSERT_TRUE(f.target && f.draft);
  std::unique_ptr<CudaModel> tiered = Load("scout-tiny-target", {.host_kv_tokens = 16384, .gpu_cache_units = 4096,
                                                                 .host_kv_memory = "pinned"});
  ASSERT_TRUE(tiered);
  const std::vector<int32_t> prompt = Prompt(2500, 200);
  SpeculativeOptions o{.num_speculative_tokens = 4, .max_tokens = 40, .head_map = &f.map,
                       .sts_budget = {.budget_fraction = 0.1}, .draft_head_map = &f.self,
                       .draft_budget = {.budget_fraction = 0.2}, .draft_refresh_rounds = 2};
  CudaRound resident(*f.target, *f.draft), tier(*tiered, *f.draft);
  absl::StatusOr<SpeculativeResult> r = RunStream(resident, *f.target, *f.draft, 1, prompt, o);
  absl::StatusOr<SpeculativeResult> t = RunStream(tier, *tiered, *f.draft, 2, prompt, o);
  ASSERT_TRUE(r.ok() && t.ok()) << r.status() << t.status();
  EXPECT_EQ(t->tokens, r->tokens);
  EXPECT_EQ(t->selected_blocks, r->selected_blocks);
  // Every step went through the tier: planned on the host, new units flushed to the store.
  EXPECT_GT(tiered->host_tier_stats().steps, 0);
  EXPECT_GT(tiered->host_tier_stats().bytes_flushed, 0);
}

}  // namespace
}  // namespace scout::round
