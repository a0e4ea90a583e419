// The coordinator's side of the cluster's data plane (--data-plane groups): a CompletionService
// that hands each request whole to a target group (a worker running its own engine, its draft
// in-process; cluster/group.h) and relays the group's text. The coordinator never runs a pass or
// a draft step: per request it sends one Generate and reads the pieces back.
//
// Routing: a session returns to the group that holds its KV (affinity); a new session or a
// one-off request goes to the live group with the fewest requests running. A group that refuses
// a request for want of room (ResourceExhausted: its queue or KV pool full) passes it to another
// group that has some: the session moves there with its context (rebalance on overload). The router keeps every
// session's context as token ids (it tokenizes prompts itself), so when a group dies its sessions
// move: the next request on one goes to another group with the context, which that group
// prefills before the prompt. A request running when its group dies is run again on another
// group from where its text had got to (the prompt, then the tokens already sent to the client):
// the client sees one stream; with greedy sampling, the same text.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "cluster/coordinator.h"
#include "monitoring/metrics.h"
#include "scheduler/completion_service.h"
#include "text/tokenizer.h"

namespace scout::cluster {

struct RouterOptions {
  int64_t max_model_len = 0;  // what the front end reports; the groups check each request
  int max_attempts = 4;       // groups tried for one request while they die under it
  // > 0: a session idle this long is forgotten here and deleted on its group (a request on it
  // then starts a new session), so a coordinator's session contexts do not outlive their use.
  double session_idle_timeout_s = 0;
};

class Router final : public scheduler::CompletionService {
 public:
  // coordinator and metrics must outlive the router; it hooks itself into the coordinator
  // (Coordinator::SetDataPlane). tokenizer: the target model's.
  Router(Coordinator* coordinator, std::unique_ptr<text::Tokenizer> tokenizer, monitoring::ServerMetrics* metrics,
         const RouterOptions& options);
  ~Router() override;
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  // Unavailable when no group is alive (or every group tried died under it), ResourceExhausted
  // etc. as the group's engine answers.
  absl::StatusOr<scheduler::CompletionResult> Complete(const scheduler::CompletionRequest& request,
                                                       const scheduler::TextCallback& on_text = nullptr) override;
  std::vector<scheduler::SessionInfo> ListSessions() override;
  absl::Status DeleteSession(const std::string& id) override;
  bool Drain(double timeout_seconds) override;
  bool draining() const override { return draining_.load(); }
  bool ready() override;
  int64_t max_model_len() const override { return options_.max_model_len; }

  // The registered id of the group holding a session ("" if none): tests and logs.
  std::string GroupOf(const std::string& session_id) const;
  // Requests the router has moved to another group after theirs died, and after theirs refused
  // them for want of room (a session then moves with its context, its copy on the full group
  // dropped).
  int64_t moved_requests() const { return moved_requests_.load(); }
  int64_t rebalanced_requests() const { return rebalanced_requests_.load(); }

 private:
  struct Piece {
    std::string text;
    std::vector<runtime::TokenLogprobs> logprobs;
    std::vector<int32_t> tokens;
  };
  // One Generate (or DeleteSession) on its way: filled by the coordinator's reader threads.
  struct Stream {
    uint64_t group = 0;
    absl::Mutex mu;
    std::deque<Piece> pieces ABSL_GUARDED_BY(mu);
    bool done ABSL_GUARDED_BY(mu) = false;
    bool group_died ABSL_GUARDED_BY(mu) = false;  // ended by its group's death, not by the group
    v1::GenerateDone end ABSL_GUARDED_BY(mu);
  };
  struct Session {
    uint64_t group = 0;           // member key of the group holding its KV; 0: none (it moves)
    std::vector<int32_t> tokens;  // its context; empty: a new session
    bool busy = false;            // a request runs on it (they run one at a time, in order)
    std::chrono::steady_clock::time_point last_used = std::chrono::steady_clock::now();
  };
  // Forgets sessions idle past the timeout, deleting them on their groups.
  void ForgetIdleSessions();

  using Clock = std::chrono::steady_clock;
  // What a request has produced so far, over the groups it ran on.
  struct Progress {
    scheduler::CompletionResult result{.finish_reason = "length"};
    bool first = true;       // no token yet (the next one's latency is the TTFT)
    bool cancelled = false;  // the client went away
    Clock::time_point last;  // when the last token arrived
  };
  // Hands the stream's pieces to on_text as they come (and into progress) until it ends: its
  // GenerateDone in *end; true if it ended by its group's death instead.
  bool Relay(uint64_t group, uint64_t id, Stream& stream, const scheduler::TextCallback& on_text, Progress& progress,
             v1::GenerateDone* end);
  void CountFinished(const scheduler::CompletionResult& result, bool cancelled, Clock::time_point start);
  // A session's context after a request: `context`, the prompt and the generated tokens, held
  // by `group` (0: by none, it moves on its next request).
  void Remember(const std::string& session_id, uint64_t group, std::vector<int32_t> context,
                const std::vector<int32_t>& prompt, const std::vector<int32_t>& generated);
  void OnMessage(uint64_t member, const v1::Envelope& message);
  void OnDead(uint64_t member);
  // A live, serving group not in `exclude`: `preferred` if it is one, else the one with the fewest
  // requests running (then the fewest sessions); 0 if none.
  uint64_t PickGroup(uint64_t preferred, const std::vector<uint64_t>& exclude) const;
  std::shared_ptr<Stream> OpenStream(uint64_t group, uint64_t* id);
  void CloseStream(uint64_t id);
  // Sends message (its stream id set) to the group: false if it cannot be sent (then dead).
  bool SendTo(uint64_t group, v1::Envelope message);

  Coordinator* coordinator_;
  monitoring::ServerMetrics* metrics_;
  RouterOptions options_;
  absl::Mutex tokenizer_mu_;
  std::unique_ptr<text::Tokenizer> tokenizer_ ABSL_GUARDED_BY(tokenizer_mu_);
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> moved_requests_{0};
  std::atomic<int64_t> rebalanced_requests_{0};
  mutable absl::Mutex mu_;
  uint64_t next_stream_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<uint64_t, std::shared_ptr<Stream>> streams_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, Session> sessions_ ABSL_GUARDED_BY(mu_);
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace scout::cluster
