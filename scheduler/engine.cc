#include "scheduler/engine.h"

#include <algorithm>
#include <tuple>
#include <chrono>
#include <deque>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "kvstore/block_table.h"
#include "runtime/generator.h"
#include "round/speculative.h"
#include "scheduler/engine_request.h"
#include "scheduler/policy.h"

namespace scout::scheduler {

Engine::Engine(std::unique_ptr<runtime::ModelBackend> model, std::unique_ptr<runtime::ModelBackend> draft,
               std::unique_ptr<text::Tokenizer> tokenizer, monitoring::ServerMetrics* metrics,
               const EngineOptions& options)
    : config_(model->config()),
      model_(std::move(model)),
      draft_(std::move(draft)),
      tokenizer_(std::move(tokenizer)),
      metrics_(metrics),
      options_(options),
      pacer_(options.max_decode_slowdown, PrefillPacer::GemmTokens(config_)) {
  options_.max_num_seqs = std::max(options_.max_num_seqs, 1);
  if (draft_ != nullptr) {
    request_head_map_ = options_.head_map.has_value() ? *options_.head_map
                                                      : runtime::DefaultHeadMap(config_, draft_->config());
    draft_self_map_ = runtime::SelfHeadMap(draft_->config());
    round_ = round::MakeRound(*model_, *draft_);
    round_name_ = round_->name();
  }
  loop_ = std::thread([this] { Loop(); });
}

Engine::~Engine() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  loop_.join();
}

int64_t Engine::max_model_len() const {
  const int64_t model_len = config_.max_position_embeddings;
  return options_.max_model_len > 0 ? std::min(options_.max_model_len, model_len) : model_len;
}

bool Engine::ready() {
  if (options_.health && !options_.health().ok()) return false;
  absl::MutexLock admit(&admit_mu_);
  return !draining_ && admitted_ < options_.max_num_seqs + options_.max_waiting;
}

