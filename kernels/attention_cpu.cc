#include "kernels/attention_cpu.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/santa.h"

namespace scout::kernels {
namespace {

// The first position any query of the pass may see: 0, or the first query's window start.
int64_t FirstVisible(const PagedAttentionParams& p) {
  return p.sliding_window > 0 ? std::max<int64_t>(0, p.context_len - p.num_tokens - p.sliding_window + 1) : 0;
}

// Positions KV head kv_head reads, ascending: every position below context_len, or those of its
// listed blocks; with trim_window, none before FirstVisible.
std::vector<int64_t> Positions(const PagedAttentionParams& p, int kv_head, bool trim_window) {
  std::vector<int64_t> pos;
  const int64_t n = p.context_len, first = trim_window ? FirstVisible(p) : 0;
  auto add_block = [&](int64_t b) {
    for (int64_t i = std::max(first, b * p.block_size); i < std::min<int64_t>(n, (b + 1) * p.block_size); ++i) {
      pos.push_back(i);
    }
  };
  if (p.sel_indptr == nullptr) {
    for (int64_t b = first / p.block_size; b * p.block_size < n; ++b) add_block(b);
  } else {
    for (int32_t i = p.sel_indptr[kv_head]; i < p.sel_indptr[kv_head + 1]; ++i) add_block(p.sel_blocks[i]);
  }
  return pos;
}

// Gathers one KV head's keys and values at `pos` into contiguous [pos.size()][head_dim] rows.
void GatherHead(const PagedAttentionParams& p, int kv_head, const std::vector<int64_t>& pos, float* k, float* v) {
  const int64_t head_floats = int64_t{2} * p.block_size * p.head_dim;
  const int64_t block_floats = head_floats * p.num_kv_heads;
  for (size_t j = 0; j < pos.size(); ++j) {
    const int64_t b = pos[j] / p.block_size, i = pos[j] % p.block_size;
    const float* src = p.kv_layer + p.block_table[b] * block_floats + kv_head * head_floats + i * p.head_dim;
    std::copy(src, src + p.head_dim, k + j * p.head_dim);
    src += int64_t{p.block_size} * p.head_dim;
    std::copy(src, src + p.head_dim, v + j * p.head_dim);
  }
}

// Keys visible to a query at qpos: the prefix of pos at or before it.
int64_t Visible(const std::vector<int64_t>& pos, int64_t qpos) {
  return std::upper_bound(pos.begin(), pos.end(), qpos) - pos.begin();
}

// The first key a query at qpos may see: the index in pos of its window's start (0 without one).
int64_t WindowStart(const PagedAttentionParams& p, const std::vector<int64_t>& pos, int64_t qpos) {
  if (p.sliding_window <= 0) return 0;
  return std::lower_bound(pos.begin(), pos.end(), qpos - p.sliding_window + 1) - pos.begin();
}

}  // namespace

void SantaAttentionCpu(const PagedAttentionParams& p) {
  const int group = p.num_heads / p.num_kv_heads;
  const int64_t first_pos = p.context_len - p.num_tokens;
  const int row_stride = p.num_heads * p.head_dim;
  const int64_t nblocks = (p.context_len + p.block_size - 1) / p.block_size;
  if (p.block_mass != nullptr) std::fill(p.block_mass, p.block_mass + int64_t{p.num_heads} * p.num_tokens * nblocks, 0.0f);
  const int rows = p.num_tokens * group;
  for (int kvh = 0; kvh < p.num_kv_heads; ++kvh) {
    const std::vector<int64_t> pos = Positions(p, kvh, /*trim_window=*/true);
    const int64_t n = static_cast<int64_t>(pos.size());
    std::vector<float> k(n * p.head_dim), v(n * p.head_dim);
    GatherHead(p, kvh, pos, k.data(), v.data());
    // Exact softmax of every row over the keys it sees: prob[row][j], row = t * group + g.
    std::vector<float> prob(static_cast<size_t>(rows) * std::max<int64_t>(n, 1), 0.0f);
    std::vector<bool> sees(rows, false);
    for (int t = 0; t < p.num_tokens; ++t) {
      const int64_t qpos = first_pos + t, lo = WindowStart(p, pos, qpos), hi = Visible(pos, qpos);
      for (int g = 0; g < group; ++g) {
        const int h = kvh * group + g, row = t * group + g;
        if (hi <= lo) continue;
        sees[row] = true;
        const float* q = p.q + int64_t{t} * row_stride + h * p.head_dim;
        float* pr = prob.data() + int64_t{row} * n;
        for (int64_t j = lo; j < hi; ++j) {
          pr[j] = p.scale * cblas_sdot(p.head_dim, q, 1, k.data() + j * p.head_dim, 1);
        }
        const float mx = *std::max_element(pr + lo, pr + hi);
        float sum = 0;
        for (int64_t j = lo; j < hi; ++j) sum += (pr[j] = std::exp(pr[j] - mx));
        for (int64_t j = lo; j < hi; ++j) pr[j] /= sum;
        if (p.block_mass != nullptr) {
          float* mass = p.block_mass + (int64_t{h} * p.num_tokens + t) * nblocks;
          for (int64_t j = lo; j < hi; ++j) mass[pos[j] / p.block_size] += pr[j];
        }
      }
    }
    // Per group of 16 rows: systematic points (u + i) / S on the rows' mixed distribution; each
    // hit on key j adds p_r(j) / (S q(j)) of its value to row r.
    for (int rg = 0; rg * kSantaRowGroup < rows; ++rg) {
      const int r0 = rg * kSantaRowGroup, nr = std::min(kSantaRowGroup, rows - r0);
      std::vector<int> valid;
      for (int r = r0; r < r0 + nr; ++r) {
        if (sees[r]) valid.push_back(r);
      }
      std::vector<double> acc(static_cast<size_t>(nr) * p.head_dim, 0.0);
      if (!valid.empty()) {
        const double u = SantaUniform(p.santa_seed, 0, kvh, rg);
        double cdf = 0;
        for (int64_t j = 0; j < n; ++j) {
          double mix = 0;
          for (int r : valid) mix += prob[int64_t{r} * n + j];
          mix /= static_cast<double>(valid.size());
          const double lo = cdf;
          cdf += mix;
          const long hits = std::max(0L, static_cast<long>(std::ceil(cdf * p.santa_samples - u)) -
                                             static_cast<long>(std::ceil(lo * p.santa_samples - u)));
          if (hits == 0 || mix == 0) continue;
          for (int r : valid) {
            const double w = hits * prob[int64_t{r} * n + j] / (p.santa_samples * mix);
            double* a = acc.data() + int64_t{r - r0} * p.head_dim;
            for (int d = 0; d < p.head_dim; ++d) a[d] += w * v[j * p.head_dim + d];
          }
        }
      }
      for (int r = r0; r < r0 + nr; ++r) {
        const int t = r / group, h = kvh * group + r % group;
        float* out = p.out + int64_t{t} * row_stride + h * p.head_dim;
        for (int d = 0; d < p.head_dim; ++d) out[d] = static_cast<float>(acc[int64_t{r - r0} * p.head_dim + d]);
      }
    }
  }
}

void PagedAttentionCpu(const PagedAttentionParams& p) {
  if (p.santa_samples > 0) return SantaAttentionCpu(p);
  const int group = p.num_heads / p.num_kv_heads;
  const int64_t first_pos = p.context_len - p.num_tokens;
  const int row_stride = p.num_heads * p.head_dim;
  const int64_t nblocks = (p.context_len + p.block_size - 1) / p.block_size;
  if (p.block_mass != nullptr) std::fill(p.block_mass, p.block_mass + int64_t{p.num_heads} * p.num_tokens * nblocks, 0.0f);
  for (int kvh = 0; kvh < p.num_kv_heads; ++kvh) {
    const std::vector<int64_t> pos = Positions(p, kvh, /*trim_window=*/true);
    const int64_t n = static_cast<int64_t>(pos.size());
    // Bound the score buffer: queries are processed in chunks of rows.
    const int chunk = static_cast<int>(
        std::max<int64_t>(1, std::min<int64_t>(p.num_tokens, (int64_t{1} << 22) / std::max<int64_t>(n, 1))));
    std::vector<float> k(n * p.head_dim), v(n * p.head_dim), s(int64_t{chunk} * std::max<int64_t>(n, 1));
    GatherHead(p, kvh, pos, k.data(), v.data());
    for (int g = 0; g < group; ++g) {
      const int h = kvh * group + g;
      for (int t0 = 0; t0 < p.num_tokens; t0 += chunk) {
        const int rows = std::min(chunk, p.num_tokens - t0);
        // Keys after the chunk's last query, or before its first query's window, are masked for
        // every row: the chunk reads columns [col0, col0 + cols) of pos.
        const int64_t col0 = WindowStart(p, pos, first_pos + t0);
        const int64_t cols = Visible(pos, first_pos + t0 + rows - 1) - col0;
        float* out = p.out + int64_t{t0} * row_stride + h * p.head_dim;
        if (cols <= 0) {
          for (int r = 0; r < rows; ++r) std::fill(out + int64_t{r} * row_stride, out + int64_t{r} * row_stride + p.head_dim, 0.0f);
          continue;
        }
        const float* q = p.q + int64_t{t0} * row_stride + h * p.head_dim;
        const float* kc = k.data() + col0 * p.head_dim;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, static_cast<int>(cols), p.head_dim, p.scale, q,
                    row_stride, kc, p.head_dim, 0.0f, s.data(), static_cast<int>(cols));
        for (int r = 0; r < rows; ++r) {
          float* row = s.data() + int64_t{r} * cols;
          const int64_t qpos = first_pos + t0 + r;
          // This row's keys: [lo, hi) within the chunk's columns.
          const int64_t lo = WindowStart(p, pos, qpos) - col0, hi = Visible(pos, qpos) - col0;
          if (hi > lo) {
            const float mx = *std::max_element(row + lo, row + hi);
            float sum = 0;
            for (int64_t j = lo; j < hi; ++j) {
              row[j] = std::exp(row[j] - mx);
              sum += row[j];
            }
            const float inv = 1.0f / sum;
            for (int64_t j = lo; j < hi; ++j) row[j] *= inv;
          }
          std::fill(row, row + std::max<int64_t>(lo, 0), 0.0f);
          std::fill(row + std::max(hi, lo), row + cols, 0.0f);
          if (p.block_mass != nullptr) {
            float* mass = p.block_mass + (int64_t{h} * p.num_tokens + t0 + r) * nblocks;
            for (int64_t j = lo; j < hi; ++j) mass[pos[col0 + j] / p.block_size] += row[j];
          }
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, p.head_dim, static_cast<int>(cols), 1.0f, s.data(),
                    static_cast<int>(cols), v.data() + col0 * p.head_dim, p.head_dim, 0.0f, out, row_stride);
      }
    }
  }
}

