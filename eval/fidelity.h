// The fidelity harness: what sparse attention costs in accuracy, teacher-forced on a text.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/backend.h"
#include "runtime/sts.h"

namespace scout::eval {

// The runtime's names this module is written against.
using runtime::BudgetBlocks;
using runtime::HeadMap;
using runtime::ModelBackend;
using runtime::ModelConfig;
using runtime::SequenceId;
using runtime::SequenceInput;
using runtime::StsBudget;

struct FidelityOptions {
  int64_t context_tokens = 3584;          // prefilled densely before evaluation starts
  int64_t eval_tokens = 512;              // scored after the context, in rounds of k + 1
  int num_speculative_tokens = 4;         // k: a round is one verification's k + 1 rows
  std::vector<double> budgets = {0.5, 0.2, 0.1, 0.05, 0.02};  // fractions of the context's blocks
  std::vector<std::string> methods = {"sts", "oracle", "quest", "window"};  // "+santa" suffix: see below
  int sink_blocks = 1;
  int window_blocks = 4;
  std::vector<int> dense_layers;  // layers every method reads densely (StsBudget::dense_layers)
  // Methods named "M+santa" (M one of the above, or "dense") run M's lists with SANTA value
  // sampling of this many rows per (KV head, 16 query rows), seeded per round and layer.
  int santa_samples = 64;
};

// One round of k + 1 teacher-forced tokens, as the harness and calibration see it.
struct Round {
  int64_t pos = 0;                       // first token of the round
  int64_t rows = 0;                      // tokens in the round
  int64_t nb = 0;                        // context blocks once the round is in
  std::span<const int32_t> tokens;
  const std::vector<float>* draft_mass;  // [draft layers][draft heads][rows][nb]
  const std::vector<float>* target_mass; // [target layers][target heads][rows][nb], dense
  const std::vector<float>* logits;      // [rows][vocab], dense target
};

// Prefills both models with ids[0, context_tokens) and walks the next eval_tokens in rounds of
// k + 1: the draft reads each round (teacher-forced, kept), the target reads it densely (masses
// and logits), is rolled back so that `visit` can run its own passes from the same state, then
// reads it again densely (kept). Errors of the backends or of `visit` stop the walk.
absl::Status WalkRounds(ModelBackend& target, ModelBackend& draft, std::span<const int32_t> ids, int64_t context_tokens,
                        int64_t eval_tokens, int num_speculative_tokens,
                        const std::function<absl::Status(const Round&)>& visit);

// Mean over the unit's query heads and the round's rows of the dense target attention mass that
// `list` (blocks of target unit (layer, kv_head)) holds.
double CapturedMass(const ModelConfig& target, const Round& round, int layer, int kv_head, std::span<const int32_t> list);

// One method at one budget (method "dense" has budget 1).
struct FidelityRow {
  std::string method;
  double budget = 1.0;
  double perplexity = 0;
  double nll_per_token = 0;   // nats
  double recall = 0;          // mean fraction of the dense target's attention mass the lists held
  double jaccard_oracle = 0;  // mean Jaccard overlap of the lists with the oracle's
  double blocks_read = 0;     // mean fraction of the context's blocks the lists named
};

// Runs the text (token ids) through target and draft. Each round of k + 1 tokens: the draft
// reads them (teacher-forced) and yields its block masses; the target reads them densely (the
// reference logits and the oracle's masses), then once per (method, budget) over that method's
// Selection; every pass but the dense one is rolled back. Methods: "sts" (draft masses through
// `map`), "oracle" (the target's own top blocks: the upper bound), "quest" (per-block key
// bounds against the target's queries, chosen inside the pass), "window" (sinks + the most
// recent blocks). InvalidArgument for a text shorter than context + eval tokens or an unknown
// method.
absl::StatusOr<std::vector<FidelityRow>> RunFidelity(ModelBackend& target, ModelBackend& draft, const HeadMap& map,
                                                     std::span<const int32_t> ids, const FidelityOptions& options);

// Retrieval accuracy: for each (prompt ids, answer ids) the answer is scored teacher-forced:
// correct under a method when every answer token is the argmax of that method's logits at its
// position. One row per method and budget (and "dense"), perplexity fields unused.
struct RetrievalRow {
  std::string method;
  double budget = 1.0;
  int correct = 0;
  int total = 0;
};
absl::StatusOr<std::vector<RetrievalRow>> RunRetrieval(ModelBackend& target, ModelBackend& draft, const HeadMap& map,
                                                       const std::vector<std::vector<int32_t>>& prompts,
                                                       const std::vector<std::vector<int32_t>>& answers,
                                                       const FidelityOptions& options);

}  // namespace scout::eval
