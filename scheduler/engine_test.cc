#include "scheduler/engine.h"

#include <atomic>
#include <chrono>
#include <filesystem>
#include <set>
#include <thread>

#include "gtest/gtest.h"
#include "runtime/test_model.h"
#include "text/utf8.h"

namespace scout::scheduler {
namespace {

const std::filesystem::path kModels = std::filesystem::path(SCOUT_SOURCE_DIR) / "models";

std::unique_ptr<Engine> MakeEngine(monitoring::ServerMetrics* metrics, int64_t max_model_len = 0) {
  auto model = runtime::CpuModel::Load(kModels / "scout-tiny-target");
  auto tok = text::LoadTokenizer(kModels / "scout-tiny-target");
  EXPECT_TRUE(model.ok() && tok.ok());
  return std::make_unique<Engine>(std::move(*model), nullptr, std::move(*tok), metrics,
                                  EngineOptions{.max_model_len = max_model_len});
}

// The fixture target with the fixture draft (speculative decoding), default options.
std::unique_ptr<Engine> MakeDraftEngine(monitoring::ServerMetrics* metrics) {
  auto model = runtime::CpuModel::Load(kModels / "scout-tiny-target");
  auto draft = runtime::CpuModel::Load(kModels / "scout-tiny-draft");
  auto tok = text::LoadTokenizer(kModels / "scout-tiny-target");
  EXPECT_TRUE(model.ok() && draft.ok() && tok.ok());
  if (!model.ok() || !draft.ok() || !tok.ok()) return nullptr;
  return std::make_unique<Engine>(std::move(*model), std::move(*draft), std::move(*tok), metrics, EngineOptions{});
}

// Streamed pieces add up to the returned text; a stop string never appears in either, and text
// held back as a possible stop prefix is released when it turns out not to be one.
TEST(EngineTest, StopStringsAndStreamingAgree) {
  monitoring::ServerMetrics metrics;
  auto engine = MakeEngine(&metrics);
  const std::string prompt = "import numpy as np\n\n\ndef softmax(x):\n    ";
  auto plain = engine->Complete({.prompt = prompt, .max_tokens = 60});
  ASSERT_TRUE(plain.ok()) << plain.status();
  ASSERT_GE(plain->text.size(), 20u);
  // Stop on a piece of the greedy text: generation ends right before it.
  const std::string stop = plain->text.substr(10, 4);
  std::string streamed;
  auto stopped = engine->Complete({.prompt = prompt, .max_tokens = 60, .stop = {stop, "zzzz-never"}},
                                  [&](absl::string_view piece, std::span<const runtime::TokenLogprobs>, std::span<const int32_t>) {
                                    streamed.append(piece.data(), piece.size());
                                    return true;
                                  });
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->finish_reason, "stop");
  EXPECT_EQ(stopped->text, plain->text.substr(0, plain->text.find(stop)));
  EXPECT_EQ(streamed, stopped->text);
  // A stop string that only ever half-matches: everything comes out, nothing is lost.
  streamed.clear();
  auto half = engine->Complete({.prompt = prompt, .max_tokens = 60, .stop = {plain->text.substr(0, 3) + "\x01"}},
                               [&](absl::string_view piece, std::span<const runtime::TokenLogprobs>, std::span<const int32_t>) {
                                 streamed.append(piece.data(), piece.size());
                                 return true;
                               });
  ASSERT_TRUE(half.ok());
  EXPECT_EQ(half->finish_reason, "length");
  EXPECT_EQ(half->text, plain->text);
  EXPECT_EQ(streamed, plain->text);
}

// Regression: a byte-level BPE token can end inside a UTF-8 character; streamed pieces (and the
// JSON built from them) must still be whole characters. Random weights sampled at temperature 1
// emit such byte tokens often.
TEST(EngineTest, StreamedPiecesAreWholeUtf8WithBpeTokenizer) {
  const std::filesystem::path dir = runtime::testing::FreshDir("bpe_model");
  auto tok = text::LoadTokenizer(kModels / "tokenizers" / "llama3");
  ASSERT_TRUE(tok.ok()) << tok.status();
  runtime::ModelConfig c = runtime::testing::TinyConfig();
  c.vocab_size = (*tok)->vocab_size();
  runtime::testing::WriteRandomModel(dir, c, 9);
  auto model = runtime::CpuModel::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  monitoring::ServerMetrics metrics;
  Engine engine(std::move(*model), nullptr, std::move(*tok), &metrics, EngineOptions{});
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    std::string streamed;
    int pieces = 0;
    auto r = engine.Complete({.prompt = "héllo wörld ✓", .max_tokens = 200,
                              .sampling = {.temperature = 1.0f, .seed = seed}, .ignore_eos = true},
                             [&](absl::string_view piece, std::span<const runtime::TokenLogprobs>, std::span<const int32_t>) {
                               EXPECT_TRUE(text::IsValidUtf8(piece)) << "piece " << pieces;
                               streamed.append(piece.data(), piece.size());
                               ++pieces;
                               return true;
                             });
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(text::IsValidUtf8(r->text));
    EXPECT_EQ(streamed, r->text);
  }
}