EngineStats Engine::stats() {
  absl::MutexLock lock(&mu_);
  return stats_;
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
  if (req.sparsity.has_value() && *req.sparsity != "dense" && *req.sparsity != "sts") {
    return absl::InvalidArgumentError(absl::StrCat("sparsity must be \"dense\" or \"sts\", got \"", *req.sparsity, "\""));
  }
  if (req.sparsity == "sts" && draft_ == nullptr) {
    return absl::InvalidArgumentError("sparsity \"sts\" needs a server started with --draft (its attention picks the blocks)");
  }
  if (req.kv_budget_tokens.has_value() && *req.kv_budget_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("kv_budget_tokens must be >= 1, got ", *req.kv_budget_tokens));
  }
  if (req.kv_budget_fraction.has_value() && !(*req.kv_budget_fraction > 0 && *req.kv_budget_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("kv_budget_fraction must be in (0, 1], got ", *req.kv_budget_fraction));
  }
  if ((req.sparse_draft.value_or(false) || req.santa_samples.value_or(0) > 0) && draft_ == nullptr) {
    return absl::InvalidArgumentError("sparse_draft and santa_samples need a server started with --draft");
  }
  if (req.draft_kv_budget_fraction.has_value() &&
      !(*req.draft_kv_budget_fraction > 0 && *req.draft_kv_budget_fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("draft_kv_budget_fraction must be in (0, 1], got ", *req.draft_kv_budget_fraction));
  }
  if (req.draft_refresh_rounds.has_value() && *req.draft_refresh_rounds < 1) {
    return absl::InvalidArgumentError(absl::StrCat("draft_refresh_rounds must be >= 1, got ", *req.draft_refresh_rounds));
  }
  if (req.santa_samples.has_value() && *req.santa_samples < 0) {
    return absl::InvalidArgumentError(absl::StrCat("santa_samples must be >= 0, got ", *req.santa_samples));
  }
  if (req.logprobs.has_value() && (*req.logprobs < 0 || *req.logprobs > kMaxLogprobs)) {
    return absl::InvalidArgumentError(absl::StrCat("logprobs must be 0 to ", kMaxLogprobs, ", got ", *req.logprobs));
  }
  if (absl::Status s = runtime::ValidatePenalties(req.penalties); !s.ok()) return s;
  if ((req.logprobs.has_value() || req.penalties.any()) && model_->samples_on_device() &&
      !model_->keeps_logit_rows()) {
    return absl::InvalidArgumentError(
        "logprobs and the penalties are not supported by this server's model backend yet (a cluster of GPU workers "
        "samples on the workers and keeps no logit rows)");
  }
  if (req.prompt_ids.has_value()) {
    if (req.prompt_ids->empty()) return absl::InvalidArgumentError("the prompt's token ids are empty");
    for (int32_t id : *req.prompt_ids) {
      if (id < 0 || id >= config_.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("prompt token id ", id, " is outside the vocabulary (0..", config_.vocab_size - 1, ")"));
      }
    }
  }
  if (req.session_context.has_value()) {
    for (int32_t id : *req.session_context) {
      if (id < 0 || id >= config_.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("session context token id ", id, " is outside the vocabulary (0..", config_.vocab_size - 1, ")"));
      }
    }
  }
  if (req.dense_layers.has_value()) {
    const int64_t layers = config_.num_hidden_layers;
    for (int l : *req.dense_layers) {
      if (l >= layers || l < -layers) {
        return absl::InvalidArgumentError(
            absl::StrCat("dense_layers names layer ", l, "; the model has ", layers, " (negative: from the last)"));
      }
    }
  }
  {
    absl::MutexLock admit(&admit_mu_);
    if (draining_) return absl::UnavailableError("server is shutting down");
    if (admitted_ >= options_.max_num_seqs + options_.max_waiting) {
      metrics_->requests_error.Increment();
      return absl::ResourceExhaustedError(absl::StrCat(admitted_, " requests already running or waiting (max_num_seqs ",
                                                       options_.max_num_seqs, ", max_waiting ", options_.max_waiting,
                                                       ")"));
    }
    ++admitted_;
  }
  absl::Cleanup leave = [this] {
    absl::MutexLock admit(&admit_mu_);
    --admitted_;
  };
  auto r = std::make_shared<Request>(req, *tokenizer_);
  metrics_->requests_waiting.Increment();
  {
    absl::MutexLock lock(&mu_);
    waiting_.push_back(r);
  }
  // Hand text to the caller as it comes; its callback runs on this thread, never the scheduler's.
  while (true) {
    std::deque<Request::Piece> pieces;
    bool done = false;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return r->done || !r->outbox.empty(); };
      mu_.Await(absl::Condition(&ready));
      pieces.swap(r->outbox);
      done = r->done;
    }
    for (const Request::Piece& piece : pieces) {
      if (on_text && !r->cancelled && !on_text(piece.text, piece.logprobs, piece.tokens)) r->cancelled = true;
    }
    if (done) break;
  }
  if (!r->status.ok()) return r->status;
  return r->result;
}

