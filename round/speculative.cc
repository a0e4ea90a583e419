#include "round/speculative.h"

#include <map>
#include <set>

#include <algorithm>
#include <chrono>
#include <thread>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"

namespace scout::round {
namespace {

using runtime::ModelConfig;

int32_t SampleFrom(std::span<const float> probs, std::mt19937_64& rng) {
  double total = 0;
  for (float x : probs) total += x;
  const double u = std::uniform_real_distribution<double>(0.0, total)(rng);
  double acc = 0;
  int32_t last = 0;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] <= 0.0f) continue;
    last = static_cast<int32_t>(i);
    acc += probs[i];
    if (u < acc) return last;
  }
  return last;
}

// Adds to `result`'s turnover counts one round pair: per unit, the blocks of `cur` (over a context
// of nb blocks) outside the sinks and the window, and of those the ones `prev` did not list. Both
// hold ascending lists for the same units.
void CountTurnover(const kvstore::Selection& prev, const kvstore::Selection& cur, int64_t nb, const StsBudget& budget,
                   SpeculativeResult& result) {
  const int64_t window_begin = nb - budget.window_blocks;
  for (size_t u = 0; u + 1 < cur.indptr.size(); ++u) {
    int32_t p = prev.indptr[u];
    const int32_t p_end = prev.indptr[u + 1];
    for (int32_t i = cur.indptr[u]; i < cur.indptr[u + 1]; ++i) {
      const int32_t b = cur.blocks[i];
      if (b < budget.sink_blocks || b >= window_begin) continue;
      ++result.turnover_movable_blocks;
      while (p < p_end && prev.blocks[p] < b) ++p;
      if (p == p_end || prev.blocks[p] != b) ++result.turnover_new_blocks;
    }
  }
  ++result.turnover_round_pairs;
}

}  // namespace

Verdict VerifyDraft(std::span<const std::vector<float>> p, std::span<const std::vector<float>> q,
                    std::span<const int32_t> drafted, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (size_t i = 0; i < drafted.size(); ++i) {
    const int32_t d = drafted[i];
    const double pi = p[i][d], qi = q[i][d];
    if (qi > 0 && uniform(rng) < std::min(1.0, pi / qi)) continue;  // accepted
    // Rejected: draw from the residual max(0, p - q). It is never empty: if p <= q everywhere
    // then p == q, and then d would have been accepted.
    std::vector<float> residual(p[i].size());
    double mass = 0;
    for (size_t v = 0; v < residual.size(); ++v) mass += (residual[v] = std::max(0.0f, p[i][v] - q[i][v]));
    if (mass <= 0) return {static_cast<int>(i), SampleFrom(p[i], rng)};  // rounding: p == q
    return {static_cast<int>(i), SampleFrom(residual, rng)};
  }
  return {static_cast<int>(drafted.size()), SampleFrom(p[drafted.size()], rng)};
}

SpeculativeStream::SpeculativeStream(ModelBackend& target, ModelBackend& draft, SequenceId seq,
                                     std::vector<int32_t> prompt, SpeculativeOptions options, TokenCallback on_token)
    : target_(target),
      draft_(draft),
      seq_(seq),
      prompt_(std::move(prompt)),
      options_(std::move(options)),
      on_token_(std::move(on_token)),
      dist_(options_.sampling),  // only its Distribution() is used: both models filtered alike
      rng_(options_.sampling.seed) {}

SpeculativeStream::~SpeculativeStream() {
  if (added_) {
    target_.ReleaseSequence(seq_).IgnoreError();
    draft_.ReleaseSequence(seq_).IgnoreError();
  }
}

