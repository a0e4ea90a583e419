#include "runtime/cpu_model.h"

#include <cstring>

#include <cblas.h>

#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/model_ops.h"
#include "kernels/attention_cpu.h"
#include "runtime/batch_check.h"
#include "runtime/rope.h"

namespace scout::runtime {
namespace {

// y[rows][out] = x[rows][in] · W[out][in]ᵀ + beta · y
void Linear(const float* x, int64_t rows, int64_t in, const std::vector<float>& w, int64_t out, float* y,
            float beta = 0.0f) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(out),
              static_cast<int>(in), 1.0f, x, static_cast<int>(in), w.data(), static_cast<int>(in), beta, y,
              static_cast<int>(out));
}

// The norms, bias adds and SiLU are the kernels' references in float32 (kernels/model_ops.h):
// the functions the GPU kernels are tested against.
void RmsNorm(const float* x, int64_t rows, int64_t d, const std::vector<float>& w, float eps, float* y) {
  kernels::RmsNormF32(x, rows, d, w.data(), eps, y);
}

void AddBias(float* y, int64_t rows, const std::vector<float>& b) {
  kernels::AddBiasRef({.y = y, .bias = b.data(), .rows = static_cast<int>(rows), .n = static_cast<int>(b.size())});
}

// Quest's lists for one layer of one sequence: per KV head, the blocks whose keys' per-channel
// bounds give the largest upper bound on a new query's score (sinks and window always), within
// the budget. q: the sequence's n new query rows.
void QuestLists(const kvstore::KvPool& pool, int layer, const std::vector<int32_t>& blocks, const float* q, int64_t n,
                int64_t start, const ModelConfig& c, const StsBudget& budget, std::vector<int32_t>* indptr_out,
                std::vector<int32_t>* blocks_out) {
  const int64_t hd = c.head_dim, nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  std::vector<int32_t>& quest_indptr = *indptr_out;
  std::vector<int32_t>& quest_blocks = *blocks_out;
  const int64_t end = start + n, nb = kvstore::BlocksFor(end);
  // A dense layer's lists name every block.
  const int64_t len =
      budget.IsDenseLayer(layer, c.num_hidden_layers) ? nb : BudgetBlocks(budget, nb);
  const int group = static_cast<int>(nh / nkv);
  std::vector<float> kmin(hd), kmax(hd), score(nb);
  std::vector<int32_t> order(nb);
  quest_indptr.push_back(0);
  for (int64_t kh = 0; kh < nkv; ++kh) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* keys = pool.keys(static_cast<int>(layer), blocks[b], static_cast<int>(kh));
      const int64_t filled = std::min<int64_t>(kvstore::kBlockSize, end - b * kvstore::kBlockSize);
      std::copy_n(keys, hd, kmin.data());
      std::copy_n(keys, hd, kmax.data());
      for (int64_t t = 1; t < filled; ++t) {
        for (int64_t d = 0; d < hd; ++d) {
          kmin[d] = std::min(kmin[d], keys[t * hd + d]);
          kmax[d] = std::max(kmax[d], keys[t * hd + d]);
        }
      }
      float best = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        for (int g = 0; g < group; ++g) {
          const float* qr = q + (t * nh + kh * group + g) * hd;
          float bound = 0;
          for (int64_t d = 0; d < hd; ++d) bound += std::max(qr[d] * kmin[d], qr[d] * kmax[d]);
          best = std::max(best, bound);
        }
      }
      const bool forced = b < budget.sink_blocks || b >= nb - budget.window_blocks;
      score[b] = forced ? INFINITY : best;
    }
    for (int64_t b = 0; b < nb; ++b) order[b] = static_cast<int32_t>(b);
    std::partial_sort(order.begin(), order.begin() + len, order.end(), [&](int32_t a, int32_t b2) {
      return score[a] > score[b2] || (score[a] == score[b2] && a < b2);
    });
    std::sort(order.begin(), order.begin() + len);
    quest_blocks.insert(quest_blocks.end(), order.begin(), order.begin() + len);
    quest_indptr.push_back(static_cast<int32_t>(quest_blocks.size()));
  }
}

}  // namespace

