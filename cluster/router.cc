#include "cluster/router.h"

#include <algorithm>
#include <chrono>
#include <tuple>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "cluster/group.h"

namespace scout::cluster {

namespace {
std::vector<uint64_t> Plus(std::vector<uint64_t> v, uint64_t x) {
  v.push_back(x);
  return v;
}
double Seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }
}  // namespace

Router::Router(Coordinator* coordinator, std::unique_ptr<text::Tokenizer> tokenizer,
               monitoring::ServerMetrics* metrics, const RouterOptions& options)
    : coordinator_(coordinator), metrics_(metrics), options_(options), tokenizer_(std::move(tokenizer)) {
  coordinator_->SetDataPlane([this](uint64_t member, const v1::Envelope& m) { OnMessage(member, m); },
                             [this](uint64_t member) { OnDead(member); });
}

Router::~Router() { coordinator_->SetDataPlane(nullptr, nullptr); }

void Router::OnMessage(uint64_t member, const v1::Envelope& m) {
  uint64_t id = 0;
  if (m.body_case() == v1::Envelope::kGeneratePiece) id = m.generate_piece().stream();
  else if (m.body_case() == v1::Envelope::kGenerateDone) id = m.generate_done().stream();
  else return;
  std::shared_ptr<Stream> s;
  {
    absl::MutexLock lock(&mu_);
    auto it = streams_.find(id);
    if (it == streams_.end() || it->second->group != member) return;  // ended already, or not its group's
    s = it->second;
  }
  absl::MutexLock lock(&s->mu);
  if (s->done) return;
  if (m.body_case() == v1::Envelope::kGenerateDone) {
    s->end = m.generate_done();
    s->done = true;
    return;
  }
  const v1::GeneratePiece& p = m.generate_piece();
  Piece piece{.text = p.text(), .tokens = std::vector<int32_t>(p.tokens().begin(), p.tokens().end())};
  for (const v1::TokenLogprobs& lp : p.logprobs()) piece.logprobs.push_back(FromWire(lp));
  s->pieces.push_back(std::move(piece));
}

void Router::OnDead(uint64_t member) {
  std::vector<std::shared_ptr<Stream>> ended;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, s] : streams_) {
      if (s->group == member) ended.push_back(s);
    }
  }
  for (auto& s : ended) {
    absl::MutexLock lock(&s->mu);
    if (s->done) continue;
    s->done = true;
    s->group_died = true;
  }
}

uint64_t Router::PickGroup(uint64_t preferred, const std::vector<uint64_t>& exclude) const {
  std::vector<uint64_t> live;
  for (const Coordinator::Member& m : coordinator_->Members(v1::ROLE_TARGET)) {
    if (m.info.runs_engine() && coordinator_->Serving(m.key) &&
        std::find(exclude.begin(), exclude.end(), m.key) == exclude.end()) {
      live.push_back(m.key);
    }
  }
  if (std::find(live.begin(), live.end(), preferred) != live.end()) return preferred;
  if (live.empty()) return 0;
  // Fewest requests running, then the least of its KV pool in use (its last heartbeat), then
  // fewest sessions held (new sessions spread over the groups).
  absl::flat_hash_map<uint64_t, std::tuple<int, double, int>> load;
  for (const Coordinator::Member& m : coordinator_->Members(v1::ROLE_TARGET)) {
    if (m.last.kv_total_blocks() > 0) {
      std::get<1>(load[m.key]) = static_cast<double>(m.last.kv_used_blocks()) / m.last.kv_total_blocks();
    }
  }
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, s] : streams_) ++std::get<0>(load[s->group]);
    for (const auto& [id, s] : sessions_) ++std::get<2>(load[s.group]);
  }
  return *std::min_element(live.begin(), live.end(), [&](uint64_t a, uint64_t b) {
    return load[a] != load[b] ? load[a] < load[b] : a < b;
  });
}

std::shared_ptr<Router::Stream> Router::OpenStream(uint64_t group, uint64_t* id) {
  auto s = std::make_shared<Stream>();
  s->group = group;
  absl::MutexLock lock(&mu_);
  *id = next_stream_++;
  streams_[*id] = s;
  return s;
}

void Router::CloseStream(uint64_t id) {
  absl::MutexLock lock(&mu_);
  streams_.erase(id);
}