absl::Status SpeculativeStream::Begin(bool prefill) {
  vocab_ = target_.config().vocab_size;
  if (draft_.config().vocab_size != vocab_) {
    return absl::InvalidArgumentError(absl::StrCat("draft vocabulary (", draft_.config().vocab_size,
                                                   ") differs from the target's (", vocab_, ")"));
  }
  if (prompt_.empty()) return absl::InvalidArgumentError("prompt is empty");
  if (options_.num_speculative_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_speculative_tokens must be >= 1, got ",
                                                   options_.num_speculative_tokens));
  }
  if (options_.max_tokens < 0 || options_.prefill_chunk <= 0) return absl::InvalidArgumentError("bad max_tokens or prefill_chunk");
  if (absl::Status s = runtime::ValidateSamplingParams(options_.sampling); !s.ok()) return s;
  if (options_.santa_samples < 0) {
    return absl::InvalidArgumentError(absl::StrCat("santa_samples must be >= 0, got ", options_.santa_samples));
  }
  if (options_.draft_refresh_rounds < 1) {
    return absl::InvalidArgumentError(absl::StrCat("draft_refresh_rounds must be >= 1, got ",
                                                   options_.draft_refresh_rounds));
  }
  if (const HeadMap* m = options_.head_map; m != nullptr) {
    const ModelConfig &t = target_.config(), &d = draft_.config();
    if (m->target_layers != t.num_hidden_layers || m->target_kv_heads != t.num_key_value_heads ||
        m->draft_layers != d.num_hidden_layers || m->draft_heads != d.num_attention_heads ||
        m->units.size() != static_cast<size_t>(m->target_layers) * m->target_kv_heads) {
      return absl::InvalidArgumentError("head map does not match the target and draft models");
    }
    for (const std::vector<int32_t>& u : m->units) {
      for (int32_t h : u) {
        if (h < 0 || h >= m->draft_layers * m->draft_heads) {
          return absl::InvalidArgumentError(absl::StrCat("head map names draft head ", h));
        }
      }
    }
  }
  if (const HeadMap* m = options_.draft_head_map; m != nullptr) {
    const ModelConfig& d = draft_.config();
    if (m->target_layers != d.num_hidden_layers || m->target_kv_heads != d.num_key_value_heads ||
        m->draft_layers != d.num_hidden_layers || m->draft_heads != d.num_attention_heads ||
        m->units.size() != static_cast<size_t>(m->target_layers) * m->target_kv_heads) {
      return absl::InvalidArgumentError("draft head map does not map the draft onto itself");
    }
  }
  limit_ = std::min(target_.config().max_position_embeddings, draft_.config().max_position_embeddings);
  if (static_cast<int64_t>(prompt_.size()) > limit_) {
    return absl::OutOfRangeError(absl::StrCat("prompt of ", prompt_.size(), " tokens exceeds the models' ", limit_));
  }
  if (options_.continue_sequence) {
    absl::StatusOr<int64_t> t = target_.SequenceLength(seq_), d = draft_.SequenceLength(seq_);
    if (!t.ok()) return t.status();
    if (!d.ok()) return d.status();
    if (*t != *d) {
      return absl::FailedPreconditionError(absl::StrCat("sequence ", seq_, " holds ", *t, " tokens in the target but ",
                                                        *d, " in the draft"));
    }
    base_ = *t;
    if (base_ + static_cast<int64_t>(prompt_.size()) > limit_) {
      return absl::OutOfRangeError(absl::StrCat("sequence ", seq_, " of ", base_, " tokens plus a prompt of ",
                                                prompt_.size(), " exceeds the models' ", limit_));
    }
  } else {
    if (absl::Status s = target_.AddSequence(seq_); !s.ok()) return s;
    if (absl::Status s = draft_.AddSequence(seq_); !s.ok()) {
      target_.ReleaseSequence(seq_).IgnoreError();
      return s;
    }
    added_ = true;
  }
  result_.prompt_tokens = static_cast<int64_t>(prompt_.size());
  // Tokens each model has yet to process (the last accepted ones).
  target_pending_ = {prompt_.back()};
  draft_pending_ = {prompt_.back()};
  done_ = options_.max_tokens == 0;
  prefill_start_ = std::chrono::steady_clock::now();
  decode_start_ = prefill_start_;
  prefilled_target_ = prefilled_draft_ = 0;
  if (!prefill) return absl::OkStatus();
  SpeculativeStream* self = this;
  return PrefillStreams(target_, draft_, {&self, 1}, options_.prefill_chunk)[0];
}

