// Internal to the CUDA backend: the model's weights on one GPU (one tensor-parallel shard's)
// and the layer loop, which enqueues a step from token ids to logits on the model's stream.
// The KV it reads and writes is the placement's (cuda_kv_placement.h); the step's index arrays
// are the runner's (cuda_model.cc). Not thread-safe.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "kernels/santa.cuh"
#include "kernels/sparse_decode.cuh"
#include "runtime/cuda_buffers.h"
#include "runtime/cuda_kv_placement.h"
#include "runtime/cuda_model.h"
#include "runtime/llama_weights.h"

namespace scout::runtime::cuda {

struct LayerWeights {
  DeviceBuffer attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down;  // norms float32, matrices bf16
  DeviceBuffer bqkv, bo;  // float32 biases where the config has them (Qwen2: bqkv)
};

// One step as the layer loop runs it. Pointers are device pointers, valid when the step runs.
struct LayerStep {
  std::span<const SequenceInput> batch;  // shapes and which rows want logits
  int64_t rows = 0, logit_rows = 0;      // new tokens over the batch; rows whose logits are kept
  const int32_t* tokens = nullptr;       // [rows]
  const int32_t* positions = nullptr;    // [rows]
  const int32_t* phys = nullptr;         // [rows] physical block of each row (resident KV)
  const int32_t* q_indptr = nullptr;     // [seqs + 1]
  const int32_t* seq_lens = nullptr;     // [seqs]
  const int32_t* block_table = nullptr;  // [seqs][table_blocks]
  int table_blocks = 0;
  const int32_t* kv_index = nullptr;     // the placement's entries (KvPlacement::Prepare)
  // The step's lists in device memory (indptr nullptr: dense); this shard's KV heads start at
  // list_head_offset of the view's.
  kvstore::SelectionView lists;
  int list_head_offset = 0;
  int max_q = 0, max_list = 0, max_blocks = 0;
  const kernels::SparseDecodePlan* plan = nullptr;
  const kernels::SantaPlan* santa_plan = nullptr;  // with santa_samples > 0
  int santa_samples = 0;
  uint64_t santa_seed = 0;
  bool prefill_kernel = false;  // the tiled prefill kernel where a layer's attention allows it
  // Block mass: into block_mass (the draft's device layout) or, host_mass, into the stack's
  // mass buffer [seqs][layers][heads][max_q][max_blocks]; fused_mass: from the attention's
  // per-block log-sum-exp.
  const DeviceBlockMass* block_mass = nullptr;
  bool host_mass = false;
  bool fused_mass = false;
  bool skip_attention = false;
  int32_t* argmax = nullptr;
};

// Sizes a step's activation buffers must hold.
struct StepSizes {
  int64_t rows = 0, logit_rows = 0, table_blocks = 0;
  size_t attention_workspace = 0;
  int merge_counters = 0;
  bool fused_mass = false;
  int64_t host_mass_floats = 0;
};

class LayerStack {
 public:
  LayerStack() = default;
  LayerStack(const LayerStack&) = delete;
  LayerStack& operator=(const LayerStack&) = delete;
  ~LayerStack();

  // The device, the shard's shape, the stream and cuBLAS; then weights' room.
  absl::Status Init(const ModelConfig& config, const CudaModelOptions& o);
  absl::Status AllocWeights();
  // This shard's slices of a checkpoint's weights, as bf16 (norms and biases float32).
  absl::Status UploadWeights(const LlamaWeights& weights);
  // Every tensor through `write`, in a fixed order (embedding, lm_head, final norm, then per
  // layer its biases, norms, qkv, output, gate/up and down projections).
  absl::Status WriteWeights(const CudaModel::WeightWriter& write);

  // Grows the activation buffers; bumps generation() when any moves (captured steps that
  // read the old ones are stale).
  absl::Status Reserve(const StepSizes& s);
  // Embedding, every layer (attention over `kv`'s memory), final norm, logits of the wanted
  // rows, argmax; enqueued on stream(), nothing waited for.
  absl::Status EnqueueStep(const LayerStep& s, KvPlacement& kv);

  const ModelConfig& model() const { return c_; }
  const ModelConfig& shard() const { return lc_; }
  int tp_rank() const { return tp_rank_; }
  int tp_size() const { return tp_size_; }
  int device() const { return device_; }
  int sms() const { return sms_; }
  cudaStream_t stream() const { return stream_; }
  uint64_t generation() const { return generation_; }
  size_t weight_bytes() const { return weight_bytes_; }
  float* logits() const { return logits_.as<float>(); }
  const float* host_mass() const { return mass_.as<float>(); }
  void* attention_workspace() const { return attn_ws_.ptr; }
  unsigned int* merge_counters() const { return merge_counters_.as<unsigned int>(); }

 private:
  // y[rows][out] (float32) = x[rows][in] (bf16) . w[out][in]^T (bf16) + beta * y
  absl::Status Gemm(const void* w, const void* x_bf16, float* y, int64_t rows, int64_t in, int64_t out, float beta);
  // x += in . w^T, summed over the tensor-parallel shards (each holds a slice of `in`'s columns).
  absl::Status ProjectAndReduce(const void* w, const void* in_bf16, int64_t rows, int64_t in, int64_t out);
  absl::Status AttentionBlock(const LayerStep& s, int layer, KvPlacement& kv);
  absl::Status Attention(const LayerStep& s, int layer, const kernels::SparseDecodeParams& ap);
  absl::Status WriteBlockMass(const LayerStep& s, int layer, const kernels::SparseDecodeParams& ap);
  absl::Status MlpBlock(const LayerStep& s, int layer);
  absl::Status Logits(const LayerStep& s);

  ModelConfig c_;   // the whole model's shape
  ModelConfig lc_;  // this shard's: heads, KV heads and MLP width divided by tp_size
  int tp_rank_ = 0, tp_size_ = 1;
  void* comm_ = nullptr;  // ncclComm_t, owned by the caller (TensorParallelModel)
  float rope_scaling_ = 1.0f;
  int device_ = 0, sms_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  DeviceBuffer blas_workspace_;
  DeviceBuffer embed_, lm_head_, norm_, inv_freq_;
  std::vector<LayerWeights> layers_;
  size_t weight_bytes_ = 0;
  // Per-step buffers, grown before a step is enqueued (never during a capture).
  DeviceBuffer x_, h_, qkv_, q_, attn_, gu_, act_, final_x_, final_h_, logits_, lse_, block_lse_, attn_ws_, mass_,
      partial_;
  // The attention's in-kernel merge counters: zeroed when allocated, left zero by every launch
  // (kernels::SparseDecode), so steps and graph replays need no memset.
  DeviceBuffer merge_counters_;
  uint64_t generation_ = 0;
};

}  // namespace scout::runtime::cuda
