// Speculative decoding: a draft model proposes k tokens, the target verifies all of them in one
// forward pass, and rejection sampling keeps the output distribution exactly the target's
// (greedy decoding is the special case where both distributions are one-hot).
//
// The round's one home. A SpeculativeStream holds one sequence's state between rounds (pending
// tokens, random state, emission, rollback); a SpeculativeRound runs one round of many streams.
// MakeRound picks the implementation: on the device when both models are CUDA models (draft
// steps, block mass, STS selection, verification and greedy acceptance stay on the GPUs; one
// host synchronisation a round: cuda_round.h), else the host round (any ModelBackend: logits
// and block masses come back to the host, selections are made there). `scout generate`,
// `scout serve`'s engine and `scout bench decode` all run rounds through MakeRound.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/backend.h"
#include "runtime/generator.h"
#include "runtime/sampling.h"
#include "runtime/sts.h"

namespace scout::round {

using runtime::HeadMap;
using runtime::ModelBackend;
using runtime::SamplingParams;
using runtime::Sampler;
using runtime::SequenceId;
using runtime::SequenceInput;
using runtime::StsBudget;
using runtime::TokenCallback;

struct SpeculativeOptions {
  int num_speculative_tokens = 4;  // k: draft proposals per round
  int64_t max_tokens = 64;
  SamplingParams sampling;         // applied to both models' logits (temperature, top-k, top-p)
  int64_t prefill_chunk = 512;
  std::vector<int32_t> stop_ids;
  // Called after each prefill pass with the prompt tokens the target holds and those it will (the
  // prompt but its last token).
  std::function<void(int64_t done, int64_t total)> on_prefill_progress;
  // STS: when set, the target verifies each round attending only to the blocks that the
  // draft's attention over the round's rows selects through this map, within sts_budget.
  const HeadMap* head_map = nullptr;
  StsBudget sts_budget;
  // Sparse draft: when set (SelfHeadMap of the draft), a round's first draft step attends densely
  // and its attention picks, through this map and within draft_budget, the blocks the round's
  // later draft steps attend. Cuts the draft's KV reads at long context; may change acceptance.
  const HeadMap* draft_head_map = nullptr;
  StsBudget draft_budget;
  // With draft_head_map: the draft's dense first step runs every this many rounds; the rounds
  // between run all their draft steps over the blocks the last dense step picked. 1: every round.
  int draft_refresh_rounds = 1;
  // SANTA: > 0 makes the target's verification sample this many value rows per (KV head, 16
  // query rows) from its softmax instead of summing all of them (kernels/santa.h). 0: exact.
  int santa_samples = 0;
  // >= 0: each emitted token's log-probability under the target's distribution (its verification
  // row after temperature, runtime::LogprobsOf) and this many most likely alternatives, handed to
  // on_logprobs just before the token goes to on_token. -1: none.
  int logprobs = -1;
  std::function<void(runtime::TokenLogprobs)> on_logprobs;
  // presence / frequency / repetition penalties (runtime::ApplyPenalties) on the target's
  // verification rows, each row counting the tokens emitted so far and the drafts before it: the
  // emitted tokens follow the target's penalised distribution. The draft proposes unpenalised
  // (only acceptance depends on it). Logprobs stay those before the penalties.
  runtime::Penalties penalties;
  // Agent sessions: continue sequence `seq`, which both models already hold (with the same
  // tokens), and keep it afterwards. On success both caches hold exactly the earlier tokens, the
  // prompt and every emitted token but the last, which the caller feeds first next time (as
  // GenerateOptions::continue_sequence). On error the caller truncates both back.
  bool continue_sequence = false;
};

struct SpeculativeResult {
  std::vector<int32_t> tokens;  // generated, without the prompt
  int64_t prompt_tokens = 0;
  int64_t rounds = 0;
  int64_t draft_proposed = 0;   // drafted tokens the target checked
  int64_t draft_accepted = 0;   // of those, accepted
  // Rounds whose draft token at position i was accepted (accepted ones form a prefix of a round's).
  std::vector<int64_t> accepted_per_position;
  double prefill_seconds = 0;
  double decode_seconds = 0;
  std::string round_impl;       // GenerateSpeculative: the round that ran ("cuda" or "host")
  int64_t selected_blocks = 0;  // STS: blocks the target's (layer, KV head) lists named, summed
  int64_t context_blocks = 0;   // over the same lists, the blocks a dense pass would read
  // The draft's steps, in its own (layer, KV head, block) units: read (fewer than dense with a
  // sparse draft), and what dense steps would have read.
  int64_t draft_selected_blocks = 0;
  int64_t draft_context_blocks = 0;
  // The same two for the target, per target layer (summed over its KV heads and the rounds).
  std::vector<int64_t> layer_selected_blocks, layer_context_blocks;
  // STS turnover between consecutive rounds, per (layer, KV head) list: the list's movable blocks
  // (neither sinks nor the recent window of its round, which every list holds) and, of those, the
  // ones the previous round's list for that unit did not hold: what a cache of last round's lists
  // would miss. Summed over lists and over round pairs (rounds with a selection, back to back).
  // Counted by the host round only (the device round's lists never come to the host).
  int64_t turnover_new_blocks = 0;
  int64_t turnover_movable_blocks = 0;
  int64_t turnover_round_pairs = 0;
  double acceptance_rate() const { return draft_proposed > 0 ? double(draft_accepted) / draft_proposed : 0.0; }
  // Share of movable blocks new each round; 0 when no list had a movable block.
  double turnover() const {
    return turnover_movable_blocks > 0 ? double(turnover_new_blocks) / turnover_movable_blocks : 0.0;
  }
};

// One verification: the target's distributions p[0..k] (p[i] after the first i drafted tokens),
// the draft's q[0..k-1] and its k drafted tokens. Accepts drafted[i] with probability
// min(1, p_i / q_i); at the first rejection draws from max(0, p_i - q_i) renormalised; if all
// are accepted, draws a bonus token from p[k]. Returns how many drafted tokens were accepted and
// the token that follows them. The emitted tokens are distributed exactly as sampling from p.
struct Verdict {
  int accepted = 0;
  int32_t next = 0;
};
Verdict VerifyDraft(std::span<const std::vector<float>> p, std::span<const std::vector<float>> q,
                    std::span<const int32_t> drafted, std::mt19937_64& rng);

// Generates from `prompt` with the target, using `draft` (same vocabulary) for proposals. Both
// backends get a new sequence `seq`, released before returning. InvalidArgument for vocabularies
// that differ or bad options; backend errors pass through.
absl::StatusOr<SpeculativeResult> GenerateSpeculative(ModelBackend& target, ModelBackend& draft, SequenceId seq,
                                                      std::span<const int32_t> prompt,
                                                      const SpeculativeOptions& options,
                                                      const TokenCallback& on_token = nullptr);

// One sequence's speculative decoding, cut into the phases that several sequences run together
// (a SpeculativeRound batches each draft step and the verification over them): a server's
// continuous batching with a draft. GenerateSpeculative is one stream, round after round; a
// stream alone gives exactly its result.
class SpeculativeStream {
 public:
  SpeculativeStream(ModelBackend& target, ModelBackend& draft, SequenceId seq, std::vector<int32_t> prompt,
                    SpeculativeOptions options, TokenCallback on_token = nullptr);
  // Releases the sequences Begin added (not with continue_sequence).
  ~SpeculativeStream();
  SpeculativeStream(const SpeculativeStream&) = delete;
  SpeculativeStream& operator=(const SpeculativeStream&) = delete;

