#include "runtime/fidelity.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"

namespace scout::runtime {
namespace {

// -log p(next) under the logits row.
double Nll(std::span<const float> logits, int32_t next) {
  const float mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float x : logits) sum += std::exp(double{x} - mx);
  return std::log(sum) - (double{logits[next]} - mx);
}

struct Acc {
  double nll = 0, recall = 0, jaccard = 0, read = 0;
  int64_t tokens = 0, lists = 0;
};

}  // namespace

absl::StatusOr<std::vector<FidelityRow>> RunFidelity(ModelBackend& target, ModelBackend& draft, const HeadMap& map,
                                                     std::span<const int32_t> ids, const FidelityOptions& o) {
  const ModelConfig& tc = target.config();
  if (o.context_tokens < 1 || o.eval_tokens < 1 || static_cast<int64_t>(ids.size()) < o.context_tokens + o.eval_tokens + 1) {
    return absl::InvalidArgumentError(absl::StrCat("text of ", ids.size(), " tokens is shorter than context ",
                                                   o.context_tokens, " + eval ", o.eval_tokens, " + 1"));
  }
  if (o.context_tokens + o.eval_tokens > std::min(tc.max_position_embeddings, draft.config().max_position_embeddings)) {
    return absl::InvalidArgumentError("context + eval tokens exceed the models' max_position_embeddings");
  }
  for (const std::string& m : o.methods) {
    if (m != "sts" && m != "oracle" && m != "window") return absl::InvalidArgumentError(absl::StrCat("unknown method \"", m, "\""));
  }
  const SequenceId seq = 0x5c0;
  if (absl::Status s = target.AddSequence(seq); !s.ok()) return s;
  absl::Cleanup rt = [&] { target.ReleaseSequence(seq).IgnoreError(); };
  if (absl::Status s = draft.AddSequence(seq); !s.ok()) return s;
  absl::Cleanup rd = [&] { draft.ReleaseSequence(seq).IgnoreError(); };
  std::vector<float> logits;
  for (ModelBackend* m : {&target, &draft}) {
    for (int64_t at = 0; at < o.context_tokens; at += 512) {
      SequenceInput in{.seq = seq, .tokens = ids.subspan(at, std::min<int64_t>(512, o.context_tokens - at))};
      if (absl::Status s = m->Forward({&in, 1}, &logits); !s.ok()) return s;
    }
  }
  const int layers = static_cast<int>(tc.num_hidden_layers), heads = static_cast<int>(tc.num_attention_heads);
  const int kvh = static_cast<int>(tc.num_key_value_heads), group = heads / kvh;
  const int64_t vocab = tc.vocab_size;
  Acc dense;
  std::map<std::pair<std::string, double>, Acc> acc;
  std::vector<float> draft_mass, target_mass;
  const int64_t end = o.context_tokens + o.eval_tokens;
  for (int64_t pos = o.context_tokens; pos < end; pos += o.num_speculative_tokens + 1) {
    const int64_t rows = std::min<int64_t>(o.num_speculative_tokens + 1, end - pos);
    const std::span<const int32_t> chunk = ids.subspan(pos, rows);
    const int64_t nb = kvstore::BlocksFor(pos + rows);
    SequenceInput din{.seq = seq, .tokens = chunk, .block_mass = &draft_mass};
    if (absl::Status s = draft.Forward({&din, 1}, &logits); !s.ok()) return s;
    // Dense target: reference logits and the oracle's masses; rolled back, re-run at the end.
    SequenceInput tin{.seq = seq, .tokens = chunk, .all_logits = true, .block_mass = &target_mass};
    if (absl::Status s = target.Forward({&tin, 1}, &logits); !s.ok()) return s;
    for (int64_t r = 0; r < rows; ++r) dense.nll += Nll(std::span(logits).subspan(r * vocab, vocab), ids[pos + r + 1]);
    dense.tokens += rows;
    if (absl::Status s = target.TruncateSequence(seq, pos); !s.ok()) return s;
    for (double budget : o.budgets) {
      const StsBudget b{.budget_fraction = budget, .sink_blocks = o.sink_blocks, .window_blocks = o.window_blocks};
      const kvstore::Selection oracle = BuildOracleSelection(tc, target_mass, static_cast<int>(rows), nb, nb, b);
      for (const std::string& method : o.methods) {
        kvstore::Selection sel;
        if (method == "sts") {
          sel = BuildStsSelection(map, draft_mass, static_cast<int>(rows), nb, nb, b);
        } else if (method == "oracle") {
          sel = oracle;
        } else {
          sel = BuildWindowSelection(tc, nb, b);
        }
        SequenceInput sin{.seq = seq, .tokens = chunk, .all_logits = true, .selection = &sel};
        if (absl::Status s = target.Forward({&sin, 1}, &logits); !s.ok()) return s;
        if (absl::Status s = target.TruncateSequence(seq, pos); !s.ok()) return s;
        Acc& a = acc[{method, budget}];
        for (int64_t r = 0; r < rows; ++r) a.nll += Nll(std::span(logits).subspan(r * vocab, vocab), ids[pos + r + 1]);
        a.tokens += rows;
        for (int l = 0; l < layers; ++l) {
          for (int h = 0; h < kvh; ++h) {
            const int list = l * kvh + h;
            const std::vector<int32_t> mine(sel.blocks.begin() + sel.indptr[list], sel.blocks.begin() + sel.indptr[list + 1]);
            const std::set<int32_t> theirs(oracle.blocks.begin() + oracle.indptr[list],
                                           oracle.blocks.begin() + oracle.indptr[list + 1]);
            int64_t inter = 0;
            for (int32_t x : mine) inter += theirs.count(x);
            a.jaccard += double(inter) / double(mine.size() + theirs.size() - inter);
            a.read += double(mine.size()) / nb;
            // Captured mass: each query head of this KV head, each row, summed over the list.
            double captured = 0;
            for (int g = 0; g < group; ++g) {
              for (int64_t r = 0; r < rows; ++r) {
                const float* m = target_mass.data() + ((static_cast<int64_t>(l) * heads + h * group + g) * rows + r) * nb;
                for (int32_t x : mine) captured += m[x];
              }
            }
            a.recall += captured / (group * rows);
            ++a.lists;
          }
        }
      }
    }
    SequenceInput keep{.seq = seq, .tokens = chunk};
    if (absl::Status s = target.Forward({&keep, 1}, &logits); !s.ok()) return s;
  }
  std::vector<FidelityRow> out;
  out.push_back({.method = "dense", .budget = 1.0, .perplexity = std::exp(dense.nll / dense.tokens),
                 .nll_per_token = dense.nll / dense.tokens, .recall = 1.0, .jaccard_oracle = 1.0, .blocks_read = 1.0});
  for (double budget : o.budgets) {
    for (const std::string& method : o.methods) {
      const Acc& a = acc[{method, budget}];
      out.push_back({.method = method, .budget = budget, .perplexity = std::exp(a.nll / a.tokens),
                     .nll_per_token = a.nll / a.tokens, .recall = a.recall / a.lists,
                     .jaccard_oracle = a.jaccard / a.lists, .blocks_read = a.read / a.lists});
    }
  }
  return out;
}

}  // namespace scout::runtime