namespace {

// One pass of at most `budget` tokens on one model, filled from the streams in order from
// (*done)[i]; a pass that fails runs again stream by stream, so the error lands on its own stream.
void PrefillPassOn(ModelBackend& m, std::span<SpeculativeStream* const> streams,
                   std::span<const std::vector<int32_t>* const> prompts, std::vector<int64_t>* done,
                   std::vector<absl::Status>* status, int64_t budget) {
  std::vector<SequenceInput> batch;
  std::vector<size_t> who;
  int64_t room = std::max<int64_t>(1, budget);
  for (size_t i = 0; i < streams.size() && room > 0; ++i) {
    const std::span<const int32_t> prompt(*prompts[i]);
    const int64_t left = static_cast<int64_t>(prompt.size()) - 1 - (*done)[i];
    if (!(*status)[i].ok() || left <= 0) continue;
    const int64_t n = std::min(room, left);
    batch.push_back({.seq = streams[i]->seq(), .tokens = prompt.subspan((*done)[i], n)});
    who.push_back(i);
    room -= n;
  }
  if (batch.empty()) return;
  std::vector<float> logits;
  if (!m.Forward(batch, &logits).ok()) {
    for (size_t j = 0; j < batch.size(); ++j) (*status)[who[j]] = m.Forward({&batch[j], 1}, &logits);
  }
  for (size_t j = 0; j < batch.size(); ++j) {
    if ((*status)[who[j]].ok()) (*done)[who[j]] += static_cast<int64_t>(batch[j].tokens.size());
  }
}

}  // namespace

std::vector<absl::Status> PrefillStep(ModelBackend& target, ModelBackend& draft,
                                      std::span<SpeculativeStream* const> streams, int64_t budget) {
  // Both models process each prompt but its last token, which opens the first round.
  std::vector<absl::Status> target_status(streams.size()), draft_status(streams.size());
  std::vector<int64_t> target_done(streams.size()), draft_done(streams.size());
  std::vector<const std::vector<int32_t>*> prompts(streams.size());
  for (size_t i = 0; i < streams.size(); ++i) {
    target_done[i] = streams[i]->prefilled_target_;
    draft_done[i] = streams[i]->prefilled_draft_;
    prompts[i] = &streams[i]->prompt_;
  }
  // The draft's pass runs beside the target's: on its own GPU it costs no time of the target's.
  // (The CUDA models are separate objects on separate devices; the CPU ones share nothing.)
  std::thread draft_pass;
  if (&draft != &target && target.concurrent_with(draft)) {
    draft_pass = std::thread([&] { PrefillPassOn(draft, streams, prompts, &draft_done, &draft_status, budget); });
  } else {
    PrefillPassOn(draft, streams, prompts, &draft_done, &draft_status, budget);
  }
  PrefillPassOn(target, streams, prompts, &target_done, &target_status, budget);
  if (draft_pass.joinable()) draft_pass.join();
  std::vector<absl::Status> status(streams.size());
  const auto now = std::chrono::steady_clock::now();
  for (size_t i = 0; i < streams.size(); ++i) {
    SpeculativeStream& st = *streams[i];
    status[i] = !target_status[i].ok() ? target_status[i] : draft_status[i];
    st.prefilled_target_ = target_done[i];
    st.prefilled_draft_ = draft_done[i];
    if (status[i].ok() && st.options_.on_prefill_progress) {
      // The prompt but its last token, which opens the first round.
      st.options_.on_prefill_progress(st.prefilled_target_, static_cast<int64_t>(st.prompt_.size()) - 1);
    }
    if (status[i].ok() && st.prefilled() && st.decode_start_ == st.prefill_start_) {
      st.decode_start_ = now;
      st.result_.prefill_seconds = std::chrono::duration<double>(now - st.prefill_start_).count();
    }
  }
  return status;
}

std::vector<absl::Status> PrefillStreams(ModelBackend& target, ModelBackend& draft,
                                         std::span<SpeculativeStream* const> streams, int64_t chunk) {
  std::vector<absl::Status> status(streams.size());
  while (true) {
    std::vector<SpeculativeStream*> left;
    std::vector<size_t> at;
    for (size_t i = 0; i < streams.size(); ++i) {
      if (status[i].ok() && !streams[i]->prefilled()) {
        left.push_back(streams[i]);
        at.push_back(i);
      }
    }
    if (left.empty()) break;
    const std::vector<absl::Status> step = PrefillStep(target, draft, left, chunk);
    for (size_t j = 0; j < left.size(); ++j) status[at[j]] = step[j];
  }
  return status;
}

