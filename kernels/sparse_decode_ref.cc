#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/sparse_decode.h"
#include "kernels/bf16.h"

namespace scout::kernels {
namespace {

float Bf(uint16_t v) { return Bf16ToFloat(v); }

}  // namespace

void SparseDecodeRef(const SparseDecodeParams& p, float* out_f32, float* abs_out) {
  const int hd = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int64_t head_stride = int64_t{2} * kKvBlockSize * hd;
  const int64_t block_stride = head_stride * p.num_kv_heads;
  std::vector<float> k, v, w, acc(hd), acc_abs(hd);
  std::vector<int32_t> pos;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q0 = p.q_indptr[s], nq = p.q_indptr[s + 1] - q0, len = p.seq_lens[s];
    const int32_t* table = p.block_table + int64_t{s} * p.max_blocks_per_seq;
    for (int kvh = 0; kvh < p.num_kv_heads; ++kvh) {
      // Gather the listed blocks' keys and values (positions past the end dropped).
      std::vector<int32_t> logical;
      std::vector<const uint16_t*> base_of;
      if (p.sel_indptr != nullptr) {
        const int sh = s * (p.sel_seq_stride > 0 ? p.sel_seq_stride : p.num_kv_heads) + kvh;
        for (int32_t i = p.sel_indptr[sh]; i < p.sel_indptr[sh + 1]; ++i) {
          logical.push_back(p.sel_blocks[i]);
          base_of.push_back(p.sel_slots != nullptr ? p.kv + p.sel_slots[i] * head_stride
                                                   : p.kv + table[p.sel_blocks[i]] * block_stride + kvh * head_stride);
        }
      } else {
        for (int b = 0; b < (len + kKvBlockSize - 1) / kKvBlockSize; ++b) {
          logical.push_back(b);
          base_of.push_back(p.kv + table[b] * block_stride + kvh * head_stride);
        }
      }
      k.clear();
      v.clear();
      pos.clear();
      for (size_t li = 0; li < logical.size(); ++li) {
        const int32_t b = logical[li];
        const uint16_t* base = base_of[li];
        for (int i = 0; i < kKvBlockSize && b * kKvBlockSize + i < len; ++i) {
          pos.push_back(b * kKvBlockSize + i);
          for (int d = 0; d < hd; ++d) {
            k.push_back(Bf(base[i * hd + d]));
            v.push_back(Bf(base[(kKvBlockSize + i) * hd + d]));
          }
        }
      }
      const size_t n = pos.size();
      w.resize(n);
      for (int t = 0; t < nq; ++t) {
        const int qpos = len - nq + t;
        for (int g = 0; g < group; ++g) {
          const int h = kvh * group + g;
          const int64_t row = (int64_t{q0 + t} * p.num_heads + h) * hd;
          float mx = -INFINITY;
          for (size_t j = 0; j < n; ++j) {
            if (!KeyVisible(pos[j], qpos, p.sliding_window)) {
              w[j] = -INFINITY;
              continue;
            }
            float dot = 0;
            for (int d = 0; d < hd; ++d) dot += Bf(p.q[row + d]) * k[j * hd + d];
            w[j] = dot * p.scale;
            mx = std::max(mx, w[j]);
          }
          std::fill(acc.begin(), acc.end(), 0.0f);
          std::fill(acc_abs.begin(), acc_abs.end(), 0.0f);
          if (mx != -INFINITY) {
            float sum = 0;
            for (size_t j = 0; j < n; ++j) {
              const float e = w[j] == -INFINITY ? 0.0f : std::exp(w[j] - mx);
              sum += e;
              for (int d = 0; d < hd; ++d) {
                acc[d] += e * v[j * hd + d];
                acc_abs[d] += e * std::abs(v[j * hd + d]);
              }
            }
            for (int d = 0; d < hd; ++d) {
              acc[d] /= sum;
              acc_abs[d] /= sum;
            }
            if (p.lse != nullptr) p.lse[row / hd] = (mx + std::log(sum)) * static_cast<float>(M_LOG2E);
          } else if (p.lse != nullptr) {
            p.lse[row / hd] = -INFINITY;
          }
          if (p.block_lse != nullptr) {
            for (int32_t b : logical) {
              float bm = -INFINITY;
              for (size_t j = 0; j < n; ++j) {
                if (pos[j] / kKvBlockSize == b) bm = std::max(bm, w[j]);
              }
              float bs = 0;
              for (size_t j = 0; j < n; ++j) {
                if (pos[j] / kKvBlockSize == b && w[j] != -INFINITY) bs += std::exp(w[j] - bm);
              }
              p.block_lse[(row / hd) * p.block_lse_stride + b] =
                  bm == -INFINITY ? -INFINITY : (bm + std::log(bs)) * static_cast<float>(M_LOG2E);
            }
          }
          for (int d = 0; d < hd; ++d) {
            p.out[row + d] = FloatToBf16(acc[d]);
            if (out_f32 != nullptr) out_f32[row + d] = acc[d];
            if (abs_out != nullptr) abs_out[row + d] = acc_abs[d];
          }
        }
      }
    }
  }
}

}  // namespace scout::kernels
