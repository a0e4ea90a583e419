// Rotary position embedding as Hugging Face Llama computes it (rotate-half pairing, float32 angles).
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/model_config.h"

namespace scout::runtime {

// head_dim / 2 inverse frequencies, with linear, llama3 or YaRN scaling applied when configured.
// Computed in float32 as transformers does, so angles at long positions round the same way.
std::vector<float> RopeInvFreq(const RopeConfig& rope, int64_t head_dim);

// The factor transformers multiplies cos and sin by (its rotary embedding's attention_scaling):
// YaRN's attention factor (configured, or 0.1 ln(factor) + 1, or the mscale ratio); 1 for every
// other type. It scales both q and k, so attention logits grow by its square.
float RopeAttentionScaling(const RopeConfig& rope);

// Rotates num_heads vectors of head_dim floats (contiguous) for position pos, in place:
// x[i], x[i + head_dim/2] form the pair of frequency i. cos and sin are multiplied by
// attention_scaling (RopeAttentionScaling) before the rotation.
void ApplyRope(float* x, int num_heads, int head_dim, int64_t pos, const std::vector<float>& inv_freq,
               float attention_scaling = 1.0f);

}  // namespace scout::runtime
