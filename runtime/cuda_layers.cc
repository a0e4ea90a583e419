#include "runtime/cuda_layers.h"

#ifdef SCOUT_HAVE_NCCL
#include <nccl.h>
#endif

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/bf16.h"
#include "kernels/model_ops.cuh"
#include "kernels/prefill_attention.cuh"
#include "kernels/santa.cuh"
#include "kernels/sparse_decode.cuh"
#include "runtime/rope.h"

namespace scout::runtime::cuda {
namespace {

absl::Status BlasStatus(cublasStatus_t s, absl::string_view what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  if (s == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(absl::StrCat(what, ": cuBLAS out of memory"));
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(s)));
}

}  // namespace

LayerStack::~LayerStack() {
  if (blas_ != nullptr) cublasDestroy(blas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status LayerStack::Init(const ModelConfig& config, const CudaModelOptions& o) {
  c_ = config;
  device_ = o.device;
  tp_rank_ = o.tp_rank;
  tp_size_ = o.tp_size;
  if (tp_size_ < 1 || tp_rank_ < 0 || tp_rank_ >= tp_size_) {
    return absl::InvalidArgumentError(absl::StrCat("tensor-parallel rank ", tp_rank_, " of ", tp_size_));
  }
  for (auto [n, what] : {std::pair{c_.num_attention_heads, "num_attention_heads"},
                         std::pair{c_.num_key_value_heads, "num_key_value_heads"},
                         std::pair{c_.intermediate_size, "intermediate_size"}}) {
    if (n % tp_size_ != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor-parallel size ", tp_size_, " does not divide ", what, " = ", n));
    }
  }
  lc_ = c_;
  lc_.num_attention_heads /= tp_size_;
  lc_.num_key_value_heads /= tp_size_;
  lc_.intermediate_size /= tp_size_;
  if (tp_size_ > 1) {
#ifdef SCOUT_HAVE_NCCL
    if (o.nccl_comm == nullptr) return absl::InvalidArgumentError("tensor parallelism needs an NCCL communicator");
    comm_ = o.nccl_comm;
#else
    return absl::UnimplementedError("tensor parallelism needs a build with NCCL");
#endif
  }
  int count = 0;
  SCOUT_RETURN_IF_CUDA(cudaGetDeviceCount(&count), "CUDA device query");
  if (device_ < 0 || device_ >= count) {
    return absl::UnavailableError(absl::StrCat("CUDA device ", device_, " requested, ", count, " present"));
  }
  SCOUT_RETURN_IF_CUDA(cudaSetDevice(device_), "cudaSetDevice");
  SCOUT_RETURN_IF_CUDA(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device_), "SM count");
  SCOUT_RETURN_IF_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream");
  SCOUT_RETURN_IF_ERROR(BlasStatus(cublasCreate(&blas_), "cublasCreate"));
  SCOUT_RETURN_IF_ERROR(BlasStatus(cublasSetStream(blas_, stream_), "cublasSetStream"));
  // A fixed workspace keeps cuBLAS from allocating inside a graph capture.
  SCOUT_RETURN_IF_ERROR(blas_workspace_.Reserve(size_t{32} << 20, "cuBLAS workspace"));
  SCOUT_RETURN_IF_ERROR(
      BlasStatus(cublasSetWorkspace(blas_, blas_workspace_.ptr, blas_workspace_.bytes), "cublasSetWorkspace"));
  rope_scaling_ = RopeAttentionScaling(c_.rope);
  std::vector<float> inv = RopeInvFreq(c_.rope, c_.head_dim);
  SCOUT_RETURN_IF_ERROR(inv_freq_.Reserve(inv.size() * sizeof(float), "RoPE frequencies"));
  SCOUT_RETURN_IF_CUDA(cudaMemcpy(inv_freq_.ptr, inv.data(), inv.size() * sizeof(float), cudaMemcpyHostToDevice),
                       "upload");
  return absl::OkStatus();
}

absl::Status LayerStack::AllocWeights() {
  const int64_t d = lc_.hidden_size, hd = lc_.head_dim, nh = lc_.num_attention_heads, nkv = lc_.num_key_value_heads;
  const int64_t inter = lc_.intermediate_size, vocab = lc_.vocab_size;
  const size_t b = sizeof(uint16_t);
  SCOUT_RETURN_IF_ERROR(embed_.Reserve(vocab * d * b, "embedding"));
  if (!c_.tie_word_embeddings) SCOUT_RETURN_IF_ERROR(lm_head_.Reserve(vocab * d * b, "lm_head"));
  SCOUT_RETURN_IF_ERROR(norm_.Reserve(d * sizeof(float), "final norm"));
  layers_ = std::vector<LayerWeights>(c_.num_hidden_layers);
  for (LayerWeights& l : layers_) {
    SCOUT_RETURN_IF_ERROR(l.attn_norm.Reserve(d * sizeof(float), "attention norm"));
    SCOUT_RETURN_IF_ERROR(l.wqkv.Reserve((nh + 2 * nkv) * hd * d * b, "qkv projection"));
    SCOUT_RETURN_IF_ERROR(l.wo.Reserve(d * nh * hd * b, "output projection"));
    SCOUT_RETURN_IF_ERROR(l.mlp_norm.Reserve(d * sizeof(float), "MLP norm"));
    SCOUT_RETURN_IF_ERROR(l.w_gate_up.Reserve(2 * inter * d * b, "gate/up projection"));
    SCOUT_RETURN_IF_ERROR(l.w_down.Reserve(d * inter * b, "down projection"));
    if (c_.qkv_bias) SCOUT_RETURN_IF_ERROR(l.bqkv.Reserve((nh + 2 * nkv) * hd * sizeof(float), "qkv bias"));
    if (c_.o_bias) SCOUT_RETURN_IF_ERROR(l.bo.Reserve(d * sizeof(float), "output bias"));
  }
  weight_bytes_ = (c_.tie_word_embeddings ? 1 : 2) * vocab * d * b +
                  c_.num_hidden_layers * ((nh + 2 * nkv) * hd * d + d * nh * hd + 3 * inter * d) * b;
  return absl::OkStatus();
}

absl::Status LayerStack::UploadWeights(const LlamaWeights& weights) {
  auto upload_bf16 = [](const std::vector<float>& v, DeviceBuffer& dst) -> absl::Status {
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = kernels::FloatToBf16(v[i]);
    SCOUT_RETURN_IF_CUDA(cudaMemcpy(dst.ptr, b.data(), b.size() * 2, cudaMemcpyHostToDevice), "weight upload");
    return absl::OkStatus();
  };
  auto upload_f32 = [](const std::vector<float>& v, DeviceBuffer& dst) -> absl::Status {
    SCOUT_RETURN_IF_CUDA(cudaMemcpy(dst.ptr, v.data(), v.size() * 4, cudaMemcpyHostToDevice), "weight upload");
    return absl::OkStatus();
  };
  SCOUT_RETURN_IF_ERROR(upload_bf16(weights.embed, embed_));
  if (!c_.tie_word_embeddings) {
    SCOUT_RETURN_IF_ERROR(upload_bf16(weights.lm_head.empty() ? weights.embed : weights.lm_head, lm_head_));
  }
  SCOUT_RETURN_IF_ERROR(upload_f32(weights.norm, norm_));
  // This shard's slices: rows of [out][in] matrices for split outputs (q, k, v heads; gate and
  // up columns), columns for split inputs (the attention output and MLP projections).
  const int64_t dm = c_.hidden_size, hd = c_.head_dim, r = tp_rank_;
  const int64_t nh = lc_.num_attention_heads, nkv = lc_.num_key_value_heads, inter = lc_.intermediate_size;
  const int64_t nh_all = c_.num_attention_heads, nkv_all = c_.num_key_value_heads;
  auto rows = [](const std::vector<float>& m, int64_t cols, std::initializer_list<std::pair<int64_t, int64_t>> ranges) {
    std::vector<float> out;
    for (auto [begin, count] : ranges) out.insert(out.end(), m.begin() + begin * cols, m.begin() + (begin + count) * cols);
    return out;
  };
  auto cols = [](const std::vector<float>& m, int64_t n_rows, int64_t n_cols, int64_t begin, int64_t count) {
    std::vector<float> out(n_rows * count);
    for (int64_t i = 0; i < n_rows; ++i) std::copy_n(m.begin() + i * n_cols + begin, count, out.begin() + i * count);
    return out;
  };
  const std::initializer_list<std::pair<int64_t, int64_t>> qkv_rows = {
      {r * nh * hd, nh * hd}, {(nh_all + r * nkv) * hd, nkv * hd}, {(nh_all + nkv_all + r * nkv) * hd, nkv * hd}};
  for (int64_t l = 0; l < c_.num_hidden_layers; ++l) {
    const LlamaLayerWeights& w = weights.layers[l];
    LayerWeights& d = layers_[l];
    SCOUT_RETURN_IF_ERROR(upload_f32(w.attn_norm, d.attn_norm));
    SCOUT_RETURN_IF_ERROR(upload_f32(w.mlp_norm, d.mlp_norm));
    if (c_.o_bias) SCOUT_RETURN_IF_ERROR(upload_f32(w.bo, d.bo));
    if (c_.qkv_bias) SCOUT_RETURN_IF_ERROR(upload_f32(tp_size_ == 1 ? w.bqkv : rows(w.bqkv, 1, qkv_rows), d.bqkv));
    if (tp_size_ == 1) {
      SCOUT_RETURN_IF_ERROR(upload_bf16(w.wqkv, d.wqkv));
      SCOUT_RETURN_IF_ERROR(upload_bf16(w.wo, d.wo));
      SCOUT_RETURN_IF_ERROR(upload_bf16(w.w_gate_up, d.w_gate_up));
      SCOUT_RETURN_IF_ERROR(upload_bf16(w.w_down, d.w_down));
      continue;
    }
    SCOUT_RETURN_IF_ERROR(upload_bf16(rows(w.wqkv, dm, qkv_rows), d.wqkv));
    SCOUT_RETURN_IF_ERROR(upload_bf16(cols(w.wo, dm, nh_all * hd, r * nh * hd, nh * hd), d.wo));
    SCOUT_RETURN_IF_ERROR(
        upload_bf16(rows(w.w_gate_up, dm, {{r * inter, inter}, {c_.intermediate_size + r * inter, inter}}), d.w_gate_up));
    SCOUT_RETURN_IF_ERROR(upload_bf16(cols(w.w_down, dm, c_.intermediate_size, r * inter, inter), d.w_down));
  }
  return absl::OkStatus();
}

absl::Status LayerStack::WriteWeights(const CudaModel::WeightWriter& write) {
  using Kind = CudaModel::WeightTensor::Kind;
  auto put = [&](Kind kind, int layer, DeviceBuffer& b, bool bf16, int64_t fan_in) -> absl::Status {
    if (b.ptr == nullptr) return absl::OkStatus();
    return write({.kind = kind, .layer = layer, .data = b.ptr,
                  .elements = static_cast<int64_t>(b.bytes / (bf16 ? 2 : 4)), .bf16 = bf16, .fan_in = fan_in},
                 stream_);
  };
  const int64_t d = c_.hidden_size;
  SCOUT_RETURN_IF_ERROR(put(Kind::kEmbedding, -1, embed_, true, 1));
  SCOUT_RETURN_IF_ERROR(put(Kind::kLmHead, -1, lm_head_, true, d));
  SCOUT_RETURN_IF_ERROR(put(Kind::kFinalNorm, -1, norm_, false, d));
  for (int l = 0; l < static_cast<int>(layers_.size()); ++l) {
    LayerWeights& w = layers_[l];
    SCOUT_RETURN_IF_ERROR(put(Kind::kQkvBias, l, w.bqkv, false, d));
    SCOUT_RETURN_IF_ERROR(put(Kind::kOutBias, l, w.bo, false, c_.num_attention_heads * c_.head_dim));
    SCOUT_RETURN_IF_ERROR(put(Kind::kAttentionNorm, l, w.attn_norm, false, d));
    SCOUT_RETURN_IF_ERROR(put(Kind::kMlpNorm, l, w.mlp_norm, false, d));
    SCOUT_RETURN_IF_ERROR(put(Kind::kQkv, l, w.wqkv, true, d));
    SCOUT_RETURN_IF_ERROR(put(Kind::kOut, l, w.wo, true, c_.num_attention_heads * c_.head_dim));
    SCOUT_RETURN_IF_ERROR(put(Kind::kGateUp, l, w.w_gate_up, true, d));
    SCOUT_RETURN_IF_ERROR(put(Kind::kDown, l, w.w_down, true, c_.intermediate_size));
  }
  SCOUT_RETURN_IF_CUDA(cudaStreamSynchronize(stream_), "weights");
  return absl::OkStatus();
}

absl::Status LayerStack::Reserve(const StepSizes& s) {
  const int64_t d = lc_.hidden_size, hd = lc_.head_dim, nh = lc_.num_attention_heads, nkv = lc_.num_key_value_heads;
  const int64_t inter = lc_.intermediate_size, vocab = lc_.vocab_size, T = s.rows, R = s.logit_rows;
  DeviceBuffer* const per_step[] = {&x_,      &h_,     &qkv_,     &q_,       &attn_, &gu_,      &act_,
                                    &final_x_, &final_h_, &logits_, &lse_, &block_lse_, &attn_ws_, &mass_,
                                    &partial_, &merge_counters_};
  void* before[std::size(per_step)];
  for (size_t i = 0; i < std::size(per_step); ++i) before[i] = per_step[i]->ptr;
  SCOUT_RETURN_IF_ERROR(x_.Reserve(T * d * 4, "activations"));
  if (tp_size_ > 1) SCOUT_RETURN_IF_ERROR(partial_.Reserve(T * d * 4, "activations"));
  SCOUT_RETURN_IF_ERROR(h_.Reserve(T * std::max(d, nh * hd) * 2, "activations"));
  SCOUT_RETURN_IF_ERROR(qkv_.Reserve(T * (nh + 2 * nkv) * hd * 4, "activations"));
  SCOUT_RETURN_IF_ERROR(q_.Reserve(T * nh * hd * 2, "activations"));
  SCOUT_RETURN_IF_ERROR(attn_.Reserve(T * nh * hd * 2, "activations"));
  SCOUT_RETURN_IF_ERROR(gu_.Reserve(T * 2 * inter * 4, "activations"));
  SCOUT_RETURN_IF_ERROR(act_.Reserve(T * inter * 2, "activations"));
  SCOUT_RETURN_IF_ERROR(final_x_.Reserve(R * d * 4, "activations"));
  SCOUT_RETURN_IF_ERROR(final_h_.Reserve(R * d * 2, "activations"));
  SCOUT_RETURN_IF_ERROR(logits_.Reserve(R * vocab * 4, "logits"));
  SCOUT_RETURN_IF_ERROR(lse_.Reserve(T * nh * 4, "log-sum-exp"));
  if (s.fused_mass) SCOUT_RETURN_IF_ERROR(block_lse_.Reserve(T * nh * s.table_blocks * 4, "block log-sum-exp"));
  SCOUT_RETURN_IF_ERROR(attn_ws_.Reserve(std::max<size_t>(s.attention_workspace, 16), "attention workspace"));
  if (const size_t n = sizeof(unsigned int) * std::max(s.merge_counters, 1); n > merge_counters_.bytes) {
    SCOUT_RETURN_IF_ERROR(merge_counters_.Reserve(n, "attention merge counters"));
    // On the model's stream (non-blocking: it does not wait for the legacy default stream).
    SCOUT_RETURN_IF_CUDA(cudaMemsetAsync(merge_counters_.ptr, 0, n, stream_), "attention merge counters");
  }
  if (s.host_mass_floats > 0) SCOUT_RETURN_IF_ERROR(mass_.Reserve(s.host_mass_floats * 4, "block mass"));
  for (size_t i = 0; i < std::size(per_step); ++i) {
    if (per_step[i]->ptr != before[i]) ++generation_;
  }
  return absl::OkStatus();
}

absl::Status LayerStack::Gemm(const void* w, const void* x_bf16, float* y, int64_t rows, int64_t in, int64_t out,
                              float beta) {
  if (rows <= 2 && in % 8 == 0) {
    // Decode steps of one or two rows: the weight streamed once by the GEMV; from a few rows
    // on cuBLAS is faster, as the GEMV re-reads x once per row (docs/BENCHMARKS.md).
    SCOUT_RETURN_IF_CUDA(kernels::Gemv({.w = static_cast<const uint16_t*>(w), .x = static_cast<const uint16_t*>(x_bf16),
                                        .y = y, .rows = static_cast<int>(rows), .in = static_cast<int>(in),
                                        .out = static_cast<int>(out), .beta = beta},
                                       stream_),
                         "GEMV");
    return absl::OkStatus();
  }
  const float alpha = 1.0f;
  // Row-major y[rows][out] = x . w^T is column-major y^T[out][rows] = w^T(op T of [in][out]) . x^T.
  return BlasStatus(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(rows),
                                 static_cast<int>(in), &alpha, w, CUDA_R_16BF, static_cast<int>(in), x_bf16, CUDA_R_16BF,
                                 static_cast<int>(in), &beta, y, CUDA_R_32F, static_cast<int>(out), CUBLAS_COMPUTE_32F,
                                 CUBLAS_GEMM_DEFAULT),
                    "GEMM");
}

