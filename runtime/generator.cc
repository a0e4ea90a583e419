#include "runtime/generator.h"

#include <algorithm>
#include <chrono>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"

namespace scout::runtime {

absl::StatusOr<GenerateResult> Generate(ModelBackend& backend, SequenceId seq, std::span<const int32_t> prompt,
                                        const GenerateOptions& options, const TokenCallback& on_token) {
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  if (options.max_tokens < 0) return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 0, got ", options.max_tokens));
  if (options.prefill_chunk <= 0) return absl::InvalidArgumentError("prefill_chunk must be positive");
  if (absl::Status s = ValidateSamplingParams(options.sampling); !s.ok()) return s;
  const int64_t limit = backend.config().max_position_embeddings;
  int64_t earlier = 0;
  if (options.continue_sequence) {
    absl::StatusOr<int64_t> len = backend.SequenceLength(seq);
    if (!len.ok()) return len.status();
    earlier = *len;
  }
  if (earlier + static_cast<int64_t>(prompt.size()) > limit) {
    return absl::OutOfRangeError(absl::StrCat("prompt of ", prompt.size(), " tokens after ", earlier,
                                              " exceeds the model's ", limit));
  }
  if (!options.continue_sequence) {
    if (absl::Status s = backend.AddSequence(seq); !s.ok()) return s;
  }
  absl::Cleanup release = [&] {
    if (!options.continue_sequence) backend.ReleaseSequence(seq).IgnoreError();
  };

  using Clock = std::chrono::steady_clock;
  GenerateResult result;
  result.prompt_tokens = static_cast<int64_t>(prompt.size());
  Sampler sampler(options.sampling);
  std::vector<float> logits;
  auto t0 = Clock::now();
  for (size_t at = 0; at < prompt.size(); at += options.prefill_chunk) {
    size_t n = std::min<size_t>(options.prefill_chunk, prompt.size() - at);
    SequenceInput in{.seq = seq, .tokens = prompt.subspan(at, n)};
    if (absl::Status s = backend.Forward({&in, 1}, &logits); !s.ok()) return s;
    if (options.on_prefill_progress) {
      options.on_prefill_progress(static_cast<int64_t>(at + n), static_cast<int64_t>(prompt.size()));
    }
  }
  auto t1 = Clock::now();
  result.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  int64_t length = earlier + result.prompt_tokens;
  for (int64_t i = 0; i < options.max_tokens; ++i) {
    int32_t next = sampler.Sample(logits);
    result.tokens.push_back(next);
    if (on_token && !on_token(next)) break;
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) != options.stop_ids.end()) break;
    if (i + 1 == options.max_tokens || length >= limit) break;  // the last token needs no forward pass
    SequenceInput in{.seq = seq, .tokens = {&result.tokens.back(), 1}};
    if (absl::Status s = backend.Forward({&in, 1}, &logits); !s.ok()) return s;
    ++length;
  }
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return result;
}

}  // namespace scout::runtime