void SpeculativeStream::StartRound() {
  const int64_t target_len = *target_.SequenceLength(seq_) + static_cast<int64_t>(target_pending_.size());
  const int64_t remaining = options_.max_tokens - static_cast<int64_t>(result_.tokens.size());
  if (limit_ - target_len < 0) {
    done_ = true;
    return;
  }
  // k drafted tokens plus the pending ones must fit the context; the round emits up to k + 1.
  int k = static_cast<int>(std::min<int64_t>(options_.num_speculative_tokens, remaining - 1));
  k = static_cast<int>(std::min<int64_t>(k, limit_ - target_len));
  k_ = std::max(k, 0);
  rng_at_start_ = rng_;
  draft_len_at_start_ = *draft_.SequenceLength(seq_);
  target_len_at_start_ = *target_.SequenceLength(seq_);
  refresh_mass_at_start_ = refresh_mass_;
  refresh_rows_at_start_ = refresh_rows_;
  refresh_blocks_at_start_ = refresh_blocks_;
  q_.assign(k_, {});
  drafted_.clear();
  feed_ = draft_pending_;
  masses_.clear();
  masses_.reserve(k_);
  mass_rows_.clear();
  mass_blocks_.clear();
  draft_selection_ = {};
  selection_ = {};
  refresh_ = options_.draft_head_map != nullptr &&
             (refresh_mass_.empty() || round_index_ % std::max(1, options_.draft_refresh_rounds) == 0);
  ++round_index_;
}

SequenceInput SpeculativeStream::DraftInput(int i) {
  SequenceInput in{.seq = seq_, .tokens = feed_};
  const int64_t draft_end = *draft_.SequenceLength(seq_) + static_cast<int64_t>(feed_.size());
  if (options_.head_map != nullptr || (refresh_ && i == 0)) {
    masses_.emplace_back();
    in.block_mass = &masses_.back();
    mass_rows_.push_back(static_cast<int64_t>(feed_.size()));
    mass_blocks_.push_back(kvstore::BlocksFor(draft_end));
  }
  if (options_.draft_head_map != nullptr && (i > 0 || !refresh_)) {
    // The last dense step's rows pick this step's blocks (the new token's block always included).
    draft_selection_ = BuildStsSelection(*options_.draft_head_map, refresh_mass_, static_cast<int>(refresh_rows_),
                                         refresh_blocks_, kvstore::BlocksFor(draft_end), options_.draft_budget);
    in.selection = &draft_selection_;
  }
  const int64_t units = draft_.config().num_hidden_layers * draft_.config().num_key_value_heads;
  result_.draft_context_blocks += kvstore::BlocksFor(draft_end) * units;
  result_.draft_selected_blocks += in.selection != nullptr ? static_cast<int64_t>(draft_selection_.blocks.size())
                                                           : kvstore::BlocksFor(draft_end) * units;
  return in;
}

void SpeculativeStream::OnDraftLogits(int i, std::span<const float> row) {
  if (refresh_ && i == 0) {
    refresh_mass_ = masses_.back();
    refresh_rows_ = mass_rows_.back();
    refresh_blocks_ = mass_blocks_.back();
  }
  q_[i].resize(vocab_);
  dist_.Distribution(row, q_[i]);
  drafted_.push_back(SampleFrom(q_[i], rng_));
  feed_ = {drafted_.back()};
}

