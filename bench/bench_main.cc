// scout-bench: the benchmarks behind `scout bench` (the scout binary execs this one, so the
// product links no benchmark code). Each times the functions the product runs; bench/ adds only
// setup and timing.
//   scout-bench decode [flags]   decode rounds at production shapes on the GPU (decode_bench.h)
//   scout-bench serve [flags]    load against an OpenAI-compatible server (serve_bench.h)
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/serve_bench.h"
#include "cli/flags.h"
#ifdef SCOUT_HAVE_CUDA
#include "bench/decode_bench.h"
#endif

namespace scout::bench {
namespace {

using cli::Flags;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "scout bench: error: %s\n", s.ToString().c_str());
  return 1;
}

// `scout bench serve`: see bench/serve_bench.h.
int BenchServe(int argc, char** argv) {
  Flags flags({
      {"base-url", "http://127.0.0.1:8000", "the server, http://HOST:PORT"},
      {"endpoint", "/v1/completions", "/v1/completions or /v1/chat/completions"},
      {"model", "", "model name in the requests (default: the server's first in /v1/models)"},
      {"api-key", "", "sent as Authorization: Bearer (default: $OPENAI_API_KEY)"},
      {"num-prompts", "100", "requests to send"},
      {"request-rate", "inf", "requests a second, Poisson arrivals (inf: all at once)"},
      {"max-concurrency", "0", "requests in flight at most (0: no bound)"},
      {"burstiness", "1", "arrival gaps gamma-distributed with this shape (1: Poisson; below 1 burstier)"},
      {"metric-percentiles", "99", "percentiles reported beside mean and median, comma-separated, e.g. 50,90,99"},
      {"seed", "0", "random prompts and arrival times"},
      {"random-input-len", "1024", "prompt tokens (random token ids)"},
      {"random-output-len", "128", "tokens to generate"},
      {"random-range-ratio", "0", "lengths uniform in [len * (1 - r), len * (1 + r)]"},
      {"dataset-path", "", "JSONL of {\"prompt\": text or token ids, \"max_tokens\": n} instead of random prompts"},
      {"sessions", "0", "agent sessions instead of requests: conversations on a session_id, one turn at a time"},
      {"turn-tokens", "1024", "sessions: new prompt tokens a turn"},
      {"session-output-len", "64", "sessions: tokens generated a turn"},
      {"session-length", "32768", "sessions: context a session grows to"},
      {"ignore-eos", "true", "generate every requested token (true or false)"},
      {"extra-body", "", "JSON object merged into every request, e.g. '{\"sparsity\": \"sts\"}'"},
      {"goodput", "", "SLOs in ms, e.g. ttft:500,tpot:50,e2el:10000: goodput counts requests meeting all"},
      {"label", "", "name of the run in the report"},
      {"result-json", "", "write the report and every request's figures here"},
      {"help", "", "show this help", true},
  });
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout bench serve [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  bench::ServeBenchOptions o;
  o.base_url = flags.Get("base-url");
  o.endpoint = flags.Get("endpoint");
  o.model = flags.Get("model");
  o.api_key = flags.Get("api-key");
  if (o.api_key.empty() && std::getenv("OPENAI_API_KEY") != nullptr) o.api_key = std::getenv("OPENAI_API_KEY");
  absl::StatusOr<int64_t> num = flags.GetInt("num-prompts"), conc = flags.GetInt("max-concurrency"),
                          seed = flags.GetInt("seed"), in = flags.GetInt("random-input-len"),
                          out = flags.GetInt("random-output-len"), sessions = flags.GetInt("sessions"),
                          turn = flags.GetInt("turn-tokens"), sout = flags.GetInt("session-output-len"),
                          slen = flags.GetInt("session-length");
  absl::StatusOr<double> ratio = flags.GetDouble("random-range-ratio");
  for (const absl::Status& s : {num.status(), conc.status(), seed.status(), in.status(), out.status(),
                                sessions.status(), turn.status(), sout.status(), slen.status(), ratio.status()}) {
    if (!s.ok()) return Fail(s);
  }
  o.num_prompts = static_cast<int>(*num);
  o.max_concurrency = static_cast<int>(*conc);
  o.seed = static_cast<uint64_t>(*seed);
  o.random_input_len = static_cast<int>(*in);
  o.random_output_len = static_cast<int>(*out);
  o.random_range_ratio = *ratio;
  o.sessions = static_cast<int>(*sessions);
  o.turn_tokens = static_cast<int>(*turn);
  o.session_output_len = static_cast<int>(*sout);
  o.session_length = *slen;
  if (const std::string rate = flags.Get("request-rate"); rate != "inf") {
    absl::StatusOr<double> r = flags.GetDouble("request-rate");
    if (!r.ok()) return Fail(r.status());
    o.request_rate = *r;
  }
  const std::string eos = flags.Get("ignore-eos");
  if (eos != "true" && eos != "false") return Fail(absl::InvalidArgumentError("--ignore-eos must be true or false"));
  o.ignore_eos = eos == "true";
  o.dataset_path = flags.Get("dataset-path");
  o.extra_body = flags.Get("extra-body");
  for (absl::string_view slo : absl::StrSplit(flags.Get("goodput"), ',', absl::SkipEmpty())) {
    const std::vector<std::string> kv = absl::StrSplit(slo, ':');
    double ms = 0;
    if (kv.size() != 2 || !absl::SimpleAtod(kv[1], &ms) || ms <= 0) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--goodput: NAME:MS pairs, got \"", slo, "\"")));
    }
    if (kv[0] == "ttft") {
      o.slo_ttft_ms = ms;
    } else if (kv[0] == "tpot") {
      o.slo_tpot_ms = ms;
    } else if (kv[0] == "e2el") {
      o.slo_e2el_ms = ms;
    } else {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--goodput: ttft, tpot or e2el, got \"", kv[0], "\"")));
    }
  }
  absl::StatusOr<double> burst = flags.GetDouble("burstiness");
  if (!burst.ok()) return Fail(burst.status());
  o.burstiness = *burst;
  o.percentiles.clear();
  for (absl::string_view q : absl::StrSplit(flags.Get("metric-percentiles"), ',', absl::SkipEmpty())) {
    double v = 0;
    if (!absl::SimpleAtod(q, &v)) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--metric-percentiles: numbers, got \"", q, "\"")));
    }
    o.percentiles.push_back(v);
  }
  o.label = flags.Get("label");
  o.result_json = flags.Get("result-json");
  if (absl::Status s = RunServeBench(o); !s.ok()) return Fail(s);
  return 0;
}

