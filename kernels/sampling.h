// Sampling the next token on the GPU: greedy, temperature, top-k, top-p, seeded. The kept set is
// the host Sampler's (runtime/sampling.h): logits ordered by value, ties to the lower index; the
// top_k first of them; of those, the shortest prefix whose softmax mass reaches top_p (sums in
// another order: a row whose prefix mass lands within rounding of top_p may keep one token more
// or less).
// The draw among the kept tokens is the Gumbel-max trick with counter-based uniforms, so a row's
// token depends only on its logits, its parameters and its seed (not on the batch around it):
//   token = argmax over kept i of (l_i - max) / T - log(-log(u_i)),  u_i = RandomUniform(seed, i)
// which is an exact sample of softmax(l / T) restricted to the kept set.
#pragma once

#include <cstdint>

namespace scout::kernels {

struct SampleRowParams {
  float temperature = 0.0f;  // 0: greedy (the largest logit, lowest index on ties)
  int top_k = 0;             // 0: no limit
  float top_p = 1.0f;        // in (0, 1]
  uint64_t seed = 0;
};

struct SampleParams {
  const float* logits = nullptr;          // [rows][vocab], finite
  const SampleRowParams* row = nullptr;   // [rows]
  int32_t* out = nullptr;                 // [rows]
  int rows = 0;
  int vocab = 0;
};

// The uniform u_i of token i for `seed`, in [0, 1).
float SampleUniform(uint64_t seed, int64_t i);

// Plain C++ reference: sorts, keeps, draws as specified above (double precision throughout).
void SampleRef(const SampleParams& p);

}  // namespace scout::kernels
