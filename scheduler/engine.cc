#include "scheduler/engine.h"

#include <algorithm>
#include <chrono>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "runtime/generator.h"
#include "runtime/speculative.h"

namespace scout::scheduler {

Engine::Engine(std::unique_ptr<runtime::ModelBackend> model, std::unique_ptr<runtime::ModelBackend> draft,
               std::unique_ptr<runtime::Tokenizer> tokenizer, monitoring::ServerMetrics* metrics,
               const EngineOptions& options)
    : model_(std::move(model)),
      draft_(std::move(draft)),
      tokenizer_(std::move(tokenizer)),
      metrics_(metrics),
      options_(options) {}

int64_t Engine::max_model_len() const {
  const int64_t model_len = model_->config().max_position_embeddings;
  return options_.max_model_len > 0 ? std::min(options_.max_model_len, model_len) : model_len;
}

bool Engine::Drain(double timeout_seconds) {
  draining_ = true;
  absl::MutexLock lock(&admit_mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(admit_mu_) { return admitted_ == 0; };
  return admit_mu_.AwaitWithTimeout(absl::Condition(&idle), absl::Seconds(timeout_seconds));
}

absl::StatusOr<CompletionResult> Engine::Complete(const CompletionRequest& req, const TextCallback& on_text) {
  if (req.max_tokens < 1) return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1, got ", req.max_tokens));
  if (absl::Status s = runtime::ValidateSamplingParams(req.sampling); !s.ok()) return s;
  if (!req.session_id.empty() && draft_ != nullptr) {
    return absl::InvalidArgumentError("sessions are not supported with a draft model yet");
  }
  const int64_t limit = max_model_len();
  {
    absl::MutexLock admit(&admit_mu_);
    if (draining_) return absl::UnavailableError("server is shutting down");
    if (admitted_ > options_.max_waiting) {  // one runs, max_waiting wait
      metrics_->requests_error.Increment();
      return absl::ResourceExhaustedError(absl::StrCat(admitted_ - 1, " requests already wait (max_waiting ",
                                                       options_.max_waiting, ")"));
    }
    ++admitted_;
  }
  absl::Cleanup leave = [this] {
    absl::MutexLock admit(&admit_mu_);
    --admitted_;
  };
  metrics_->requests_waiting.Increment();
  absl::MutexLock lock(&mu_);
  metrics_->requests_waiting.Decrement();
  // A session's new tokens follow its pending token; a new session (or none) starts with BOS.
  Session* session = nullptr;
  bool new_session = false;
  if (!req.session_id.empty()) {
    auto [it, inserted] = sessions_.try_emplace(req.session_id);
    session = &it->second;
    new_session = inserted;
    if (inserted) session->seq = next_seq_++;
  }
  std::vector<int32_t> ids;
  int64_t earlier = 0;
  if (session != nullptr && !new_session) {
    earlier = *model_->SequenceLength(session->seq);
    if (session->pending >= 0) ids.push_back(session->pending);
    const std::vector<int32_t> more = tokenizer_->Encode(req.prompt, /*add_bos=*/false);
    ids.insert(ids.end(), more.begin(), more.end());
  } else {
    ids = tokenizer_->Encode(req.prompt, /*add_bos=*/true);
  }
  auto forget_new_session = [&] {
    if (new_session) sessions_.erase(req.session_id);
  };
  if (ids.empty()) {
    forget_new_session();
    return absl::InvalidArgumentError("prompt is empty");
  }
  if (earlier + static_cast<int64_t>(ids.size()) + req.max_tokens > limit) {
    forget_new_session();
    return absl::OutOfRangeError(absl::StrCat("prompt (", ids.size(), " tokens", earlier > 0 ? absl::StrCat(" after ", earlier, " in the session") : "",
                                              ") plus max_tokens (", req.max_tokens,
                                              ") exceeds the model's context of ", limit, " (max_model_len)"));
  }
  if (new_session) {
    if (absl::Status s = model_->AddSequence(session->seq); !s.ok()) {
      forget_new_session();
      return s;
    }
  }
  metrics_->requests_running.Increment();
  const int64_t seq = session != nullptr ? session->seq : next_seq_++;
  int32_t last_token = -1;

  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto last = start;
  bool first = true;
  CompletionResult result{.text = "", .finish_reason = "length", .prompt_tokens = static_cast<int64_t>(ids.size()),
                          .cached_tokens = earlier, .completion_tokens = 0};
  // Text is held back while it could still be the start of a stop string, and released once it
  // cannot; a stop string ends generation and is not returned.
  std::string pending;
  bool cancelled = false, stop_hit = false;
  // Byte-level BPE tokens can end inside a UTF-8 character: text is released only whole.
  runtime::StreamingDecoder decoder(*tokenizer_);
  auto on_token = [&](int32_t token) {
    const auto now = Clock::now();
    (first ? metrics_->time_to_first_token : metrics_->inter_token_latency)
        .Observe(std::chrono::duration<double>(now - (first ? start : last)).count());
    first = false;
    last = now;
    last_token = token;
    ++result.completion_tokens;
    const std::vector<int32_t> eos = tokenizer_->eos_ids();
    if (!req.ignore_eos && std::find(eos.begin(), eos.end(), token) != eos.end()) {
      result.finish_reason = "stop";
      return false;
    }
    absl::StatusOr<std::string> piece = decoder.Add(token);
    if (piece.ok()) pending += *piece;
    for (const std::string& stop : req.stop) {
      if (const size_t at = pending.find(stop); !stop.empty() && at != std::string::npos) {
        pending.resize(at);
        result.finish_reason = "stop";
        stop_hit = true;
        break;
      }
    }
    // Release the part of pending that no stop string can still start in.
    size_t keep = 0;
    for (const std::string& stop : req.stop) {
      for (size_t k = std::min(stop.size() - (stop.empty() ? 0 : 1), pending.size()); k > keep; --k) {
        if (pending.compare(pending.size() - k, k, stop, 0, k) == 0) {
          keep = k;
          break;
        }
      }
    }
    if (stop_hit) keep = 0;
    const std::string out = pending.substr(0, pending.size() - keep);
    pending.erase(0, pending.size() - keep);
    result.text += out;
    if (!out.empty() && on_text && !on_text(out)) {
      cancelled = true;
      return false;
    }
    return !stop_hit;
  };
  absl::Status status;
  if (draft_ != nullptr) {
    absl::StatusOr<runtime::SpeculativeResult> r = runtime::GenerateSpeculative(
        *model_, *draft_, seq, ids,
        {.num_speculative_tokens = options_.num_speculative_tokens, .max_tokens = req.max_tokens,
         .sampling = req.sampling},
        on_token);
    status = r.status();
    if (r.ok()) {
      metrics_->draft_tokens.Increment(static_cast<double>(r->draft_proposed));
      metrics_->accepted_tokens.Increment(static_cast<double>(r->draft_accepted));
    }
  } else {
    status = runtime::Generate(*model_, seq, ids,
                               {.max_tokens = req.max_tokens, .sampling = req.sampling,
                                .continue_sequence = session != nullptr},
                               on_token)
                 .status();
  }
  metrics_->requests_running.Decrement();
  if (!status.ok()) {
    metrics_->requests_error.Increment();
    if (session != nullptr) {
      if (new_session) {
        model_->ReleaseSequence(seq).IgnoreError();
        forget_new_session();
      } else {
        model_->TruncateSequence(seq, earlier).IgnoreError();  // the session is as it was
      }
    }
    return status;
  }
  if (session != nullptr) session->pending = last_token;
  if (!stop_hit && !cancelled) pending += decoder.Finish();  // an unfinished character, as U+FFFD
  if (!stop_hit && !cancelled && !pending.empty()) {  // held-back text that never became a stop string
    result.text += pending;
    if (on_text && !on_text(pending)) cancelled = true;
  }
  if (cancelled) result.finish_reason = "cancelled";
  (cancelled ? metrics_->requests_cancelled : metrics_->requests_ok).Increment();
  metrics_->prompt_tokens.Increment(static_cast<double>(result.prompt_tokens));
  metrics_->generation_tokens.Increment(static_cast<double>(result.completion_tokens));
  return result;
}

std::vector<SessionInfo> Engine::ListSessions() {
  absl::MutexLock lock(&mu_);
  std::vector<SessionInfo> out;
  for (const auto& [id, s] : sessions_) {
    out.push_back({id, *model_->SequenceLength(s.seq) + (s.pending >= 0 ? 1 : 0)});
  }
  std::sort(out.begin(), out.end(), [](const SessionInfo& a, const SessionInfo& b) { return a.id < b.id; });
  return out;
}

absl::Status Engine::DeleteSession(const std::string& id) {
  absl::MutexLock lock(&mu_);  // requests hold mu_ while they run: none uses the session now
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session \"", id, "\""));
  absl::Status s = model_->ReleaseSequence(it->second.seq);
  sessions_.erase(it);
  return s;
}

}  // namespace scout::scheduler
