#include "cluster/group.h"

#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"

namespace scout::cluster {

v1::CompletionRequest ToWire(const scheduler::CompletionRequest& r, const std::vector<int32_t>& prompt_ids) {
  v1::CompletionRequest w;
  w.mutable_prompt_ids()->Add(prompt_ids.begin(), prompt_ids.end());
  w.set_max_tokens(r.max_tokens);
  w.set_temperature(r.sampling.temperature);
  w.set_top_k(r.sampling.top_k);
  w.set_top_p(r.sampling.top_p);
  w.set_seed(r.sampling.seed);
  for (const std::string& s : r.stop) w.add_stop(s);
  w.set_ignore_eos(r.ignore_eos);
  w.set_session_id(r.session_id);
  if (r.session_context.has_value()) {
    w.set_has_session_context(true);
    w.mutable_session_context()->Add(r.session_context->begin(), r.session_context->end());
  }
  if (r.sparsity.has_value()) w.set_sparsity(*r.sparsity);
  if (r.kv_budget_tokens.has_value()) w.set_kv_budget_tokens(*r.kv_budget_tokens);
  if (r.kv_budget_fraction.has_value()) w.set_kv_budget_fraction(*r.kv_budget_fraction);
  if (r.dense_layers.has_value()) {
    w.set_has_dense_layers(true);
    w.mutable_dense_layers()->Add(r.dense_layers->begin(), r.dense_layers->end());
  }
  if (r.sparse_draft.has_value()) w.set_sparse_draft(*r.sparse_draft);
  if (r.draft_kv_budget_fraction.has_value()) w.set_draft_kv_budget_fraction(*r.draft_kv_budget_fraction);
  if (r.draft_refresh_rounds.has_value()) w.set_draft_refresh_rounds(*r.draft_refresh_rounds);
  if (r.santa_samples.has_value()) w.set_santa_samples(*r.santa_samples);
  if (r.logprobs.has_value()) w.set_logprobs(*r.logprobs);
  w.set_presence_penalty(r.penalties.presence);
  w.set_frequency_penalty(r.penalties.frequency);
  w.set_repetition_penalty(r.penalties.repetition);
  return w;
}

absl::StatusOr<scheduler::CompletionRequest> FromWire(const v1::CompletionRequest& w) {
  if (w.prompt_ids().empty()) return absl::InvalidArgumentError("a Generate without prompt token ids");
  scheduler::CompletionRequest r;
  r.prompt_ids = std::vector<int32_t>(w.prompt_ids().begin(), w.prompt_ids().end());
  r.max_tokens = w.max_tokens();
  r.sampling = {.temperature = w.temperature(), .top_k = w.top_k(), .top_p = w.top_p(), .seed = w.seed()};
  r.stop.assign(w.stop().begin(), w.stop().end());
  r.ignore_eos = w.ignore_eos();
  r.session_id = w.session_id();
  if (w.has_session_context()) {
    r.session_context = std::vector<int32_t>(w.session_context().begin(), w.session_context().end());
  }
  if (w.has_sparsity()) r.sparsity = w.sparsity();
  if (w.has_kv_budget_tokens()) r.kv_budget_tokens = w.kv_budget_tokens();
  if (w.has_kv_budget_fraction()) r.kv_budget_fraction = w.kv_budget_fraction();
  if (w.has_dense_layers()) r.dense_layers = std::vector<int>(w.dense_layers().begin(), w.dense_layers().end());
  if (w.has_sparse_draft()) r.sparse_draft = w.sparse_draft();
  if (w.has_draft_kv_budget_fraction()) r.draft_kv_budget_fraction = w.draft_kv_budget_fraction();
  if (w.has_draft_refresh_rounds()) r.draft_refresh_rounds = w.draft_refresh_rounds();
  if (w.has_santa_samples()) r.santa_samples = w.santa_samples();
  if (w.has_logprobs()) r.logprobs = w.logprobs();
  r.penalties = {.presence = w.presence_penalty(), .frequency = w.frequency_penalty(),
                 .repetition = w.repetition_penalty()};
  return r;
}

v1::TokenLogprobs ToWire(const runtime::TokenLogprobs& lp) {
  v1::TokenLogprobs w;
  auto put = [](const runtime::TokenLogprob& t, v1::TokenLogprob* out) {
    out->set_token(t.token);
    out->set_logprob(t.logprob);
    out->set_bytes(t.bytes);
  };
  put(lp.chosen, w.mutable_chosen());
  for (const runtime::TokenLogprob& t : lp.top) put(t, w.add_top());
  return w;
}

runtime::TokenLogprobs FromWire(const v1::TokenLogprobs& w) {
  auto get = [](const v1::TokenLogprob& t) {
    return runtime::TokenLogprob{.token = t.token(), .logprob = t.logprob(), .bytes = t.bytes()};
  };
  runtime::TokenLogprobs lp{.chosen = get(w.chosen())};
  for (const v1::TokenLogprob& t : w.top()) lp.top.push_back(get(t));
  return lp;
}

GroupService::~GroupService() {
  absl::MutexLock lock(&mu_);
  for (auto& [stream, cancelled] : running_) cancelled->store(true);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_.empty(); };
  mu_.Await(absl::Condition(&idle));
}

