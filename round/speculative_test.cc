#include "round/speculative.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <map>
#include <optional>
#include <random>
#include <set>

#include "gtest/gtest.h"
#include "runtime/cpu_model.h"
#include "runtime/test_model.h"

namespace scout::round {
namespace {

using namespace scout::runtime;  // the models and sampling the tests drive

const std::filesystem::path kModels = std::filesystem::path(SCOUT_SOURCE_DIR) / "models";

// BOS and the first `bytes` bytes of the long golden prompt (byte-level fixture tokens); empty
// if the file cannot be read.
std::vector<int32_t> GoldenPrompt(size_t bytes) {
  absl::StatusOr<std::string> text = ReadFile(kModels / "goldens" / "long_prompt.txt");
  if (!text.ok()) return {};
  std::vector<int32_t> prompt = {256};
  for (char c : text->substr(0, bytes)) prompt.push_back(static_cast<unsigned char>(c));
  return prompt;
}

// Rejection sampling keeps the target's distribution: over many seeded verifications of k = 2
// drafted tokens on a 5-token vocabulary, the first emitted token is distributed as p[0], and
// the second (where the first was accepted) as p[1]. Chi-square against the exact distribution.
TEST(VerifyDraftTest, EmittedTokensFollowTheTargetDistribution) {
  const std::vector<std::vector<float>> p = {{0.5f, 0.2f, 0.15f, 0.1f, 0.05f}, {0.05f, 0.05f, 0.6f, 0.2f, 0.1f},
                                             {0.2f, 0.2f, 0.2f, 0.2f, 0.2f}};
  const std::vector<std::vector<float>> q = {{0.1f, 0.4f, 0.1f, 0.2f, 0.2f}, {0.3f, 0.1f, 0.2f, 0.2f, 0.2f}};
  std::mt19937_64 rng(42);
  const int kDraws = 200000;
  std::vector<double> first(5, 0), second(5, 0);
  int second_n = 0;
  for (int n = 0; n < kDraws; ++n) {
    // The draft samples its proposals from q, as GenerateSpeculative does.
    std::vector<int32_t> drafted;
    for (int i = 0; i < 2; ++i) {
      std::discrete_distribution<int> d(q[i].begin(), q[i].end());
      drafted.push_back(d(rng));
    }
    Verdict v = VerifyDraft(p, q, drafted, rng);
    const int32_t t0 = v.accepted >= 1 ? drafted[0] : v.next;
    first[t0] += 1;
    if (v.accepted >= 1) {
      second[v.accepted >= 2 ? drafted[1] : v.next] += 1;
      ++second_n;
    }
  }
  auto chi2 = [](const std::vector<double>& counts, const std::vector<float>& probs, double n) {
    double x = 0;
    for (size_t i = 0; i < counts.size(); ++i) x += std::pow(counts[i] - n * probs[i], 2) / (n * probs[i]);
    return x;
  };
  // 4 degrees of freedom: P(chi2 > 23.5) ~ 1e-4.
  EXPECT_LT(chi2(first, p[0], kDraws), 23.5);
  EXPECT_LT(chi2(second, p[1], second_n), 23.5);
  // And the draft is not simply ignored: some drafts are accepted.
  EXPECT_GT(second_n, kDraws / 10);
}

TEST(VerifyDraftTest, GreedyAcceptsExactlyTheTargetsArgmax) {
  std::vector<std::vector<float>> p = {{0, 1, 0}, {0, 0, 1}, {1, 0, 0}}, q = {{0, 1, 0}, {0, 1, 0}};
  std::mt19937_64 rng(1);
  std::vector<int32_t> drafted = {1, 1};
  Verdict v = VerifyDraft(p, q, drafted, rng);
  EXPECT_EQ(v.accepted, 1);
  EXPECT_EQ(v.next, 2);
  drafted = {1, 2};
  q[1] = {0, 0, 1};
  v = VerifyDraft(p, q, drafted, rng);
  EXPECT_EQ(v.accepted, 2);
  EXPECT_EQ(v.next, 0);  // the bonus token from p[2]
}

// Greedy speculative decoding emits exactly the target's greedy tokens, on the trained fixture
// pair (where the draft agrees often) and on random models (where it rarely does).
TEST(GenerateSpeculativeTest, GreedyOutputEqualsTargetGreedy) {
  auto target = CpuModel::Load(kModels / "scout-tiny-target");
  auto draft = CpuModel::Load(kModels / "scout-tiny-draft");
  ASSERT_TRUE(target.ok() && draft.ok());
  const std::string text = "import os\nimport sys\n\n\ndef main(argv):\n    parser = ";
  std::vector<int32_t> prompt = {256};
  for (char c : text) prompt.push_back(static_cast<unsigned char>(c));
  absl::StatusOr<GenerateResult> plain = Generate(**target, 1, prompt, {.max_tokens = 100});
  ASSERT_TRUE(plain.ok());
  for (int k : {1, 3, 4, 7}) {
    absl::StatusOr<SpeculativeResult> spec =
        GenerateSpeculative(**target, **draft, 2, prompt, {.num_speculative_tokens = k, .max_tokens = 100});
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->tokens, plain->tokens) << "k = " << k;
    std::printf("k=%d: %lld rounds, acceptance %.2f\n", k, (long long)spec->rounds, spec->acceptance_rate());
    EXPECT_GT(spec->draft_accepted, 0);
    EXPECT_EQ((*target)->block_tables().num_sequences(), 0u);
    EXPECT_EQ((*draft)->block_tables().num_sequences(), 0u);
  }
  // Random models of one vocabulary: acceptance near zero, output still exact.
  std::filesystem::path a = testing::FreshDir("a"), b = testing::FreshDir("b");
  testing::WriteRandomModel(a, testing::TinyConfig(), 1);
  testing::WriteRandomModel(b, testing::TinyConfig(), 2);
  auto ta = CpuModel::Load(a);
  auto tb = CpuModel::Load(b);
  ASSERT_TRUE(ta.ok() && tb.ok());
  std::vector<int32_t> small = {1, 5, 9, 3, 7, 7, 2, 30};
  absl::StatusOr<GenerateResult> ref = Generate(**ta, 1, small, {.max_tokens = 60});
  absl::StatusOr<SpeculativeResult> spec = GenerateSpeculative(**ta, **tb, 1, small, {.num_speculative_tokens = 4, .max_tokens = 60});
  ASSERT_TRUE(ref.ok() && spec.ok());
  EXPECT_EQ(spec->tokens, ref->tokens);
  // The model's context limit ends generation cleanly.
  std::vector<int32_t> near_limit(testing::TinyConfig().max_position_embeddings - 5, 3);
  spec = GenerateSpeculative(**ta, **tb, 1, near_limit, {.num_speculative_tokens = 4, .max_tokens = 60});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->tokens.size(), 6u);
  // Mismatched vocabularies are refused.
  testing::WriteRandomModel(b, [] { auto c = testing::TinyConfig(); c.vocab_size = 41; return c; }(), 3);
  auto wrong = CpuModel::Load(b);
  ASSERT_TRUE(wrong.ok());
  EXPECT_EQ(GenerateSpeculative(**ta, **wrong, 1, small, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

// Streams of different prompts, lengths and k run round by round together (each draft step and
// the verification one batched pass) give each stream exactly what it gives alone, greedy and
// sampled; a round that fails leaves every stream as it was, and the next round carries on.
TEST(SpeculativeStreamTest, BatchedRoundsEqualEachStreamAlone) {
  auto target = CpuModel::Load(kModels / "scout-tiny-target");
  auto draft = CpuModel::Load(kModels / "scout-tiny-draft");
  ASSERT_TRUE(target.ok() && draft.ok());
  auto bytes = [](const std::string& text) {
    std::vector<int32_t> ids = {256};
    for (char c : text) ids.push_back(static_cast<unsigned char>(c));
    return ids;
  };
  const std::vector<std::vector<int32_t>> prompts = {bytes("import os\nimport sys\n\n"), bytes("def add(a, b):\n"),
                                                     bytes("class Stack:\n    def __init__(self):\n        self."),
                                                     bytes("for i in range(")};
  std::vector<SpeculativeOptions> options;
  for (int i = 0; i < 4; ++i) {
    SpeculativeOptions o{.num_speculative_tokens = 2 + i, .max_tokens = 30 + 7 * i};
    if (i == 3) o.sampling = {.temperature = 0.8f, .seed = 11};
    options.push_back(o);
  }
  std::vector<std::vector<int32_t>> alone;
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<SpeculativeResult> r = GenerateSpeculative(**target, **draft, 100 + i, prompts[i], options[i]);
    ASSERT_TRUE(r.ok()) << r.status();
    alone.push_back(r->tokens);
  }
  std::vector<std::unique_ptr<SpeculativeStream>> streams;
  std::vector<SpeculativeStream*> ptrs;
  for (int i = 0; i < 4; ++i) {
    streams.push_back(std::make_unique<SpeculativeStream>(**target, **draft, 200 + i, prompts[i], options[i]));
    ASSERT_TRUE(streams.back()->Begin().ok());
    ptrs.push_back(streams.back().get());
  }
  while (std::any_of(ptrs.begin(), ptrs.end(), [](SpeculativeStream* s) { return !s->done(); })) {
    ASSERT_TRUE(HostRound(**target, **draft).Run(ptrs).ok());
  }
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(streams[i]->Finish().ok());
    EXPECT_EQ(streams[i]->result().tokens, alone[i]) << "stream " << i;
  }
  streams.clear();
  EXPECT_EQ((*target)->block_tables().num_sequences(), 0u);
  EXPECT_EQ((*draft)->block_tables().num_sequences(), 0u);

  // A target whose KV pool cannot hold two of them: the round that runs out fails as a whole
  // (the draft's steps of that round rolled back), the newest stream leaves, and the other
  // carries on to exactly what it gives alone.
  auto small = CpuModel::Load(kModels / "scout-tiny-target", {.kv_budget_tokens = 8 * 16});
  ASSERT_TRUE(small.ok());
  SpeculativeOptions o{.num_speculative_tokens = 4, .max_tokens = 70};
  absl::StatusOr<SpeculativeResult> want = GenerateSpeculative(**small, **draft, 1, prompts[0], o);
  ASSERT_TRUE(want.ok()) << want.status();
  auto a = std::make_unique<SpeculativeStream>(**small, **draft, 2, prompts[0], o);
  auto b = std::make_unique<SpeculativeStream>(**small, **draft, 3, prompts[1], o);
  ASSERT_TRUE(a->Begin().ok());
  ASSERT_TRUE(b->Begin().ok());
  std::vector<SpeculativeStream*> both = {a.get(), b.get()};
  int failures = 0;
  while (!a->done()) {
    absl::Status st = HostRound(**small, **draft).Run(both);
    if (!st.ok()) {
      ASSERT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
      ASSERT_EQ(both.size(), 2u) << "one stream alone fits";
      ++failures;
      b.reset();  // the newest gives way: its sequences are released
      both.pop_back();
    }
  }
  EXPECT_EQ(failures, 1);
  ASSERT_TRUE(a->Finish().ok());
  EXPECT_EQ(a->result().tokens, want->tokens);
}

// The sparse draft (its later steps over its own top blocks) changes only what is proposed: greedy
// output is still exactly the target's; a map that is not the draft's own is refused.
TEST(GenerateSpeculativeTest, SparseDraftKeepsGreedyOutput) {
  auto target = CpuModel::Load(kModels / "scout-tiny-target");
  auto draft = CpuModel::Load(kModels / "scout-tiny-draft");
  ASSERT_TRUE(target.ok() && draft.ok());
  const std::vector<int32_t> prompt = GoldenPrompt(1200);
  ASSERT_EQ(prompt.size(), 1201u);
  absl::StatusOr<GenerateResult> plain = Generate(**target, 1, prompt, {.max_tokens = 60});
  ASSERT_TRUE(plain.ok());
  const HeadMap self = SelfHeadMap((*draft)->config());
  SpeculativeOptions o{.num_speculative_tokens = 4, .max_tokens = 60, .draft_head_map = &self,
                       .draft_budget = {.budget_fraction = 0.1}};
  absl::StatusOr<SpeculativeResult> spec = GenerateSpeculative(**target, **draft, 2, prompt, o);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->tokens, plain->tokens);
  EXPECT_GT(spec->draft_accepted, 0);
  o.draft_refresh_rounds = 4;  // dense draft step only every fourth round
  spec = GenerateSpeculative(**target, **draft, 4, prompt, o);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->tokens, plain->tokens);
  EXPECT_GT(spec->draft_accepted, 0);
  o.draft_refresh_rounds = 1;
  const HeadMap wrong = DefaultHeadMap((*target)->config(), (*draft)->config());
  o.draft_head_map = &wrong;
  EXPECT_EQ(GenerateSpeculative(**target, **draft, 3, prompt, o).status().code(), absl::StatusCode::kInvalidArgument);
}

