// The engine with a draft: each request's speculative rounds (round::SpeculativeStream), run
// together over the running requests, and their prefill paced with the rounds.
#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvstore/block_table.h"
#include "scheduler/engine.h"
#include "scheduler/engine_request.h"
#include "scheduler/policy.h"

namespace scout::scheduler {

std::pair<int64_t, double> Engine::PacedSpeculativePrefill(const std::vector<Request*>& prefilling) const {
  std::vector<PrefillPacer::Prompt> prompts;
  for (Request* r : prefilling) {
    const int64_t done = r->spec != nullptr ? r->spec->prefilled_tokens() : 0;
    const int64_t left = r->spec != nullptr ? r->spec->prompt_to_prefill() - done : 0;
    prompts.push_back({.start = r->earlier + done, .left = std::max<int64_t>(left, 0)});
  }
  // The pass fills the prompts in order, as the plan does: its sum is the pass's bound.
  const std::vector<int64_t> plan = pacer_.Plan(prompts, std::max<int64_t>(options_.max_num_batched_tokens, 1));
  int64_t tokens = 0;
  double work = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    if (plan[i] <= 0) continue;
    tokens += plan[i];
    work += pacer_.Work(prompts[i].start, plan[i]);
  }
  return {tokens, work};
}

Engine::StartResult Engine::StartSpeculative(Request& r) {
  const bool session = !r.req.session_id.empty();
  if (session && r.new_session) {  // both models hold a session's tokens
    for (runtime::ModelBackend* m : {model_.get(), draft_.get()}) {
      if (absl::Status s = m->AddSequence(r.seq); !s.ok()) {
        Finish(r, s);
        return StartResult::kDone;
      }
    }
  }
  round::SpeculativeOptions so{.num_speculative_tokens = options_.num_speculative_tokens,
                                 .max_tokens = r.req.max_tokens, .sampling = r.req.sampling,
                                 .prefill_chunk = options_.max_num_batched_tokens, .continue_sequence = session};
  const bool sts = r.req.sparsity.has_value() ? *r.req.sparsity == "sts" : options_.head_map.has_value();
  if (sts) {
    so.head_map = &*request_head_map_;
    so.sts_budget = options_.sts_budget;
    if (r.req.dense_layers.has_value()) so.sts_budget.dense_layers = *r.req.dense_layers;
    if (r.req.kv_budget_tokens.has_value()) {
      so.sts_budget.budget_tokens = *r.req.kv_budget_tokens;
    } else if (r.req.kv_budget_fraction.has_value()) {
      so.sts_budget.budget_tokens = 0;
      so.sts_budget.budget_fraction = *r.req.kv_budget_fraction;
    }
  }
  if (r.req.sparse_draft.value_or(options_.sparse_draft)) {
    so.draft_head_map = &*draft_self_map_;
    so.draft_budget = options_.draft_budget;
    if (r.req.draft_kv_budget_fraction.has_value()) {
      so.draft_budget.budget_tokens = 0;
      so.draft_budget.budget_fraction = *r.req.draft_kv_budget_fraction;
    }
    so.draft_refresh_rounds = r.req.draft_refresh_rounds.value_or(options_.draft_refresh_rounds);
  }
  so.santa_samples = r.req.santa_samples.value_or(options_.santa_samples);
  so.penalties = r.req.penalties;
  Request* rp = &r;
  if (r.req.logprobs.has_value()) {  // the target's probabilities of the emitted tokens
    so.logprobs = *r.req.logprobs;
    so.on_logprobs = [rp](runtime::TokenLogprobs lp) { rp->spec_logprobs = std::move(lp); };
  }
  r.spec = std::make_unique<round::SpeculativeStream>(
      // OnToken takes every token the stream emits (it returns false once cancelled): the
      // session's pending token must be the stream's last, which its cache does not hold.
      *model_, *draft_, r.seq, r.ids, so, [this, rp](int32_t token) {
        std::optional<runtime::TokenLogprobs> lp = std::exchange(rp->spec_logprobs, std::nullopt);
        NameTokens(lp);
        return OnToken(*rp, token, std::move(lp));
      });
  if (absl::Status s = r.spec->Begin(/*prefill=*/false); !s.ok()) {
    FinishSpeculative(r, s);
    return StartResult::kDone;
  }
  return StartResult::kPrefill;
}

void Engine::SpeculativeStep(std::vector<Request*>& running) {
  for (Request* r : running) {
    if (r->cancelled) FinishSpeculative(*r, absl::OkStatus());
  }
  running.erase(std::remove_if(running.begin(), running.end(), [](Request* r) { return !r->started; }), running.end());
  // A round that fails is rolled back whole, so it can run again without the newest request.
  auto round = [&]() -> absl::Status {
    std::vector<round::SpeculativeStream*> streams;
    for (Request* r : running) streams.push_back(r->spec.get());
    return round_->Run(streams);
  };
  if (!RunBatchedPass(running, round, [this](Request& r, absl::Status s) { FinishSpeculative(r, s); })) return;
  for (Request* r : running) {
    if (r->spec->done()) FinishSpeculative(*r, absl::OkStatus());
  }
}

void Engine::FinishSpeculative(Request& r, absl::Status status) {
  if (r.spec != nullptr) {
    if (status.ok()) status = r.spec->Finish();
    const round::SpeculativeResult& res = r.spec->result();
    metrics_->draft_tokens.Increment(static_cast<double>(res.draft_proposed));
    metrics_->accepted_tokens.Increment(static_cast<double>(res.draft_accepted));
    for (size_t i = 0; i < res.accepted_per_position.size(); ++i) {
      metrics_->AcceptedAtPosition(static_cast<int>(i)).Increment(static_cast<double>(res.accepted_per_position[i]));
    }
    metrics_->draft_attention_blocks_read.Increment(static_cast<double>(res.draft_selected_blocks));
    metrics_->draft_attention_blocks_dense.Increment(static_cast<double>(res.draft_context_blocks));
    // Attention reads of the target's verification: (layer, KV head, block) units read, and
    // those a dense pass would have read; their bytes, at this model's unit size.
    if (res.context_blocks > 0) {
      const double unit_bytes = 2.0 * kvstore::kBlockSize * config_.head_dim * 2;  // K and V, bf16
      metrics_->attention_blocks_read.Increment(static_cast<double>(res.selected_blocks));
      metrics_->attention_blocks_dense.Increment(static_cast<double>(res.context_blocks));
      metrics_->attention_kv_bytes_skipped.Increment(unit_bytes *
                                                     static_cast<double>(res.context_blocks - res.selected_blocks));
      metrics_->attention_blocks_read_ratio.Observe(static_cast<double>(res.selected_blocks) / res.context_blocks);
      for (size_t l = 0; l < res.layer_context_blocks.size(); ++l) {
        if (res.layer_context_blocks[l] == 0) continue;
        metrics_->LayerBlocksReadRatio(static_cast<int>(l))
            .Observe(static_cast<double>(res.layer_selected_blocks[l]) / res.layer_context_blocks[l]);
      }
    }
    r.spec.reset();  // a one-off request's sequences go with its stream
    if (r.req.session_id.empty()) r.seq = -r.seq - 1;  // nothing left for Finish to free
  }
  Finish(r, status);
}

}  // namespace scout::scheduler