bool Router::SendTo(uint64_t group, v1::Envelope message) {
  std::shared_ptr<Channel> channel = coordinator_->ChannelOf(group);
  if (channel == nullptr) return false;
  if (channel->Send(std::move(message)).ok()) return true;
  coordinator_->MarkDead(group, "the connection failed while sending it a request");
  return false;
}

bool Router::Relay(uint64_t group, uint64_t id, Stream& stream, const scheduler::TextCallback& on_text,
                   Progress& progress, v1::GenerateDone* end) {
  scheduler::CompletionResult& result = progress.result;
  while (true) {
    std::deque<Piece> pieces;
    bool done = false, died = false;
    {
      absl::MutexLock lock(&stream.mu);
      auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(stream.mu) { return stream.done || !stream.pieces.empty(); };
      stream.mu.Await(absl::Condition(&ready));
      pieces.swap(stream.pieces);
      done = stream.done;
      if (done) {
        *end = stream.end;
        died = stream.group_died;
      }
    }
    for (Piece& p : pieces) {
      const auto now = Clock::now();
      for (size_t t = 0; t < p.tokens.size(); ++t) {
        (progress.first ? metrics_->time_to_first_token : metrics_->inter_token_latency)
            .Observe(t == 0 ? Seconds(now - progress.last) : 0.0);
        progress.first = false;
      }
      if (!p.tokens.empty()) progress.last = now;
      result.text += p.text;
      result.token_ids.insert(result.token_ids.end(), p.tokens.begin(), p.tokens.end());
      result.logprobs.insert(result.logprobs.end(), p.logprobs.begin(), p.logprobs.end());
      if (on_text && !progress.cancelled && !on_text(p.text, p.logprobs, p.tokens)) {
        progress.cancelled = true;
        v1::Envelope cancel;
        cancel.mutable_cancel_generate()->set_stream(id);
        (void)SendTo(group, std::move(cancel));
      }
    }
    if (done) return died;
  }
}

void Router::Remember(const std::string& session_id, uint64_t group, std::vector<int32_t> context,
                      const std::vector<int32_t>& prompt, const std::vector<int32_t>& generated) {
  context.insert(context.end(), prompt.begin(), prompt.end());
  context.insert(context.end(), generated.begin(), generated.end());
  absl::MutexLock lock(&mu_);
  Session& s = sessions_[session_id];
  s.group = group;
  s.tokens = std::move(context);
  s.last_used = Clock::now();
}

void Router::ForgetIdleSessions() {
  if (options_.session_idle_timeout_s <= 0) return;
  const auto now = Clock::now();
  std::vector<std::pair<std::string, uint64_t>> gone;  // session, its group
  {
    absl::MutexLock lock(&mu_);
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      const Session& s = it->second;
      if (!s.busy && Seconds(now - s.last_used) > options_.session_idle_timeout_s) {
        gone.emplace_back(it->first, s.group);
        sessions_.erase(it++);
      } else {
        ++it;
      }
    }
  }
  for (const auto& [id, group] : gone) {
    if (group == 0) continue;
    v1::Envelope del;
    del.mutable_delete_session()->set_session_id(id);  // stream 0: no one waits
    (void)SendTo(group, std::move(del));
  }
}

void Router::CountFinished(const scheduler::CompletionResult& result, bool cancelled, Clock::time_point start) {
  (cancelled ? metrics_->requests_cancelled : metrics_->requests_ok).Increment();
  metrics_->prompt_tokens.Increment(static_cast<double>(result.prompt_tokens));
  metrics_->generation_tokens.Increment(static_cast<double>(result.completion_tokens));
  metrics_->e2e_request_latency.Observe(Seconds(Clock::now() - start));
  metrics_->request_prompt_tokens.Observe(static_cast<double>(result.prompt_tokens));
  metrics_->request_generation_tokens.Observe(static_cast<double>(result.completion_tokens));
  metrics_->session_cached_tokens.Increment(static_cast<double>(result.cached_tokens));
  metrics_->RequestSuccess(result.finish_reason).Increment();
}