absl::Status LayerStack::ProjectAndReduce(const void* w, const void* in_bf16, int64_t rows, int64_t in, int64_t out) {
  if (tp_size_ == 1) return Gemm(w, in_bf16, x_.as<float>(), rows, in, out, 1.0f);
#ifdef SCOUT_HAVE_NCCL
  SCOUT_RETURN_IF_ERROR(Gemm(w, in_bf16, partial_.as<float>(), rows, in, out, 0.0f));
  if (ncclResult_t r = ncclAllReduce(partial_.ptr, partial_.ptr, rows * out, ncclFloat, ncclSum,
                                     static_cast<ncclComm_t>(comm_), stream_);
      r != ncclSuccess) {
    return absl::InternalError(absl::StrCat("NCCL all-reduce: ", ncclGetErrorString(r)));
  }
  const float one = 1.0f;
  return BlasStatus(cublasSaxpy(blas_, static_cast<int>(rows * out), &one, partial_.as<float>(), 1, x_.as<float>(), 1),
                    "residual add");
#else
  return absl::UnimplementedError("tensor parallelism needs a build with NCCL");
#endif
}

absl::Status LayerStack::EnqueueStep(const LayerStep& s, KvPlacement& kv) {
  SCOUT_RETURN_IF_CUDA(kernels::Embed({.table = embed_.as<uint16_t>(), .tokens = s.tokens, .out = x_.as<float>(),
                                       .rows = static_cast<int>(s.rows), .dim = static_cast<int>(lc_.hidden_size)},
                                      stream_),
                       "embedding");
  SCOUT_RETURN_IF_ERROR(kv.BeginTransfers(stream_));
  for (int layer = 0; layer < static_cast<int>(lc_.num_hidden_layers); ++layer) {
    SCOUT_RETURN_IF_ERROR(AttentionBlock(s, layer, kv));
    SCOUT_RETURN_IF_ERROR(MlpBlock(s, layer));
  }
  SCOUT_RETURN_IF_ERROR(kv.EndStep(stream_));
  return Logits(s);
}