void Engine::Loop() {
  std::vector<std::shared_ptr<Request>> running;
  while (true) {
    std::vector<std::shared_ptr<Request>> joining;
    {
      absl::MutexLock lock(&mu_);
      auto work = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !waiting_.empty() || !running.empty(); };
      if (options_.session_idle_timeout_s > 0) {  // wake now and then to drop idle sessions
        mu_.AwaitWithTimeout(absl::Condition(&work),
                             absl::Seconds(std::min(1.0, options_.session_idle_timeout_s / 2)));
      } else {
        mu_.Await(absl::Condition(&work));
      }
      if (stop_ && waiting_.empty() && running.empty()) return;
      // Admit in arrival order while there is room; a request on a busy session waits its turn.
      std::vector<std::string> waiting_sessions;
      for (const auto& w : waiting_) waiting_sessions.push_back(w->req.session_id);
      const std::vector<size_t> admitted = policy::AdmitInOrder(
          waiting_sessions, options_.max_num_seqs - static_cast<int>(running.size()),
          [&](const std::string& sid) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            auto s = sessions_.find(sid);
            return s != sessions_.end() && s->second.busy;
          });
      for (size_t i : admitted) {
        const std::string& sid = waiting_[i]->req.session_id;
        if (!sid.empty()) sessions_[sid].busy = true;  // created here when new; Start fills it in
        joining.push_back(waiting_[i]);
      }
      for (auto it = admitted.rbegin(); it != admitted.rend(); ++it) waiting_.erase(waiting_.begin() + *it);
    }
    absl::MutexLock model_lock(&model_mu_);
    if (options_.session_idle_timeout_s > 0) EvictSessions(0, "");
    for (size_t i = 0; i < joining.size(); ++i) {
      auto& r = joining[i];
      metrics_->requests_waiting.Decrement();
      metrics_->requests_running.Increment();
      const StartResult started = Start(*r, running);
      if (started == StartResult::kPrefill) {
        r->prefilling = true;
        running.push_back(r);  // counted as running by the admission of the ones behind it
      }
      if (started != StartResult::kDeferred) continue;
      // No room in the KV pool yet: this request and the ones behind it wait, in order, for
      // running requests to finish.
      metrics_->requests_waiting.Increment();  // only this one was counted as running
      metrics_->requests_running.Decrement();
      absl::MutexLock lock(&mu_);
      for (size_t j = i; j < joining.size(); ++j) {
        if (!joining[j]->req.session_id.empty()) sessions_[joining[j]->req.session_id].busy = false;
      }
      waiting_.insert(waiting_.begin(), joining.begin() + i, joining.end());
      break;
    }
    // Prompts and decoding requests share the model: without a draft, prompt chunks ride on the
    // decoders' step (paced so that their tokens keep coming); with a draft, or with nobody
    // decoding, one prefill pass (bounded by max_num_batched_tokens) runs before the step. A long
    // prompt slows the others' tokens, it does not stop them.
    std::vector<Request*> prefilling, step;
    for (auto& r : running) {
      if (!r->started) continue;
      (r->prefilling ? prefilling : step).push_back(r.get());
    }
    const bool mixed = draft_ == nullptr && !step.empty();
    // With a draft and requests decoding, the prefill pass and the round after it are paced as
    // one step (their sum is the decoders' inter-token gap).
    const bool paced = draft_ != nullptr && !step.empty() && pacer_.time_bound();
    double paced_work = 0, pass_seconds = 0;
    if (!prefilling.empty() && !mixed) {
      int64_t budget = 0;
      if (paced) std::tie(budget, paced_work) = PacedSpeculativePrefill(prefilling);
      if (!paced || budget > 0) {
        const auto t0 = Clock::now();
        PrefillPass(prefilling, budget);
        pass_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      }
      prefilling.clear();
      step.clear();
      for (auto& r : running) {
        if (r->started && !r->prefilling) step.push_back(r.get());
      }
    }
    running.erase(std::remove_if(running.begin(), running.end(),
                                 [](const std::shared_ptr<Request>& r) { return !r->started; }),
                  running.end());
    if (step.empty()) continue;
    const auto round_start = Clock::now();
    DecodeStep(step, prefilling);
    if (paced) {
      const double round_seconds = std::chrono::duration<double>(Clock::now() - round_start).count();
      if (paced_work > 0) {
        pacer_.ObserveMixedStep(paced_work, pass_seconds + round_seconds);
      } else if (pass_seconds == 0) {
        pacer_.ObserveDecodeStep(round_seconds);
      }
    }
    running.erase(std::remove_if(running.begin(), running.end(), [](const std::shared_ptr<Request>& r) {
                    return !r->started;  // Finish clears started
                  }),
                  running.end());
  }
}