// Continuous batching: concurrent requests share decode passes, and each gets the text it gets
// alone; one cancelled mid-stream leaves the others running; two turns of one session queue
// behind each other instead of interleaving.
TEST(EngineTest, ConcurrentRequestsAreBatchedAndMatchSequential) {
  monitoring::ServerMetrics metrics;
  auto engine = MakeEngine(&metrics);
  const std::vector<std::string> prompts = {"import os\n", "def f(x):\n    return", "class A:\n    def ",
                                            "for i in range(", "# comment\nx = ", "while True:\n    "};
  // The last two sample with seeds: a seeded request gives the same text whatever is batched
  // with it.
  auto request = [&](size_t i) {
    CompletionRequest r{.prompt = prompts[i], .max_tokens = 24};
    if (i + 2 >= prompts.size()) r.sampling = {.temperature = 0.9f, .top_p = 0.95f, .seed = 3 + i};
    return r;
  };
  std::vector<std::string> alone;
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto r = engine->Complete(request(i));
    ASSERT_TRUE(r.ok()) << r.status();
    alone.push_back(r->text);
  }
  const int64_t steps_before = engine->stats().decode_steps;
  std::vector<std::string> together(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] {
      auto r = engine->Complete(request(i));
      together[i] = r.ok() ? r->text : std::string(r.status().message());
    });
  }
  // One more that cancels after its first piece of text.
  std::string cancelled_reason;
  threads.emplace_back([&] {
    auto r = engine->Complete({.prompt = "import sys\n", .max_tokens = 200, .ignore_eos = true},
                              [](absl::string_view, std::span<const runtime::TokenLogprobs>, std::span<const int32_t>) { return false; });
    cancelled_reason = r.ok() ? r->finish_reason : std::string(r.status().message());
  });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(together, alone);
  EXPECT_EQ(cancelled_reason, "cancelled");
  EXPECT_GE(engine->stats().max_batch, 2);
  EXPECT_LT(engine->stats().decode_steps - steps_before, 7 * 24);  // fewer passes than requests x tokens

  // Two turns of one session at once: whichever comes second waits for the first and continues
  // after it (the order is the threads', so the test does not assume one).
  std::vector<absl::StatusOr<CompletionResult>> turns(2, absl::UnknownError("not run"));
  std::thread t1([&] { turns[0] = engine->Complete({.prompt = "def g(y):\n", .max_tokens = 8, .session_id = "s"}); });
  std::thread t2([&] { turns[1] = engine->Complete({.prompt = "\n", .max_tokens = 8, .session_id = "s"}); });
  t1.join();
  t2.join();
  ASSERT_TRUE(turns[0].ok() && turns[1].ok()) << turns[0].status() << turns[1].status();
  const int later = turns[0]->cached_tokens > turns[1]->cached_tokens ? 0 : 1;
  EXPECT_EQ(turns[1 - later]->cached_tokens, 0);
  EXPECT_GT(turns[later]->cached_tokens, 0);
  EXPECT_EQ(engine->ListSessions().at(0).tokens, turns[later]->cached_tokens + turns[later]->prompt_tokens + 8);
}

uint64_t PassesOf(prometheus::Histogram& h) { return h.Collect().histogram.sample_count; }

// A long prompt does not stall the requests already decoding: its prefill passes (at most
// max_num_batched_tokens each) alternate with their decode steps, so a decoding request keeps
// getting tokens while the long prompt prefills; and both give what they give alone. With and
// without a draft (the speculative streams prefill step by step as well).
TEST(EngineTest, LongPromptPrefillInterleavesWithDecoding) {
  for (bool with_draft : {false, true}) {
    SCOPED_TRACE(with_draft ? "with a draft" : "without a draft");
    monitoring::ServerMetrics metrics;
    auto model = runtime::CpuModel::Load(kModels / "scout-tiny-target");
    auto tok = text::LoadTokenizer(kModels / "scout-tiny-target");
    ASSERT_TRUE(model.ok() && tok.ok());
    std::unique_ptr<runtime::ModelBackend> draft;
    if (with_draft) {
      auto d = runtime::CpuModel::Load(kModels / "scout-tiny-draft");
      ASSERT_TRUE(d.ok());
      draft = std::move(*d);
    }
    Engine engine(std::move(*model), std::move(draft), std::move(*tok), &metrics,
                  EngineOptions{.max_num_batched_tokens = 64});
    std::string long_prompt;
    while (long_prompt.size() < 1500) long_prompt += "def f" + std::to_string(long_prompt.size()) + "(x):\n    return x\n";
    const CompletionRequest decoding{.prompt = "import os\n", .max_tokens = 300, .ignore_eos = true};
    const CompletionRequest prompt{.prompt = long_prompt, .max_tokens = 4, .ignore_eos = true};
    auto decoding_alone = engine.Complete(decoding);
    auto prompt_alone = engine.Complete(prompt);
    ASSERT_TRUE(decoding_alone.ok() && prompt_alone.ok());

    std::atomic<int> pieces{0};
    absl::StatusOr<CompletionResult> decoded = absl::UnknownError("not run"), prefilled = decoded;
    std::thread a([&] {
      decoded = engine.Complete(decoding, [&](absl::string_view, std::span<const runtime::TokenLogprobs>, std::span<const int32_t>) {
        ++pieces;
        return true;
      });
    });
    while (pieces.load() < 3) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const int before = pieces.load();
    const uint64_t passes_before = PassesOf(metrics.prefill_pass_time);
    prefilled = engine.Complete(prompt);
    const int during = pieces.load() - before;
    const uint64_t passes_during = PassesOf(metrics.prefill_pass_time) - passes_before;
    a.join();
    ASSERT_TRUE(decoded.ok() && prefilled.ok()) << decoded.status() << prefilled.status();
    EXPECT_EQ(decoded->text, decoding_alone->text);
    EXPECT_EQ(prefilled->text, prompt_alone->text);
    // About 1500 / 64 prefill passes, each followed by a decode step of the other request;
    // without a draft the chunks ride on the decode steps (at most 63 tokens beside the one
    // decoding), so there are no passes of their own.
    EXPECT_GE(during, 10) << "the decoding request got " << during << " pieces while the long prompt ran";
    EXPECT_GT(metrics.prefill_tokens.Value(), 2 * 1500);
    if (!with_draft) EXPECT_EQ(passes_during, 0u);
  }
}