absl::Status LayerStack::AttentionBlock(const LayerStep& s, int layer, KvPlacement& kv) {
  const int64_t d = lc_.hidden_size, hd = lc_.head_dim, nh = lc_.num_attention_heads, nkv = lc_.num_key_value_heads;
  const int T = static_cast<int>(s.rows);
  const LayerWeights& w = layers_[layer];
  SCOUT_RETURN_IF_CUDA(kernels::RmsNorm({.x = x_.as<float>(), .weight = w.attn_norm.as<float>(), .out = h_.as<uint16_t>(),
                                         .rows = T, .dim = static_cast<int>(d), .eps = static_cast<float>(c_.rms_norm_eps)},
                                        stream_),
                       "RMSNorm");
  SCOUT_RETURN_IF_ERROR(Gemm(w.wqkv.ptr, h_.ptr, qkv_.as<float>(), T, d, (nh + 2 * nkv) * hd, 0.0f));
  absl::StatusOr<LayerKv> lkv = kv.Layer(layer, s.kv_index, stream_);
  if (!lkv.ok()) return lkv.status();
  SCOUT_RETURN_IF_CUDA(kernels::RopeAppend({.qkv = qkv_.as<float>(), .positions = s.positions, .phys_blocks = s.phys,
                                            .inv_freq = inv_freq_.as<float>(), .q = q_.as<uint16_t>(), .kv = lkv->kv,
                                            .rows = T, .num_heads = static_cast<int>(nh),
                                            .num_kv_heads = static_cast<int>(nkv), .head_dim = static_cast<int>(hd),
                                            .bias = w.bqkv.ptr != nullptr ? w.bqkv.as<float>() : nullptr,
                                            .attention_scaling = rope_scaling_, .unit_slots = lkv->unit_slots},
                                           stream_),
                       "RoPE and KV append");
  kernels::SparseDecodeParams ap{.q = q_.as<uint16_t>(), .out = attn_.as<uint16_t>(), .kv = lkv->kv,
                                 .q_indptr = s.q_indptr, .seq_lens = s.seq_lens, .block_table = s.block_table,
                                 .max_blocks_per_seq = s.table_blocks, .num_seqs = static_cast<int>(s.batch.size()),
                                 .num_heads = static_cast<int>(nh), .num_kv_heads = static_cast<int>(nkv),
                                 .head_dim = static_cast<int>(hd), .scale = 1.0f / std::sqrt(static_cast<float>(hd))};
  ap.sliding_window = static_cast<int>(c_.SlidingWindow(layer));  // 0 on full-attention layers
  if (s.lists.indptr != nullptr) SetLists(ap, s.lists, layer, s.list_head_offset);
  const bool want_mass = s.host_mass || s.block_mass != nullptr;
  if (want_mass) ap.lse = lse_.as<float>();
  if (s.fused_mass) {  // the attention writes each block's log-sum-exp: the mass needs no key reads
    ap.block_lse = block_lse_.as<float>();
    ap.block_lse_stride = s.table_blocks;
  }
  if (!s.skip_attention) {  // (skipped: a benchmark variant without the attention kernel)
    SCOUT_RETURN_IF_ERROR(kv.Attend(
        layer, ap, [&](const kernels::SparseDecodeParams& p) { return Attention(s, layer, p); }, stream_));
    if (want_mass) SCOUT_RETURN_IF_ERROR(WriteBlockMass(s, layer, ap));
  }
  SCOUT_RETURN_IF_ERROR(ProjectAndReduce(w.wo.ptr, attn_.ptr, T, nh * hd, d));  // + residual
  if (w.bo.ptr != nullptr) {  // after the all-reduce: added once to the replicated stream
    SCOUT_RETURN_IF_CUDA(
        kernels::AddBias({.y = x_.as<float>(), .bias = w.bo.as<float>(), .rows = T, .n = static_cast<int>(d)}, stream_),
        "output bias");
  }
  return absl::OkStatus();
}

