#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/model_ops.h"

namespace scout::kernels {

float SampleUniform(uint64_t seed, int64_t i) { return RandomUniform(seed, i, 0.5f, 0.5f); }

void SampleRef(const SampleParams& p) {
  std::vector<int32_t> order(p.vocab);
  for (int r = 0; r < p.rows; ++r) {
    const float* x = p.logits + int64_t{r} * p.vocab;
    const SampleRowParams& rp = p.row[r];
    std::iota(order.begin(), order.end(), 0);
    auto by_logit = [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
    if (rp.temperature == 0.0f) {
      p.out[r] = *std::min_element(order.begin(), order.end(), by_logit);
      continue;
    }
    std::sort(order.begin(), order.end(), by_logit);
    size_t keep = p.vocab;
    if (rp.top_k > 0) keep = std::min<size_t>(keep, rp.top_k);
    const double inv_t = 1.0 / static_cast<double>(rp.temperature);
    const double mx = x[order[0]];
    std::vector<double> w(keep);
    double sum = 0;
    for (size_t i = 0; i < keep; ++i) sum += (w[i] = std::exp((static_cast<double>(x[order[i]]) - mx) * inv_t));
    if (rp.top_p < 1.0f) {  // the shortest prefix whose mass reaches top_p
      double acc = 0;
      for (size_t i = 0; i < keep; ++i) {
        acc += w[i];
        if (acc >= static_cast<double>(rp.top_p) * sum) {
          keep = i + 1;
          break;
        }
      }
    }
    int32_t best = -1;
    double best_score = -INFINITY;
    for (size_t i = 0; i < keep; ++i) {
      const int32_t t = order[i];
      const double u = SampleUniform(rp.seed, t);
      const double score = (static_cast<double>(x[t]) - mx) * inv_t - std::log(-std::log(u));
      if (best < 0 || score > best_score || (score == best_score && t < best)) {
        best = t;
        best_score = score;
      }
    }
    p.out[r] = best;
  }
}

}  // namespace scout::kernels