  // The checks of GenerateSpeculative; adds the sequences (unless continue_sequence) and
  // prefills both models with the prompt but its last token (with prefill false, the caller
  // prefills: PrefillStreams, batched over several streams).
  absl::Status Begin(bool prefill = true);
  // True once max_tokens, a stop id, the context limit or on_token returning false ended it.
  bool done() const { return done_; }
  // With continue_sequence: leaves both caches at exactly the earlier tokens, the prompt and
  // every emitted token but the last. Call once, when done.
  absl::Status Finish();
  const SpeculativeResult& result() const { return result_; }
  SequenceId seq() const { return seq_; }
  // Whether both models hold the prompt but its last token (Begin(true), or PrefillStep passes).
  bool prefilled() const {
    const int64_t want = static_cast<int64_t>(prompt_.size()) - 1;
    return prefilled_target_ >= want && prefilled_draft_ >= want;
  }
  // Prompt tokens the target has prefilled so far, and of the prompt those that prefill passes
  // run (all but its last token, which opens the first round).
  int64_t prefilled_tokens() const { return prefilled_target_; }
  int64_t prompt_to_prefill() const { return static_cast<int64_t>(prompt_.size()) - 1; }
  const SpeculativeOptions& options() const { return options_; }

 private:
  friend class HostRound;
  friend class CudaRound;
  friend std::vector<absl::Status> PrefillStep(ModelBackend& target, ModelBackend& draft,
                                               std::span<SpeculativeStream* const> streams, int64_t budget);
  friend std::vector<absl::Status> PrefillStreams(ModelBackend& target, ModelBackend& draft,
                                                  std::span<SpeculativeStream* const> streams, int64_t chunk);
  // The round's k (0: the target only checks its pending tokens); done() if the context is full.
  void StartRound();
  // Host round. Draft step i < k: this sequence's input (valid until the next call), then its
  // logits row.
  SequenceInput DraftInput(int i);
  void OnDraftLogits(int i, std::span<const float> row);
  SequenceInput VerifyInput();
  // Rejection sampling over the verification's logit rows, then AcceptVerdict.
  absl::Status OnVerifyLogits(std::span<const float> rows);
  // Both rounds: the verdict over this round's drafted_ (at least k_ of them; the draft consumed
  // its pending tokens and the first draft_fed drafted ones, the target its pending tokens and
  // every drafted one): rollback of both caches, the tokens to feed next, emission.
  // The target's first `rows` verification rows with options().penalties applied, row i counting
  // the emitted tokens and drafted[0, i) (a copy of the rows without penalties).
  std::vector<float> PenalisedRows(std::span<const float> verify_rows, int rows) const;
  // verify_rows: the target's k + 1 verification rows (row i scores emitted token i), for
  // options().logprobs; may be empty when none are asked for.
  absl::Status AcceptVerdict(const Verdict& v, int draft_fed, std::span<const float> verify_rows = {});
  // The target's STS lists of one round, for the result's counts: per target layer, the blocks
  // its KV heads' lists named, over a context of nb blocks.
  void CountSelection(std::span<const int64_t> layer_selected, int64_t nb, int kv_heads);
  // Puts the draft's cache and the random state back as they were at StartRound.
  absl::Status AbortRound();