SequenceInput SpeculativeStream::VerifyInput() {
  // Target verification: pending + all drafted tokens in one pass, every position's logits.
  verify_ = target_pending_;
  verify_.insert(verify_.end(), drafted_.begin(), drafted_.end());
  target_before_ = *target_.SequenceLength(seq_);
  SequenceInput in{.seq = seq_, .tokens = verify_, .all_logits = true};
  in.santa_samples = options_.santa_samples;
  in.santa_seed = options_.sampling.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(round_index_);
  if (options_.head_map != nullptr && k_ > 0) {
    // Stack the round's draft rows into [layers][heads][rows][blocks], zero-padded.
    const int64_t nb_mass = *std::max_element(mass_blocks_.begin(), mass_blocks_.end());
    int64_t rows = 0;
    for (int64_t r : mass_rows_) rows += r;
    const int units = options_.head_map->draft_layers * options_.head_map->draft_heads;
    std::vector<float> stacked(static_cast<size_t>(units) * rows * nb_mass, 0.0f);
    int64_t row0 = 0;
    for (size_t f = 0; f < masses_.size(); ++f) {
      for (int u = 0; u < units; ++u) {
        for (int64_t r = 0; r < mass_rows_[f]; ++r) {
          const float* from = masses_[f].data() + (u * mass_rows_[f] + r) * mass_blocks_[f];
          std::copy(from, from + mass_blocks_[f], stacked.begin() + (u * rows + row0 + r) * nb_mass);
        }
      }
      row0 += mass_rows_[f];
    }
    const int64_t nb = kvstore::BlocksFor(target_before_ + static_cast<int64_t>(verify_.size()));
    selection_ = BuildStsSelection(*options_.head_map, stacked, static_cast<int>(rows), nb_mass, nb, options_.sts_budget);
    in.selection = &selection_;
  }
  return in;
}

void SpeculativeStream::CountSelection(std::span<const int64_t> layer_selected, int64_t nb, int kv_heads) {
  const int layers = static_cast<int>(layer_selected.size());
  result_.layer_selected_blocks.resize(layers);
  result_.layer_context_blocks.resize(layers);
  for (int l = 0; l < layers; ++l) {
    result_.selected_blocks += layer_selected[l];
    result_.context_blocks += nb * kv_heads;
    result_.layer_selected_blocks[l] += layer_selected[l];
    result_.layer_context_blocks[l] += nb * kv_heads;
  }
}

absl::Status SpeculativeStream::OnVerifyLogits(std::span<const float> logits) {
  if (!selection_.indptr.empty()) {
    const int64_t nb = kvstore::BlocksFor(target_before_ + static_cast<int64_t>(verify_.size()));
    const int layers = selection_.num_layers, heads = selection_.num_kv_heads;
    std::vector<int64_t> per_layer(layers);
    for (int l = 0; l < layers; ++l) per_layer[l] = selection_.indptr[(l + 1) * heads] - selection_.indptr[l * heads];
    CountSelection(per_layer, nb, heads);
    if (!previous_selection_.indptr.empty()) CountTurnover(previous_selection_, selection_, nb, options_.sts_budget, result_);
  }
  previous_selection_ = std::move(selection_);  // empty after a round without one: pairs are back to back
  selection_ = {};
  std::vector<std::vector<float>> p(k_ + 1);
  const size_t first = target_pending_.size() - 1;  // row of the last pending token
  const std::span<const float> rows = logits.subspan(first * vocab_, (k_ + 1) * vocab_);
  const std::vector<float> penalised =
      options_.penalties.any() ? PenalisedRows(rows, k_ + 1) : std::vector<float>();
  const std::span<const float> scored = penalised.empty() ? rows : std::span<const float>(penalised);
  for (int i = 0; i <= k_; ++i) {
    p[i].resize(vocab_);
    dist_.Distribution(scored.subspan(i * vocab_, vocab_), p[i]);
  }
  const Verdict v = VerifyDraft(p, q_, drafted_, rng_);
  return AcceptVerdict(v, std::max(k_ - 1, 0), logits.subspan(first * vocab_, (k_ + 1) * vocab_));
}