bool Engine::Resolve(Request& r) {
  const CompletionRequest& req = r.req;
  int64_t session_seq = 0;
  int32_t session_pending = -1;
  if (!req.session_id.empty()) {
    bool evicted = false;
    {
      absl::MutexLock lock(&mu_);
      auto it = sessions_.find(req.session_id);  // Loop made the entry (seq 0 when new)
      evicted = it->second.evicted;
      if (evicted) sessions_.erase(it);  // told once; the id then starts a new session
      else {
        session_seq = it->second.seq;
        session_pending = it->second.pending;
      }
    }
    if (evicted) {
      Finish(r, absl::NotFoundError(absl::StrCat("session \"", req.session_id,
                                                 "\" was evicted (idle, or its KV was needed): its context is gone; "
                                                 "send the whole conversation to start it again")));
      return false;
    }
  }
  r.earlier = session_seq != 0 ? *model_->SequenceLength(session_seq) : 0;
  // A request deferred for KV room comes back every pass: its tokens are kept while the session
  // it was tokenized for is the same.
  if (r.tokenized_for != session_seq) {
    r.ids.clear();
    if (session_seq != 0) {
      if (session_pending >= 0) r.ids.push_back(session_pending);
      const std::vector<int32_t> more =
          req.prompt_ids.has_value() ? *req.prompt_ids : tokenizer_->Encode(req.prompt, /*add_bos=*/false);
      r.ids.insert(r.ids.end(), more.begin(), more.end());
    } else if (req.session_context.has_value() && !req.session_id.empty()) {
      r.ids = *req.session_context;  // a session moved here: its context, then the prompt
      const std::vector<int32_t> more =
          req.prompt_ids.has_value() ? *req.prompt_ids : tokenizer_->Encode(req.prompt, /*add_bos=*/false);
      r.ids.insert(r.ids.end(), more.begin(), more.end());
    } else {
      r.ids = req.prompt_ids.has_value() ? *req.prompt_ids : tokenizer_->Encode(req.prompt, /*add_bos=*/true);
    }
    r.tokenized_for = session_seq;
  }
  r.final_len = r.earlier + static_cast<int64_t>(r.ids.size()) + req.max_tokens;
  r.result = {.text = "", .finish_reason = "length", .prompt_tokens = static_cast<int64_t>(r.ids.size()),
              .cached_tokens = r.earlier, .completion_tokens = 0};
  return true;
}

void Engine::AssignSequence(Request& r) {
  absl::MutexLock lock(&mu_);
  if (!r.req.session_id.empty()) {
    Session& s = sessions_[r.req.session_id];
    if (s.seq == 0) {
      s.seq = next_seq_++;
      r.new_session = true;
    }
    r.seq = s.seq;
  } else {
    r.seq = next_seq_++;
  }
  r.started = true;
  r.started_at = Clock::now();
}

absl::Status Engine::CheckLength(const Request& r) const {
  if (r.ids.empty()) return absl::InvalidArgumentError("prompt is empty");
  const int64_t limit = max_model_len();
  if (r.final_len > limit) {
    return absl::OutOfRangeError(absl::StrCat(
        "prompt (", r.ids.size(), " tokens", r.earlier > 0 ? absl::StrCat(" after ", r.earlier, " in the session") : "",
        ") plus max_tokens (", r.req.max_tokens, ") exceeds the model's context of ", limit, " (max_model_len)"));
  }
  return absl::OkStatus();
}