// `scout bench decode`: see bench/decode_bench.h.
int BenchDecode(int argc, char** argv) {
  Flags flags({
      {"target", "llama-3.1-8b", "target shape: llama-3.1-8b, llama-3.2-3b, llama-3.2-1b or a model folder"},
      {"draft", "llama-3.2-1b", "draft shape (same forms)"},
      {"contexts", "32768,131072", "context lengths with the KV on the GPU, comma-separated (empty: none)"},
      {"host-contexts", "", "context lengths with the target's KV in the host store (batch 1), e.g. 1048576"},
      {"host-batch-sizes", "1", "host-store runs: sequences per step, comma-separated"},
      {"draft-device", "", "host-store runs: the draft's GPU, cuda:N (default: the target's)"},
      {"gpu-cache-units", "0", "host-store runs: the target's GPU block cache in 16-token units (0: what fits)"},
      {"prefetch-launch", "signal",
       "host-store runs: signal (one gather a step, layers waited for through counters) or layers (a gather and an "
       "event per layer)"},
      {"host-budget-fractions", "0.02", "host-store runs: STS budgets, comma-separated (one model setup for all)"},
      {"host-turnovers", "0,0.17,0.5,1", "host-store runs: fraction of each list's blocks new every round (0.17 measured on the fixture pair; random "
                                        "weights pick the same blocks every round), comma-separated"},
      {"batch-sizes", "1,8", "sequences per step, comma-separated"},
      {"num-speculative-tokens", "4", "draft tokens per round (k)"},
      {"accepted", "3", "draft tokens ASSUMED accepted per round (random weights accept none)"},
      {"kv-budget-fraction", "0.1", "STS: fraction of the blocks each target (layer, KV head) reads"},
      {"santa-samples", "512", "SANTA: value rows sampled per 16-row group"},
      {"draft-refresh-rounds", "4", "sparse draft: its dense first step every this many rounds (the -sd/R rows)"},
      {"iters", "20", "timed rounds per configuration"},
      {"device", "cuda", "cuda or cuda:N"},
      {"json", "", "also write the results as JSON lines to this file"},
      {"help", "", "show this help", true},
  });
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout bench decode [flags]\n%s", flags.Help().c_str());
    return 0;
  }