// Regression: with at least max_num_batched_tokens requests decoding, a new prompt still moves
// (at least PrefillPacer::kMinChunk tokens a step) instead of waiting for them all to finish.
TEST(EngineTest, APromptMovesWhileMoreRequestsDecodeThanTheTokenBound) {
  monitoring::ServerMetrics metrics;
  auto model = runtime::CpuModel::Load(kModels / "scout-tiny-target");
  auto tok = text::LoadTokenizer(kModels / "scout-tiny-target");
  ASSERT_TRUE(model.ok() && tok.ok());
  Engine engine(std::move(*model), nullptr, std::move(*tok), &metrics,
                EngineOptions{.max_num_seqs = 8, .max_num_batched_tokens = 2});
  std::atomic<int> pieces{0}, finished{0};
  std::vector<std::thread> decoders;
  for (int i = 0; i < 3; ++i) {
    decoders.emplace_back([&, i] {
      auto r = engine.Complete({.prompt = "import os" + std::to_string(i) + "\n", .max_tokens = 800, .ignore_eos = true},
                               [&](absl::string_view, std::span<const runtime::TokenLogprobs>, std::span<const int32_t>) {
                                 ++pieces;
                                 return true;
                               });
      EXPECT_TRUE(r.ok()) << r.status();
      ++finished;
    });
  }
  while (pieces.load() < 60) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::string prompt;
  while (prompt.size() < 200) prompt += "def g(y):\n    return y\n";
  auto r = engine.Complete({.prompt = prompt, .max_tokens = 2, .ignore_eos = true});
  const int done_before = finished.load();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(done_before, 0) << "the prompt waited for the decoders to finish";
  for (std::thread& t : decoders) t.join();
}

// Admission by KV budget: with a pool of 16 blocks, two requests that may reach 10 blocks each
// run one after the other instead of failing halfway; one that can never fit is refused at once.
TEST(EngineTest, KvBudgetAdmissionQueuesWhatDoesNotFit) {
  auto model = runtime::CpuModel::Load(kModels / "scout-tiny-target", {.kv_budget_tokens = 256});
  auto tok = text::LoadTokenizer(kModels / "scout-tiny-target");
  ASSERT_TRUE(model.ok() && tok.ok());
  monitoring::ServerMetrics metrics;
  Engine engine(std::move(*model), nullptr, std::move(*tok), &metrics, EngineOptions{});
  std::vector<std::string> out(2);
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&, i] {
      auto r = engine.Complete({.prompt = i == 0 ? "import os\n" : "def f(x):\n", .max_tokens = 150, .ignore_eos = true});
      out[i] = r.ok() ? r->finish_reason : std::string(r.status().message());
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(out[0], "length");
  EXPECT_EQ(out[1], "length");
  EXPECT_EQ(engine.stats().max_batch, 1);  // never both at once: 20 blocks > 16
  auto huge = engine.Complete({.prompt = "x", .max_tokens = 300});
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(huge.status().message().find("KV pool full"), std::string::npos) << huge.status();
  auto ok = engine.Complete({.prompt = "x", .max_tokens = 20});
  EXPECT_TRUE(ok.ok()) << ok.status();
}