int GroupService::running() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(running_.size());
}

bool GroupService::Handle(Channel& channel, const v1::Envelope& m) {
  switch (m.body_case()) {
    case v1::Envelope::kGenerate: {
      const uint64_t stream = m.generate().stream();
      absl::StatusOr<scheduler::CompletionRequest> request = FromWire(m.generate().request());
      if (!request.ok()) {
        v1::Envelope done;
        done.mutable_generate_done()->set_stream(stream);
        *done.mutable_generate_done()->mutable_status() = ToProto(request.status());
        (void)channel.Send(std::move(done));
        return true;
      }
      auto cancelled = std::make_shared<std::atomic<bool>>(false);
      {
        absl::MutexLock lock(&mu_);
        running_[stream] = cancelled;
      }
      std::thread(&GroupService::Run, this, channel.shared_from_this(), stream, *std::move(request), cancelled)
          .detach();
      return true;
    }
    case v1::Envelope::kCancelGenerate: {
      absl::MutexLock lock(&mu_);
      if (auto it = running_.find(m.cancel_generate().stream()); it != running_.end()) it->second->store(true);
      return true;
    }
    case v1::Envelope::kDeleteSession: {
      v1::Envelope done;
      done.mutable_generate_done()->set_stream(m.delete_session().stream());
      *done.mutable_generate_done()->mutable_status() = ToProto(engine_->DeleteSession(m.delete_session().session_id()));
      (void)channel.Send(std::move(done));
      return true;
    }
    default:
      return false;
  }
}

void GroupService::Run(std::shared_ptr<Channel> channel, uint64_t stream, scheduler::CompletionRequest request,
                       std::shared_ptr<std::atomic<bool>> cancelled) {
  absl::StatusOr<scheduler::CompletionResult> result = engine_->Complete(
      request, [&](absl::string_view text, std::span<const runtime::TokenLogprobs> logprobs,
                   std::span<const int32_t> tokens) {
        v1::Envelope piece;
        v1::GeneratePiece* p = piece.mutable_generate_piece();
        p->set_stream(stream);
        p->set_text(std::string(text));
        for (const runtime::TokenLogprobs& lp : logprobs) *p->add_logprobs() = ToWire(lp);
        p->mutable_tokens()->Add(tokens.begin(), tokens.end());
        // A coordinator that is gone reads nothing more: stop generating.
        return channel->Send(std::move(piece)).ok() && !cancelled->load();
      });
  v1::Envelope done;
  v1::GenerateDone* d = done.mutable_generate_done();
  d->set_stream(stream);
  *d->mutable_status() = ToProto(result.status());
  if (result.ok()) {
    d->set_finish_reason(result->finish_reason);
    d->set_prompt_tokens(result->prompt_tokens);
    d->set_cached_tokens(result->cached_tokens);
    d->set_completion_tokens(result->completion_tokens);
  }
  (void)channel->Send(std::move(done));
  absl::MutexLock lock(&mu_);
  running_.erase(stream);
}

void GroupService::Lost() {
  {
    absl::MutexLock lock(&mu_);
    for (auto& [stream, cancelled] : running_) cancelled->store(true);
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_.empty(); };
    mu_.Await(absl::Condition(&idle));
  }
  for (const scheduler::SessionInfo& s : engine_->ListSessions()) (void)engine_->DeleteSession(s.id);
}

}  // namespace scout::cluster
