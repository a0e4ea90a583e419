// CUDA launcher of the token sampling declared, with its reference, in sampling.h.
#pragma once

#include <cuda_runtime.h>

#include "kernels/sampling.h"

namespace scout::kernels {

// One CTA per row; on `stream`. cudaErrorInvalidValue for vocab < 1.
cudaError_t Sample(const SampleParams& p, cudaStream_t stream);

}  // namespace scout::kernels