std::vector<float> SpeculativeStream::PenalisedRows(std::span<const float> verify_rows, int rows) const {
  std::vector<float> out(verify_rows.begin(), verify_rows.begin() + static_cast<size_t>(rows) * vocab_);
  if (!options_.penalties.any()) return out;
  std::map<int32_t, int32_t> counts;
  for (int32_t t : result_.tokens) ++counts[t];
  if (prompt_seen_.empty()) {  // the prompt's distinct tokens, once: not rescanned every round
    prompt_seen_ = prompt_;
    std::sort(prompt_seen_.begin(), prompt_seen_.end());
    prompt_seen_.erase(std::unique(prompt_seen_.begin(), prompt_seen_.end()), prompt_seen_.end());
  }
  std::set<int32_t> seen(prompt_seen_.begin(), prompt_seen_.end());  // sorted: linear
  seen.insert(result_.tokens.begin(), result_.tokens.end());
  for (int i = 0; i < rows; ++i) {
    if (i > 0 && i - 1 < static_cast<int>(drafted_.size())) {
      ++counts[drafted_[i - 1]];
      seen.insert(drafted_[i - 1]);
    }
    const std::vector<std::pair<int32_t, int32_t>> c(counts.begin(), counts.end());
    const std::vector<int32_t> s(seen.begin(), seen.end());
    runtime::ApplyPenalties(options_.penalties, c, s, std::span<float>(out).subspan(static_cast<size_t>(i) * vocab_, vocab_));
  }
  return out;
}

absl::Status SpeculativeStream::AcceptVerdict(const Verdict& v, int draft_fed, std::span<const float> verify_rows) {
  if (options_.logprobs >= 0 && verify_rows.size() < static_cast<size_t>(v.accepted + 1) * vocab_) {
    return absl::InternalError("logprobs asked for, but the round kept no verification rows");
  }
  ++result_.rounds;
  result_.draft_proposed += k_;
  result_.draft_accepted += v.accepted;
  if (result_.accepted_per_position.size() < static_cast<size_t>(v.accepted)) {
    result_.accepted_per_position.resize(v.accepted, 0);
  }
  for (int i = 0; i < v.accepted; ++i) ++result_.accepted_per_position[i];
  // Roll back what the rejected tokens left in each cache. The target processed its pending
  // tokens and every drafted one; it keeps the pending ones and the accepted drafts.
  const int64_t keep_target = target_before_ + static_cast<int64_t>(target_pending_.size()) + v.accepted;
  if (absl::Status s = target_.TruncateSequence(seq_, keep_target); !s.ok()) return s;
  // A round that drafted consumed the draft's pending tokens and drafted[0..draft_fed-1]; the
  // draft keeps those that were accepted, and is fed the accepted ones it never saw next round.
  std::vector<int32_t> next_feed;
  if (!drafted_.empty()) {
    const int kept = std::min(v.accepted, draft_fed);
    const int64_t keep_draft = draft_len_at_start_ + static_cast<int64_t>(draft_pending_.size()) + kept;
    if (absl::Status s = draft_.TruncateSequence(seq_, keep_draft); !s.ok()) return s;
    next_feed.assign(drafted_.begin() + kept, drafted_.begin() + v.accepted);
  } else {
    next_feed = draft_pending_;  // no draft step ran: nothing consumed
  }
  // Emit accepted tokens, then the correction or bonus token.
  std::vector<int32_t> emitted(drafted_.begin(), drafted_.begin() + v.accepted);
  emitted.push_back(v.next);
  for (size_t i = 0; i < emitted.size(); ++i) {
    const int32_t t = emitted[i];
    result_.tokens.push_back(t);
    if (options_.logprobs >= 0 && options_.on_logprobs) {
      options_.on_logprobs(runtime::LogprobsOf(verify_rows.subspan(i * vocab_, vocab_), t, options_.logprobs,
                                               options_.sampling.temperature));
    }
    if ((on_token_ && !on_token_(t)) ||
        std::find(options_.stop_ids.begin(), options_.stop_ids.end(), t) != options_.stop_ids.end() ||
        static_cast<int64_t>(result_.tokens.size()) >= options_.max_tokens) {
      done_ = true;
      break;
    }
  }
  target_pending_ = {v.next};
  draft_pending_ = std::move(next_feed);
  draft_pending_.push_back(v.next);
  result_.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - decode_start_).count();
  return absl::OkStatus();
}

absl::Status SpeculativeStream::AbortRound() {
  rng_ = rng_at_start_;
  refresh_mass_ = std::move(refresh_mass_at_start_);
  refresh_rows_ = refresh_rows_at_start_;
  refresh_blocks_ = refresh_blocks_at_start_;
  --round_index_;
  selection_ = {};
  absl::Status s = draft_.TruncateSequence(seq_, draft_len_at_start_);
  absl::Status t = target_.TruncateSequence(seq_, target_len_at_start_);
  return s.ok() ? t : s;
}