// Passes every call through to `inner` and keeps a copy of each verification pass's Selection
// (nullopt for a verification without one) and the context it covered, in blocks.
class RecordingBackend final : public ModelBackend {
 public:
  explicit RecordingBackend(ModelBackend& inner) : inner_(inner) {}
  const ModelConfig& config() const override { return inner_.config(); }
  absl::Status AddSequence(SequenceId seq) override { return inner_.AddSequence(seq); }
  absl::Status ReleaseSequence(SequenceId seq) override { return inner_.ReleaseSequence(seq); }
  absl::Status TruncateSequence(SequenceId seq, int64_t n) override { return inner_.TruncateSequence(seq, n); }
  absl::StatusOr<int64_t> SequenceLength(SequenceId seq) const override { return inner_.SequenceLength(seq); }
  KvCacheUsage kv_cache_usage() const override { return inner_.kv_cache_usage(); }
  absl::Status Forward(std::span<const SequenceInput> batch, std::vector<float>* logits) override {
    if (batch.size() == 1 && batch[0].all_logits) {
      absl::StatusOr<int64_t> len = inner_.SequenceLength(batch[0].seq);
      if (!len.ok()) return len.status();
      verifications.push_back({batch[0].selection ? std::optional(*batch[0].selection) : std::nullopt,
                               kvstore::BlocksFor(*len + static_cast<int64_t>(batch[0].tokens.size()))});
    }
    return inner_.Forward(batch, logits);
  }

