// CUDA launchers of the model operations declared, with their references, in model_ops.h. Each
// runs on `stream` and returns the launch error (cudaErrorInvalidValue for unsupported shapes).
#pragma once

#include <cuda_runtime.h>

#include "kernels/model_ops.h"

namespace scout::kernels {

cudaError_t Embed(const EmbedParams& p, cudaStream_t stream);
cudaError_t RmsNorm(const RmsNormParams& p, cudaStream_t stream);
// head_dim even and at most 256.
cudaError_t RopeAppend(const RopeAppendParams& p, cudaStream_t stream);
cudaError_t SiluMul(const SiluMulParams& p, cudaStream_t stream);
cudaError_t AddBias(const AddBiasParams& p, cudaStream_t stream);
cudaError_t Argmax(const ArgmaxParams& p, cudaStream_t stream);
// head_dim 64 or 128. max_blocks: the most blocks of any sequence, or with a selection the
// longest list (sizes the grid).
cudaError_t BlockMass(const BlockMassParams& p, int max_blocks, int max_q_tokens, cudaStream_t stream);
cudaError_t RandomFill(const RandomFillParams& p, cudaStream_t stream);
cudaError_t MergeAttention(const MergeAttentionParams& p, cudaStream_t stream);
// cudaErrorInvalidValue unless 1 <= rows <= kGemvMaxRows and in % 8 == 0.
cudaError_t Gemv(const GemvParams& p, cudaStream_t stream);

}  // namespace scout::kernels
