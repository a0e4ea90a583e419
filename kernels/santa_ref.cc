#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/bf16.h"
#include "kernels/santa.h"

namespace scout::kernels {

void SantaRef(const SantaParams& sp, float* out_f32) {
  const SparseDecodeParams& p = sp.attn;
  const int hd = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int64_t head_stride = int64_t{2} * kKvBlockSize * hd;
  const int64_t block_stride = head_stride * p.num_kv_heads;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q0 = p.q_indptr[s], nq = p.q_indptr[s + 1] - q0, len = p.seq_lens[s];
    const int32_t* table = p.block_table + int64_t{s} * p.max_blocks_per_seq;
    for (int kvh = 0; kvh < p.num_kv_heads; ++kvh) {
      // Keys and values the list names, in list order (positions past the end dropped).
      std::vector<int32_t> pos;
      std::vector<const uint16_t*> krow, vrow;
      auto add_block = [&](int32_t b, const uint16_t* base) {
        for (int i = 0; i < kKvBlockSize && b * kKvBlockSize + i < len; ++i) {
          pos.push_back(b * kKvBlockSize + i);
          krow.push_back(base + i * hd);
          vrow.push_back(base + (kKvBlockSize + i) * hd);
        }
      };
      if (p.sel_indptr != nullptr) {
        const int sh = s * p.num_kv_heads + kvh;
        for (int32_t i = p.sel_indptr[sh]; i < p.sel_indptr[sh + 1]; ++i) {
          add_block(p.sel_blocks[i], p.sel_slots != nullptr ? p.kv + p.sel_slots[i] * head_stride
                                                            : p.kv + table[p.sel_blocks[i]] * block_stride + kvh * head_stride);
        }
      } else {
        for (int b = 0; b * kKvBlockSize < len; ++b) add_block(b, p.kv + table[b] * block_stride + kvh * head_stride);
      }
      const size_t n = pos.size();
      const int rows = nq * group;
      for (int rg = 0; rg * kSantaRowGroup < rows; ++rg) {
        const int r0 = rg * kSantaRowGroup, nr = std::min(kSantaRowGroup, rows - r0);
        // Exact softmax per row: p[r][j].
        std::vector<std::vector<double>> prob(nr, std::vector<double>(n, 0.0));
        std::vector<int> valid;
        for (int r = 0; r < nr; ++r) {
          const int row = r0 + r, t = row / group, h = kvh * group + row % group;
          const int qpos = len - nq + t;
          const uint16_t* q = p.q + (int64_t{q0 + t} * p.num_heads + h) * hd;
          double mx = -INFINITY;
          for (size_t j = 0; j < n; ++j) {
            if (!KeyVisible(pos[j], qpos, p.sliding_window)) {
              prob[r][j] = -INFINITY;
              continue;
            }
            double dot = 0;
            for (int d = 0; d < hd; ++d) dot += double{Bf16ToFloat(q[d])} * Bf16ToFloat(krow[j][d]);
            prob[r][j] = dot * p.scale;
            mx = std::max(mx, prob[r][j]);
          }
          if (mx == -INFINITY) {
            std::fill(prob[r].begin(), prob[r].end(), 0.0);
            continue;
          }
          double sum = 0;
          for (double& x : prob[r]) sum += (x = x == -INFINITY ? 0.0 : std::exp(x - mx));
          for (double& x : prob[r]) x /= sum;
          valid.push_back(r);
        }
        std::vector<std::vector<double>> acc(nr, std::vector<double>(hd, 0.0));
        if (!valid.empty()) {
          std::vector<double> mix(n, 0.0);
          for (int r : valid) {
            for (size_t j = 0; j < n; ++j) mix[j] += prob[r][j] / valid.size();
          }
          const double u = SantaUniform(sp.seed, s, kvh, rg);
          double cdf = 0;
          for (size_t j = 0; j < n; ++j) {
            const double lo = cdf;
            cdf += mix[j];
            // Points (u + i) / S in [lo, cdf).
            const long hits = std::max(0L, static_cast<long>(std::ceil(cdf * sp.samples - u)) -
                                               static_cast<long>(std::ceil(lo * sp.samples - u)));
            if (hits == 0 || mix[j] == 0) continue;
            for (int r : valid) {
              const double w = hits * prob[r][j] / (sp.samples * mix[j]);
              for (int d = 0; d < hd; ++d) acc[r][d] += w * Bf16ToFloat(vrow[j][d]);
            }
          }
        }
        for (int r = 0; r < nr; ++r) {
          const int row = r0 + r, t = row / group, h = kvh * group + row % group;
          const int64_t o = (int64_t{q0 + t} * p.num_heads + h) * hd;
          for (int d = 0; d < hd; ++d) {
            p.out[o + d] = FloatToBf16(static_cast<float>(acc[r][d]));
            if (out_f32 != nullptr) out_f32[o + d] = static_cast<float>(acc[r][d]);
          }
        }
      }
    }
  }
}

}  // namespace scout::kernels