// Session eviction: past the idle timeout a session's KV is dropped and its next request is
// told so once (the id then starts afresh); under KV pressure an idle session gives way to a
// request that would not fit otherwise.
TEST(EngineTest, IdleSessionsAreEvictedByTimeoutAndUnderPressure) {
  auto load = [](int64_t kv_tokens, double timeout) {
    auto model = runtime::CpuModel::Load(kModels / "scout-tiny-target", {.kv_budget_tokens = kv_tokens});
    auto tok = text::LoadTokenizer(kModels / "scout-tiny-target");
    EXPECT_TRUE(model.ok() && tok.ok());
    return std::make_pair(std::move(*model), std::move(*tok));
  };
  {
    monitoring::ServerMetrics metrics;
    auto [model, tok] = load(0, 0);
    Engine engine(std::move(model), nullptr, std::move(tok), &metrics, EngineOptions{.session_idle_timeout_s = 0.2});
    ASSERT_TRUE(engine.Complete({.prompt = "def f(x):\n", .max_tokens = 4, .session_id = "a"}).ok());
    ASSERT_EQ(engine.ListSessions().size(), 1u);
    std::this_thread::sleep_for(std::chrono::milliseconds(800));
    EXPECT_TRUE(engine.ListSessions().empty());
    auto gone = engine.Complete({.prompt = "\n", .max_tokens = 4, .session_id = "a"});
    EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
    EXPECT_NE(gone.status().message().find("evicted"), std::string::npos) << gone.status();
    auto fresh = engine.Complete({.prompt = "def g(y):\n", .max_tokens = 4, .session_id = "a"});
    ASSERT_TRUE(fresh.ok()) << fresh.status();
    EXPECT_EQ(fresh->cached_tokens, 0);
  }
  {
    monitoring::ServerMetrics metrics;
    auto [model, tok] = load(256, 0);  // 16 blocks
    Engine engine(std::move(model), nullptr, std::move(tok), &metrics, EngineOptions{});
    ASSERT_TRUE(engine.Complete({.prompt = "import os\n", .max_tokens = 150, .ignore_eos = true, .session_id = "big"}).ok());
    // The idle session holds 10 blocks; this one needs 10 of the 16.
    auto r = engine.Complete({.prompt = "def f(x):\n", .max_tokens = 150, .ignore_eos = true});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(engine.ListSessions().empty());
    EXPECT_EQ(engine.Complete({.prompt = "x", .max_tokens = 2, .session_id = "big"}).status().code(),
              absl::StatusCode::kNotFound);
  }
}

// Agent sessions with speculative decoding: both models keep the session's KV, and the second
// turn is exactly the one-off request over the whole conversation (greedy: the target's text).
TEST(EngineTest, SessionsWithADraftContinueExactly) {
  monitoring::ServerMetrics metrics;
  std::unique_ptr<Engine> engine_ptr = MakeDraftEngine(&metrics);
  ASSERT_NE(engine_ptr, nullptr);
  Engine& engine = *engine_ptr;
  const std::string p1 = "def add(a, b):\n    ", p2 = "\n\ndef sub(a, b):\n    ";
  auto t1 = engine.Complete({.prompt = p1, .max_tokens = 12, .session_id = "agent"});
  ASSERT_TRUE(t1.ok()) << t1.status();
  auto t2 = engine.Complete({.prompt = p2, .max_tokens = 12, .session_id = "agent"});
  ASSERT_TRUE(t2.ok()) << t2.status();
  EXPECT_EQ(t2->cached_tokens, t1->prompt_tokens + t1->completion_tokens - 1);
  auto one = engine.Complete({.prompt = p1 + t1->text + p2, .max_tokens = 12});
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(t2->text, one->text);
  EXPECT_EQ(engine.ListSessions().at(0).tokens, t2->cached_tokens + t2->prompt_tokens + t2->completion_tokens);
  EXPECT_TRUE(engine.DeleteSession("agent").ok());
  // The requests' lives in /metrics: three finished by length, the session's reuse counted.
  EXPECT_EQ(metrics.session_cached_tokens.Value(), t2->cached_tokens);
  // Acceptance per draft position: accepted tokens are a prefix of each round's drafts, so the
  // counts fall with the position and add up to the accepted total.
  double per_position = 0;
  for (int i = 0; i < 8; ++i) {
    per_position += metrics.AcceptedAtPosition(i).Value();
    if (i > 0) EXPECT_LE(metrics.AcceptedAtPosition(i).Value(), metrics.AcceptedAtPosition(i - 1).Value());
  }
  EXPECT_GT(metrics.AcceptedAtPosition(0).Value(), 0);
  EXPECT_EQ(per_position, metrics.accepted_tokens.Value());
  const std::string text = metrics.Serialize();
  for (const char* want : {"scout_request_success_total{finished_reason=\"length\"} 3",
                           "scout_e2e_request_latency_seconds_count 3", "scout_request_queue_time_seconds_count 3",
                           "scout_request_prefill_time_seconds_count 3", "scout_request_decode_time_seconds_count 3",
                           "scout_request_generation_tokens_sum 36"}) {
    EXPECT_NE(text.find(want), std::string::npos) << want;
  }
}

