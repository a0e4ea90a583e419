// What the OpenAI front end serves from: one engine (scout serve), or a cluster's router that
// hands each request to a target group running its own engine (scout coordinator). The request
// and result types are the engine's.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "runtime/sampling.h"

namespace scout::scheduler {

struct CompletionRequest {
  std::string prompt;
  // Token ids used instead of `prompt`, as given (no BOS added: the client's tokens are the
  // prompt, as vLLM takes them). Each must be below the vocabulary size.
  std::optional<std::vector<int32_t>> prompt_ids;
  int64_t max_tokens = 16;
  runtime::SamplingParams sampling;
  std::vector<std::string> stop;  // generation ends before the first of these strings
  bool ignore_eos = false;
  // Agent sessions: the prompt continues this session's context, whose KV stays in the cache
  // between requests, so only the new tokens are prefilled. Empty: a one-off request.
  std::string session_id;
  // A session that moved here from another server (a cluster's target group that died): the
  // tokens its context held there, prefilled before the prompt when this server does not hold
  // the session yet (ignored when it does). The prompt then continues them (no BOS of its own).
  std::optional<std::vector<int32_t>> session_context;
  // Scout's own, for a server with a draft: the target's attention while verifying, "dense" or
  // "sts" (unset: the server's --sparsity), and the STS budget per (layer, KV head): tokens, or
  // else a fraction of the context (unset: the server's).
  std::optional<std::string> sparsity;
  std::optional<int64_t> kv_budget_tokens;
  std::optional<double> kv_budget_fraction;
  // Target layers that read every block (StsBudget::dense_layers; -1 the last); unset: the
  // server's --dense-layers.
  std::optional<std::vector<int>> dense_layers;
  // The sparse draft and SANTA (EngineOptions); unset: the server's.
  std::optional<bool> sparse_draft;
  std::optional<double> draft_kv_budget_fraction;
  std::optional<int> draft_refresh_rounds;
  std::optional<int> santa_samples;
  // Each generated token's log-probability and this many most likely alternatives (0 to
  // kMaxLogprobs), under the distribution after temperature (runtime::LogprobsOf); unset: none.
  // With a draft: the target's distribution at each emitted token (its verification row).
  std::optional<int> logprobs;
  // presence / frequency / repetition penalties (runtime::ApplyPenalties), applied to the logits
  // on the host before this request's own sampler draws (on CUDA its row is read back); with a
  // draft, on the target's verification rows (round::SpeculativeOptions::penalties).
  runtime::Penalties penalties;
};
inline constexpr int kMaxLogprobs = 20;  // vLLM's default max_logprobs

struct CompletionResult {
  std::string text;
  std::string finish_reason;  // "stop" (EOS or a stop string), "length", or "cancelled"
  int64_t prompt_tokens = 0;      // tokens this request prefilled
  int64_t cached_tokens = 0;      // session tokens reused from the KV cache
  int64_t completion_tokens = 0;
  std::vector<runtime::TokenLogprobs> logprobs;  // one per generated token, when asked for
  std::vector<int32_t> token_ids;  // every generated token (EOS and a stop string's included)
};

struct SessionInfo {
  std::string id;
  int64_t tokens = 0;  // context held for the session
};

// Receives each piece of generated text as it is final, with the tokens it completes and their
// logprobs (when the request asked for them; a last piece may carry only tokens, ones that
// produced no text, like EOS); returning false cancels the request.
using TextCallback = std::function<bool(absl::string_view text, std::span<const runtime::TokenLogprobs> logprobs,
                                        std::span<const int32_t> tokens)>;

class CompletionService {
 public:
  virtual ~CompletionService() = default;
  // Thread-safe; blocks until the request has run, handing text to on_text as it comes.
  virtual absl::StatusOr<CompletionResult> Complete(const CompletionRequest& request,
                                                    const TextCallback& on_text = nullptr) = 0;
  virtual std::vector<SessionInfo> ListSessions() = 0;
  // Frees the session's KV. NotFound if unknown; FailedPrecondition while a request uses it.
  virtual absl::Status DeleteSession(const std::string& id) = 0;
  // Refuses new requests from now on; waits up to timeout_seconds for the admitted ones to
  // finish. Returns whether they all did.
  virtual bool Drain(double timeout_seconds) = 0;
  virtual bool draining() const = 0;
  // Whether a new request would be admitted now (a readiness probe).
  virtual bool ready() = 0;
  virtual int64_t max_model_len() const = 0;
};

}  // namespace scout::scheduler