Engine::StartResult Engine::Start(Request& r, const std::vector<std::shared_ptr<Request>>& running) {
  const CompletionRequest& req = r.req;
  if (!Resolve(r)) return StartResult::kDone;
  // Admission by KV budget: the blocks this request may still take, against the free ones less
  // what the running requests may still take.
  const int64_t need = kvstore::BlocksFor(r.final_len) - kvstore::BlocksFor(r.earlier);
  int64_t reserved = 0;
  for (const auto& other : running) {
    absl::StatusOr<int64_t> len = model_->SequenceLength(other->seq);
    if (len.ok()) reserved += std::max<int64_t>(0, kvstore::BlocksFor(other->final_len) - kvstore::BlocksFor(*len));
  }
  runtime::ModelBackend::KvCacheUsage usage = model_->kv_cache_usage();
  int64_t free_blocks = usage.total_blocks - usage.used_blocks;
  switch (policy::AdmitByKv({.need = need, .free_blocks = free_blocks, .reserved = reserved,
                             .others_running = !running.empty(), .fits_in_limit = r.final_len <= max_model_len()})) {
    case policy::KvAdmission::kDefer:
      return StartResult::kDeferred;  // running requests will free or stop needing room
    case policy::KvAdmission::kEvictFirst:
      if (EvictSessions(need, req.session_id) > 0) {
        usage = model_->kv_cache_usage();  // idle sessions gave way
        free_blocks = usage.total_blocks - usage.used_blocks;
      }
      break;
    case policy::KvAdmission::kStart:
      break;
  }
  AssignSequence(r);
  if (absl::Status s = CheckLength(r); !s.ok()) {
    Finish(r, s);
    return StartResult::kDone;
  }
  if (need > free_blocks) {  // nothing runs, and it still does not fit
    Finish(r, absl::ResourceExhaustedError(absl::StrCat(
                  "KV pool full: the prompt and max_tokens need ", need, " blocks, ", free_blocks, " of ",
                  usage.total_blocks, " are free (idle sessions hold the rest; delete some or lower max_tokens)")));
    return StartResult::kDone;
  }
  if (draft_ != nullptr) return StartSpeculative(r);
  if (req.session_id.empty() || r.new_session) {
    if (absl::Status s = model_->AddSequence(r.seq); !s.ok()) {
      Finish(r, s);
      return StartResult::kDone;
    }
  }
  return StartResult::kPrefill;
}

bool Engine::OnToken(Request& r, int32_t token, std::optional<runtime::TokenLogprobs> logprobs) {
  const auto now = Clock::now();
  (r.first ? metrics_->time_to_first_token : metrics_->inter_token_latency)
      .Observe(std::chrono::duration<double>(now - (r.first ? r.start : r.last)).count());
  if (r.first) r.first_token_at = now;
  r.first = false;
  r.last = now;
  r.last_token = token;
  ++r.result.completion_tokens;
  r.result.token_ids.push_back(token);
  r.pending_tokens.push_back(token);
  if (logprobs.has_value()) {
    r.result.logprobs.push_back(*logprobs);
    r.pending_logprobs.push_back(*std::move(logprobs));
  }
  // The logprobs of tokens whose text is held back (an unfinished character, a possible stop
  // string, EOS) go out with the next piece of text, or with the tail Finish sends.
  const std::vector<int32_t> eos = tokenizer_->eos_ids();
  if (!r.req.ignore_eos && std::find(eos.begin(), eos.end(), token) != eos.end()) {
    r.result.finish_reason = "stop";
    return false;
  }
  // Byte-level BPE tokens can end inside a UTF-8 character: text is released only whole.
  absl::StatusOr<std::string> piece = r.decoder.Add(token);
  if (piece.ok()) r.pending += *piece;
  for (const std::string& stop : r.req.stop) {
    if (const size_t at = r.pending.find(stop); !stop.empty() && at != std::string::npos) {
      r.pending.resize(at);
      r.result.finish_reason = "stop";
      r.stop_hit = true;
      break;
    }
  }
  // Release the part of pending that no stop string can still start in.
  size_t keep = 0;
  for (const std::string& stop : r.req.stop) {
    for (size_t k = std::min(stop.size() - (stop.empty() ? 0 : 1), r.pending.size()); k > keep; --k) {
      if (r.pending.compare(r.pending.size() - k, k, stop, 0, k) == 0) {
        keep = k;
        break;
      }
    }
  }
  if (r.stop_hit) keep = 0;
  std::string out = r.pending.substr(0, r.pending.size() - keep);
  r.pending.erase(0, r.pending.size() - keep);
  if (!out.empty()) {
    r.result.text += out;
    absl::MutexLock lock(&mu_);
    r.outbox.push_back(
        {.text = std::move(out), .logprobs = std::move(r.pending_logprobs), .tokens = std::move(r.pending_tokens)});
    r.pending_logprobs.clear();
    r.pending_tokens.clear();
  }
  return !r.stop_hit && !r.cancelled && r.result.completion_tokens < r.req.max_tokens;
}