absl::Status LayerStack::Attention(const LayerStep& s, int layer, const kernels::SparseDecodeParams& ap) {
  if (s.santa_samples > 0) {
    kernels::SantaParams sp{.attn = ap, .samples = s.santa_samples,
                            .seed = s.santa_seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(layer)};
    SCOUT_RETURN_IF_CUDA(kernels::Santa(sp, *s.santa_plan, attn_ws_.ptr, stream_), "SANTA attention");
  } else if (s.prefill_kernel && kernels::PrefillAttentionSupports(ap)) {
    SCOUT_RETURN_IF_CUDA(kernels::PrefillAttention(ap, static_cast<int>(s.rows), stream_), "prefill attention");
  } else {
    SCOUT_RETURN_IF_CUDA(kernels::SparseDecode(ap, *s.plan, attn_ws_.ptr, stream_, merge_counters_.as<unsigned int>()),
                         "attention");
  }
  return absl::OkStatus();
}

absl::Status LayerStack::WriteBlockMass(const LayerStep& s, int layer, const kernels::SparseDecodeParams& ap) {
  kernels::BlockMassParams mp{.attn = ap};
  if (s.block_mass != nullptr) {
    const DeviceBlockMass& m = *s.block_mass;
    mp.mass = m.mass + layer * m.layer_stride;
    mp.mass_seq_stride = m.seq_stride;
    mp.mass_token_stride = m.token_stride;
    mp.mass_head_stride = m.head_stride;
    mp.mass_head_offset = static_cast<int>(layer * m.layer_head_offset);
  } else {  // [seqs][layers][heads][max_q][max_blocks]
    const int64_t per_layer = lc_.num_attention_heads * s.max_q * s.max_blocks;
    mp.mass = mass_.as<float>() + layer * per_layer;
    mp.mass_seq_stride = lc_.num_hidden_layers * per_layer;
    mp.mass_token_stride = s.max_blocks;
    mp.mass_head_stride = static_cast<int64_t>(s.max_q) * s.max_blocks;
  }
  SCOUT_RETURN_IF_CUDA(
      kernels::BlockMass(mp, ap.sel_indptr != nullptr ? s.max_list : s.max_blocks, s.max_q, stream_), "block mass");
  return absl::OkStatus();
}