  struct Verification {
    std::optional<kvstore::Selection> selection;
    int64_t nb = 0;
  };
  std::vector<Verification> verifications;

 private:
  ModelBackend& inner_;
};

// The turnover GenerateSpeculative reports equals a recount, with sets, over the lists the target
// was actually given; it is nonzero on the fixture pair at 20% of blocks, and zero at 100%, where
// every list holds every block and so all of last round's.
TEST(GenerateSpeculativeTest, StsTurnoverMatchesTheListsTheTargetRead) {
  auto target = CpuModel::Load(kModels / "scout-tiny-target");
  auto draft = CpuModel::Load(kModels / "scout-tiny-draft");
  ASSERT_TRUE(target.ok() && draft.ok());
  const std::vector<int32_t> prompt = GoldenPrompt(1200);
  ASSERT_EQ(prompt.size(), 1201u);
  const HeadMap map = DefaultHeadMap((*target)->config(), (*draft)->config());
  for (double fraction : {0.2, 1.0}) {
    RecordingBackend recorder(**target);
    const StsBudget budget{.budget_fraction = fraction, .sink_blocks = 2, .window_blocks = 3};
    SpeculativeOptions o{.num_speculative_tokens = 4, .max_tokens = 60,
                         .sampling = {.temperature = 1.0f, .seed = 5}, .head_map = &map, .sts_budget = budget};
    absl::StatusOr<SpeculativeResult> r = GenerateSpeculative(recorder, **draft, 2, prompt, o);
    ASSERT_TRUE(r.ok()) << r.status();
    int64_t want_new = 0, want_movable = 0, want_pairs = 0;
    const std::vector<RecordingBackend::Verification>& v = recorder.verifications;
    for (size_t i = 1; i < v.size(); ++i) {
      if (!v[i - 1].selection || !v[i].selection) continue;
      ++want_pairs;
      const kvstore::Selection &prev = *v[i - 1].selection, &cur = *v[i].selection;
      for (int u = 0; u < cur.num_layers * cur.num_kv_heads; ++u) {
        const std::set<int32_t> before(prev.blocks.begin() + prev.indptr[u], prev.blocks.begin() + prev.indptr[u + 1]);
        for (int32_t j = cur.indptr[u]; j < cur.indptr[u + 1]; ++j) {
          const int32_t b = cur.blocks[j];
          if (b < budget.sink_blocks || b >= v[i].nb - budget.window_blocks) continue;
          ++want_movable;
          want_new += !before.contains(b);
        }
      }
    }
    EXPECT_EQ(r->turnover_round_pairs, want_pairs) << fraction;
    EXPECT_EQ(r->turnover_movable_blocks, want_movable) << fraction;
    EXPECT_EQ(r->turnover_new_blocks, want_new) << fraction;
    EXPECT_GT(r->turnover_round_pairs, 5) << fraction;
    EXPECT_GT(r->turnover_movable_blocks, 0) << fraction;
    if (fraction < 1.0) {
      EXPECT_GT(r->turnover_new_blocks, 0);  // the draft's attention moves between rounds
      EXPECT_LT(r->turnover(), 1.0);
    } else {
      EXPECT_EQ(r->turnover_new_blocks, 0);
    }
    std::printf("budget %.0f%%: turnover %.3f over %lld round pairs\n", 100 * fraction, r->turnover(),
                static_cast<long long>(r->turnover_round_pairs));
  }
}