absl::StatusOr<scheduler::CompletionResult> Router::Complete(const scheduler::CompletionRequest& req,
                                                             const scheduler::TextCallback& on_text) {
  if (draining_) return absl::UnavailableError("server is shutting down");
  if (req.max_tokens < 1) return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1, got ", req.max_tokens));
  const auto start = Clock::now();
  ForgetIdleSessions();
  const bool session = !req.session_id.empty();
  bool known = false;  // the session has a context (on some group)
  std::vector<int32_t> history;
  uint64_t home = 0;
  {
    absl::MutexLock lock(&mu_);
    ++in_flight_;
    if (session) {
      auto free = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        auto it = sessions_.find(req.session_id);
        return it == sessions_.end() || !it->second.busy;
      };
      mu_.Await(absl::Condition(&free));
      Session& s = sessions_[req.session_id];
      s.busy = true;
      known = !s.tokens.empty();
      history = s.tokens;
      home = s.group;
    }
  }
  metrics_->requests_running.Increment();
  absl::Cleanup leave = [&] {
    metrics_->requests_running.Decrement();
    absl::MutexLock lock(&mu_);
    --in_flight_;
    if (session) {
      auto it = sessions_.find(req.session_id);
      if (it != sessions_.end()) {
        it->second.busy = false;
        if (it->second.tokens.empty()) sessions_.erase(it);  // its first request failed, or it was evicted
      }
    }
  };
  auto failed = [&](absl::Status s) {
    metrics_->requests_error.Increment();
    return s;
  };
  std::vector<int32_t> ids;
  if (req.prompt_ids.has_value()) {
    ids = *req.prompt_ids;
  } else {
    absl::MutexLock lock(&tokenizer_mu_);
    ids = tokenizer_->Encode(req.prompt, /*add_bos=*/!known);
  }
  if (ids.empty()) return failed(absl::InvalidArgumentError("prompt is empty"));

  Progress progress{.last = start};
  scheduler::CompletionResult& result = progress.result;
  const bool& cancelled = progress.cancelled;
  absl::Status why_moved;
  std::vector<uint64_t> full;  // groups that refused the request for want of room
  uint64_t stale = 0;          // a full group the session moved off: its copy there is dropped
  bool after_death = false;    // this attempt follows a group's death
  for (int attempt = 0; attempt < options_.max_attempts; ++attempt) {
    const int64_t left = req.max_tokens - static_cast<int64_t>(result.token_ids.size());
    if (left <= 0) break;  // its group died after the last token reached the client
    const uint64_t group = PickGroup(home, full);
    if (group == 0) {
      return failed(absl::UnavailableError(why_moved.ok() ? "no live target group"
                                                          : absl::StrCat("no live target group left: ",
                                                                         why_moved.message())));
    }
    // Run on `group`: the prompt and whatever text got out before a group died, the session's
    // context first where the group does not hold it.
    scheduler::CompletionRequest sent = req;
    std::vector<int32_t> prompt = ids;
    prompt.insert(prompt.end(), result.token_ids.begin(), result.token_ids.end());
    sent.max_tokens = left;
    if (session && known && group != home) sent.session_context = history;
    uint64_t id = 0;
    std::shared_ptr<Stream> stream = OpenStream(group, &id);
    absl::Cleanup close = [&] { CloseStream(id); };
    v1::Envelope generate;
    generate.mutable_generate()->set_stream(id);
    *generate.mutable_generate()->mutable_request() = ToWire(sent, prompt);
    if (!SendTo(group, std::move(generate))) {
      why_moved = absl::UnavailableError("a target group's connection failed");
      continue;
    }
    if (after_death) moved_requests_.fetch_add(1);
    after_death = false;
    v1::GenerateDone end;
    const bool died = Relay(group, id, *stream, on_text, progress, &end);
    if (died) {
      why_moved = absl::UnavailableError(absl::StrCat("a target group died under the request"));
      home = 0;
      after_death = true;
      if (cancelled) break;  // nobody reads the rest
      continue;
    }
    const absl::Status status = FromProto(end.status());
    if (absl::IsResourceExhausted(status) && !cancelled && PickGroup(0, Plus(full, group)) != 0) {
      // Overload: the group is full (its queue, or its KV pool); another with room takes the
      // request (a session with its context), from where its text had got to.
      full.push_back(group);
      if (session && group == home) stale = group;
      home = 0;
      why_moved = status;
      rebalanced_requests_.fetch_add(1);
      continue;
    }
    if (!status.ok()) {
      if (session && absl::IsNotFound(status)) {  // the group evicted it: its context is gone
        absl::MutexLock lock(&mu_);
        sessions_[req.session_id] = Session{.busy = true};
      }
      return failed(status);
    }
    result.finish_reason = end.finish_reason();
    // Counted as the client asked: the prompt (a moved session's context is not the client's).
    result.prompt_tokens = static_cast<int64_t>(ids.size());
    result.cached_tokens = attempt == 0 ? end.cached_tokens() : 0;
    if (session) Remember(req.session_id, group, std::move(history), ids, result.token_ids);
    break;
  }
  if (stale != 0) {
    // Once the session lives on another group (or on none, moving on its next request), free
    // its KV on the full one; while the router still sends it there, it stays.
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(req.session_id);
    if (it != sessions_.end() && it->second.group == stale) stale = 0;
  }
  if (stale != 0) {
    v1::Envelope del;
    del.mutable_delete_session()->set_session_id(req.session_id);  // stream 0: no one waits
    (void)SendTo(stale, std::move(del));
  }
  if (cancelled) result.finish_reason = "cancelled";
  result.completion_tokens = static_cast<int64_t>(result.token_ids.size());
  if (result.prompt_tokens == 0) {  // ended without a group's word (the last died after the last token)
    if (!cancelled && static_cast<int64_t>(result.token_ids.size()) < req.max_tokens) {
      return failed(absl::UnavailableError(absl::StrCat("the request's target groups died under it ",
                                                        options_.max_attempts, " times")));
    }
    result.prompt_tokens = static_cast<int64_t>(ids.size());
    // No group holds this context: it moves on its next request.
    if (session) Remember(req.session_id, 0, std::move(history), ids, result.token_ids);
  }
  CountFinished(result, cancelled, start);
  return result;
}

