// The serving engine: one model (and optional draft) behind a queue, driven by one scheduler
// thread. Without a draft, requests are batched continuously: each step runs one token of every
// running request in a single forward pass, new requests join between steps (their prompts
// prefilled first) and finished ones leave. With a draft, the same continuous batching runs
// speculative rounds: each draft step and each verification is one pass over the running requests.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "monitoring/metrics.h"
#include "runtime/backend.h"
#include "runtime/cpu_model.h"
#include "runtime/sampling.h"
#include "runtime/sts.h"
#include "text/tokenizer.h"
#include "round/speculative.h"
#include "scheduler/completion_service.h"
#include "scheduler/prefill_pacer.h"

namespace scout::scheduler {

struct EngineOptions {
  int num_speculative_tokens = 4;
  int64_t max_model_len = 0;  // prompt + max_tokens limit; 0: the model's max_position_embeddings
  int max_waiting = 64;       // requests queued behind the running ones before new ones are refused
  int max_num_seqs = 16;      // requests batched together (vLLM's --max-num-seqs)
  // Prompt tokens one prefill pass may carry, over all the prompts in it (vLLM's
  // --max-num-batched-tokens). Prefill passes alternate with decode steps of the requests already
  // decoding, so a long prompt delays their next token by one pass, not by its whole prefill.
  int64_t max_num_batched_tokens = 2048;
  // Without a draft, prompt chunks ride on the decoding requests' steps (one pass for both, as in
  // vLLM), within max_num_batched_tokens less the decoders' tokens and sized by a PrefillPacer so
  // that a step with a chunk takes at most this many times a decode-only step: the decoders'
  // inter-token latency stays within this factor while a long prompt prefills, at the cost of
  // that prompt's time to first token. With a draft, prefill passes of their own alternate with
  // the rounds, each sized so that it and the round after it take at most this many times a
  // round alone. <= 1: bounded by tokens only.
  double max_decode_slowdown = 1.5;
  // Sessions idle this long lose their KV (0: kept until deleted or needed). Under KV pressure,
  // with nothing running to wait for, idle sessions are dropped least recently used first
  // rather than refusing a request. A request on a dropped session gets NotFound saying so.
  double session_idle_timeout_s = 0;
  // STS with a draft: the target verifies attending only to the blocks the draft's attention
  // picks through this head map, within sts_budget. Unset: dense verification.
  std::optional<runtime::HeadMap> head_map;
  runtime::StsBudget sts_budget;
  // The sparse draft: a round's first draft step attends densely and picks, within draft_budget,
  // the blocks its later steps attend (and every step of the next draft_refresh_rounds - 1
  // rounds). SANTA: the target's verification samples santa_samples value rows per (KV head, 16
  // query rows) instead of summing all of them (0: exact).
  bool sparse_draft = false;
  runtime::StsBudget draft_budget;
  int draft_refresh_rounds = 1;
  int santa_samples = 0;
  // Optional: whether the models can run now (a cluster coordinator's live workers); not ready
  // while it says no.
  std::function<absl::Status()> health;
};

struct EngineStats {
  int64_t decode_steps = 0;  // batched decode passes run
  int max_batch = 0;         // most requests one decode pass carried
};

class Engine final : public CompletionService {
 public:
  // draft may be null (no speculative decoding). metrics must outlive the engine.
  Engine(std::unique_ptr<runtime::ModelBackend> model, std::unique_ptr<runtime::ModelBackend> draft,
         std::unique_ptr<text::Tokenizer> tokenizer, monitoring::ServerMetrics* metrics,
         const EngineOptions& options);
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Thread-safe; blocks until the request has run. InvalidArgument for bad sampling params or
  // max_tokens, OutOfRange for a prompt over max_model_len, ResourceExhausted when max_waiting
  // requests already queue, Unavailable once draining; backend errors pass through.
  absl::StatusOr<CompletionResult> Complete(const CompletionRequest& request, const TextCallback& on_text = nullptr) override;