// With sampling, the first generated token follows the target's distribution whatever the draft.
TEST(GenerateSpeculativeTest, SampledFirstTokenFollowsTarget) {
  std::filesystem::path a = testing::FreshDir("a"), b = testing::FreshDir("b");
  testing::WriteRandomModel(a, testing::TinyConfig(), 11);
  testing::WriteRandomModel(b, testing::TinyConfig(), 12);
  auto target = CpuModel::Load(a);
  auto draft = CpuModel::Load(b);
  ASSERT_TRUE(target.ok() && draft.ok());
  std::vector<int32_t> prompt = {1, 4, 8, 15, 16, 23};
  SamplingParams sp{.temperature = 1.0f};
  std::vector<float> logits;
  ASSERT_TRUE((*target)->AddSequence(9).ok());
  SequenceInput in{.seq = 9, .tokens = prompt};
  ASSERT_TRUE((*target)->Forward({&in, 1}, &logits).ok());
  ASSERT_TRUE((*target)->ReleaseSequence(9).ok());
  std::vector<float> want(logits.size());
  Sampler(sp).Distribution(logits, want);
  // The draft's own distribution must differ clearly, or the test could not tell them apart.
  ASSERT_TRUE((*draft)->AddSequence(9).ok());
  ASSERT_TRUE((*draft)->Forward({&in, 1}, &logits).ok());
  ASSERT_TRUE((*draft)->ReleaseSequence(9).ok());
  std::vector<float> draft_dist(logits.size());
  Sampler(sp).Distribution(logits, draft_dist);
  double tv_models = 0;
  for (size_t i = 0; i < want.size(); ++i) tv_models += std::abs(want[i] - draft_dist[i]) / 2;
  ASSERT_GT(tv_models, 0.25);
  const int kRuns = 4000;
  std::vector<double> count(want.size(), 0);
  for (int r = 0; r < kRuns; ++r) {
    sp.seed = r;
    auto res = GenerateSpeculative(**target, **draft, 1, prompt, {.num_speculative_tokens = 3, .max_tokens = 1, .sampling = sp});
    ASSERT_TRUE(res.ok());
    count[res->tokens[0]] += 1;
  }
  // Total variation distance from the target's distribution: for 40 outcomes and 4000 draws the
  // expected TV of an exact sampler is ~0.05; 0.1 leaves room without hiding a sampler that
  // followed the draft (the two models' distributions are > 0.25 apart, checked above).
  double tv = 0;
  for (size_t i = 0; i < want.size(); ++i) tv += std::abs(count[i] / kRuns - want[i]) / 2;
  EXPECT_LT(tv, 0.1);
}