void PagedAttentionNaiveF64(const PagedAttentionParams& p) {
  const int group = p.num_heads / p.num_kv_heads;
  for (int h = 0; h < p.num_heads; ++h) {
    const std::vector<int64_t> pos = Positions(p, h / group, /*trim_window=*/false);
    const int64_t n = static_cast<int64_t>(pos.size());
    std::vector<float> k(n * p.head_dim), v(n * p.head_dim);
    GatherHead(p, h / group, pos, k.data(), v.data());
    std::vector<double> w(n);
    for (int t = 0; t < p.num_tokens; ++t) {
      const float* q = p.q + (int64_t{t} * p.num_heads + h) * p.head_dim;
      const int64_t qpos = p.context_len - p.num_tokens + t;
      float* out = p.out + (int64_t{t} * p.num_heads + h) * p.head_dim;
      // Every position the loop visits is checked against the mask directly, not through the
      // search helpers the fast kernel uses.
      std::vector<int64_t> seen;
      for (int64_t j = 0; j < n; ++j) {
        if (pos[j] <= qpos && (p.sliding_window <= 0 || pos[j] > qpos - p.sliding_window)) seen.push_back(j);
      }
      if (seen.empty()) {
        std::fill(out, out + p.head_dim, 0.0f);
        continue;
      }
      double mx = -INFINITY;
      for (int64_t j : seen) {
        double dot = 0;
        for (int d = 0; d < p.head_dim; ++d) dot += double{q[d]} * k[j * p.head_dim + d];
        w[j] = dot * p.scale;
        mx = std::max(mx, w[j]);
      }
      double sum = 0;
      for (int64_t j : seen) sum += (w[j] = std::exp(w[j] - mx));
      for (int d = 0; d < p.head_dim; ++d) {
        double acc = 0;
        for (int64_t j : seen) acc += w[j] * v[j * p.head_dim + d];
        out[d] = static_cast<float>(acc / sum);
      }
    }
  }
}

}  // namespace scout::kernels
