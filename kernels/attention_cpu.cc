#include "kernels/attention_cpu.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace scout::kernels {
namespace {

// Gathers one KV head's keys and values for positions [0, n) into contiguous [n][head_dim] rows.
void GatherHead(const PagedAttentionParams& p, int kv_head, int64_t n, float* k, float* v) {
  const int64_t head_floats = int64_t{2} * p.block_size * p.head_dim;
  const int64_t block_floats = head_floats * p.num_kv_heads;
  for (int64_t start = 0; start < n; start += p.block_size) {
    const float* src = p.kv_layer + p.block_table[start / p.block_size] * block_floats + kv_head * head_floats;
    int64_t rows = std::min<int64_t>(p.block_size, n - start);
    std::copy(src, src + rows * p.head_dim, k + start * p.head_dim);
    src += int64_t{p.block_size} * p.head_dim;
    std::copy(src, src + rows * p.head_dim, v + start * p.head_dim);
  }
}

}  // namespace

void PagedAttentionCpu(const PagedAttentionParams& p) {
  const int64_t n = p.context_len;
  const int group = p.num_heads / p.num_kv_heads;
  const int64_t first_pos = n - p.num_tokens;
  const int row_stride = p.num_heads * p.head_dim;
  // Bound the score buffer: queries are processed in chunks of rows.
  const int chunk = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.num_tokens, (int64_t{1} << 22) / std::max<int64_t>(n, 1))));
  std::vector<float> k(n * p.head_dim), v(n * p.head_dim), s(int64_t{chunk} * n);
  for (int kvh = 0; kvh < p.num_kv_heads; ++kvh) {
    GatherHead(p, kvh, n, k.data(), v.data());
    for (int g = 0; g < group; ++g) {
      const int h = kvh * group + g;
      for (int t0 = 0; t0 < p.num_tokens; t0 += chunk) {
        const int rows = std::min(chunk, p.num_tokens - t0);
        // Keys beyond the last row's position are masked for every row of the chunk: skip them.
        const int64_t cols = first_pos + t0 + rows;
        const float* q = p.q + int64_t{t0} * row_stride + h * p.head_dim;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, p.head_dim, p.scale, q,
                    row_stride, k.data(), p.head_dim, 0.0f, s.data(), cols);
        for (int r = 0; r < rows; ++r) {
          float* row = s.data() + int64_t{r} * cols;
          const int64_t visible = first_pos + t0 + r + 1;
          float mx = *std::max_element(row, row + visible);
          float sum = 0;
          for (int64_t j = 0; j < visible; ++j) {
            row[j] = std::exp(row[j] - mx);
            sum += row[j];
          }
          const float inv = 1.0f / sum;
          for (int64_t j = 0; j < visible; ++j) row[j] *= inv;
          std::fill(row + visible, row + cols, 0.0f);
        }
        float* out = p.out + int64_t{t0} * row_stride + h * p.head_dim;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, p.head_dim, cols, 1.0f, s.data(),
                    cols, v.data(), p.head_dim, 0.0f, out, row_stride);
      }
    }
  }
}

void PagedAttentionNaiveF64(const PagedAttentionParams& p) {
  const int64_t n = p.context_len;
  const int group = p.num_heads / p.num_kv_heads;
  std::vector<float> k(n * p.head_dim), v(n * p.head_dim);
  std::vector<double> w(n);
  for (int h = 0; h < p.num_heads; ++h) {
    GatherHead(p, h / group, n, k.data(), v.data());
    for (int t = 0; t < p.num_tokens; ++t) {
      const float* q = p.q + (int64_t{t} * p.num_heads + h) * p.head_dim;
      const int64_t visible = n - p.num_tokens + t + 1;
      double mx = -INFINITY;
      for (int64_t j = 0; j < visible; ++j) {
        double dot = 0;
        for (int d = 0; d < p.head_dim; ++d) dot += double{q[d]} * k[j * p.head_dim + d];
        w[j] = dot * p.scale;
        mx = std::max(mx, w[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < visible; ++j) sum += (w[j] = std::exp(w[j] - mx));
      float* out = p.out + (int64_t{t} * p.num_heads + h) * p.head_dim;
      for (int d = 0; d < p.head_dim; ++d) {
        double acc = 0;
        for (int64_t j = 0; j < visible; ++j) acc += w[j] * v[j * p.head_dim + d];
        out[d] = static_cast<float>(acc / sum);
      }
    }
  }
}

}  // namespace scout::kernels
