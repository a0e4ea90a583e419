#include "eval/fidelity.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace scout::eval {
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

// Runs the target over round r with `method`'s Selection at budget b (rolled back after), giving
// the logits and the lists it read.
absl::Status MethodPass(ModelBackend& target, SequenceId seq, const HeadMap& map, const Round& r,
                        const std::string& full_method, const StsBudget& b, const kvstore::Selection& oracle,
                        int santa_samples, kvstore::Selection* sel, std::vector<float>* logits) {
  const ModelConfig& tc = target.config();
  SequenceInput sin{.seq = seq, .tokens = r.tokens, .all_logits = true};
  std::string method = full_method;
  if (absl::EndsWith(method, "+santa")) {
    method.resize(method.size() - 6);
    sin.santa_samples = santa_samples;
    sin.santa_seed = static_cast<uint64_t>(r.pos) + 1;  // a new draw every round; layers mixed in by the backend
  }
  if (method == "dense") {  // every block (with SANTA: its value sampling alone)
    *sel = BuildWindowSelection(tc, r.nb, {.budget_fraction = 1.0});
  } else if (method == "sts") {
    *sel = BuildStsSelection(map, *r.draft_mass, static_cast<int>(r.rows), r.nb, r.nb, b);
  } else if (method == "oracle") {
    *sel = oracle;
  } else if (method == "window") {
    *sel = BuildWindowSelection(tc, r.nb, b);
  }
  if (method == "quest") {
    sin.quest_budget = &b;
    sin.quest_selection = sel;  // filled by the pass
  } else {
    sin.selection = sel;
  }
  if (absl::Status s = target.Forward({&sin, 1}, logits); !s.ok()) return s;
  return target.TruncateSequence(seq, r.pos);
}

// Runs round r once per (budget, method), each from the same cache state, handing the visitor
// the lists read, the logits, and the oracle's lists at that budget.
absl::Status ForEachMethodPass(
    ModelBackend& target, SequenceId seq, const HeadMap& map, const Round& r, const FidelityOptions& o,
    const std::function<void(const std::string& method, double budget, const kvstore::Selection& sel,
                             const std::vector<float>& logits, const kvstore::Selection& oracle)>& visit) {
  std::vector<float> logits;
  for (double budget : o.budgets) {
    const StsBudget b{.budget_fraction = budget, .sink_blocks = o.sink_blocks, .window_blocks = o.window_blocks,
                      .dense_layers = o.dense_layers};
    const kvstore::Selection oracle =
        BuildOracleSelection(target.config(), *r.target_mass, static_cast<int>(r.rows), r.nb, r.nb, b);
    for (const std::string& method : o.methods) {
      kvstore::Selection sel;
      if (absl::Status s = MethodPass(target, seq, map, r, method, b, oracle, o.santa_samples, &sel, &logits); !s.ok()) {
        return s;
      }
      visit(method, budget, sel, logits, oracle);
    }
  }
  return absl::OkStatus();
}

