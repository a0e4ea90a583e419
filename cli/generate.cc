// `scout generate`: text from a prompt, plain or speculative, with a prefill progress line.
#include "cli/commands.h"

#include <chrono>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>

#include "runtime/backend_factory.h"
#ifdef SCOUT_HAVE_CUDA
#include <cuda_runtime.h>

#include "runtime/cuda_model.h"
#endif
#ifdef SCOUT_HAVE_NCCL
#include "runtime/tensor_parallel.h"
#endif
#include <unistd.h>

#include "runtime/generator.h"
#include "round/speculative.h"
#include "text/tokenizer.h"

namespace scout::cli {

// The progress line of a long prefill on a terminal (stderr): tokens done, tokens/s and the time
// left at that rate, redrawn at most 5 times a second and wiped when the prefill ends. Prompts of
// fewer than 8192 tokens, and stderr that is not a terminal, draw nothing.
class PrefillProgressLine {
 public:
  explicit PrefillProgressLine(int64_t prompt_tokens)
      : enabled_(prompt_tokens >= 8192 && isatty(STDERR_FILENO) == 1), start_(Clock::now()), last_(start_) {}
  ~PrefillProgressLine() { Clear(); }
  void Update(int64_t done, int64_t total) {
    if (!enabled_) return;
    const Clock::time_point now = Clock::now();
    if (done < total && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    const double s = std::chrono::duration<double>(now - start_).count();
    const double rate = s > 0 ? static_cast<double>(done) / s : 0.0;
    const double left = rate > 0 ? static_cast<double>(total - done) / rate : 0.0;
    std::fprintf(stderr, "\r\033[Kscout: prefill %lld / %lld tokens (%.0f%%), %.0f tokens/s, %.0f s left",
                 static_cast<long long>(done), static_cast<long long>(total), total > 0 ? 100.0 * done / total : 100.0,
                 rate, left);
    std::fflush(stderr);
    drawn_ = true;
    if (done >= total) Clear();
  }
  std::function<void(int64_t, int64_t)> Callback() {
    return [this](int64_t done, int64_t total) { Update(done, total); };
  }

 private:
  using Clock = std::chrono::steady_clock;
  void Clear() {
    if (!drawn_) return;
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
    drawn_ = false;
  }
  bool enabled_;
  bool drawn_ = false;
  Clock::time_point start_, last_;
};

int Generate(int argc, char** argv) {
  Flags flags(WithStsFlags(WithHostTierFlags({
      {"model", "", "Hugging Face model folder (config.json, safetensors, tokenizer)"},
      {"prompt", "", "prompt text"},
      {"prompt-file", "", "read the prompt from this file instead"},
      {"max-tokens", "64", "tokens to generate"},
      {"temperature", "0", "0 for greedy"},
      {"top-k", "0", "0 for no limit"},
      {"top-p", "1", "nucleus mass"},
      {"seed", "0", "sampling seed"},
      {"prefill-chunk", "4096", "prompt tokens per forward pass (the CUDA prefill kernel needs chunks that fill the GPU)"},
      {"kv-cache-tokens", "0", "KV pool size in tokens (0: 4 x max_position_embeddings)"},
      {"device", "cpu", "backend of the target: cpu, cuda or cuda:N"},
      {"draft-device", "", "backend of the draft (default: --device)"},
      {"tensor-parallel-size", "1", "cuda: split the target over this many GPUs (NCCL)"},
      {"target-devices", "", "cuda: the target's GPUs, comma-separated (default: 0..tensor-parallel-size-1)"},
      {"ignore-eos", "", "keep generating past the end-of-sequence token", true},
      {"speculative", "", "speculative decoding with --draft proposing tokens", true},
      {"draft", "", "draft model folder (same vocabulary as --model)"},
      {"num-speculative-tokens", "4", "draft tokens proposed per round"},
      {"help", "", "show this help", true},
  }), "target attention while verifying: dense, or sts (blocks picked by the draft's attention)"));
  if (absl::Status s = flags.Parse(argc, argv); !s.ok()) return Fail(s);
  if (flags.GetBool("help")) {
    std::printf("usage: scout generate --model DIR --prompt TEXT [flags]\n%s", flags.Help().c_str());
    return 0;
  }
  if (flags.Get("model").empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  std::string prompt = flags.Get("prompt");
  if (!flags.Get("prompt-file").empty()) {
    absl::StatusOr<std::string> text = runtime::ReadFile(flags.Get("prompt-file"));
    if (!text.ok()) return Fail(text.status());
    prompt = *text;
  }
  absl::StatusOr<int64_t> max_tokens = flags.GetInt("max-tokens"), top_k = flags.GetInt("top-k"),
                          seed = flags.GetInt("seed"), chunk = flags.GetInt("prefill-chunk"),
                          budget = flags.GetInt("kv-cache-tokens");
  absl::StatusOr<double> temperature = flags.GetDouble("temperature"), top_p = flags.GetDouble("top-p");
  for (const absl::Status& s : {max_tokens.status(), top_k.status(), seed.status(), chunk.status(), budget.status(),
                                temperature.status(), top_p.status()}) {
    if (!s.ok()) return Fail(s);
  }
  absl::StatusOr<int64_t> tp = flags.GetInt("tensor-parallel-size");
  if (!tp.ok()) return Fail(tp.status());
  absl::StatusOr<HostTierFlags> tier = ParseHostTier(flags);
  if (!tier.ok()) return Fail(tier.status());
  const bool split = *tp > 1 || !flags.Get("target-devices").empty();
  absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> model =
      split ? runtime::LoadTensorParallel(flags.Get("model"), static_cast<int>(*tp), flags.Get("target-devices"), *budget, *tier)
            : runtime::LoadBackend(flags.Get("model"), flags.Get("device"), *budget, *tier);
  if (!model.ok()) return Fail(model.status());
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> tok = text::LoadTokenizer(flags.Get("model"));
  if (!tok.ok()) return Fail(tok.status());

  std::vector<int32_t> ids = (*tok)->Encode(prompt, /*add_bos=*/true);
  runtime::GenerateOptions opt{
      .max_tokens = *max_tokens,
      .sampling = {.temperature = static_cast<float>(*temperature), .top_k = static_cast<int>(*top_k),
                   .top_p = static_cast<float>(*top_p), .seed = static_cast<uint64_t>(*seed)},
      .prefill_chunk = *chunk,
  };
  if (!flags.GetBool("ignore-eos")) opt.stop_ids = (*tok)->eos_ids();
  PrefillProgressLine progress(static_cast<int64_t>(ids.size()));
  opt.on_prefill_progress = progress.Callback();
  const text::Tokenizer& t = **tok;
  auto print = [&](int32_t id) {
    absl::StatusOr<std::string> piece = t.Decode({&id, 1});
    if (piece.ok()) std::fwrite(piece->data(), 1, piece->size(), stdout);
    std::fflush(stdout);
    return true;
  };
  if (flags.GetBool("speculative")) {
    if (flags.Get("draft").empty()) return Fail(absl::InvalidArgumentError("--speculative needs --draft DIR"));
    absl::StatusOr<int64_t> k = flags.GetInt("num-speculative-tokens");
    if (!k.ok()) return Fail(k.status());
    const std::string draft_device = flags.Get("draft-device").empty() ? flags.Get("device") : flags.Get("draft-device");
    absl::StatusOr<std::unique_ptr<runtime::ModelBackend>> draft = runtime::LoadBackend(flags.Get("draft"), draft_device, *budget);
    if (!draft.ok()) return Fail(draft.status());
    round::SpeculativeOptions sopt{.num_speculative_tokens = static_cast<int>(*k), .max_tokens = opt.max_tokens,
                                   .sampling = opt.sampling, .prefill_chunk = opt.prefill_chunk,
                                   .stop_ids = opt.stop_ids, .on_prefill_progress = opt.on_prefill_progress};
    absl::StatusOr<std::optional<StsChoice>> sts = ParseSts(flags, (*model)->config(), (*draft)->config());
    if (!sts.ok()) return Fail(sts.status());
    if (sts->has_value()) {
      sopt.head_map = &(*sts)->head_map;
      sopt.sts_budget = (*sts)->budget;
    }
    absl::StatusOr<RoundChoice> rc = ParseRoundFlags(flags);
    if (!rc.ok()) return Fail(rc.status());
    const runtime::HeadMap self_map = runtime::SelfHeadMap((*draft)->config());
    if (rc->sparse_draft) {
      sopt.draft_head_map = &self_map;
      sopt.draft_budget = rc->draft_budget;
      sopt.draft_refresh_rounds = rc->draft_refresh_rounds;
    }
    sopt.santa_samples = rc->santa_samples;
    absl::StatusOr<round::SpeculativeResult> r = round::GenerateSpeculative(**model, **draft, 0, ids, sopt, print);
    std::printf("\n");
    if (!r.ok()) return Fail(r.status());
    std::fprintf(stderr,
                 "scout: prompt %lld tokens, prefill %.3f s; generated %zu tokens in %lld rounds, decode %.3f s "
                 "(%.1f tokens/s, %.3f ms a round, %s round); draft acceptance %.1f%% (%lld of %lld)\n",
                 static_cast<long long>(r->prompt_tokens), r->prefill_seconds, r->tokens.size(),
                 static_cast<long long>(r->rounds), r->decode_seconds, r->tokens.size() / std::max(r->decode_seconds, 1e-9),
                 1e3 * r->decode_seconds / std::max<int64_t>(r->rounds, 1), r->round_impl.c_str(),
                 100.0 * r->acceptance_rate(), static_cast<long long>(r->draft_accepted),
                 static_cast<long long>(r->draft_proposed));
    if (r->context_blocks > 0) {
      std::fprintf(stderr, "scout: sts: target read %.1f%% of the context's blocks while verifying\n",
                   100.0 * r->selected_blocks / r->context_blocks);
    }
    if (rc->sparse_draft && r->draft_context_blocks > 0) {
      std::fprintf(stderr, "scout: sparse draft: its steps read %.1f%% of its context's blocks\n",
                   100.0 * r->draft_selected_blocks / r->draft_context_blocks);
    }
    return 0;
  }
  absl::StatusOr<runtime::GenerateResult> r = runtime::Generate(**model, 0, ids, opt, print);
  std::printf("\n");
  if (!r.ok()) return Fail(r.status());
  const double decode_tokens = r->tokens.size() > 1 ? static_cast<double>(r->tokens.size() - 1) : 0.0;
  std::fprintf(stderr,
               "scout: prompt %lld tokens, prefill %.3f s (%.1f tokens/s); generated %zu tokens, decode %.3f s "
               "(%.1f tokens/s)\n",
               static_cast<long long>(r->prompt_tokens), r->prefill_seconds,
               r->prompt_tokens / std::max(r->prefill_seconds, 1e-9), r->tokens.size(), r->decode_seconds,
               decode_tokens / std::max(r->decode_seconds, 1e-9));
  return 0;
}

}  // namespace scout::cli