void Engine::UpdateKvMetrics() {
  const runtime::ModelBackend::KvCacheUsage usage = model_->kv_cache_usage();
  metrics_->kv_cache_usage.Set(usage.total_blocks > 0 ? double(usage.used_blocks) / usage.total_blocks : 0.0);
  kv_used_blocks_.store(usage.used_blocks);
  kv_total_blocks_.store(usage.total_blocks);
  const runtime::HostKvTierStats t = model_->host_tier_stats();
  if (!t.enabled) return;
  metrics_->kv_prefetch_bytes.Increment(static_cast<double>(t.bytes_prefetched - tier_seen_.bytes_prefetched));
  metrics_->kv_prefetch_seconds.Increment(std::max(0.0, t.prefetch_seconds - tier_seen_.prefetch_seconds));
  metrics_->kv_flush_bytes.Increment(static_cast<double>(t.bytes_flushed - tier_seen_.bytes_flushed));
  metrics_->kv_block_cache_hits.Increment(static_cast<double>(t.unit_hits - tier_seen_.unit_hits));
  metrics_->kv_block_cache_misses.Increment(static_cast<double>(t.unit_misses - tier_seen_.unit_misses));
  metrics_->gpu_block_cache_usage.Set(
      t.cache_units_total > 0 ? static_cast<double>(t.cache_units_used) / static_cast<double>(t.cache_units_total) : 0.0);
  tier_seen_ = t;
}

void Engine::Finish(Request& r, absl::Status status) {
  const bool session = !r.req.session_id.empty();
  std::string tail;
  if (status.ok()) {
    if (!r.stop_hit && !r.cancelled) {
      r.pending += r.decoder.Finish();  // an unfinished character, as U+FFFD
      tail = r.pending;                 // held-back text that never became a stop string
      r.result.text += tail;
    }
    if (r.cancelled) r.result.finish_reason = "cancelled";
  }
  if (r.seq > 0) {
    for (runtime::ModelBackend* m : {model_.get(), draft_.get()}) {
      if (m == nullptr || (m == draft_.get() && !session)) continue;  // one-off drafts: released already
      if (!session) {
        m->ReleaseSequence(r.seq).IgnoreError();
      } else if (!status.ok()) {
        if (r.new_session) {
          m->ReleaseSequence(r.seq).IgnoreError();
        } else {
          m->TruncateSequence(r.seq, r.earlier).IgnoreError();  // the session is as it was
        }
      }
    }
  }
  metrics_->requests_running.Decrement();
  UpdateKvMetrics();
  if (!status.ok()) {
    metrics_->requests_error.Increment();
  } else {
    (r.cancelled ? metrics_->requests_cancelled : metrics_->requests_ok).Increment();
    metrics_->prompt_tokens.Increment(static_cast<double>(r.result.prompt_tokens));
    metrics_->generation_tokens.Increment(static_cast<double>(r.result.completion_tokens));
    // The request's life (only requests that started and produced tokens have every phase).
    const auto now = Clock::now();
    auto seconds = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
    metrics_->e2e_request_latency.Observe(seconds(now - r.start));
    if (r.started) {
      metrics_->request_queue_time.Observe(seconds(r.started_at - r.start));
      if (!r.first) {
        metrics_->request_prefill_time.Observe(seconds(r.first_token_at - r.started_at));
        metrics_->request_decode_time.Observe(seconds(now - r.first_token_at));
      }
    }
    metrics_->request_prompt_tokens.Observe(static_cast<double>(r.result.prompt_tokens));
    metrics_->request_generation_tokens.Observe(static_cast<double>(r.result.completion_tokens));
    metrics_->session_cached_tokens.Increment(static_cast<double>(r.result.cached_tokens));
    metrics_->RequestSuccess(r.result.finish_reason).Increment();
  }
  absl::MutexLock lock(&mu_);
  if (session) {
    auto it = sessions_.find(r.req.session_id);
    if (it != sessions_.end()) {
      if (!status.ok() && r.new_session) {
        sessions_.erase(it);
      } else {
        it->second.busy = false;
        it->second.last_used = std::chrono::steady_clock::now();
        if (status.ok()) it->second.pending = r.last_token;
      }
    }
  }
  if (!tail.empty() || !r.pending_tokens.empty()) {
    r.outbox.push_back({.text = tail, .logprobs = std::move(r.pending_logprobs), .tokens = std::move(r.pending_tokens)});
    r.pending_logprobs.clear();
    r.pending_tokens.clear();
  }
  r.status = status;
  r.started = false;
  r.done = true;
}