  std::vector<SessionInfo> ListSessions() override;
  // Frees the session's KV. NotFound if unknown; FailedPrecondition while a request uses it.
  absl::Status DeleteSession(const std::string& id) override;

  // Refuses new requests from now on; waits up to timeout_seconds for the admitted ones to
  // finish. Returns whether they all did.
  bool Drain(double timeout_seconds) override;
  bool draining() const override { return draining_.load(); }
  // Whether a new request would be admitted now: not draining, the models healthy, and fewer
  // than max_num_seqs + max_waiting requests admitted (a readiness probe stops routing to a
  // saturated server).
  bool ready() override;

  const runtime::ModelConfig& config() const { return config_; }
  // With a draft: where the speculative rounds run ("cuda": on the GPUs, "host"); else "".
  const char* round_name() const { return round_name_; }
  int64_t max_model_len() const override;
  EngineStats stats();
  // The KV pool's use as the engine last saw it (after each pass; thread-safe): a cluster group
  // reports it in its heartbeats.
  runtime::ModelBackend::KvCacheUsage kv_usage() const {
    return {.used_blocks = kv_used_blocks_.load(), .total_blocks = kv_total_blocks_.load()};
  }

  ~Engine();

 private:
  struct Request;
  struct Session {
    int64_t seq = 0;
    int32_t pending = -1;  // last generated token, not yet in the cache
    bool busy = false;     // a request is running on it
    bool evicted = false;  // its KV was dropped; the next request on it is told so
    std::chrono::steady_clock::time_point last_used = std::chrono::steady_clock::now();
  };
  // Drops the KV of idle sessions (never one a request uses): those idle past the timeout, or,
  // with blocks_wanted > 0, the least recently used until that many blocks are free. Returns
  // how many it dropped.
  int EvictSessions(int64_t blocks_wanted, const std::string& keep) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);