#ifdef SCOUT_HAVE_CUDA
  bench::DecodeBenchOptions o;
  o.target = flags.Get("target");
  o.draft = flags.Get("draft");
  o.contexts.clear();
  o.batches.clear();
  for (auto [name, out] : {std::pair{"contexts", &o.contexts}, std::pair{"host-contexts", &o.host_contexts}}) {
    for (absl::string_view v : absl::StrSplit(flags.Get(name), ',', absl::SkipEmpty())) {
      int64_t x = 0;
      if (!absl::SimpleAtoi(v, &x) || x < 1) {
        return Fail(absl::InvalidArgumentError(absl::StrCat("--", name, ": positive integers")));
      }
      out->push_back(x);
    }
  }
  if (o.contexts.empty() && o.host_contexts.empty()) {
    return Fail(absl::InvalidArgumentError("--contexts and --host-contexts are both empty"));
  }
  if (const std::string dd = flags.Get("draft-device"); !dd.empty()) {
    if (!(dd.rfind("cuda:", 0) == 0 && absl::SimpleAtoi(dd.substr(5), &o.draft_device) && o.draft_device >= 0)) {
      return Fail(absl::InvalidArgumentError("--draft-device must be cuda:N"));
    }
  }
  absl::StatusOr<int64_t> cache_units = flags.GetInt("gpu-cache-units");
  if (!cache_units.ok()) return Fail(cache_units.status());
  if (*cache_units < 0) return Fail(absl::InvalidArgumentError("--gpu-cache-units must be >= 0"));
  o.gpu_cache_units = *cache_units;
  if (const std::string pl = flags.Get("prefetch-launch"); pl == "signal" || pl == "layers") {
    o.signalled_prefetch = pl == "signal";
  } else {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--prefetch-launch must be signal or layers, got \"", pl, "\"")));
  }
  o.host_budget_fractions.clear();
  for (absl::string_view v : absl::StrSplit(flags.Get("host-budget-fractions"), ',', absl::SkipEmpty())) {
    double x = 0;
    if (!absl::SimpleAtod(v, &x) || !(x > 0 && x <= 1)) {
      return Fail(absl::InvalidArgumentError("--host-budget-fractions: numbers in (0, 1]"));
    }
    o.host_budget_fractions.push_back(x);
  }
  o.host_batches.clear();
  for (absl::string_view v : absl::StrSplit(flags.Get("host-batch-sizes"), ',', absl::SkipEmpty())) {
    int x = 0;
    if (!absl::SimpleAtoi(v, &x) || x < 1) return Fail(absl::InvalidArgumentError("--host-batch-sizes: positive integers"));
    o.host_batches.push_back(x);
  }
  o.host_turnovers.clear();
  for (absl::string_view v : absl::StrSplit(flags.Get("host-turnovers"), ',', absl::SkipEmpty())) {
    double x = 0;
    if (!absl::SimpleAtod(v, &x) || !(x >= 0 && x <= 1)) {
      return Fail(absl::InvalidArgumentError("--host-turnovers: numbers in [0, 1]"));
    }
    o.host_turnovers.push_back(x);
  }
  if (!o.host_contexts.empty() && (o.host_budget_fractions.empty() || o.host_turnovers.empty())) {
    return Fail(absl::InvalidArgumentError("--host-budget-fractions and --host-turnovers must not be empty"));
  }
  for (absl::string_view v : absl::StrSplit(flags.Get("batch-sizes"), ',')) {
    int x = 0;
    if (!absl::SimpleAtoi(v, &x) || x < 1) return Fail(absl::InvalidArgumentError("--batch-sizes: positive integers"));
    o.batches.push_back(x);
  }
  absl::StatusOr<int64_t> k = flags.GetInt("num-speculative-tokens"), santa = flags.GetInt("santa-samples"),
                          iters = flags.GetInt("iters"), refresh = flags.GetInt("draft-refresh-rounds");
  if (!refresh.ok()) return Fail(refresh.status());
  if (*refresh < 1) return Fail(absl::InvalidArgumentError("--draft-refresh-rounds must be >= 1"));
  absl::StatusOr<double> accepted = flags.GetDouble("accepted"), fraction = flags.GetDouble("kv-budget-fraction");
  for (const absl::Status& s : {k.status(), santa.status(), iters.status(), accepted.status(), fraction.status()}) {
    if (!s.ok()) return Fail(s);
  }
  o.k = static_cast<int>(*k);
  o.accepted = *accepted;
  o.budget_fraction = *fraction;
  o.santa_samples = static_cast<int>(*santa);
  o.iters = static_cast<int>(*iters);
  o.draft_refresh_rounds = static_cast<int>(*refresh);
  const std::string device = flags.Get("device");
  if (device != "cuda" && !(device.rfind("cuda:", 0) == 0 && absl::SimpleAtoi(device.substr(5), &o.device))) {
    return Fail(absl::InvalidArgumentError("--device must be cuda or cuda:N"));
  }
  o.json_out = flags.Get("json");
  return bench::RunDecodeBench(o);
#else
  return Fail(absl::UnavailableError("scout bench decode needs a CUDA build (SCOUT_CUDA=ON)"));
#endif
}

}  // namespace
}  // namespace scout::bench

int main(int argc, char** argv) {
  const std::string name = argc >= 2 ? argv[1] : "";
  if (name == "decode") return scout::bench::BenchDecode(argc - 2, argv + 2);
  if (name == "serve") return scout::bench::BenchServe(argc - 2, argv + 2);
  std::fprintf(stderr, "usage: scout bench <decode|serve> [flags]\n");
  return 2;
}
