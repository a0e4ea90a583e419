#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/bf16.h"
#include "kernels/santa.h"

namespace scout::kernels {

void SantaRef(const SantaParams& sp, const SantaSplits& splits, float* out_f32) {
  const SparseDecodeParams& p = sp.attn;
  const int hd = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int64_t head_stride = int64_t{2} * kKvBlockSize * hd;
  const int64_t block_stride = head_stride * p.num_kv_heads;
  const int n_points = SantaSamplesPerSplit(sp.samples, splits.num_splits);
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q0 = p.q_indptr[s], nq = p.q_indptr[s + 1] - q0, len = p.seq_lens[s];
    const int32_t* table = p.block_table + int64_t{s} * p.max_blocks_per_seq;
    for (int kvh = 0; kvh < p.num_kv_heads; ++kvh) {
      // The list's units in list order.
      std::vector<int32_t> logical;
      std::vector<const uint16_t*> unit;
      if (p.sel_indptr != nullptr) {
        const int stride = p.sel_seq_stride > 0 ? p.sel_seq_stride : p.num_kv_heads;
        const int sh = s * stride + kvh;
        for (int32_t i = p.sel_indptr[sh]; i < p.sel_indptr[sh + 1]; ++i) {
          logical.push_back(p.sel_blocks[i]);
          unit.push_back(p.sel_slots != nullptr ? p.kv + p.sel_slots[i] * head_stride
                                                : p.kv + table[p.sel_blocks[i]] * block_stride + kvh * head_stride);
        }
      } else {
        for (int b = 0; b * kKvBlockSize < len; ++b) {
          logical.push_back(b);
          unit.push_back(p.kv + table[b] * block_stride + kvh * head_stride);
        }
      }
      const int list_len = static_cast<int>(logical.size());
      const int rows = nq * group;
      for (int rg = 0; rg * kSantaRowGroup < rows; ++rg) {
        const int r0 = rg * kSantaRowGroup, nr = std::min(kSantaRowGroup, rows - r0);
        // Merged across splits: running max, sum and output per row (natural exponentials).
        std::vector<double> m_all(nr, -INFINITY), l_all(nr, 0.0);
        std::vector<std::vector<double>> o_all(nr, std::vector<double>(hd, 0.0));
        for (int c = 0; c < splits.num_splits; ++c) {
          const int64_t e0 = int64_t{c} * splits.blocks_per_split;
          const int64_t e1 = std::min<int64_t>(list_len, e0 + splits.blocks_per_split);
          if (e0 >= e1) break;
          // The split's keys (positions past the end dropped), in list order.
          std::vector<int32_t> pos;
          std::vector<const uint16_t*> krow, vrow;
          for (int64_t e = e0; e < e1; ++e) {
            for (int i = 0; i < kKvBlockSize && logical[e] * kKvBlockSize + i < len; ++i) {
              pos.push_back(logical[e] * kKvBlockSize + i);
              krow.push_back(unit[e] + i * hd);
              vrow.push_back(unit[e] + (kKvBlockSize + i) * hd);
            }
          }
          const size_t n = pos.size();
          // e_r(j) = exp(s_rj - m_r) of the split, its max and sum per row.
          std::vector<std::vector<double>> ex(nr, std::vector<double>(n, 0.0));
          std::vector<double> m(nr, -INFINITY), l(nr, 0.0);
          int valid = 0;
          for (int r = 0; r < nr; ++r) {
            const int row = r0 + r, t = row / group, h = kvh * group + row % group;
            const int qpos = len - nq + t;
            const uint16_t* q = p.q + (int64_t{q0 + t} * p.num_heads + h) * hd;
            std::vector<double>& x = ex[r];
            for (size_t j = 0; j < n; ++j) {
              if (!KeyVisible(pos[j], qpos, p.sliding_window)) {
                x[j] = -INFINITY;
                continue;
              }
              double dot = 0;
              for (int d = 0; d < hd; ++d) dot += double{Bf16ToFloat(q[d])} * Bf16ToFloat(krow[j][d]);
              x[j] = dot * p.scale;
              m[r] = std::max(m[r], x[j]);
            }
            if (m[r] == -INFINITY) {
              std::fill(x.begin(), x.end(), 0.0);
              continue;
            }
            for (double& v : x) l[r] += (v = v == -INFINITY ? 0.0 : std::exp(v - m[r]));
            ++valid;
          }
          std::vector<std::vector<double>> o(nr, std::vector<double>(hd, 0.0));
          if (valid > 0) {
            std::vector<double> mix(n, 0.0);
            double total = 0;
            for (size_t j = 0; j < n; ++j) {
              for (int r = 0; r < nr; ++r) {
                if (l[r] > 0) mix[j] += ex[r][j] / (valid * l[r]);
              }
              total += mix[j];
            }
            const double u = SantaUniform(sp.seed, s, kvh, rg, c), scale = n_points / total;
            double cdf = 0;
            for (size_t j = 0; j < n; ++j) {
              const double lo = cdf;
              cdf += mix[j];
              // Points (u + i) / n_points of the scaled cumulative in [lo, cdf).
              const long hits = std::max(0L, static_cast<long>(std::ceil(cdf * scale - u)) -
                                                 static_cast<long>(std::ceil(lo * scale - u)));
              if (hits == 0 || mix[j] == 0) continue;
              for (int r = 0; r < nr; ++r) {
                const double w = hits * ex[r][j] / (scale * mix[j]);
                if (w == 0) continue;
                for (int d = 0; d < hd; ++d) o[r][d] += w * Bf16ToFloat(vrow[j][d]);
              }
            }
          }
          // Log-sum-exp merge of the split's partial into the running one.
          for (int r = 0; r < nr; ++r) {
            if (m[r] == -INFINITY) continue;
            const double mn = std::max(m_all[r], m[r]);
            const double fa = std::exp(m_all[r] - mn), fb = std::exp(m[r] - mn);
            l_all[r] = l_all[r] * fa + l[r] * fb;
            for (int d = 0; d < hd; ++d) o_all[r][d] = o_all[r][d] * fa + o[r][d] * fb;
            m_all[r] = mn;
          }
        }
        for (int r = 0; r < nr; ++r) {
          const int row = r0 + r, t = row / group, h = kvh * group + row % group;
          const int64_t at = (int64_t{q0 + t} * p.num_heads + h) * hd;
          for (int d = 0; d < hd; ++d) {
            const double v = l_all[r] > 0 ? o_all[r][d] / l_all[r] : 0.0;
            p.out[at + d] = FloatToBf16(static_cast<float>(v));
            if (out_f32 != nullptr) out_f32[at + d] = static_cast<float>(v);
          }
        }
      }
    }
  }
}

}  // namespace scout::kernels
