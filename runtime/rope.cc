#include "runtime/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace scout::runtime {
namespace {

// transformers' _compute_yarn_parameters: a ramp over the dimensions between the one that turns
// beta_fast times and the one that turns beta_slow times over the original context mixes
// extrapolated frequencies (fast dimensions kept) with interpolated ones (slow dimensions divided
// by factor). Float32 where torch computes in float32, double where Python does.
std::vector<float> YarnInvFreq(const RopeConfig& rope, int64_t head_dim, const std::vector<float>& extrapolation) {
  const int64_t half = head_dim / 2;
  const double dim = static_cast<double>(head_dim), base = rope.theta;
  const double orig = static_cast<double>(rope.original_max_position_embeddings);
  auto correction_dim = [&](double rotations) {
    return dim * std::log(orig / (rotations * 2 * std::numbers::pi)) / (2 * std::log(base));
  };
  double low = correction_dim(rope.beta_fast), high = correction_dim(rope.beta_slow);
  if (rope.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, dim - 1);
  if (low == high) high += 0.001;  // avoids a division by zero, as transformers does
  const float lo = static_cast<float>(low), span = static_cast<float>(high - low);
  const float factor = static_cast<float>(rope.factor);
  std::vector<float> inv(half);
  for (int64_t i = 0; i < half; ++i) {
    // pos_freqs = base ** (2i / dim); extrapolation = 1 / pos_freqs; interpolation = 1 / (factor * pos_freqs)
    const float pos_freq = std::pow(static_cast<float>(base), static_cast<float>(2 * i) / static_cast<float>(head_dim));
    const float interpolation = 1.0f / (factor * pos_freq);
    const float ramp = std::clamp((static_cast<float>(i) - lo) / span, 0.0f, 1.0f);
    const float extrapolation_factor = 1.0f - ramp;
    inv[i] = interpolation * (1.0f - extrapolation_factor) + extrapolation[i] * extrapolation_factor;
  }
  return inv;
}

}  // namespace

float RopeAttentionScaling(const RopeConfig& rope) {
  if (rope.type != "yarn") return 1.0f;
  if (rope.attention_factor > 0) return static_cast<float>(rope.attention_factor);
  auto mscale = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
  if (rope.mscale != 0 && rope.mscale_all_dim != 0) {
    return static_cast<float>(mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim));
  }
  return static_cast<float>(mscale(rope.factor, 1.0));
}

std::vector<float> RopeInvFreq(const RopeConfig& rope, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  std::vector<float> inv(half);
  const float base = static_cast<float>(rope.theta);
  for (int64_t i = 0; i < half; ++i) {
    float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[i] = 1.0f / std::pow(base, e);
  }
  if (rope.type == "linear") {
    for (float& f : inv) f /= static_cast<float>(rope.factor);
    return inv;
  }
  if (rope.type == "yarn") return YarnInvFreq(rope, head_dim, inv);
  if (rope.type != "llama3") return inv;
  const float factor = static_cast<float>(rope.factor);
  const float lo = static_cast<float>(rope.low_freq_factor), hi = static_cast<float>(rope.high_freq_factor);
  const float old_len = static_cast<float>(rope.original_max_position_embeddings);
  const float low_freq_wavelen = old_len / lo, high_freq_wavelen = old_len / hi;
  for (int64_t i = 0; i < half; ++i) {
    const float wavelen = 2.0f * std::numbers::pi_v<float> / inv[i];
    float f = wavelen > low_freq_wavelen ? inv[i] / factor : inv[i];
    if (!(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen)) {
      const float smooth = (old_len / wavelen - lo) / (hi - lo);
      f = (1.0f - smooth) * f / factor + smooth * f;
    }
    inv[i] = f;
  }
  return inv;
}

void ApplyRope(float* x, int num_heads, int head_dim, int64_t pos, const std::vector<float>& inv_freq,
               float attention_scaling) {
  const int half = head_dim / 2;
  const float p = static_cast<float>(pos);
  for (int i = 0; i < half; ++i) {
    const float angle = p * inv_freq[i];
    const float c = std::cos(angle) * attention_scaling, s = std::sin(angle) * attention_scaling;
    for (int h = 0; h < num_heads; ++h) {
      float* v = x + int64_t{h} * head_dim;
      const float a = v[i], b = v[i + half];
      v[i] = a * c - b * s;
      v[i + half] = b * c + a * s;
    }
  }
}

}  // namespace scout::runtime