int Engine::EvictSessions(int64_t blocks_wanted, const std::string& keep) {
  const auto now = std::chrono::steady_clock::now();
  std::vector<policy::IdleSession> idle;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, s] : sessions_) {
      if (!s.busy && !s.evicted && s.seq != 0 && id != keep) idle.push_back({.id = id, .last_used = s.last_used});
    }
  }
  policy::OrderForEviction(idle);
  int dropped = 0;
  for (const policy::IdleSession& candidate : idle) {
    const runtime::ModelBackend::KvCacheUsage u = model_->kv_cache_usage();
    if (!policy::ShouldEvict(candidate, now, options_.session_idle_timeout_s, blocks_wanted,
                             u.total_blocks - u.used_blocks)) {
      continue;
    }
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(candidate.id);
    if (it == sessions_.end() || it->second.busy || it->second.evicted) continue;
    model_->ReleaseSequence(it->second.seq).IgnoreError();
    if (draft_ != nullptr) draft_->ReleaseSequence(it->second.seq).IgnoreError();
    it->second = Session{.evicted = true};
    metrics_->sessions_evicted.Increment();
    ++dropped;
  }
  return dropped;
}

std::vector<SessionInfo> Engine::ListSessions() {
  absl::MutexLock model_lock(&model_mu_);
  absl::MutexLock lock(&mu_);
  std::vector<SessionInfo> out;
  for (const auto& [id, s] : sessions_) {
    if (s.seq == 0) continue;  // admitted, not started yet
    absl::StatusOr<int64_t> len = model_->SequenceLength(s.seq);
    out.push_back({id, (len.ok() ? *len : 0) + (s.pending >= 0 ? 1 : 0)});
  }
  std::sort(out.begin(), out.end(), [](const SessionInfo& a, const SessionInfo& b) { return a.id < b.id; });
  return out;
}

absl::Status Engine::DeleteSession(const std::string& id) {
  absl::MutexLock model_lock(&model_mu_);
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it != sessions_.end() && it->second.evicted) {
    sessions_.erase(it);
    return absl::OkStatus();  // its KV is already gone
  }
  if (it == sessions_.end() || it->second.seq == 0) {
    return absl::NotFoundError(absl::StrCat("unknown session \"", id, "\""));
  }
  if (it->second.busy) {
    return absl::FailedPreconditionError(absl::StrCat("session \"", id, "\" has a request running"));
  }
  absl::Status s = model_->ReleaseSequence(it->second.seq);
  if (draft_ != nullptr) draft_->ReleaseSequence(it->second.seq).IgnoreError();
  sessions_.erase(it);
  return s;
}

}  // namespace scout::scheduler