CpuModel::CpuModel(const ModelConfig& config, LlamaWeights weights, std::unique_ptr<kvstore::KvPool> pool)
    : config_(config),
      weights_(std::move(weights)),
      inv_freq_(RopeInvFreq(config.rope, config.head_dim)),
      rope_scaling_(RopeAttentionScaling(config.rope)),
      pool_(std::move(pool)),
      tables_(pool_->shape().num_blocks) {}

absl::StatusOr<std::unique_ptr<CpuModel>> CpuModel::Create(const ModelConfig& config, LlamaWeights weights,
                                                           const CpuModelOptions& options) {
  int64_t tokens = options.kv_budget_tokens > 0 ? options.kv_budget_tokens : 4 * config.max_position_embeddings;
  absl::StatusOr<std::unique_ptr<kvstore::KvPool>> pool = kvstore::KvPool::Create(
      {.num_layers = static_cast<int>(config.num_hidden_layers),
       .num_kv_heads = static_cast<int>(config.num_key_value_heads),
       .head_dim = static_cast<int>(config.head_dim),
       .num_blocks = static_cast<int32_t>(kvstore::BlocksFor(tokens))});
  if (!pool.ok()) return pool.status();
  return std::unique_ptr<CpuModel>(new CpuModel(config, std::move(weights), std::move(*pool)));
}

absl::StatusOr<std::unique_ptr<CpuModel>> CpuModel::Load(const std::filesystem::path& model_dir,
                                                         const CpuModelOptions& options) {
  absl::StatusOr<Checkpoint> ckpt = LoadCheckpoint(model_dir);
  if (!ckpt.ok()) return ckpt.status();
  return Create(ckpt->config, std::move(ckpt->weights), options);
}

absl::StatusOr<int64_t> CpuModel::SequenceLength(SequenceId seq) const {
  const kvstore::BlockTable* t = tables_.Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  return t->num_tokens;
}

size_t CpuModel::kv_unit_bytes() const {
  return size_t{2} * kvstore::kBlockSize * static_cast<size_t>(config_.head_dim) * sizeof(float);
}

