// `scout calibrate`: the draft heads that stand for each target (layer, KV head).
#include "cli/commands.h"

#include <cstdio>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "runtime/cpu_model.h"

#include "eval/calibrate.h"
#include "text/tokenizer.h"

namespace scout::cli {

int Calibrate(int argc, char** argv) {
  Flags flags({
      {"model", "", "target model folder"},
      {"draft", "", "draft model folder"},
      {"text", "", "calibration text file (keep it apart from evaluation text)"},
      {"context-tokens", "2048", "tokens prefilled before calibration rounds start"},
      {"calib-tokens", "1024", "tokens over which coverage is measured"},
      {"num-speculative-tokens", "4", "k: rounds of k + 1 tokens"},
      {"budget-fraction", "0.1", "budget at which coverage is measured"},
      {"max-heads", "3", "draft heads per target (layer, KV head) at most"},
      {"output", "", "head map JSON to write (default: DRAFT/scout_head_map.json)"},
      {"help", "", "show this help", true},
  });
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout calibrate --model DIR --draft DIR --text FILE [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  for (const char* f : {"model", "draft", "text"}) {
    if (flags.Get(f).empty()) return Fail(absl::InvalidArgumentError(absl::StrCat("--", f, " is required")));
  }
  absl::StatusOr<ModelPair> pair = LoadPair(flags.Get("model"), flags.Get("draft"));
  if (!pair.ok()) return Fail(pair.status());
  runtime::CpuModel* target = pair->target.get();
  runtime::CpuModel* draft = pair->draft.get();
  text::Tokenizer* tok = pair->tokenizer.get();
  absl::StatusOr<std::string> text = runtime::ReadFile(flags.Get("text"));
  if (!text.ok()) return Fail(text.status());
  absl::StatusOr<int64_t> ctx = flags.GetInt("context-tokens"), n = flags.GetInt("calib-tokens"),
                          k = flags.GetInt("num-speculative-tokens"), heads = flags.GetInt("max-heads");
  absl::StatusOr<double> frac = flags.GetDouble("budget-fraction");
  for (const absl::Status& s : {ctx.status(), n.status(), k.status(), heads.status(), frac.status()}) {
    if (!s.ok()) return Fail(s);
  }
  std::vector<int32_t> ids = tok->Encode(*text, /*add_bos=*/true);
  absl::StatusOr<eval::CalibrationReport> rep = eval::CalibrateHeadMap(
      *target, *draft, ids,
      {.context_tokens = *ctx, .calib_tokens = *n, .num_speculative_tokens = static_cast<int>(*k),
       .budget_fraction = *frac, .max_heads_per_unit = static_cast<int>(*heads)});
  if (!rep.ok()) return Fail(rep.status());
  std::printf("%6s %8s | %-16s %9s | %9s\n", "layer", "kv head", "draft heads", "captured", "default");
  double mean = 0, mean_def = 0;
  for (size_t u = 0; u < rep->map.units.size(); ++u) {
    std::string heads_text;
    for (int32_t h : rep->map.units[u]) {
      absl::StrAppend(&heads_text, heads_text.empty() ? "" : ",", "L", h / rep->map.draft_heads, "H",
                      h % rep->map.draft_heads);
    }
    std::printf("%6zu %8zu | %-16s %8.1f%% | %8.1f%%\n", u / rep->map.target_kv_heads, u % rep->map.target_kv_heads,
                heads_text.c_str(), 100 * rep->unit_recall[u], 100 * rep->default_recall[u]);
    mean += rep->unit_recall[u] / rep->map.units.size();
    mean_def += rep->default_recall[u] / rep->map.units.size();
  }
  std::printf("mean captured target attention at %.0f%% of blocks: %.1f%% (proportional-depth default %.1f%%)\n",
              *frac * 100, 100 * mean, 100 * mean_def);
  std::filesystem::path out = flags.Get("output");
  if (out.empty()) out = DefaultHeadMapPath(flags.Get("draft"));
  if (absl::Status s = runtime::SaveHeadMap(out, rep->map); !s.ok()) return Fail(s);
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

}  // namespace scout::cli