absl::Status CheckMethods(const std::vector<std::string>& methods) {
  for (const std::string& m : methods) {
    const bool santa = absl::EndsWith(m, "+santa");
    const std::string base = santa ? m.substr(0, m.size() - 6) : m;
    if (base != "sts" && base != "oracle" && base != "window" && base != "quest" && !(santa && base == "dense")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown method \"", m, "\" (sts, oracle, window, quest, each optionally +santa, and dense+santa)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WalkRounds(ModelBackend& target, ModelBackend& draft, std::span<const int32_t> ids, int64_t context_tokens,
                        int64_t eval_tokens, int num_speculative_tokens,
                        const std::function<absl::Status(const Round&)>& visit) {
  const int64_t limit = std::min(target.config().max_position_embeddings, draft.config().max_position_embeddings);
  if (context_tokens < 1 || eval_tokens < 1 || num_speculative_tokens < 0 ||
      static_cast<int64_t>(ids.size()) < context_tokens + eval_tokens + 1) {
    return absl::InvalidArgumentError(absl::StrCat("text of ", ids.size(), " tokens is shorter than context ",
                                                   context_tokens, " + eval ", eval_tokens, " + 1"));
  }
  if (context_tokens + eval_tokens > limit) {
    return absl::InvalidArgumentError(absl::StrCat("context + eval tokens exceed the models' ", limit, " positions"));
  }
  const SequenceId seq = 0x5c0;
  if (absl::Status s = target.AddSequence(seq); !s.ok()) return s;
  absl::Cleanup rt = [&] { target.ReleaseSequence(seq).IgnoreError(); };
  if (absl::Status s = draft.AddSequence(seq); !s.ok()) return s;
  absl::Cleanup rd = [&] { draft.ReleaseSequence(seq).IgnoreError(); };
  std::vector<float> logits, draft_mass, target_mass, scratch;
  for (ModelBackend* m : {&target, &draft}) {
    for (int64_t at = 0; at < context_tokens; at += 512) {
      SequenceInput in{.seq = seq, .tokens = ids.subspan(at, std::min<int64_t>(512, context_tokens - at))};
      if (absl::Status s = m->Forward({&in, 1}, &scratch); !s.ok()) return s;
    }
  }
  const int64_t end = context_tokens + eval_tokens;
  for (int64_t pos = context_tokens; pos < end; pos += num_speculative_tokens + 1) {
    Round r;
    r.pos = pos;
    r.rows = std::min<int64_t>(num_speculative_tokens + 1, end - pos);
    r.tokens = ids.subspan(pos, r.rows);
    r.nb = kvstore::BlocksFor(pos + r.rows);
    SequenceInput din{.seq = seq, .tokens = r.tokens, .block_mass = &draft_mass};
    if (absl::Status s = draft.Forward({&din, 1}, &scratch); !s.ok()) return s;
    SequenceInput tin{.seq = seq, .tokens = r.tokens, .all_logits = true, .block_mass = &target_mass};
    if (absl::Status s = target.Forward({&tin, 1}, &logits); !s.ok()) return s;
    if (absl::Status s = target.TruncateSequence(seq, pos); !s.ok()) return s;
    r.draft_mass = &draft_mass;
    r.target_mass = &target_mass;
    r.logits = &logits;
    if (absl::Status s = visit(r); !s.ok()) return s;
    if (absl::Status s = target.TruncateSequence(seq, pos); !s.ok()) return s;  // whatever visit appended
    SequenceInput keep{.seq = seq, .tokens = r.tokens};
    if (absl::Status s = target.Forward({&keep, 1}, &scratch); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// Mean over the unit's query heads and the round's rows of the dense attention mass that `list`
// holds.
double CapturedMass(const ModelConfig& tc, const Round& r, int layer, int kv_head, std::span<const int32_t> list) {
  const int heads = static_cast<int>(tc.num_attention_heads), group = heads / static_cast<int>(tc.num_key_value_heads);
  double captured = 0;
  for (int g = 0; g < group; ++g) {
    for (int64_t row = 0; row < r.rows; ++row) {
      const float* m = r.target_mass->data() + ((static_cast<int64_t>(layer) * heads + kv_head * group + g) * r.rows + row) * r.nb;
      for (int32_t x : list) captured += m[x];
    }
  }
  return captured / (group * r.rows);
}

absl::StatusOr<std::vector<FidelityRow>> RunFidelity(ModelBackend& target, ModelBackend& draft, const HeadMap& map,
                                                     std::span<const int32_t> ids, const FidelityOptions& o) {
  const ModelConfig& tc = target.config();
  if (absl::Status s = CheckMethods(o.methods); !s.ok()) return s;
  const int layers = static_cast<int>(tc.num_hidden_layers), kvh = static_cast<int>(tc.num_key_value_heads);
  const int64_t vocab = tc.vocab_size;
  const SequenceId seq = 0x5c0;
  Acc dense;
  std::map<std::pair<std::string, double>, Acc> acc;
  absl::Status walked = WalkRounds(target, draft, ids, o.context_tokens, o.eval_tokens, o.num_speculative_tokens,
                                   [&](const Round& r) -> absl::Status {
    for (int64_t row = 0; row < r.rows; ++row) {
      dense.nll += Nll(std::span(*r.logits).subspan(row * vocab, vocab), ids[r.pos + row + 1]);
    }
    dense.tokens += r.rows;
    return ForEachMethodPass(target, seq, map, r, o, [&](const std::string& method, double budget,
                                                          const kvstore::Selection& sel,
                                                          const std::vector<float>& logits,
                                                          const kvstore::Selection& oracle) {
      Acc& a = acc[{method, budget}];
      for (int64_t row = 0; row < r.rows; ++row) {
        a.nll += Nll(std::span(logits).subspan(row * vocab, vocab), ids[r.pos + row + 1]);
      }
      a.tokens += r.rows;
      for (int l = 0; l < layers; ++l) {
        for (int h = 0; h < kvh; ++h) {
          const int list = l * kvh + h;
          const std::span<const int32_t> mine(sel.blocks.data() + sel.indptr[list], sel.indptr[list + 1] - sel.indptr[list]);
          const std::set<int32_t> theirs(oracle.blocks.begin() + oracle.indptr[list],
                                         oracle.blocks.begin() + oracle.indptr[list + 1]);
          int64_t inter = 0;
          for (int32_t x : mine) inter += theirs.count(x);
          a.jaccard += double(inter) / double(mine.size() + theirs.size() - inter);
          a.read += double(mine.size()) / r.nb;
          a.recall += CapturedMass(tc, r, l, h, mine);
          ++a.lists;
        }
      }
    });
  });
  if (!walked.ok()) return walked;
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

absl::StatusOr<std::vector<RetrievalRow>> RunRetrieval(ModelBackend& target, ModelBackend& draft, const HeadMap& map,
                                                       const std::vector<std::vector<int32_t>>& prompts,
                                                       const std::vector<std::vector<int32_t>>& answers,
                                                       const FidelityOptions& o) {
  if (absl::Status s = CheckMethods(o.methods); !s.ok()) return s;
  if (prompts.size() != answers.size()) return absl::InvalidArgumentError("prompts and answers differ in number");
  const ModelConfig& tc = target.config();
  const int64_t vocab = tc.vocab_size;
  const SequenceId seq = 0x5c0;
  std::map<std::pair<std::string, double>, RetrievalRow> rows;
  RetrievalRow dense{.method = "dense", .budget = 1.0, .correct = 0, .total = 0};
  for (size_t t = 0; t < prompts.size(); ++t) {
    std::vector<int32_t> ids = prompts[t];
    ids.insert(ids.end(), answers[t].begin(), answers[t].end());
    const int64_t ctx = static_cast<int64_t>(prompts[t].size()) - 1;  // the last prompt token predicts the answer
    std::map<std::pair<std::string, double>, bool> right;
    bool dense_right = true;
    auto argmax_ok = [&](const std::vector<float>& l, const Round& r) {
      bool ok = true;
      for (int64_t row = 0; row < r.rows; ++row) {
        const float* x = l.data() + row * vocab;
        ok = ok && static_cast<int32_t>(std::max_element(x, x + vocab) - x) == ids[r.pos + row + 1];
      }
      return ok;
    };
    absl::Status walked = WalkRounds(target, draft, ids, ctx, static_cast<int64_t>(answers[t].size()),
                                     o.num_speculative_tokens, [&](const Round& r) -> absl::Status {
      dense_right = dense_right && argmax_ok(*r.logits, r);
      return ForEachMethodPass(target, seq, map, r, o, [&](const std::string& method, double budget,
                                                            const kvstore::Selection&, const std::vector<float>& logits,
                                                            const kvstore::Selection&) {
        auto [it, fresh] = right.try_emplace({method, budget}, true);
        it->second = it->second && argmax_ok(logits, r);
      });
    });
    if (!walked.ok()) return walked;
    dense.correct += dense_right;
    ++dense.total;
    for (const auto& [key, ok] : right) {
      RetrievalRow& row = rows[key];
      row.method = key.first;
      row.budget = key.second;
      row.correct += ok;
      ++row.total;
    }
  }
  std::vector<RetrievalRow> out = {dense};
  for (double budget : o.budgets) {
    for (const std::string& method : o.methods) out.push_back(rows[{method, budget}]);
  }
  return out;
}

}  // namespace scout::eval