  ModelBackend& target_;
  ModelBackend& draft_;
  const SequenceId seq_;
  const std::vector<int32_t> prompt_;
  mutable std::vector<int32_t> prompt_seen_;  // PenalisedRows: the prompt's distinct tokens, sorted
  const SpeculativeOptions options_;
  const TokenCallback on_token_;
  int64_t vocab_ = 0, limit_ = 0, base_ = 0;
  bool added_ = false, done_ = false;
  SpeculativeResult result_;
  Sampler dist_;
  std::mt19937_64 rng_;
  std::vector<int32_t> target_pending_, draft_pending_;
  std::vector<float> refresh_mass_;
  int64_t refresh_rows_ = 0, refresh_blocks_ = 0, round_index_ = 0;
  kvstore::Selection previous_selection_;
  std::chrono::steady_clock::time_point prefill_start_, decode_start_;
  int64_t prefilled_target_ = 0, prefilled_draft_ = 0;  // prompt tokens each model holds
  // The round in flight.
  int k_ = 0;
  bool refresh_ = false;
  std::mt19937_64 rng_at_start_;
  int64_t draft_len_at_start_ = 0, target_len_at_start_ = 0;
  std::vector<float> refresh_mass_at_start_;
  int64_t refresh_rows_at_start_ = 0, refresh_blocks_at_start_ = 0;
  std::vector<std::vector<float>> q_;
  std::vector<int32_t> drafted_, feed_, verify_;
  std::vector<std::vector<float>> masses_;
  std::vector<int64_t> mass_rows_, mass_blocks_;
  kvstore::Selection draft_selection_, selection_;
  int64_t target_before_ = 0;
};

// Runs rounds for one (target, draft) pair. Not thread-safe: one caller, as the models.
class SpeculativeRound {
 public:
  virtual ~SpeculativeRound() = default;
  // One round of every stream that is not done: the draft's steps over the streams still
  // drafting, then one verification over all of them. A pass that fails (a full KV pool, say)
  // leaves every stream's caches and random state as before the round, so a server can drop one
  // stream and run the round again; an error while accepting (a cache truncation, which does
  // not fail in practice) leaves the streams before it advanced: end them. The streams must have
  // been made with this round's target and draft.
  virtual absl::Status Run(std::span<SpeculativeStream* const> streams) = 0;
  // "host" or "cuda": where the round's selections and acceptance run.
  virtual const char* name() const = 0;
};

// Any ModelBackend pair: every pass through Forward, logits and block masses to the host, STS
// selections made there (BuildStsSelection).
class HostRound final : public SpeculativeRound {
 public:
  HostRound(ModelBackend& target, ModelBackend& draft) : target_(target), draft_(draft) {}
  absl::Status Run(std::span<SpeculativeStream* const> streams) override;
  const char* name() const override { return "host"; }

 private:
  ModelBackend& target_;
  ModelBackend& draft_;
};

// The device round (CudaRound) when both models are single-GPU CUDA models of a CUDA build,
// else the host round. The models must outlive the round.
std::unique_ptr<SpeculativeRound> MakeRound(ModelBackend& target, ModelBackend& draft);

// One step of the prefill of streams begun with Begin(false): on each model one pass of at most
// `budget` tokens in all, carrying the streams' prompts (but their last tokens) from where they
// stand, in order; the draft's pass on a thread of its own beside the target's where the two may
// run at once (ModelBackend::concurrent_with). A pass that fails runs again stream by stream, so
// each stream gets its own error; returns one status per stream. A stream is done when
// prefilled().
std::vector<absl::Status> PrefillStep(ModelBackend& target, ModelBackend& draft,
                                      std::span<SpeculativeStream* const> streams, int64_t budget);
// The whole prefill of such streams: PrefillStep until each is prefilled or failed.
std::vector<absl::Status> PrefillStreams(ModelBackend& target, ModelBackend& draft,
                                         std::span<SpeculativeStream* const> streams, int64_t chunk);

}  // namespace scout::round
