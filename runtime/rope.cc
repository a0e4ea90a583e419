#include "runtime/rope.h"

#include <cmath>
#include <numbers>

namespace scout::runtime {

std::vector<float> RopeInvFreq(const RopeConfig& rope, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  std::vector<float> inv(half);
  const float base = static_cast<float>(rope.theta);
  for (int64_t i = 0; i < half; ++i) {
    float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[i] = 1.0f / std::pow(base, e);
  }
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

void ApplyRope(float* x, int num_heads, int head_dim, int64_t pos, const std::vector<float>& inv_freq) {
  const int half = head_dim / 2;
  const float p = static_cast<float>(pos);
  for (int i = 0; i < half; ++i) {
    const float angle = p * inv_freq[i];
    const float c = std::cos(angle), s = std::sin(angle);
    for (int h = 0; h < num_heads; ++h) {
      float* v = x + int64_t{h} * head_dim;
      const float a = v[i], b = v[i + half];
      v[i] = a * c - b * s;
      v[i + half] = b * c + a * s;
    }
  }
}

}  // namespace scout::runtime