// With a draft, logprobs are the target's: greedy speculative decoding emits the target's greedy
// tokens, each with the probability the target alone gives it (within float error: the
// verification scores k + 1 rows a pass, plain decoding one).
TEST(EngineTest, LogprobsWithADraftAreTheTargets) {
  monitoring::ServerMetrics m1, m2;
  std::unique_ptr<Engine> spec = MakeDraftEngine(&m1);
  std::unique_ptr<Engine> plain = MakeEngine(&m2);
  ASSERT_NE(spec, nullptr);
  const CompletionRequest req{.prompt = "def add(a, b):\n    ", .max_tokens = 12, .ignore_eos = true, .logprobs = 3};
  auto a = spec->Complete(req);
  auto b = plain->Complete(req);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  ASSERT_EQ(a->text, b->text);
  ASSERT_EQ(a->logprobs.size(), 12u);
  ASSERT_EQ(b->logprobs.size(), 12u);
  for (size_t i = 0; i < 12; ++i) {
    EXPECT_EQ(a->logprobs[i].chosen.token, b->logprobs[i].chosen.token);
    EXPECT_NEAR(a->logprobs[i].chosen.logprob, b->logprobs[i].chosen.logprob, 1e-3) << i;
    ASSERT_EQ(a->logprobs[i].top.size(), 3u);
    for (size_t t = 0; t < 3; ++t) {
      EXPECT_EQ(a->logprobs[i].top[t].token, b->logprobs[i].top[t].token) << i;
      EXPECT_NEAR(a->logprobs[i].top[t].logprob, b->logprobs[i].top[t].logprob, 1e-3) << i;
    }
    EXPECT_FALSE(a->logprobs[i].chosen.bytes.empty());
  }
}

// With a draft, the penalties act on the target's verification rows: greedy speculative decoding
// with them gives the plain engine's penalised greedy text, and they change it.
TEST(EngineTest, PenaltiesWithADraftGiveTheTargetsPenalisedText) {
  monitoring::ServerMetrics m1, m2;
  std::unique_ptr<Engine> spec = MakeDraftEngine(&m1);
  std::unique_ptr<Engine> plain = MakeEngine(&m2);
  ASSERT_NE(spec, nullptr);
  CompletionRequest req{.prompt = "def add(a, b):\n    ", .max_tokens = 40, .ignore_eos = true};
  auto unpenalised = spec->Complete(req);
  req.penalties = {.presence = 0.5f, .frequency = 1.0f, .repetition = 1.3f};
  auto a = spec->Complete(req);
  auto b = plain->Complete(req);
  ASSERT_TRUE(unpenalised.ok() && a.ok() && b.ok()) << a.status() << b.status();
  EXPECT_EQ(a->text, b->text);
  EXPECT_NE(a->text, unpenalised->text);
}