  void Loop();
  // Scheduler thread, model_mu_ held: turns a waiting request into a running one (session,
  // tokens, sequence); kPrefill when its prompt is to be prefilled (Prefill, batched with the
  // others that joined). kDeferred, with nothing changed, when the KV pool cannot hold its
  // prompt and max_tokens next to what the running requests still need.
  enum class StartResult { kPrefill, kDone, kDeferred };
  StartResult Start(Request& r, const std::vector<std::shared_ptr<Request>>& running)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  // One prefill pass of at most max_num_batched_tokens over the requests still prefilling, in
  // arrival order, from where each stands (so the sessions' new turns are prefilled together, and
  // split over a cluster's workers); a request whose prompt is done gets its first token and
  // decodes from the next step. A failed pass runs again request by request, so errors stay
  // each request's own.
  // One prefill pass over the prompts in order, at most `budget` tokens (0: max_num_batched_tokens).
  void PrefillPass(const std::vector<Request*>& prefilling, int64_t budget = 0) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  // With a draft and requests decoding: the tokens the next prefill pass may carry so that it and
  // the round after it take at most max_decode_slowdown times a round (the pacer's plan), and
  // their work; {0, 0} while the pacer has no round timed yet.
  std::pair<int64_t, double> PacedSpeculativePrefill(const std::vector<Request*>& prefilling) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  // Runs `pass` over the running requests; when a KV pool is full the newest gives way (finished
  // with the error; when only a host tier's GPU block cache is short, it just sits this pass
  // out) and the pass runs again over the rest; any other error finishes them all.
  // False when none is left; otherwise counts the pass in the stats and metrics.
  bool RunBatchedPass(std::vector<Request*>& running, absl::FunctionRef<absl::Status()> pass,
                      absl::FunctionRef<void(Request&, absl::Status)> finish) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  // One decode pass over the running requests (model_mu_ held); without a draft it carries
  // chunks of the prompts still prefilling (as the pacer allows; in a PrefillPass of their own
  // if the mixed pass fails).
  void DecodeStep(std::vector<Request*>& running, const std::vector<Request*>& prefilling)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  // One pass over decoding requests (their last token) and prompt chunks (chunk_tokens[j] tokens
  // of chunked[j] from where it stands): one sampled token, or logit row, per input, the chunks'
  // after the decoders'. Nothing changes on error.
  struct ChunkOutputs {
    std::vector<float> logits;    // host sampling: [rows][vocab]
    std::vector<int32_t> sampled;  // device sampling: [rows]
    size_t first_chunk_row = 0;
  };
  absl::Status RunChunks(std::span<Request* const> decoding, std::span<Request* const> chunked,
                         std::span<const int64_t> chunk_tokens, ChunkOutputs* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  kernels::SampleRowParams SampleRow(const Request& r) const;
  // Fills a logprobs record's token bytes (the tokenizer's pieces).
  void NameTokens(std::optional<runtime::TokenLogprobs>& lp) const;
  int32_t TokenOfRow(Request& r, const ChunkOutputs& out, size_t row) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  // Samples the row's token and hands it to OnToken with its logprobs when r asks for them (the
  // row's logits from the host, or from the backend after a device-sampled pass). False when r
  // is finished (its error included).
  bool TakeToken(Request& r, const ChunkOutputs& out, size_t row) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  // A chunk of n tokens of r is in the cache: a prompt now complete takes its first token from
  // the chunk's row. Returns n.
  int64_t TakeChunk(Request& r, int64_t n, const ChunkOutputs& out, size_t chunk) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  // With a draft: the request's speculative stream (its prefill on both models), then rounds
  // batched over the running requests; FinishSpeculative counts its draft and sparsity metrics.
  StartResult StartSpeculative(Request& r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  void SpeculativeStep(std::vector<Request*>& running) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  void FinishSpeculative(Request& r, absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  // The request's session (told it was evicted: false, finished) and tokens, with nothing else
  // changed; then its sequence id (a new session's made here); then the context-length check.
  bool Resolve(Request& r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  void AssignSequence(Request& r);
  absl::Status CheckLength(const Request& r) const;
  // Takes a sampled token: metrics, EOS, stop strings, text to the request's outbox. False when
  // the request is finished.
  bool OnToken(Request& r, int32_t token, std::optional<runtime::TokenLogprobs> logprobs = std::nullopt);
  // KV usage gauges and the host KV tier's counters (what it did since the last call).
  void UpdateKvMetrics() ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);
  // Frees or keeps the request's sequence and hands the result to its caller.
  void Finish(Request& r, absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(model_mu_);

  const runtime::ModelConfig config_;
  absl::Mutex model_mu_;  // the scheduler thread's hold on the models; sessions calls take it briefly
  std::unique_ptr<runtime::ModelBackend> model_ ABSL_PT_GUARDED_BY(model_mu_);
  std::unique_ptr<runtime::ModelBackend> draft_ ABSL_PT_GUARDED_BY(model_mu_);
  std::unique_ptr<text::Tokenizer> tokenizer_;
  monitoring::ServerMetrics* metrics_;
  EngineOptions options_;
  // With a draft: the head map of requests that ask for STS (the server's, else the
  // proportional-depth default).
  std::optional<runtime::HeadMap> request_head_map_;
  std::optional<runtime::HeadMap> draft_self_map_;  // the sparse draft's: the draft onto itself
  std::atomic<int64_t> kv_used_blocks_{0}, kv_total_blocks_{0};  // UpdateKvMetrics' last reading
  std::unique_ptr<round::SpeculativeRound> round_;   // with a draft: runs the rounds (MakeRound)
  const char* round_name_ = "";
  runtime::HostKvTierStats tier_seen_ ABSL_GUARDED_BY(model_mu_);  // counters already exported
  PrefillPacer pacer_ ABSL_GUARDED_BY(model_mu_);

  absl::Mutex mu_;  // queues, sessions, requests' outboxes
  int64_t next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<std::string, Session> sessions_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<Request>> waiting_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  EngineStats stats_ ABSL_GUARDED_BY(mu_);

  absl::Mutex admit_mu_;
  int admitted_ ABSL_GUARDED_BY(admit_mu_) = 0;  // running + waiting
  std::atomic<bool> draining_{false};
  std::thread loop_;
};

}  // namespace scout::scheduler
