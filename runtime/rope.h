// Rotary position embedding as Hugging Face Llama computes it (rotate-half pairing, float32 angles).
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/model_config.h"

namespace scout::runtime {

// head_dim / 2 inverse frequencies, with llama3 scaling applied when configured. Computed in
// float32 as transformers does, so angles at long positions round the same way.
std::vector<float> RopeInvFreq(const RopeConfig& rope, int64_t head_dim);

// Rotates num_heads vectors of head_dim floats (contiguous) for position pos, in place:
// x[i], x[i + head_dim/2] form the pair of frequency i.
void ApplyRope(float* x, int num_heads, int head_dim, int64_t pos, const std::vector<float>& inv_freq);

}  // namespace scout::runtime
