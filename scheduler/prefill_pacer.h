// How many prompt tokens a decode step may carry. The engine adds prompt chunks to the decode
// steps of running requests (one pass reads the weights once for both, as vLLM and SGLang's
// mixed chunks do). A chunk's cost grows with its depth: at 128k tokens of context a prompt token
// costs an 8B model some 70 GFLOP of attention, so a fixed token bound that is harmless at the
// start of a prompt multiplies the decoders' inter-token latency near its end. The pacer sizes
// each step's chunks so that the step takes at most max_slowdown times a decode-only step, from
// a cost model it fits to the steps it sees. Plain class: no model, no clock; tested alone.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "runtime/model_config.h"

namespace scout::scheduler {

class PrefillPacer {
 public:
  // Chunks of fewer tokens than this are not worth a step's bookkeeping: a step that carries
  // prefill at all carries at least this many tokens of its first prompt (or the prompt's rest),
  // whatever the time bound says, so that prefill always moves.
  static constexpr int64_t kMinChunk = 16;

  // max_slowdown <= 1 turns the time bound off (chunks bounded by tokens only).
  // gemm_tokens: the cost of a token's projections, in units of the attention cost of one query
  // token against one key (GemmTokens).
  PrefillPacer(double max_slowdown, double gemm_tokens);

  // GEMM FLOPs per token over attention FLOPs per (query, key) pair, over the model's layers:
  // 26.6k for Llama-3.1-8B (a prompt token's projections cost what its attention to 26.6k
  // earlier tokens costs).
  static double GemmTokens(const runtime::ModelConfig& config);

  // The cost of prefilling n tokens from position start, in the model's units:
  // n * (gemm_tokens + start + n / 2).
  double Work(int64_t start, int64_t n) const;

  // What a step took. decode-only steps give the base; steps with prefill work give the cost of
  // a unit of work (their time less the base, over the work).
  void ObserveDecodeStep(double seconds);
  void ObserveMixedStep(double work, double seconds);

  struct Prompt {
    int64_t start = 0;  // tokens already in the cache
    int64_t left = 0;   // tokens still to prefill
  };
  // Tokens of each prompt, in order, for the next decode step: within token_budget over all of
  // them, and, with the time bound on, within the work that keeps the step under max_slowdown
  // times the base. Before the first decode-only step has been timed: none (the decoders' first
  // step is the measurement). Before the first mixed step has been timed: kMinChunk of the first
  // prompt (a probe).
  std::vector<int64_t> Plan(std::span<const Prompt> prompts, int64_t token_budget) const;

  bool time_bound() const { return max_slowdown_ > 1.0; }
  double base_seconds() const { return base_s_; }
  double seconds_per_work() const { return per_work_s_; }

 private:
  // Largest n with Work(start, n) <= work (0 if not even one token fits).
  int64_t TokensWithin(int64_t start, double work) const;

  double max_slowdown_;
  double gemm_tokens_;
  double base_s_ = 0;      // exponential average of decode-only steps
  double per_work_s_ = 0;  // exponential average of (mixed step - base) / work
};

}  // namespace scout::scheduler