std::vector<scheduler::SessionInfo> Router::ListSessions() {
  ForgetIdleSessions();
  absl::MutexLock lock(&mu_);
  std::vector<scheduler::SessionInfo> out;
  for (const auto& [id, s] : sessions_) {
    if (!s.tokens.empty()) out.push_back({.id = id, .tokens = static_cast<int64_t>(s.tokens.size())});
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
  return out;
}

absl::Status Router::DeleteSession(const std::string& session_id) {
  uint64_t group = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session_id);
    if (it == sessions_.end() || it->second.tokens.empty()) {
      return absl::NotFoundError(absl::StrCat("no session \"", session_id, "\""));
    }
    if (it->second.busy) {
      return absl::FailedPreconditionError(absl::StrCat("session \"", session_id, "\" has a request running"));
    }
    group = it->second.group;
    sessions_.erase(it);
  }
  // Free its KV on its group; a group that is gone has freed it already, and one that evicted
  // it answers NotFound: either way the session is gone.
  if (group == 0 || coordinator_->ChannelOf(group) == nullptr) return absl::OkStatus();
  uint64_t id = 0;
  std::shared_ptr<Stream> stream = OpenStream(group, &id);
  absl::Cleanup close = [&] { CloseStream(id); };
  v1::Envelope del;
  del.mutable_delete_session()->set_stream(id);
  del.mutable_delete_session()->set_session_id(session_id);
  if (!SendTo(group, std::move(del))) return absl::OkStatus();
  absl::MutexLock lock(&stream->mu);
  auto done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(stream->mu) { return stream->done; };
  stream->mu.AwaitWithTimeout(absl::Condition(&done), absl::Seconds(30));
  const absl::Status s = stream->done && !stream->group_died ? FromProto(stream->end.status()) : absl::OkStatus();
  return absl::IsNotFound(s) ? absl::OkStatus() : s;
}

bool Router::Drain(double timeout_seconds) {
  draining_ = true;
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return in_flight_ == 0; };
  return mu_.AwaitWithTimeout(absl::Condition(&idle), absl::Seconds(timeout_seconds));
}

bool Router::ready() { return !draining_ && PickGroup(0, {}) != 0; }

std::string Router::GroupOf(const std::string& session_id) const {
  uint64_t group = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session_id);
    if (it == sessions_.end()) return "";
    group = it->second.group;
  }
  for (const Coordinator::Member& m : coordinator_->Members(v1::ROLE_TARGET)) {
    if (m.key == group) return m.info.id();
  }
  return "";
}

}  // namespace scout::cluster
