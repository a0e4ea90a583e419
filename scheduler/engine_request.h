// Engine::Request, shared by the engine's source files (engine.cc: admission, sessions, text
// out; engine_passes.cc: the plain decode path; engine_speculative.cc: the rounds). Not for
// other folders.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "round/speculative.h"
#include "runtime/sampling.h"
#include "scheduler/engine.h"
#include "text/tokenizer.h"

namespace scout::scheduler {

using Clock = std::chrono::steady_clock;

// One request from admission to its result. The caller's thread waits in Complete and drains the
// outbox; the scheduler thread does everything else.
struct Engine::Request {
  Request(const CompletionRequest& r, const text::Tokenizer& tok)
      : req(r), sampler(r.sampling), decoder(tok) {}
  const CompletionRequest req;
  // Set up by Start.
  std::vector<int32_t> ids;
  int64_t seq = 0;
  int64_t earlier = 0;       // session tokens already in the cache
  int64_t final_len = 0;     // earlier + prompt + max_tokens: what its sequence may reach
  int64_t tokenized_for = -1;  // the session sequence ids was built for (0: a new one or none)
  bool new_session = false;
  bool started = false;
  bool prefilling = false;   // started, its prompt not all in the cache yet
  int64_t prefilled = 0;     // prompt tokens in the cache (without a draft; the stream counts its own)
  runtime::Sampler sampler;
  text::StreamingDecoder decoder;
  std::string pending;       // text held back as a possible stop-string prefix
  bool stop_hit = false;
  int32_t last_token = -1;   // sampled, not yet in the cache
  Clock::time_point start = Clock::now(), last;
  Clock::time_point started_at, first_token_at;  // when it left the queue; its first token
  bool first = true;
  CompletionResult result;
  std::atomic<bool> cancelled{false};
  std::unique_ptr<round::SpeculativeStream> spec;  // with a draft: the request's rounds
  std::vector<runtime::TokenLogprobs> pending_logprobs;  // of tokens whose text is held back
  std::vector<int32_t> pending_tokens;                   // tokens whose text is held back
  std::optional<runtime::TokenLogprobs> spec_logprobs;   // with a draft: the next emitted token's
  absl::flat_hash_map<int32_t, int32_t> generated_counts;  // with penalties: tokens generated so far
  // Handed to the caller (Engine::mu_).
  struct Piece {
    std::string text;
    std::vector<runtime::TokenLogprobs> logprobs;
    std::vector<int32_t> tokens;
  };
  std::deque<Piece> outbox;
  bool done = false;
  absl::Status status;
};

}  // namespace scout::scheduler