absl::Status CpuModel::ExportKv(SequenceId seq, int64_t first_block, int64_t num_blocks, std::byte* out) const {
  const kvstore::BlockTable* t = tables_.Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  if (first_block < 0 || num_blocks < 0 || first_block + num_blocks > static_cast<int64_t>(t->blocks.size())) {
    return absl::OutOfRangeError(absl::StrCat("blocks [", first_block, ", ", first_block + num_blocks, ") of sequence ",
                                              seq, ", which has ", t->blocks.size()));
  }
  const size_t unit = kv_unit_bytes();
  for (int64_t b = first_block; b < first_block + num_blocks; ++b) {
    for (int l = 0; l < config_.num_hidden_layers; ++l) {
      for (int h = 0; h < config_.num_key_value_heads; ++h) {
        std::memcpy(out, pool_->keys(l, t->blocks[b], h), unit);
        out += unit;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CpuModel::ImportKv(SequenceId seq, int64_t num_tokens, const std::byte* data) {
  const kvstore::BlockTable* t = tables_.Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  if (t->num_tokens != 0) {
    return absl::FailedPreconditionError(absl::StrCat("sequence ", seq, " holds ", t->num_tokens,
                                                      " tokens; KV is imported into an empty one"));
  }
  if (num_tokens > config_.max_position_embeddings) {
    return absl::OutOfRangeError(absl::StrCat(num_tokens, " tokens of KV is past max_position_embeddings ",
                                              config_.max_position_embeddings));
  }
  if (absl::Status s = tables_.Grow(seq, num_tokens); !s.ok()) return s;
  if (data == nullptr) return absl::OkStatus();  // filled unit by unit later (WriteKvUnits)
  t = tables_.Find(seq);
  const size_t unit = kv_unit_bytes();
  for (int32_t block : t->blocks) {
    for (int l = 0; l < config_.num_hidden_layers; ++l) {
      for (int h = 0; h < config_.num_key_value_heads; ++h) {
        std::memcpy(pool_->keys(l, block, h), data, unit);
        data += unit;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CpuModel::WriteKvUnits(SequenceId seq, std::span<const KvUnitRef> units, const std::byte* data) {
  const kvstore::BlockTable* t = tables_.Find(seq);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  if (absl::Status s = CheckKvUnits(config_, seq, static_cast<int64_t>(t->blocks.size()), units); !s.ok()) return s;
  const size_t unit = kv_unit_bytes();
  for (size_t i = 0; i < units.size(); ++i) {
    std::memcpy(pool_->keys(units[i].layer, t->blocks[units[i].block], units[i].head), data + i * unit, unit);
  }
  return absl::OkStatus();
}

size_t CpuModel::weight_bytes() const {
  size_t n = weights_.embed.size() + weights_.norm.size() + weights_.lm_head.size();
  for (const LlamaLayerWeights& l : weights_.layers) {
    n += l.attn_norm.size() + l.wqkv.size() + l.bqkv.size() + l.wo.size() + l.bo.size() + l.mlp_norm.size() +
         l.w_gate_up.size() + l.w_down.size();
  }
  return n * sizeof(float);
}

absl::Status CpuModel::Forward(std::span<const SequenceInput> batch, std::vector<float>* logits) {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size, hd = c.head_dim, nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  const int64_t inter = c.intermediate_size, vocab = c.vocab_size;
  // Validate everything before touching any state.
  absl::StatusOr<BatchShape> shape = CheckBatch(c, tables_, batch);
  if (!shape.ok()) return shape.status();
  if (absl::Status s = GrowForBatch(tables_, batch, *shape); !s.ok()) return s;
  const std::vector<int64_t>& start = shape->start;
  const int64_t total = shape->total_tokens, logit_rows = shape->logit_rows;

  const int64_t qkv_dim = (nh + 2 * nkv) * hd;
  std::vector<float> x(total * d), h(total * d), qkv(total * qkv_dim), q(total * nh * hd), attn(total * nh * hd);
  std::vector<float> gu(total * 2 * inter), act(total * inter);
  {
    int64_t row = 0;
    for (const SequenceInput& in : batch) {
      for (int32_t t : in.tokens) std::copy_n(weights_.embed.data() + t * d, d, x.data() + (row++) * d);
    }
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    if (batch[i].block_mass != nullptr) {
      const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
      batch[i].block_mass->assign(c.num_hidden_layers * nh * n * kvstore::BlocksFor(start[i] + n), 0.0f);
    }
  }
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    const LlamaLayerWeights& w = weights_.layers[layer];
    RmsNorm(x.data(), total, d, w.attn_norm, eps, h.data());
    Linear(h.data(), total, d, w.wqkv, qkv_dim, qkv.data());
    if (!w.bqkv.empty()) AddBias(qkv.data(), total, w.bqkv);
    int64_t row = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      const SequenceInput& in = batch[i];
      const std::vector<int32_t>& blocks = tables_.Find(in.seq)->blocks;
      const int64_t n = static_cast<int64_t>(in.tokens.size());
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = start[i] + t;
        float* r = qkv.data() + (row + t) * qkv_dim;
        ApplyRope(r, static_cast<int>(nh + nkv), static_cast<int>(hd), pos, inv_freq_, rope_scaling_);  // q and k heads
        std::copy_n(r, nh * hd, q.data() + (row + t) * nh * hd);
        const int32_t block = blocks[pos / kvstore::kBlockSize];
        const int64_t off = (pos % kvstore::kBlockSize) * hd;
        for (int64_t kh = 0; kh < nkv; ++kh) {
          std::copy_n(r + (nh + kh) * hd, hd, pool_->keys(static_cast<int>(layer), block, static_cast<int>(kh)) + off);
          std::copy_n(r + (nh + nkv + kh) * hd, hd, pool_->values(static_cast<int>(layer), block, static_cast<int>(kh)) + off);
        }
      }
      // Quest-style lists for this layer, from the keys' per-block bounds and the new queries.
      std::vector<int32_t> quest_indptr, quest_blocks;
      if (in.selection == nullptr && in.quest_budget != nullptr) {
        QuestLists(*pool_, static_cast<int>(layer), blocks, q.data() + row * nh * hd, n, start[i], c, *in.quest_budget,
                   &quest_indptr, &quest_blocks);
        if (in.quest_selection != nullptr) {
          kvstore::Selection& out = *in.quest_selection;
          if (layer == 0) out = {.num_layers = static_cast<int>(c.num_hidden_layers), .num_kv_heads = static_cast<int>(nkv),
                                 .indptr = {0}, .blocks = {}};
          for (int64_t kh = 0; kh < nkv; ++kh) {
            out.blocks.insert(out.blocks.end(), quest_blocks.begin() + quest_indptr[kh], quest_blocks.begin() + quest_indptr[kh + 1]);
            out.indptr.push_back(static_cast<int32_t>(out.blocks.size()));
          }
        }
      }
      // The new tokens always see their own blocks, whatever a list names.
      std::vector<int32_t> merged_indptr, merged_blocks;
      if (in.selection != nullptr || !quest_indptr.empty()) {
        const int32_t* ip = in.selection ? in.selection->indptr.data() + layer * nkv : quest_indptr.data();
        const int32_t* bl = in.selection ? in.selection->blocks.data() : quest_blocks.data();
        merged_indptr.push_back(0);
        ListsWithNewBlocks(ip, bl, nkv, start[i], n, &merged_indptr, &merged_blocks);
      }
      const int32_t* sel_indptr = merged_indptr.empty() ? nullptr : merged_indptr.data();
      const int32_t* sel_blocks = merged_indptr.empty() ? nullptr : merged_blocks.data();
      kernels::PagedAttentionCpu({.q = q.data() + row * nh * hd,
                                  .out = attn.data() + row * nh * hd,
                                  .kv_layer = pool_->layer(static_cast<int>(layer)),
                                  .block_table = blocks.data(),
                                  .context_len = start[i] + n,
                                  .num_tokens = static_cast<int>(n),
                                  .num_heads = static_cast<int>(nh),
                                  .num_kv_heads = static_cast<int>(nkv),
                                  .head_dim = static_cast<int>(hd),
                                  .block_size = kvstore::kBlockSize,
                                  .scale = scale,
                                  .sel_indptr = sel_indptr,
                                  .sel_blocks = sel_blocks,
                                  .sliding_window = c.SlidingWindow(layer),
                                  .block_mass = in.block_mass ? in.block_mass->data() + layer * nh * n *
                                                                    kvstore::BlocksFor(start[i] + n)
                                                              : nullptr,
                                  .santa_samples = in.santa_samples,
                                  .santa_seed = in.santa_seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(layer)});
      row += n;
    }
    Linear(attn.data(), total, nh * hd, w.wo, d, x.data(), /*beta=*/1.0f);  // residual add
    if (!w.bo.empty()) AddBias(x.data(), total, w.bo);
    RmsNorm(x.data(), total, d, w.mlp_norm, eps, h.data());
    Linear(h.data(), total, d, w.w_gate_up, 2 * inter, gu.data());
    kernels::SiluMulF32(gu.data(), total, inter, act.data());
    Linear(act.data(), total, inter, w.w_down, d, x.data(), /*beta=*/1.0f);
  }

  // Final norm and LM head only on the rows whose logits are wanted.
  std::vector<float> sel(logit_rows * d);
  {
    int64_t row = 0, out = 0;
    for (const SequenceInput& in : batch) {
      const int64_t n = static_cast<int64_t>(in.tokens.size());
      const int64_t first = in.all_logits ? 0 : n - 1;
      for (int64_t t = first; t < n; ++t) std::copy_n(x.data() + (row + t) * d, d, sel.data() + (out++) * d);
      row += n;
    }
  }
  RmsNorm(sel.data(), logit_rows, d, weights_.norm, eps, sel.data());
  logits->resize(logit_rows * vocab);
  Linear(sel.data(), logit_rows, d, weights_.lm_head.empty() ? weights_.embed : weights_.lm_head, vocab, logits->data());
  return absl::OkStatus();
}

}  // namespace scout::runtime
