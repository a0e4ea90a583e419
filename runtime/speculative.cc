#include "runtime/speculative.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"

namespace scout::runtime {
namespace {

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

absl::StatusOr<SpeculativeResult> GenerateSpeculative(ModelBackend& target, ModelBackend& draft, SequenceId seq,
                                                      std::span<const int32_t> prompt,
                                                      const SpeculativeOptions& options,
                                                      const TokenCallback& on_token) {
  const int64_t vocab = target.config().vocab_size;
  if (draft.config().vocab_size != vocab) {
    return absl::InvalidArgumentError(absl::StrCat("draft vocabulary (", draft.config().vocab_size,
                                                   ") differs from the target's (", vocab, ")"));
  }
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  if (options.num_speculative_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_speculative_tokens must be >= 1, got ",
                                                   options.num_speculative_tokens));
  }
  if (options.max_tokens < 0 || options.prefill_chunk <= 0) return absl::InvalidArgumentError("bad max_tokens or prefill_chunk");
  if (absl::Status s = ValidateSamplingParams(options.sampling); !s.ok()) return s;
  if (const HeadMap* m = options.head_map; m != nullptr) {
    const ModelConfig &t = target.config(), &d = draft.config();
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
  if (const HeadMap* m = options.draft_head_map; m != nullptr) {
    const ModelConfig& d = draft.config();
    if (m->target_layers != d.num_hidden_layers || m->target_kv_heads != d.num_key_value_heads ||
        m->draft_layers != d.num_hidden_layers || m->draft_heads != d.num_attention_heads ||
        m->units.size() != static_cast<size_t>(m->target_layers) * m->target_kv_heads) {
      return absl::InvalidArgumentError("draft head map does not map the draft onto itself");
    }
  }
  const int64_t limit = std::min(target.config().max_position_embeddings, draft.config().max_position_embeddings);
  if (static_cast<int64_t>(prompt.size()) > limit) {
    return absl::OutOfRangeError(absl::StrCat("prompt of ", prompt.size(), " tokens exceeds the models' ", limit));
  }
  int64_t base = 0;  // tokens both caches hold before this call
  if (options.continue_sequence) {
    absl::StatusOr<int64_t> t = target.SequenceLength(seq), d = draft.SequenceLength(seq);
    if (!t.ok()) return t.status();
    if (!d.ok()) return d.status();
    if (*t != *d) {
      return absl::FailedPreconditionError(absl::StrCat("sequence ", seq, " holds ", *t, " tokens in the target but ",
                                                        *d, " in the draft"));
    }
    base = *t;
    if (base + static_cast<int64_t>(prompt.size()) > limit) {
      return absl::OutOfRangeError(absl::StrCat("sequence ", seq, " of ", base, " tokens plus a prompt of ",
                                                prompt.size(), " exceeds the models' ", limit));
    }
  } else {
    if (absl::Status s = target.AddSequence(seq); !s.ok()) return s;
  }
  absl::Cleanup release_target = [&] {
    if (!options.continue_sequence) target.ReleaseSequence(seq).IgnoreError();
  };
  if (!options.continue_sequence) {
    if (absl::Status s = draft.AddSequence(seq); !s.ok()) return s;
  }
  absl::Cleanup release_draft = [&] {
    if (!options.continue_sequence) draft.ReleaseSequence(seq).IgnoreError();
  };

  using Clock = std::chrono::steady_clock;
  SpeculativeResult result;
  result.prompt_tokens = static_cast<int64_t>(prompt.size());
  Sampler dist(options.sampling);  // only its Distribution() is used: both models filtered alike
  std::mt19937_64 rng(options.sampling.seed);
  auto t0 = Clock::now();
  // Both models process the prompt but its last token, which opens the first round.
  std::vector<float> logits;
  for (ModelBackend* m : {&target, &draft}) {
    for (size_t at = 0; at + 1 < prompt.size(); at += options.prefill_chunk) {
      const size_t n = std::min<size_t>(options.prefill_chunk, prompt.size() - 1 - at);
      SequenceInput in{.seq = seq, .tokens = prompt.subspan(at, n)};
      if (absl::Status s = m->Forward({&in, 1}, &logits); !s.ok()) return s;
    }
  }
  // Tokens each model has yet to process (the last accepted ones).
  std::vector<int32_t> target_pending = {prompt.back()}, draft_pending = {prompt.back()};
  auto t1 = Clock::now();
  result.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

  bool done = options.max_tokens == 0;
  // Sparse draft: the mass of the last dense draft step, which picks the draft's blocks.
  std::vector<float> refresh_mass;
  int64_t refresh_rows = 0, refresh_blocks = 0, round_index = 0;
  kvstore::Selection previous_selection;  // the last round's target lists, for turnover; empty: none
  while (!done) {
    const int64_t target_len = *target.SequenceLength(seq) + static_cast<int64_t>(target_pending.size());
    const int64_t remaining = options.max_tokens - static_cast<int64_t>(result.tokens.size());
    // k drafted tokens plus the pending ones must fit the context; the round emits up to k + 1.
    int k = static_cast<int>(std::min<int64_t>(options.num_speculative_tokens, remaining - 1));
    k = static_cast<int>(std::min<int64_t>(k, limit - target_len));
    if (limit - target_len < 0) break;
    k = std::max(k, 0);
    // Draft proposals (and, for STS, its attention mass per block for every row it runs).
    std::vector<std::vector<float>> q(k), p(k + 1);
    std::vector<int32_t> drafted;
    std::vector<int32_t> feed = draft_pending;
    std::vector<std::vector<float>> masses;
    std::vector<int64_t> mass_rows, mass_blocks;
    kvstore::Selection draft_selection;
    masses.reserve(k);
    const bool refresh = options.draft_head_map != nullptr &&
                         (refresh_mass.empty() || round_index % std::max(1, options.draft_refresh_rounds) == 0);
    ++round_index;
    for (int i = 0; i < k; ++i) {
      SequenceInput in{.seq = seq, .tokens = feed};
      const int64_t draft_end = *draft.SequenceLength(seq) + static_cast<int64_t>(feed.size());
      if (options.head_map != nullptr || (refresh && i == 0)) {
        masses.emplace_back();
        in.block_mass = &masses.back();
        mass_rows.push_back(static_cast<int64_t>(feed.size()));
        mass_blocks.push_back(kvstore::BlocksFor(draft_end));
      }
      if (options.draft_head_map != nullptr && (i > 0 || !refresh)) {
        // The last dense step's rows pick this step's blocks (the new token's block always included).
        draft_selection = BuildStsSelection(*options.draft_head_map, refresh_mass, static_cast<int>(refresh_rows),
                                            refresh_blocks, kvstore::BlocksFor(draft_end), options.draft_budget);
        in.selection = &draft_selection;
      }
      if (absl::Status s = draft.Forward({&in, 1}, &logits); !s.ok()) return s;
      if (refresh && i == 0) {
        refresh_mass = masses.back();
        refresh_rows = mass_rows.back();
        refresh_blocks = mass_blocks.back();
      }
      q[i].resize(vocab);
      dist.Distribution(logits, q[i]);
      drafted.push_back(SampleFrom(q[i], rng));
      feed = {drafted.back()};
    }
    const int64_t draft_base = *draft.SequenceLength(seq);  // after pending + drafted[0..k-2]
    // Target verification: pending + all drafted tokens in one pass, every position's logits.
    std::vector<int32_t> verify = target_pending;
    verify.insert(verify.end(), drafted.begin(), drafted.end());
    const int64_t target_before = *target.SequenceLength(seq);
    SequenceInput in{.seq = seq, .tokens = verify, .all_logits = true};
    kvstore::Selection selection;
    if (options.head_map == nullptr) {
      masses.clear();  // only the sparse draft's own
      mass_rows.clear();
      mass_blocks.clear();
    }
    if (options.head_map != nullptr && k > 0) {
      // Stack the round's draft rows into [layers][heads][rows][blocks], zero-padded.
      const int64_t nb_mass = *std::max_element(mass_blocks.begin(), mass_blocks.end());
      int64_t rows = 0;
      for (int64_t r : mass_rows) rows += r;
      const int units = options.head_map->draft_layers * options.head_map->draft_heads;
      std::vector<float> stacked(static_cast<size_t>(units) * rows * nb_mass, 0.0f);
      int64_t row0 = 0;
      for (size_t f = 0; f < masses.size(); ++f) {
        for (int u = 0; u < units; ++u) {
          for (int64_t r = 0; r < mass_rows[f]; ++r) {
            const float* from = masses[f].data() + (u * mass_rows[f] + r) * mass_blocks[f];
            std::copy(from, from + mass_blocks[f], stacked.begin() + (u * rows + row0 + r) * nb_mass);
          }
        }
        row0 += mass_rows[f];
      }
      const int64_t nb = kvstore::BlocksFor(target_before + static_cast<int64_t>(verify.size()));
      selection = BuildStsSelection(*options.head_map, stacked, static_cast<int>(rows), nb_mass, nb, options.sts_budget);
      in.selection = &selection;
      result.selected_blocks += static_cast<int64_t>(selection.blocks.size());
      result.context_blocks += nb * selection.num_layers * selection.num_kv_heads;
      if (!previous_selection.indptr.empty()) CountTurnover(previous_selection, selection, nb, options.sts_budget, result);
    }
    if (absl::Status s = target.Forward({&in, 1}, &logits); !s.ok()) return s;
    previous_selection = std::move(selection);  // empty after a round without one: pairs are back to back
    const size_t first = target_pending.size() - 1;  // row of the last pending token
    for (int i = 0; i <= k; ++i) {
      p[i].resize(vocab);
      dist.Distribution(std::span<const float>(logits).subspan((first + i) * vocab, vocab), p[i]);
    }
    const Verdict v = VerifyDraft(p, q, drafted, rng);
    ++result.rounds;
    result.draft_proposed += k;
    result.draft_accepted += v.accepted;
    // Roll back what the rejected tokens left in each cache.
    const int64_t keep_target = target_before + static_cast<int64_t>(target_pending.size()) + v.accepted;
    if (absl::Status s = target.TruncateSequence(seq, keep_target); !s.ok()) return s;
    // The draft processed pending + drafted[0..k-2]; it keeps pending + drafted[0..accepted-1].
    const int64_t draft_kept_drafted = std::min<int64_t>(v.accepted, std::max(k - 1, 0));
    const int64_t keep_draft = draft_base - std::max(k - 1, 0) + draft_kept_drafted;
    if (absl::Status s = draft.TruncateSequence(seq, keep_draft); !s.ok()) return s;
    // Emit accepted tokens, then the correction or bonus token.
    std::vector<int32_t> emitted(drafted.begin(), drafted.begin() + v.accepted);
    emitted.push_back(v.next);
    if (k > 0) {
      // The draft consumed its pending tokens in this round's first forward.
      draft_pending.clear();
      if (v.accepted == k) draft_pending.push_back(drafted.back());  // accepted but never fed
    }
    for (int32_t t : emitted) {
      result.tokens.push_back(t);
      if ((on_token && !on_token(t)) ||
          std::find(options.stop_ids.begin(), options.stop_ids.end(), t) != options.stop_ids.end() ||
          static_cast<int64_t>(result.tokens.size()) >= options.max_tokens) {
        done = true;
        break;
      }
    }
    target_pending = {v.next};
    draft_pending.push_back(v.next);
  }
  if (options.continue_sequence && !result.tokens.empty()) {
    // Leave both caches at exactly base + prompt + emitted tokens but the last: rounds may have
    // cached accepted tokens past where emission stopped, or left the draft a token short.
    std::vector<int32_t> all(prompt.begin(), prompt.end());
    all.insert(all.end(), result.tokens.begin(), result.tokens.end() - 1);
    const int64_t want = base + static_cast<int64_t>(all.size());
    for (ModelBackend* m : {&target, &draft}) {
      const int64_t have = *m->SequenceLength(seq);
      if (have > want) {
        if (absl::Status s = m->TruncateSequence(seq, want); !s.ok()) return s;
      } else if (have < want) {
        SequenceInput in{.seq = seq, .tokens = std::span<const int32_t>(all).subspan(have - base)};
        if (absl::Status s = m->Forward({&in, 1}, &logits); !s.ok()) return s;
      }
    }
  }
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return result;
}

}  // namespace scout::runtime