absl::Status SpeculativeStream::Finish() {
  if (options_.continue_sequence && !result_.tokens.empty()) {
    // Leave both caches at exactly base + prompt + emitted tokens but the last: rounds may have
    // cached accepted tokens past where emission stopped, or left the draft a token short.
    std::vector<int32_t> all(prompt_.begin(), prompt_.end());
    all.insert(all.end(), result_.tokens.begin(), result_.tokens.end() - 1);
    const int64_t want = base_ + static_cast<int64_t>(all.size());
    std::vector<float> logits;
    for (ModelBackend* m : {&target_, &draft_}) {
      const int64_t have = *m->SequenceLength(seq_);
      if (have > want) {
        if (absl::Status s = m->TruncateSequence(seq_, want); !s.ok()) return s;
      } else if (have < want) {
        SequenceInput in{.seq = seq_, .tokens = std::span<const int32_t>(all).subspan(have - base_)};
        if (absl::Status s = m->Forward({&in, 1}, &logits); !s.ok()) return s;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status HostRound::Run(std::span<SpeculativeStream* const> streams) {
  std::vector<SpeculativeStream*> live;
  for (SpeculativeStream* s : streams) {
    if (s->done()) continue;
    s->StartRound();
    if (!s->done()) live.push_back(s);
  }
  if (live.empty()) return absl::OkStatus();
  auto abort = [&](absl::Status st) {
    for (SpeculativeStream* s : live) s->AbortRound().IgnoreError();
    return st;
  };
  const int64_t vocab = target_.config().vocab_size;
  int max_k = 0;
  for (SpeculativeStream* s : live) max_k = std::max(max_k, s->k_);
  std::vector<float> logits;
  for (int i = 0; i < max_k; ++i) {
    std::vector<SpeculativeStream*> step;
    std::vector<SequenceInput> batch;
    for (SpeculativeStream* s : live) {
      if (i >= s->k_) continue;
      step.push_back(s);
      batch.push_back(s->DraftInput(i));
    }
    if (absl::Status st = draft_.Forward(batch, &logits); !st.ok()) return abort(st);
    for (size_t j = 0; j < step.size(); ++j) {
      step[j]->OnDraftLogits(i, std::span<const float>(logits).subspan(j * vocab, vocab));
    }
  }
  std::vector<SequenceInput> batch;
  for (SpeculativeStream* s : live) batch.push_back(s->VerifyInput());
  if (absl::Status st = target_.Forward(batch, &logits); !st.ok()) return abort(st);
  size_t row = 0;
  for (size_t j = 0; j < live.size(); ++j) {
    const size_t rows = batch[j].tokens.size();
    if (absl::Status st = live[j]->OnVerifyLogits(std::span<const float>(logits).subspan(row * vocab, rows * vocab));
        !st.ok()) {
      // A cache truncation failed while accepting: the streams not yet accepted go back; the
      // ones before have emitted (the caller ends them all).
      for (size_t later = j + 1; later < live.size(); ++later) live[later]->AbortRound().IgnoreError();
      return st;
    }
    row += rows;
  }
  return absl::OkStatus();
}

absl::StatusOr<SpeculativeResult> GenerateSpeculative(ModelBackend& target, ModelBackend& draft, SequenceId seq,
                                                      std::span<const int32_t> prompt,
                                                      const SpeculativeOptions& options,
                                                      const TokenCallback& on_token) {
  SpeculativeStream stream(target, draft, seq, std::vector<int32_t>(prompt.begin(), prompt.end()), options, on_token);
  if (absl::Status s = stream.Begin(); !s.ok()) return s;
  SpeculativeStream* const one[] = {&stream};
  const std::unique_ptr<SpeculativeRound> round = MakeRound(target, draft);
  while (!stream.done()) {
    if (absl::Status s = round->Run(one); !s.ok()) return s;
  }
  if (absl::Status s = stream.Finish(); !s.ok()) return s;
  SpeculativeResult result = stream.result();
  result.round_impl = round->name();
  return result;
}

}  // namespace scout::round
