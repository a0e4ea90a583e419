#include "scheduler/prefill_pacer.h"

#include <algorithm>
#include <cmath>

namespace scout::scheduler {
namespace {

// Exponential averages: a step's time moves with the batch and the depth, slowly; a new
// measurement counts for this much.
constexpr double kBaseWeight = 0.2;
constexpr double kWorkWeight = 0.3;

}  // namespace

PrefillPacer::PrefillPacer(double max_slowdown, double gemm_tokens)
    : max_slowdown_(max_slowdown), gemm_tokens_(std::max(gemm_tokens, 1.0)) {}

double PrefillPacer::GemmTokens(const runtime::ModelConfig& c) {
  const double d = static_cast<double>(c.hidden_size), hd = static_cast<double>(c.head_dim);
  const double nh = static_cast<double>(c.num_attention_heads), nkv = static_cast<double>(c.num_key_value_heads);
  const double inter = static_cast<double>(c.intermediate_size);
  // Multiply-adds per token of one layer's projections (q, k, v, o, gate, up, down) against
  // those of one (query, key) pair's attention (q.k and p.v over every head).
  const double linear = d * (nh + 2 * nkv) * hd + nh * hd * d + 3 * d * inter;
  return linear / (2 * nh * hd);
}

double PrefillPacer::Work(int64_t start, int64_t n) const {
  const double nn = static_cast<double>(n);
  return nn * (gemm_tokens_ + static_cast<double>(start) + nn / 2);
}

void PrefillPacer::ObserveDecodeStep(double seconds) {
  if (!(seconds > 0)) return;
  base_s_ = base_s_ == 0 ? seconds : (1 - kBaseWeight) * base_s_ + kBaseWeight * seconds;
}

void PrefillPacer::ObserveMixedStep(double work, double seconds) {
  if (!(work > 0) || !(seconds > 0) || base_s_ == 0) return;
  // A mixed step faster than the average decode-only step is noise around a small chunk: it
  // still cost something, say a tenth of the base.
  const double cost = std::max(seconds - base_s_, 0.1 * base_s_) / work;
  per_work_s_ = per_work_s_ == 0 ? cost : (1 - kWorkWeight) * per_work_s_ + kWorkWeight * cost;
}

int64_t PrefillPacer::TokensWithin(int64_t start, double work) const {
  if (work <= 0) return 0;
  // n^2 / 2 + n * b <= work, b = gemm_tokens + start.
  const double b = gemm_tokens_ + static_cast<double>(start);
  const double n = std::sqrt(b * b + 2 * work) - b;
  int64_t k = static_cast<int64_t>(std::floor(std::max(n, 0.0)));
  while (k > 0 && Work(start, k) > work) --k;  // rounding at large b
  return k;
}

std::vector<int64_t> PrefillPacer::Plan(std::span<const Prompt> prompts, int64_t token_budget) const {
  std::vector<int64_t> n(prompts.size(), 0);
  int64_t room = std::max<int64_t>(token_budget, 0);
  if (!time_bound()) {
    for (size_t i = 0; i < prompts.size() && room > 0; ++i) {
      n[i] = std::min(room, std::max<int64_t>(prompts[i].left, 0));
      room -= n[i];
    }
    return n;
  }
  if (base_s_ == 0) return n;
  if (per_work_s_ == 0) {  // probe
    if (!prompts.empty()) n[0] = std::min({kMinChunk, std::max<int64_t>(prompts[0].left, 0), room});
    return n;
  }
  double work = (max_slowdown_ - 1) * base_s_ / per_work_s_;
  for (size_t i = 0; i < prompts.size() && room > 0; ++i) {
    const int64_t left = std::max<int64_t>(prompts[i].left, 0);
    int64_t k = std::min({TokensWithin(prompts[i].start, work), left, room});
    if (i == 0) k = std::max(k, std::min({kMinChunk, left, room}));
    if (k <= 0) break;
    n[i] = k;
    room -= k;
    work -= Work(prompts[i].start, k);
  }
  return n;
}

}  // namespace scout::scheduler