// Verification over a Selection of every block is plain dense verification: greedy STS output
// equals the target's greedy output token for token. At a 10% budget it still runs end to end.
TEST(StsSpeculativeTest, FullSelectionEqualsDenseAndSparseRuns) {
  auto target = CpuModel::Load(kModels / "scout-tiny-target");
  auto draft = CpuModel::Load(kModels / "scout-tiny-draft");
  ASSERT_TRUE(target.ok() && draft.ok());
  HeadMap map = DefaultHeadMap((*target)->config(), (*draft)->config());
  std::vector<int32_t> prompt = {256};
  for (int i = 0; i < 900; ++i) prompt.push_back("def f(x):\n    return x + 1\n\n"[i % 29]);
  absl::StatusOr<GenerateResult> plain = Generate(**target, 1, prompt, {.max_tokens = 40});
  ASSERT_TRUE(plain.ok());
  SpeculativeOptions opt{.num_speculative_tokens = 4, .max_tokens = 40, .head_map = &map,
                         .sts_budget = {.budget_fraction = 1.0}};
  absl::StatusOr<SpeculativeResult> full = GenerateSpeculative(**target, **draft, 2, prompt, opt);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->tokens, plain->tokens);
  EXPECT_EQ(full->selected_blocks, full->context_blocks);
  opt.sts_budget = {.budget_fraction = 0.1};
  absl::StatusOr<SpeculativeResult> sparse = GenerateSpeculative(**target, **draft, 3, prompt, opt);
  ASSERT_TRUE(sparse.ok()) << sparse.status();
  EXPECT_EQ(sparse->tokens.size(), 40u);
  EXPECT_LT(double(sparse->selected_blocks) / sparse->context_blocks, 0.15);
}

}  // namespace
}  // namespace scout::round
