// `scout eval`: fidelity of sparse attention against dense.
#include "cli/commands.h"

#include <cstdio>
#include <map>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "runtime/cpu_model.h"

#include "eval/fidelity.h"
#include "eval/tasks.h"
#include "round/speculative.h"
#include "text/tokenizer.h"

namespace scout::cli {

namespace {

// --context-tokens, --eval-tokens, -k, --budgets, --methods, sinks, window, dense layers, SANTA.
absl::StatusOr<eval::FidelityOptions> ParseFidelityOptions(const Flags& flags) {
  eval::FidelityOptions opt;
  absl::StatusOr<int64_t> ctx = flags.GetInt("context-tokens"), ev = flags.GetInt("eval-tokens"),
                          k = flags.GetInt("num-speculative-tokens");
  for (const absl::Status& s : {ctx.status(), ev.status(), k.status()}) {
    if (!s.ok()) return s;
  }
  opt.context_tokens = *ctx;
  opt.eval_tokens = *ev;
  opt.num_speculative_tokens = static_cast<int>(*k);
  opt.budgets.clear();
  for (absl::string_view b : absl::StrSplit(flags.Get("budgets"), ',')) {
    double v;
    if (!absl::SimpleAtod(b, &v) || !(v > 0 && v <= 1)) {
      return absl::InvalidArgumentError(absl::StrCat("--budgets: \"", b, "\" is not a fraction in (0, 1]"));
    }
    opt.budgets.push_back(v);
  }
  opt.methods = absl::StrSplit(flags.Get("methods"), ',');
  absl::StatusOr<int64_t> sinks = flags.GetInt("sink-blocks"), window = flags.GetInt("window-blocks");
  if (!sinks.ok()) return sinks.status();
  if (!window.ok()) return window.status();
  if (*sinks < 0 || *window < 1) return absl::InvalidArgumentError("--sink-blocks >= 0 and --window-blocks >= 1");
  opt.sink_blocks = static_cast<int>(*sinks);
  opt.window_blocks = static_cast<int>(*window);
  absl::StatusOr<std::vector<int>> dense_layers = runtime::ParseDenseLayers(flags.Get("dense-layers"));
  if (!dense_layers.ok()) return dense_layers.status();
  opt.dense_layers = *dense_layers;
  absl::StatusOr<int64_t> santa = flags.GetInt("santa-samples");
  if (!santa.ok()) return santa.status();
  if (*santa < 1) return absl::InvalidArgumentError("--santa-samples must be >= 1");
  opt.santa_samples = static_cast<int>(*santa);
  return opt;
}

// --tasks: retrieval accuracy of each method and budget on generated prompts over `filler`.
int RunTasks(const Flags& flags, const ModelPair& pair, const runtime::HeadMap& map, const std::string& filler,
             const eval::FidelityOptions& opt) {
  runtime::CpuModel& target = *pair.target;
  runtime::CpuModel& draft = *pair.draft;
  text::Tokenizer* tok = pair.tokenizer.get();
  absl::StatusOr<int64_t> count = flags.GetInt("task-count");
  if (!count.ok()) return Fail(count.status());
  std::string csv = "task,length,method,budget,correct,total\n";
  std::printf("%-8s %7s %-8s %7s | %9s\n", "task", "length", "method", "budget", "accuracy");
  for (absl::string_view kind : absl::StrSplit(flags.Get("tasks"), ',')) {
    if (kind != "passkey" && kind != "kv") return Fail(absl::InvalidArgumentError(absl::StrCat("unknown task \"", kind, "\"")));
    for (absl::string_view ls : absl::StrSplit(flags.Get("task-lengths"), ',')) {
      int64_t length;
      if (!absl::SimpleAtoi(ls, &length) || length < 256) return Fail(absl::InvalidArgumentError("--task-lengths: integers >= 256"));
      std::vector<std::vector<int32_t>> prompts, answers;
      for (int64_t i = 0; i < *count; ++i) {
        eval::RetrievalTask t = kind == "passkey" ? eval::MakePasskeyTask(filler, length, 1000 + i)
                                                     : eval::MakeKeyValueTask(filler, length, 2000 + i);
        prompts.push_back(tok->Encode(t.prompt, /*add_bos=*/true));
        answers.push_back(tok->Encode(t.answer, /*add_bos=*/false));
      }
      absl::StatusOr<std::vector<eval::RetrievalRow>> rows =
          eval::RunRetrieval(target, draft, map, prompts, answers, opt);
      if (!rows.ok()) return Fail(rows.status());
      for (const eval::RetrievalRow& r : *rows) {
        std::printf("%-8s %7lld %-8s %6.0f%% | %4d / %-3d\n", std::string(kind).c_str(), static_cast<long long>(length),
                    r.method.c_str(), r.budget * 100, r.correct, r.total);
        absl::StrAppend(&csv, kind, ",", length, ",", r.method, ",", r.budget, ",", r.correct, ",", r.total, "\n");
      }
    }
  }
  if (absl::Status st = WriteCsv(flags.Get("csv"), csv); !st.ok()) return Fail(st);
  return 0;
}

// Draft acceptance while generating after the context: dense verification, and STS at each budget.
struct AcceptanceTables {
  std::map<double, double> acceptance, acceptance_sd;  // budget (1 = dense) -> rate
  // budget -> {new, movable} blocks of the target's lists between consecutive rounds (STS only)
  std::map<double, std::pair<int64_t, int64_t>> turnover, turnover_sd;
};

absl::StatusOr<AcceptanceTables> MeasureAcceptance(const Flags& flags, const ModelPair& pair, const runtime::HeadMap& map,
                                                   const std::vector<int32_t>& ids, const eval::FidelityOptions& opt,
                                                   int64_t acc_tokens) {
  AcceptanceTables t;
  absl::StatusOr<int64_t> acc_seeds = flags.GetInt("acceptance-seeds"), refresh_rounds = flags.GetInt("draft-refresh-rounds");
  if (!acc_seeds.ok()) return acc_seeds.status();
  if (!refresh_rounds.ok()) return refresh_rounds.status();
  if (*refresh_rounds < 1) return absl::InvalidArgumentError("--draft-refresh-rounds must be >= 1");
  if (*acc_seeds < 1) return absl::InvalidArgumentError("--acceptance-seeds must be >= 1");
  const runtime::HeadMap self_map = runtime::SelfHeadMap(pair.draft->config());
  if (acc_tokens > 0) {
    std::span<const int32_t> prompt(ids.data(), static_cast<size_t>(opt.context_tokens));
    for (double budget : [&] { std::vector<double> b = {1.0}; b.insert(b.end(), opt.budgets.begin(), opt.budgets.end()); return b; }()) {
      for (int sparse_draft = 0; sparse_draft < (flags.GetBool("sparse-draft") && budget < 1.0 ? 2 : 1); ++sparse_draft) {
        int64_t proposed = 0, accepted = 0, fresh = 0, movable = 0;
        for (int64_t seed = 1; seed <= *acc_seeds; ++seed) {
          // Sampled at temperature 1: greedy continuations of this text are runs the draft always
          // gets right, which says little.
          round::SpeculativeOptions so{.num_speculative_tokens = opt.num_speculative_tokens, .max_tokens = acc_tokens,
                                         .sampling = {.temperature = 1.0f, .seed = static_cast<uint64_t>(seed)}};
          const runtime::StsBudget b{.budget_fraction = budget, .sink_blocks = opt.sink_blocks,
                                     .window_blocks = opt.window_blocks, .dense_layers = opt.dense_layers};
          if (budget < 1.0) {
            so.head_map = &map;
            so.sts_budget = b;
          }
          if (sparse_draft) {
            so.draft_head_map = &self_map;
            so.draft_budget = b;
            so.draft_refresh_rounds = static_cast<int>(*refresh_rounds);
          }
          absl::StatusOr<round::SpeculativeResult> r = round::GenerateSpeculative(*pair.target, *pair.draft, 77, prompt, so);
          if (!r.ok()) return r.status();
          proposed += r->draft_proposed;
          accepted += r->draft_accepted;
          fresh += r->turnover_new_blocks;
          movable += r->turnover_movable_blocks;
        }
        (sparse_draft ? t.acceptance_sd : t.acceptance)[budget] = proposed > 0 ? double(accepted) / proposed : 0.0;
        if (budget < 1.0) (sparse_draft ? t.turnover_sd : t.turnover)[budget] = {fresh, movable};
      }
    }
  }
  return t;
}

}  // namespace

int Eval(int argc, char** argv) {
  Flags flags({
      {"model", "", "target model folder"},
      {"draft", "", "draft model folder"},
      {"text", "", "text file to score (byte-level: the fixtures' tokenizer)"},
      {"context-tokens", "3584", "tokens prefilled densely before scoring starts"},
      {"eval-tokens", "512", "tokens scored after the context"},
      {"num-speculative-tokens", "4", "k: tokens are scored in rounds of k + 1, as verification sees them"},
      {"budgets", "0.5,0.2,0.1,0.05,0.02", "fractions of the context's blocks each (layer, KV head) reads"},
      {"methods", "sts,oracle,quest,window", "selection rules to compare with dense"},
      {"head-map", "", "head map JSON (default: DRAFT/scout_head_map.json if present, else proportional depth)"},
      {"csv", "", "also write the table as CSV to this file"},
      {"acceptance-seeds", "1", "acceptance: sampled continuations per setting (seeds 1..N), averaged"},
      {"sparse-draft", "", "acceptance: also with the sparse draft (its later steps over its own top blocks at the same budget)", true},
      {"draft-refresh-rounds", "1", "sparse draft: its dense first step every this many rounds (others fully sparse)"},
      {"acceptance-tokens", "0", "also sample this many tokens (temperature 1) speculatively after the context, dense and with STS at each budget, and report the draft's acceptance and how much the STS lists change from round to round"},
      {"sink-blocks", "1", "first blocks every list keeps"},
      {"window-blocks", "4", "last blocks every list keeps"},
      {"dense-layers", "", "target layers every method reads densely, e.g. 0,1 (Quest's practice) or -1 (the last)"},
      {"santa-samples", "64", "methods named M+santa (and dense+santa): SANTA value rows sampled per (KV head, 16 query rows)"},
      {"tasks", "", "instead of perplexity on --text: retrieval accuracy on generated tasks (passkey,kv)"},
      {"task-lengths", "2048,4096", "tasks: prompt lengths in bytes"},
      {"task-count", "8", "tasks: prompts per task and length"},
      {"filler", "", "tasks: text the facts are written over"},
      {"help", "", "show this help", true},
  });
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout eval --model DIR --draft DIR (--text FILE | --tasks passkey,kv --filler FILE) [flags]\n%s",
                flags.Help().c_str());
    return 0;
  }
  const bool tasks = !flags.Get("tasks").empty();
  for (const char* f : {"model", "draft", tasks ? "filler" : "text"}) {
    if (flags.Get(f).empty()) return Fail(absl::InvalidArgumentError(absl::StrCat("--", f, " is required")));
  }
  absl::StatusOr<ModelPair> pair = LoadPair(flags.Get("model"), flags.Get("draft"));
  if (!pair.ok()) return Fail(pair.status());
  runtime::CpuModel* target = pair->target.get();
  runtime::CpuModel* draft = pair->draft.get();
  text::Tokenizer* tok = pair->tokenizer.get();
  absl::StatusOr<std::string> text = runtime::ReadFile(flags.Get(tasks ? "filler" : "text"));
  if (!text.ok()) return Fail(text.status());
  absl::StatusOr<runtime::HeadMap> map_or =
      ResolveHeadMap(flags.Get("head-map"), flags.Get("draft"), target->config(), draft->config());
  if (!map_or.ok()) return Fail(map_or.status());
  const runtime::HeadMap& map = *map_or;
  absl::StatusOr<eval::FidelityOptions> opt_or = ParseFidelityOptions(flags);
  if (!opt_or.ok()) return Fail(opt_or.status());
  const eval::FidelityOptions& opt = *opt_or;
  if (tasks) return RunTasks(flags, *pair, map, *text, opt);
  std::vector<int32_t> ids = tok->Encode(*text, /*add_bos=*/true);
  absl::StatusOr<std::vector<eval::FidelityRow>> rows = eval::RunFidelity(*target, *draft, map, ids, opt);
  if (!rows.ok()) return Fail(rows.status());
  const double dense_ppl = rows->front().perplexity;
  // Draft acceptance while generating after the context: dense verification, and STS at each budget.
  absl::StatusOr<int64_t> acc_tokens = flags.GetInt("acceptance-tokens");
  if (!acc_tokens.ok()) return Fail(acc_tokens.status());
  absl::StatusOr<AcceptanceTables> measured = MeasureAcceptance(flags, *pair, map, ids, opt, *acc_tokens);
  if (!measured.ok()) return Fail(measured.status());
  const auto& [acceptance, acceptance_sd, turnover, turnover_sd] = *measured;
  auto acceptance_text = [&](const eval::FidelityRow& r, const std::map<double, double>& from) -> std::string {
    const double key = r.method == "dense" ? 1.0 : r.budget;
    if ((r.method != "dense" && r.method != "sts") || !from.contains(key)) return "";
    return absl::StrFormat("%.3f", from.at(key));
  };
  // Empty where not measured; "-" where every list was sinks and window only (nothing can move).
  auto turnover_text = [&](const eval::FidelityRow& r, const std::map<double, std::pair<int64_t, int64_t>>& from,
                           bool table) -> std::string {
    if (r.method != "sts" || !from.contains(r.budget)) return "";
    const auto [fresh, movable] = from.at(r.budget);
    if (movable == 0) return table ? "-" : "";
    return absl::StrFormat("%.3f", double(fresh) / movable);
  };
  std::printf("fidelity: %s scored on %lld tokens after %lld of context, rounds of k+1 = %d\n",
              flags.Get("text").c_str(), static_cast<long long>(opt.eval_tokens),
              static_cast<long long>(opt.context_tokens), opt.num_speculative_tokens + 1);
  if (*acc_tokens > 0) {
    std::printf("turnover: share of each (layer, KV head) list's blocks, sinks and window excepted, that the "
                "previous round's list did not hold, over the acceptance runs\n");
  }
  std::printf("%-8s %7s | %10s %8s %9s | %8s %8s %8s | %10s %13s | %8s %14s\n", "method", "budget", "perplexity",
              "vs dense", "bits/tok", "recall", "jaccard", "read", "acceptance", "acc_sparse_dr", "turnover",
              "turn_sparse_dr");
  std::string csv =
      "method,budget,perplexity,ppl_change_pct,nll_per_token,recall,jaccard_oracle,blocks_read,acceptance,"
      "acceptance_sparse_draft,turnover,turnover_sparse_draft\n";
  for (const eval::FidelityRow& r : *rows) {
    const double change = 100.0 * (r.perplexity / dense_ppl - 1.0);
    std::printf("%-8s %6.0f%% | %10.4f %+7.2f%% %9.4f | %7.1f%% %8.3f %7.1f%% | %10s %13s | %8s %14s\n",
                r.method.c_str(), r.budget * 100, r.perplexity, change, r.nll_per_token / std::log(2.0), 100 * r.recall,
                r.jaccard_oracle, 100 * r.blocks_read, acceptance_text(r, acceptance).c_str(),
                acceptance_text(r, acceptance_sd).c_str(), turnover_text(r, turnover, true).c_str(),
                turnover_text(r, turnover_sd, true).c_str());
    absl::StrAppend(&csv, r.method, ",", r.budget, ",", r.perplexity, ",", change, ",", r.nll_per_token, ",", r.recall,
                    ",", r.jaccard_oracle, ",", r.blocks_read, ",", acceptance_text(r, acceptance), ",",
                    acceptance_text(r, acceptance_sd), ",", turnover_text(r, turnover, false), ",",
                    turnover_text(r, turnover_sd, false), "\n");
  }
  if (absl::Status st = WriteCsv(flags.Get("csv"), csv); !st.ok()) return Fail(st);
  return 0;
}

}  // namespace scout::cli
