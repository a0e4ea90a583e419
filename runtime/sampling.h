// Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace scout::runtime {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax)
  int top_k = 0;             // 0: no limit
  float top_p = 1.0f;        // nucleus mass kept, in (0, 1]
  uint64_t seed = 0;
};

// InvalidArgument naming the field for a negative temperature, negative top_k or top_p outside (0, 1].
absl::Status ValidateSamplingParams(const SamplingParams& p);

// Index of the largest logit; the lowest index wins ties (matches torch.argmax).
int32_t ArgMax(std::span<const float> logits);

// OpenAI's and vLLM's penalties on the logits before sampling: a token already generated c times
// loses frequency * c + presence; a token of the prompt or the output has its logit divided by
// repetition when positive, multiplied when negative (applied first, as vLLM does).
struct Penalties {
  float presence = 0.0f;    // [-2, 2]
  float frequency = 0.0f;   // [-2, 2]
  float repetition = 1.0f;  // > 0; 1: none
  bool any() const { return presence != 0.0f || frequency != 0.0f || repetition != 1.0f; }
};
// InvalidArgument naming the field out of range.
absl::Status ValidatePenalties(const Penalties& p);
// output_counts: (token, times generated); seen: tokens of the prompt and the output (for
// repetition), each once.
void ApplyPenalties(const Penalties& p, std::span<const std::pair<int32_t, int32_t>> output_counts,
                    std::span<const int32_t> seen, std::span<float> logits);

// A generated token's log-probability and its most likely alternatives, under the distribution
// after temperature and before top-k / top-p truncation: log_softmax(logits / temperature), the
// logits as they are for greedy (temperature 0). OpenAI's `logprobs` (vLLM's processed logprobs).
struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0;
  std::string bytes;  // the token's bytes (the caller's tokenizer fills them; may end inside a UTF-8 character)
};
struct TokenLogprobs {
  TokenLogprob chosen;
  std::vector<TokenLogprob> top;  // most likely first, the lower id first among ties
};
// token within the row; top >= 0 alternatives (fewer if the vocabulary is smaller).
TokenLogprobs LogprobsOf(std::span<const float> logits, int32_t token, int top, float temperature);

// Draws tokens with its own generator: two samplers with equal params and seeds draw the same
// sequence. Not thread-safe.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  int32_t Sample(std::span<const float> logits);
  // The distribution Sample draws from (temperature, top-k and top-p applied), written to probs.
  // Greedy params give a one-hot vector. Used by speculative decoding's rejection sampling.
  void Distribution(std::span<const float> logits, std::span<float> probs) const;

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace scout::runtime
