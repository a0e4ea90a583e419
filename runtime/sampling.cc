#include "runtime/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"

namespace scout::runtime {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) {
    return absl::InvalidArgumentError(absl::StrCat("temperature must be >= 0, got ", p.temperature));
  }
  if (p.top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  }
  return absl::OkStatus();
}

int32_t ArgMax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

void Sampler::Distribution(std::span<const float> logits, std::span<float> probs) const {
  const size_t n = logits.size();
  std::fill(probs.begin(), probs.end(), 0.0f);
  if (params_.temperature == 0.0f) {
    probs[ArgMax(logits)] = 1.0f;
    return;
  }
  // Candidates sorted by logit, descending; ties by index so results are reproducible.
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  size_t keep = n;
  if (params_.top_k > 0) keep = std::min<size_t>(keep, params_.top_k);
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_logit);
  order.resize(keep);
  const double inv_t = 1.0 / params_.temperature;
  const double mx = logits[order[0]];
  std::vector<double> w(keep);
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += (w[i] = std::exp((logits[order[i]] - mx) * inv_t));
  // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
  size_t cut = keep;
  if (params_.top_p < 1.0f) {
    double acc = 0;
    for (size_t i = 0; i < keep; ++i) {
      acc += w[i] / sum;
      if (acc >= params_.top_p) {
        cut = i + 1;
        break;
      }
    }
  }
  double kept = 0;
  for (size_t i = 0; i < cut; ++i) kept += w[i];
  for (size_t i = 0; i < cut; ++i) probs[order[i]] = static_cast<float>(w[i] / kept);
}

int32_t Sampler::Sample(std::span<const float> logits) {
  if (params_.temperature == 0.0f) return ArgMax(logits);
  std::vector<float> probs(logits.size());
  Distribution(logits, probs);
  // Inverse CDF over a double uniform; the last non-zero token absorbs rounding.
  double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  double acc = 0;
  int32_t last = 0;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] == 0.0f) continue;
    last = static_cast<int32_t>(i);
    acc += probs[i];
    if (u < acc) return last;
  }
  return last;
}

TokenLogprobs LogprobsOf(std::span<const float> logits, int32_t token, int top, float temperature) {
  const double inv_t = temperature > 0 ? 1.0 / temperature : 1.0;
  double mx = -INFINITY;
  for (float x : logits) mx = std::max(mx, static_cast<double>(x) * inv_t);
  double sum = 0;
  for (float x : logits) sum += std::exp(static_cast<double>(x) * inv_t - mx);
  const double lse = mx + std::log(sum);
  auto lp = [&](int32_t id) { return static_cast<float>(static_cast<double>(logits[id]) * inv_t - lse); };
  TokenLogprobs out;
  out.chosen = {.token = token, .logprob = lp(token)};
  const int k = std::min<int>(std::max(top, 0), static_cast<int>(logits.size()));
  std::vector<int32_t> ids(logits.size());
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int i = 0; i < k; ++i) out.top.push_back({.token = ids[i], .logprob = lp(ids[i])});
  return out;
}

absl::Status ValidatePenalties(const Penalties& p) {
  if (!(p.presence >= -2 && p.presence <= 2)) {
    return absl::InvalidArgumentError(absl::StrCat("presence_penalty must be in [-2, 2], got ", p.presence));
  }
  if (!(p.frequency >= -2 && p.frequency <= 2)) {
    return absl::InvalidArgumentError(absl::StrCat("frequency_penalty must be in [-2, 2], got ", p.frequency));
  }
  if (!(p.repetition > 0 && p.repetition <= 100)) {
    return absl::InvalidArgumentError(absl::StrCat("repetition_penalty must be in (0, 100], got ", p.repetition));
  }
  return absl::OkStatus();
}

void ApplyPenalties(const Penalties& p, std::span<const std::pair<int32_t, int32_t>> output_counts,
                    std::span<const int32_t> seen, std::span<float> logits) {
  const int64_t n = static_cast<int64_t>(logits.size());
  if (p.repetition != 1.0f) {
    for (int32_t t : seen) {
      if (t < 0 || t >= n) continue;
      logits[t] = logits[t] > 0 ? logits[t] / p.repetition : logits[t] * p.repetition;
    }
  }
  for (const auto& [t, c] : output_counts) {
    if (t < 0 || t >= n || c <= 0) continue;
    logits[t] -= p.frequency * static_cast<float>(c) + p.presence;
  }
}

}  // namespace scout::runtime
