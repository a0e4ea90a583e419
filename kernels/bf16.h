// bfloat16 <-> float32 on the host, as bit patterns (uint16_t).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace scout::kernels {

// memcpy rather than std::bit_cast: this header is also compiled by nvcc in C++17 mode.
inline float Bf16ToFloat(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as PyTorch and __float2bfloat16 do.
inline uint16_t FloatToBf16(float f) {
  if (std::isnan(f)) return 0x7fc0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace scout::kernels