// A session moved from another server (a cluster group that died) starts from its context: the
// prompt then continues it exactly as on the server that ran the earlier turns. The streamed
// pieces carry every generated token, held-back ones included, as CompletionResult::token_ids.
TEST(EngineTest, AMovedSessionContinuesFromItsContext) {
  monitoring::ServerMetrics metrics;
  std::unique_ptr<Engine> engine = MakeDraftEngine(&metrics);
  ASSERT_NE(engine, nullptr);
  auto tok = text::LoadTokenizer(kModels / "scout-tiny-target");
  ASSERT_TRUE(tok.ok());
  const std::string p1 = "def add(a, b):\n    ", p2 = "\n\ndef sub(a, b):\n    ";
  std::vector<int32_t> streamed;
  auto t1 = engine->Complete({.prompt = p1, .max_tokens = 12, .stop = {"\n"}, .session_id = "a"},
                             [&](absl::string_view, std::span<const runtime::TokenLogprobs>, std::span<const int32_t> t) {
                               streamed.insert(streamed.end(), t.begin(), t.end());
                               return true;
                             });
  ASSERT_TRUE(t1.ok()) << t1.status();
  EXPECT_EQ(streamed, t1->token_ids);
  EXPECT_EQ(static_cast<int64_t>(t1->token_ids.size()), t1->completion_tokens);
  auto t2 = engine->Complete({.prompt = p2, .max_tokens = 12, .session_id = "a"});
  ASSERT_TRUE(t2.ok()) << t2.status();
  // The same turn on a session that never ran here, given the first turn's context.
  std::vector<int32_t> context = (*tok)->Encode(p1, /*add_bos=*/true);
  context.insert(context.end(), t1->token_ids.begin(), t1->token_ids.end());
  auto moved = engine->Complete({.prompt = p2, .max_tokens = 12, .session_id = "b", .session_context = context});
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_EQ(moved->text, t2->text);
  EXPECT_EQ(moved->cached_tokens, 0);
  // Once held, the session ignores a context: it has its own.
  auto again = engine->Complete({.prompt = "\n", .max_tokens = 4, .session_id = "b", .session_context = std::vector<int32_t>{1}});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_GT(again->cached_tokens, static_cast<int64_t>(context.size()));
  auto bad = engine->Complete({.prompt = p2, .max_tokens = 4, .session_id = "c", .session_context = std::vector<int32_t>{-1}});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

// With a draft, concurrent requests run their speculative rounds together (each draft step and
// verification one pass over them) and give what each gives alone, greedy and sampled; a session
// turn and a cancelled request run among them.
TEST(EngineTest, ConcurrentSpeculativeRequestsAreBatchedAndMatchSequential) {
  monitoring::ServerMetrics metrics;
  std::unique_ptr<Engine> engine_ptr = MakeDraftEngine(&metrics);
  ASSERT_NE(engine_ptr, nullptr);
  Engine& engine = *engine_ptr;
  std::vector<CompletionRequest> reqs = {{.prompt = "import os\n", .max_tokens = 24},
                                         {.prompt = "def f(x):\n    return", .max_tokens = 30},
                                         {.prompt = "class A:\n    def ", .max_tokens = 18},
                                         {.prompt = "for i in range(", .max_tokens = 24}};
  reqs[3].sampling = {.temperature = 0.7f, .seed = 5};
  std::vector<std::string> alone;
  for (const CompletionRequest& r : reqs) {
    auto out = engine.Complete(r);
    ASSERT_TRUE(out.ok()) << out.status();
    alone.push_back(out->text);
  }
  auto first_turn = engine.Complete({.prompt = "def g(y):\n", .max_tokens = 8, .session_id = "s"});
  ASSERT_TRUE(first_turn.ok()) << first_turn.status();
  const int64_t steps_before = engine.stats().decode_steps;
  std::vector<std::string> together(reqs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reqs.size(); ++i) {
    threads.emplace_back([&, i] {
      auto out = engine.Complete(reqs[i]);
      together[i] = out.ok() ? out->text : std::string(out.status().message());
    });
  }
  std::string cancelled_reason;
  threads.emplace_back([&] {
    auto out = engine.Complete({.prompt = "import sys\n", .max_tokens = 200, .ignore_eos = true},
                               [](absl::string_view, std::span<const runtime::TokenLogprobs>, std::span<const int32_t>) { return false; });
    cancelled_reason = out.ok() ? out->finish_reason : std::string(out.status().message());
  });
  absl::StatusOr<CompletionResult> second_turn;
  threads.emplace_back([&] { second_turn = engine.Complete({.prompt = "\n", .max_tokens = 10, .session_id = "s"}); });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(together, alone);
  EXPECT_EQ(cancelled_reason, "cancelled");
  EXPECT_GE(engine.stats().max_batch, 3);
  // Rounds emit one to five tokens each: far fewer passes than requests x tokens.
  EXPECT_LT(engine.stats().decode_steps - steps_before, 24 + 30 + 18 + 24);
  ASSERT_TRUE(second_turn.ok()) << second_turn.status();
  // The session's second turn continues exactly: as the whole conversation in one request.
  auto whole = engine.Complete({.prompt = "def g(y):\n" + first_turn->text + "\n", .max_tokens = 10});
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(second_turn->text, whole->text);
  EXPECT_GT(metrics.draft_tokens.Value(), 0);
}

// About 1,100 bytes of Python: a context of ~70 blocks for the sparsity tests.
std::string FortyFunctions() {
  std::string prompt;
  for (int i = 0; i < 40; ++i) prompt += "def f" + std::to_string(i) + "(x):\n    return x + " + std::to_string(i) + "\n";
  return prompt;
}

// A request picks its own sparsity on a server with a draft: STS at its own budget on a dense
// server (sparsity metrics, per layer too), dense on the same server reads every block; bad
// settings are refused by name.
TEST(EngineTest, RequestsChooseTheirSparsity) {
  monitoring::ServerMetrics metrics;
  std::unique_ptr<Engine> engine_ptr = MakeDraftEngine(&metrics);
  ASSERT_NE(engine_ptr, nullptr);
  Engine& engine = *engine_ptr;
  const std::string prompt = FortyFunctions();
  auto dense = engine.Complete({.prompt = prompt, .max_tokens = 8, .sparsity = "dense"});
  ASSERT_TRUE(dense.ok()) << dense.status();
  EXPECT_EQ(metrics.attention_blocks_dense.Value(), 0);
  auto sts = engine.Complete({.prompt = prompt, .max_tokens = 8, .sparsity = "sts", .kv_budget_fraction = 0.2});
  ASSERT_TRUE(sts.ok()) << sts.status();
  ASSERT_GT(metrics.attention_blocks_dense.Value(), 0);
  const double read = metrics.attention_blocks_read.Value() / metrics.attention_blocks_dense.Value();
  EXPECT_LT(read, 0.4);  // 20% of the blocks plus sinks and window
  EXPECT_GT(read, 0.1);
  EXPECT_NE(metrics.Serialize().find("scout_attention_layer_blocks_read_ratio_count{layer=\"5\"} 1"), std::string::npos);
  auto tokens = engine.Complete({.prompt = prompt, .max_tokens = 8, .sparsity = "sts", .kv_budget_tokens = 64});
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(engine.Complete({.prompt = "x", .sparsity = "sparse"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine.Complete({.prompt = "x", .kv_budget_fraction = 0.0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine.Complete({.prompt = "x", .kv_budget_tokens = -4}).status().code(), absl::StatusCode::kInvalidArgument);
}

// A request turns on the sparse draft and SANTA: the draft's own sparsity shows in /metrics, greedy
// output stays the target's (exact rejection sampling), and bad values are refused by name.
TEST(EngineTest, RequestsTurnOnTheSparseDraftAndSanta) {
  monitoring::ServerMetrics metrics;
  std::unique_ptr<Engine> engine_ptr = MakeDraftEngine(&metrics);
  ASSERT_NE(engine_ptr, nullptr);
  Engine& engine = *engine_ptr;
  const std::string prompt = FortyFunctions();
  auto dense = engine.Complete({.prompt = prompt, .max_tokens = 12});
  ASSERT_TRUE(dense.ok()) << dense.status();
  EXPECT_EQ(metrics.draft_attention_blocks_read.Value(), metrics.draft_attention_blocks_dense.Value());
  const double read0 = metrics.draft_attention_blocks_read.Value(), dense0 = metrics.draft_attention_blocks_dense.Value();
  CompletionRequest sd{.prompt = prompt, .max_tokens = 12};
  sd.sparse_draft = true;
  sd.draft_kv_budget_fraction = 0.2;
  sd.draft_refresh_rounds = 2;
  auto sparse = engine.Complete(sd);
  ASSERT_TRUE(sparse.ok()) << sparse.status();
  EXPECT_EQ(sparse->text, dense->text);  // the draft only proposes
  const double read = metrics.draft_attention_blocks_read.Value() - read0;
  const double all = metrics.draft_attention_blocks_dense.Value() - dense0;
  ASSERT_GT(all, 0);
  EXPECT_LT(read / all, 0.6);  // dense first steps, the rest at 20% plus sinks and window
  EXPECT_NE(metrics.Serialize().find("scout_draft_attention_blocks_read_total"), std::string::npos);
  CompletionRequest santa{.prompt = prompt, .max_tokens = 12, .sparsity = "sts", .kv_budget_fraction = 0.5};
  santa.santa_samples = 64;
  auto sampled = engine.Complete(santa);
  ASSERT_TRUE(sampled.ok()) << sampled.status();
  EXPECT_EQ(sampled->completion_tokens, 12);
  using Edit = void (*)(CompletionRequest&);
  for (Edit bad : {+[](CompletionRequest& r) { r.draft_refresh_rounds = 0; },
                   +[](CompletionRequest& r) { r.santa_samples = -1; },
                   +[](CompletionRequest& r) { r.draft_kv_budget_fraction = 1.5; }}) {
    CompletionRequest r{.prompt = "x"};
    bad(r);
    EXPECT_EQ(engine.Complete(r).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

// A session turn cancelled mid-round (with a draft) keeps the session consistent: the next turn
// continues exactly after the tokens the cancelled one emitted.
TEST(EngineTest, CancelledSpeculativeTurnLeavesTheSessionConsistent) {
  monitoring::ServerMetrics metrics;
  std::unique_ptr<Engine> engine = MakeDraftEngine(&metrics);
  ASSERT_NE(engine, nullptr);
  const std::string p1 = "def add(a, b):\n    ", p2 = "\n\ndef sub(a, b):\n    ";
  int pieces = 0;
  auto t1 = engine->Complete({.prompt = p1, .max_tokens = 40, .session_id = "c"},
                             [&](absl::string_view, std::span<const runtime::TokenLogprobs>, std::span<const int32_t>) { return ++pieces < 3; });
  ASSERT_TRUE(t1.ok()) << t1.status();
  ASSERT_EQ(t1->finish_reason, "cancelled");
  auto t2 = engine->Complete({.prompt = p2, .max_tokens = 12, .session_id = "c"});
  ASSERT_TRUE(t2.ok()) << t2.status();
  auto whole = engine->Complete({.prompt = p1 + t1->text + p2, .max_tokens = 12});
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(t2->text, whole->text);
}

// A failed turn leaves the session as it was; the next turn still continues it.
TEST(EngineTest, FailedTurnLeavesSessionIntact) {
  monitoring::ServerMetrics metrics;
  auto engine = MakeEngine(&metrics, /*max_model_len=*/200);
  auto t1 = engine->Complete({.prompt = "def f(x):\n", .max_tokens = 10, .session_id = "s"});
  ASSERT_TRUE(t1.ok());
  const int64_t before = engine->ListSessions().at(0).tokens;
  auto too_long = engine->Complete({.prompt = std::string(150, 'a'), .max_tokens = 100, .session_id = "s"});
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(engine->ListSessions().at(0).tokens, before);
  auto t2 = engine->Complete({.prompt = "\n", .max_tokens = 5, .session_id = "s"});
  ASSERT_TRUE(t2.ok()) << t2.status();
  EXPECT_EQ(t2->cached_tokens, before - 1);  // the pending token is prefilled with the new ones
  EXPECT_EQ(t2->prompt_tokens, 2);
  EXPECT_TRUE(engine->DeleteSession("s").ok());
  EXPECT_EQ(engine->DeleteSession("s").code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(engine->ListSessions().empty());
  // A new session that fails on its first turn is not kept.
  EXPECT_FALSE(engine->Complete({.prompt = std::string(150, 'a'), .max_tokens = 100, .session_id = "t"}).ok());
  EXPECT_TRUE(engine->ListSessions().empty());
}

// The fixture target whose passes fail for one sequence alone once it has run a few: what a
// cluster's pass returns when a sequence's KV is lost beyond rebuilding (kFailedSequencePayload).
// The victim is the sequence whose first pass begins with victim_prefix, whatever order the
// requests arrive in; the other sequences' passes are slowed (slow_pass) so that the requests
// certainly overlap.
class LosesOneSequence : public runtime::ModelBackend {
 public:
  LosesOneSequence(std::unique_ptr<runtime::ModelBackend> model, std::vector<int32_t> victim_prefix)
      : model_(std::move(model)), victim_prefix_(std::move(victim_prefix)) {}
  const runtime::ModelConfig& config() const override { return model_->config(); }
  absl::Status AddSequence(runtime::SequenceId seq) override {
    fresh_.insert(seq);
    return model_->AddSequence(seq);
  }
  absl::Status ReleaseSequence(runtime::SequenceId seq) override { return model_->ReleaseSequence(seq); }
  absl::Status TruncateSequence(runtime::SequenceId seq, int64_t n) override { return model_->TruncateSequence(seq, n); }
  absl::StatusOr<int64_t> SequenceLength(runtime::SequenceId seq) const override { return model_->SequenceLength(seq); }
  KvCacheUsage kv_cache_usage() const override { return model_->kv_cache_usage(); }
  absl::Status Forward(std::span<const runtime::SequenceInput> batch, std::vector<float>* logits) override {
    for (const runtime::SequenceInput& in : batch) {
      if (fresh_.erase(in.seq) > 0 && in.tokens.size() >= victim_prefix_.size() &&
          std::equal(victim_prefix_.begin(), victim_prefix_.end(), in.tokens.begin())) {
        victim_ = in.seq;
      }
    }
    if (std::any_of(batch.begin(), batch.end(), [&](const runtime::SequenceInput& in) { return in.seq != victim_; })) {
      std::this_thread::sleep_for(slow_pass);
    }
    for (const runtime::SequenceInput& in : batch) {
      if (in.seq == victim_ && ++victim_passes_ > 5) {
        absl::Status s = absl::UnavailableError(absl::StrCat("sequence ", in.seq, ": its KV is gone"));
        s.SetPayload(runtime::kFailedSequencePayload, absl::Cord(absl::StrCat(in.seq)));
        return s;
      }
    }
    return model_->Forward(batch, logits);
  }

 private:
  static constexpr std::chrono::milliseconds slow_pass{5};
  std::unique_ptr<runtime::ModelBackend> model_;
  const std::vector<int32_t> victim_prefix_;
  std::set<runtime::SequenceId> fresh_;  // added, no pass yet
  int64_t victim_passes_ = 0;
  runtime::SequenceId victim_ = -1;
};

// A pass that fails for one sequence alone ends that request with the error; the request batched
// beside it runs on and gives the text it gives alone.
TEST(EngineTest, ASequenceThatFailsAloneEndsOnlyItsRequest) {
  monitoring::ServerMetrics metrics;
  const std::string p1 = "import os\n", p2 = "def f(x):\n    return";
  std::string alone;
  {
    auto engine = MakeEngine(&metrics);
    auto r = engine->Complete({.prompt = p1, .max_tokens = 40, .ignore_eos = true});
    ASSERT_TRUE(r.ok()) << r.status();
    alone = r->text;
  }
  auto model = runtime::CpuModel::Load(kModels / "scout-tiny-target");
  auto tok = text::LoadTokenizer(kModels / "scout-tiny-target");
  ASSERT_TRUE(model.ok() && tok.ok());
  // p2's request is the victim: its prompt's first tokens (BOS, "def") pick it, in any order.
  std::vector<int32_t> victim_prefix = (*tok)->Encode(p2, /*add_bos=*/true);
  victim_prefix.resize(4);
  Engine engine(std::make_unique<LosesOneSequence>(std::move(*model), victim_prefix), nullptr, std::move(*tok), &metrics,
                EngineOptions{});
  absl::StatusOr<CompletionResult> first, second;
  std::thread a([&] { first = engine.Complete({.prompt = p1, .max_tokens = 40, .ignore_eos = true}); });
  std::thread b([&] { second = engine.Complete({.prompt = p2, .max_tokens = 40, .ignore_eos = true}); });
  a.join();
  b.join();
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->text, alone);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
  EXPECT_NE(second.status().message().find("its KV is gone"), std::string::npos) << second.status();
  EXPECT_GE(engine.stats().max_batch, 2);
}

}  // namespace
}  // namespace scout::scheduler
