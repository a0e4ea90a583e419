// Autoregressive generation for one sequence: chunked prefill, then one token a step.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/backend.h"
#include "runtime/sampling.h"

namespace scout::runtime {

struct GenerateOptions {
  int64_t max_tokens = 64;
  SamplingParams sampling;
  int64_t prefill_chunk = 512;     // prompt tokens per forward pass
  std::vector<int32_t> stop_ids;   // generation ends after emitting one of these (kept in output)
  // Called after each prefill pass with the prompt tokens done and the prompt's length.
  std::function<void(int64_t done, int64_t total)> on_prefill_progress;
  // Continue sequence `seq`, which already holds earlier tokens, and keep it afterwards (agent
  // sessions). The last generated token is not in the cache when Generate returns: the caller
  // feeds it first next time.
  bool continue_sequence = false;
};

struct GenerateResult {
  std::vector<int32_t> tokens;     // generated, without the prompt
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;      // until the first generated token's logits
  double decode_seconds = 0;       // the remaining steps
};

// Called with each generated token; returning false stops generation early.
using TokenCallback = std::function<bool(int32_t)>;

// Runs `prompt` (non-empty) through the backend as a new sequence `seq` (or appended to it, with
// continue_sequence), samples up to max_tokens tokens, and releases a new sequence before
// returning (on error too). Errors of the backend pass through; InvalidArgument for bad options.
absl::StatusOr<GenerateResult> Generate(ModelBackend& backend, SequenceId seq, std::span<const int32_t> prompt,
                                        const GenerateOptions& options, const TokenCallback& on_token = nullptr);

}  // namespace scout::runtime