absl::Status LayerStack::MlpBlock(const LayerStep& s, int layer) {
  const int64_t d = lc_.hidden_size, inter = lc_.intermediate_size;
  const int T = static_cast<int>(s.rows);
  const LayerWeights& w = layers_[layer];
  SCOUT_RETURN_IF_CUDA(kernels::RmsNorm({.x = x_.as<float>(), .weight = w.mlp_norm.as<float>(), .out = h_.as<uint16_t>(),
                                         .rows = T, .dim = static_cast<int>(d), .eps = static_cast<float>(c_.rms_norm_eps)},
                                        stream_),
                       "RMSNorm");
  SCOUT_RETURN_IF_ERROR(Gemm(w.w_gate_up.ptr, h_.ptr, gu_.as<float>(), T, d, 2 * inter, 0.0f));
  SCOUT_RETURN_IF_CUDA(
      kernels::SiluMul({.gate_up = gu_.as<float>(), .out = act_.as<uint16_t>(), .rows = T, .inter = static_cast<int>(inter)},
                       stream_),
      "SwiGLU");
  return ProjectAndReduce(w.w_down.ptr, act_.ptr, T, inter, d);  // + residual
}

absl::Status LayerStack::Logits(const LayerStep& s) {
  const int64_t d = lc_.hidden_size, vocab = lc_.vocab_size, R = s.logit_rows;
  // The rows whose logits are wanted, in runs of consecutive rows.
  int64_t row = 0, out = 0;
  for (const SequenceInput& in : s.batch) {
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    const int64_t first = in.all_logits ? 0 : n - 1;
    SCOUT_RETURN_IF_CUDA(cudaMemcpyAsync(final_x_.as<float>() + out * d, x_.as<float>() + (row + first) * d,
                                         (n - first) * d * 4, cudaMemcpyDeviceToDevice, stream_),
                         "logit rows");
    out += n - first;
    row += n;
  }
  SCOUT_RETURN_IF_CUDA(kernels::RmsNorm({.x = final_x_.as<float>(), .weight = norm_.as<float>(),
                                         .out = final_h_.as<uint16_t>(), .rows = static_cast<int>(R),
                                         .dim = static_cast<int>(d), .eps = static_cast<float>(c_.rms_norm_eps)},
                                        stream_),
                       "final norm");
  SCOUT_RETURN_IF_ERROR(
      Gemm(c_.tie_word_embeddings ? embed_.ptr : lm_head_.ptr, final_h_.ptr, logits_.as<float>(), R, d, vocab, 0.0f));
  if (s.argmax != nullptr) {
    SCOUT_RETURN_IF_CUDA(kernels::Argmax({.logits = logits_.as<float>(), .out = s.argmax, .rows = static_cast<int>(R),
                                          .vocab = static_cast<int>(vocab)},
                                         stream_),
                         "argmax");
  }
  return absl::OkStatus();
}

}  // namespace scout::runtime::cuda
