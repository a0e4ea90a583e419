#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/bf16.h"
#include "kernels/model_ops.h"

namespace scout::kernels {

void EmbedRef(const EmbedParams& p) {
  for (int r = 0; r < p.rows; ++r) {
    const uint16_t* src = p.table + int64_t{p.tokens[r]} * p.dim;
    for (int i = 0; i < p.dim; ++i) p.out[int64_t{r} * p.dim + i] = Bf16ToFloat(src[i]);
  }
}

void RmsNormF32(const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    float* yr = out + r * dim;
    for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

void RmsNormRef(const RmsNormParams& p) {
  std::vector<float> row(p.dim);
  for (int r = 0; r < p.rows; ++r) {
    RmsNormF32(p.x + int64_t{r} * p.dim, 1, p.dim, p.weight, p.eps, row.data());
    for (int i = 0; i < p.dim; ++i) p.out[int64_t{r} * p.dim + i] = FloatToBf16(row[i]);
  }
}

void RopeAppendRef(const RopeAppendParams& p) {
  const int hd = p.head_dim, half = hd / 2, nh = p.num_heads, nkv = p.num_kv_heads;
  const int64_t row_len = int64_t{nh + 2 * nkv} * hd;
  std::vector<float> v(hd);
  for (int r = 0; r < p.rows; ++r) {
    const float* src = p.qkv + r * row_len;
    const int pos = p.positions[r];
    const int64_t slot = pos % kKvBlockSize;
    for (int h = 0; h < nh + 2 * nkv; ++h) {
      for (int i = 0; i < hd; ++i) v[i] = src[int64_t{h} * hd + i] + (p.bias ? p.bias[int64_t{h} * hd + i] : 0.0f);
      if (h < nh + nkv) {
        for (int i = 0; i < half; ++i) {
          const float angle = static_cast<float>(pos) * p.inv_freq[i];
          const float c = std::cos(angle) * p.attention_scaling, s = std::sin(angle) * p.attention_scaling;
          const float a = v[i], b = v[i + half];
          v[i] = a * c - b * s;
          v[i + half] = b * c + a * s;
        }
      }
      uint16_t* dst;
      if (h < nh) {
        dst = p.q + (int64_t{r} * nh + h) * hd;
      } else {
        const int kvh = h < nh + nkv ? h - nh : h - nh - nkv;
        const int kv_index = h < nh + nkv ? 0 : 1;
        const int64_t unit = p.unit_slots != nullptr ? int64_t{p.unit_slots[int64_t{r} * nkv + kvh]}
                                                     : int64_t{p.phys_blocks[r]} * nkv + kvh;
        dst = p.kv + (unit * 2 + kv_index) * kKvBlockSize * hd + slot * hd;
      }
      for (int i = 0; i < hd; ++i) dst[i] = FloatToBf16(v[i]);
    }
  }
}

void AddBiasRef(const AddBiasParams& p) {
  for (int r = 0; r < p.rows; ++r) {
    for (int j = 0; j < p.n; ++j) p.y[int64_t{r} * p.n + j] += p.bias[j];
  }
}

void SiluMulF32(const float* gate_up, int64_t rows, int64_t inter, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * inter;
    for (int64_t j = 0; j < inter; ++j) out[r * inter + j] = g[j] / (1.0f + std::exp(-g[j])) * g[inter + j];
  }
}

void SiluMulRef(const SiluMulParams& p) {
  std::vector<float> row(p.inter);
  for (int r = 0; r < p.rows; ++r) {
    SiluMulF32(p.gate_up + int64_t{r} * 2 * p.inter, 1, p.inter, row.data());
    for (int j = 0; j < p.inter; ++j) p.out[int64_t{r} * p.inter + j] = FloatToBf16(row[j]);
  }
}

void MergeAttentionRef(const MergeAttentionParams& p) {
  for (int r = 0; r < p.rows; ++r) {
    float* acc = p.acc + int64_t{r} * p.head_dim;
    const uint16_t* part = p.part + int64_t{r} * p.head_dim;
    const float lp = p.part_lse[r];
    if (p.first) {
      for (int i = 0; i < p.head_dim; ++i) acc[i] = Bf16ToFloat(part[i]);
      p.acc_lse[r] = lp;
    } else if (lp != -INFINITY) {
      const float la = p.acc_lse[r];
      const float m = std::max(la, lp);
      const float a = la == -INFINITY ? 0.0f : std::exp2(la - m), b = std::exp2(lp - m);
      for (int i = 0; i < p.head_dim; ++i) acc[i] = (a * acc[i] + b * Bf16ToFloat(part[i])) / (a + b);
      p.acc_lse[r] = m + std::log2(a + b);
    }
    if (p.out != nullptr) {
      for (int i = 0; i < p.head_dim; ++i) p.out[int64_t{r} * p.head_dim + i] = FloatToBf16(acc[i]);
    }
  }
}

void ArgmaxRef(const ArgmaxParams& p) {
  for (int r = 0; r < p.rows; ++r) {
    const float* x = p.logits + int64_t{r} * p.vocab;
    int best = 0;
    for (int i = 1; i < p.vocab; ++i) {
      if (x[i] > x[best] || (std::isnan(x[best]) && !std::isnan(x[i]))) best = i;
    }
    p.out[r] = best;
  }
}

void BlockMassRef(const BlockMassParams& bp) {
  const SparseDecodeParams& p = bp.attn;
  const int hd = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const float log2e = static_cast<float>(M_LOG2E);
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q0 = p.q_indptr[s], nq = p.q_indptr[s + 1] - q0, len = p.seq_lens[s];
    const int nb = (len + kKvBlockSize - 1) / kKvBlockSize;
    for (int t = 0; t < nq; ++t) {
      const int qpos = len - nq + t;
      for (int h = 0; h < p.num_heads; ++h) {
        const int kvh = h / group;
        const uint16_t* q = p.q + (int64_t{q0 + t} * p.num_heads + h) * hd;
        const float lse = p.lse[int64_t{q0 + t} * p.num_heads + h];
        float* out = bp.mass + s * bp.mass_seq_stride + t * bp.mass_token_stride +
                     (bp.mass_head_offset + h) * bp.mass_head_stride;
        std::vector<int32_t> listed;
        if (p.sel_indptr != nullptr) {
          const int idx = s * (p.sel_seq_stride > 0 ? p.sel_seq_stride : p.num_kv_heads) + kvh;
          listed.assign(p.sel_blocks + p.sel_indptr[idx], p.sel_blocks + p.sel_indptr[idx + 1]);
        } else {
          for (int b = 0; b < nb; ++b) listed.push_back(b);
        }
        const int64_t qrow = int64_t{q0 + t} * p.num_heads + h;
        for (int32_t b : listed) {
          if (p.block_lse != nullptr) {
            const float bl = p.block_lse[qrow * p.block_lse_stride + b];
            out[b] = (bl == -INFINITY || lse == -INFINITY) ? 0.0f : std::exp2(bl - lse);
            continue;
          }
          const int32_t phys = p.block_table[int64_t{s} * p.max_blocks_per_seq + b];
          const uint16_t* keys = p.kv + (int64_t{phys} * p.num_kv_heads + kvh) * 2 * kKvBlockSize * hd;
          float m = 0;
          for (int i = 0; i < kKvBlockSize; ++i) {
            const int pos = b * kKvBlockSize + i;
            if (!KeyVisible(pos, qpos, p.sliding_window) || lse == -INFINITY) continue;
            float dot = 0;
            for (int d = 0; d < hd; ++d) dot += Bf16ToFloat(q[d]) * Bf16ToFloat(keys[i * hd + d]);
            m += std::exp2(dot * p.scale * log2e - lse);
          }
          out[b] = m;
        }
      }
    }
  }
}

void GemvRef(const GemvParams& p) {
  for (int r = 0; r < p.rows; ++r) {
    for (int o = 0; o < p.out; ++o) {
      double acc = 0;
      for (int i = 0; i < p.in; ++i) {
        acc += double{Bf16ToFloat(p.x[int64_t{r} * p.in + i])} * Bf16ToFloat(p.w[int64_t{o} * p.in + i]);
      }
      float& y = p.y[int64_t{r} * p.out + o];
      y = static_cast<float>(acc) + (p.beta != 0.0f ? p.beta * y : 0.0f);
    }
  }
}

void RandomFillRef(const RandomFillParams& p) {
  for (int64_t i = 0; i < p.n; ++i) p.out[i] = FloatToBf16(RandomUniform(p.seed, i, p.scale, p.offset));
}

}  // namespace scout::kernels
