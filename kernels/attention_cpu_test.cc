#include "kernels/attention_cpu.h"

#include <cmath>
#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include <tuple>

#include "gtest/gtest.h"
#include "kernels/bf16.h"
#include "kernels/santa.h"
#include "kernels/test_util.h"

namespace scout::kernels {
namespace {

struct Case {
  int64_t context_len;
  int num_tokens;
  int num_heads;
  int num_kv_heads;
  int head_dim;
};

using testing::RelL2;

TEST(PagedAttentionCpuTest, MatchesFloat64OnAwkwardShapes) {
  std::mt19937 rng(12345);
  const Case cases[] = {
      {1, 1, 1, 1, 64},    {17, 17, 4, 1, 64},  {16, 1, 8, 8, 128}, {32, 5, 6, 2, 64},
      {33, 33, 8, 2, 128}, {300, 1, 3, 1, 64},  {257, 7, 32, 8, 128}, {4100, 40, 6, 2, 64},
  };
  for (const Case& c : cases) {
    const int bs = 16;
    const int64_t nblocks = (c.context_len + bs - 1) / bs;
    // Scatter the sequence over a pool larger than it needs, in shuffled block order.
    const int32_t pool_blocks = static_cast<int32_t>(nblocks * 2 + 3);
    std::vector<int32_t> ids(pool_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    ids.resize(nblocks);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> pool(int64_t{pool_blocks} * c.num_kv_heads * 2 * bs * c.head_dim);
    for (float& x : pool) x = normal(rng);
    std::vector<float> q(int64_t{c.num_tokens} * c.num_heads * c.head_dim);
    for (float& x : q) x = 2.0f * normal(rng);  // sharper softmax than unit queries
    std::vector<float> out(q.size(), NAN), ref(q.size(), NAN);
    PagedAttentionParams p{.q = q.data(), .out = out.data(), .kv_layer = pool.data(),
                           .block_table = ids.data(), .context_len = c.context_len,
                           .num_tokens = c.num_tokens, .num_heads = c.num_heads,
                           .num_kv_heads = c.num_kv_heads, .head_dim = c.head_dim, .block_size = bs,
                           .scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim))};
    PagedAttentionCpu(p);
    p.out = ref.data();
    PagedAttentionNaiveF64(p);
    for (float x : out) ASSERT_TRUE(std::isfinite(x)) << "unwritten or NaN output";
    // float32 accumulation over up to 4k keys: expect ~1e-6; 1e-5 leaves room for BLAS order.
    EXPECT_LT(RelL2(out, ref), 1e-5) << "ctx=" << c.context_len << " tokens=" << c.num_tokens
                                     << " heads=" << c.num_heads << "/" << c.num_kv_heads;
  }
}

// The float64 reference against a hand-computed case: two keys, one query, uniform weights.
TEST(PagedAttentionCpuTest, NaiveReferenceMatchesHandComputation) {
  const int bs = 16, d = 2;
  std::vector<float> pool(2 * bs * d, 0.0f);
  // keys k0=(1,0), k1=(0,1); values v0=(1,2), v1=(3,4)
  pool[0] = 1; pool[3] = 1;
  float* v = pool.data() + bs * d;
  v[0] = 1; v[1] = 2; v[2] = 3; v[3] = 4;
  int32_t table[] = {0};
  float q[] = {1.0f, 0.0f};
  float out[2];
  PagedAttentionParams p{.q = q, .out = out, .kv_layer = pool.data(), .block_table = table,
                         .context_len = 2, .num_tokens = 1, .num_heads = 1, .num_kv_heads = 1,
                         .head_dim = d, .block_size = bs, .scale = 1.0f};
  PagedAttentionNaiveF64(p);
  const double w0 = std::exp(1.0) / (std::exp(1.0) + 1.0);
  EXPECT_NEAR(out[0], w0 * 1 + (1 - w0) * 3, 1e-6);
  EXPECT_NEAR(out[1], w0 * 2 + (1 - w0) * 4, 1e-6);
}

}  // namespace
}  // namespace scout::kernels

namespace scout::kernels {
namespace {

// With a Selection each KV head reads only its listed blocks; the float64 formula agrees, rows
// that see nothing output zeros, and the block masses are the probabilities summed per block.
TEST(PagedAttentionCpuTest, SelectionAndBlockMassMatchFloat64) {
  std::mt19937 rng(99);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int bs = 16, hd = 64, heads = 6, kv_heads = 2, tokens = 5;
  const int64_t ctx = 300;
  const int64_t nblocks = (ctx + bs - 1) / bs;
  std::vector<int32_t> table(nblocks);
  for (int64_t b = 0; b < nblocks; ++b) table[b] = static_cast<int32_t>(nblocks - 1 - b);
  std::vector<float> pool(nblocks * kv_heads * 2 * bs * hd), q(tokens * heads * hd);
  for (float& x : pool) x = normal(rng);
  for (float& x : q) x = 2 * normal(rng);
  // Head 0: a few blocks and the last; head 1: only early blocks (the new tokens see those).
  std::vector<int32_t> indptr = {0, 4, 6}, blocks = {0, 3, 7, static_cast<int32_t>(nblocks - 1), 1, 2};
  std::vector<float> out(q.size(), NAN), ref(q.size(), NAN), mass(heads * tokens * nblocks, -1.0f);
  PagedAttentionParams p{.q = q.data(), .out = out.data(), .kv_layer = pool.data(), .block_table = table.data(),
                         .context_len = ctx, .num_tokens = tokens, .num_heads = heads, .num_kv_heads = kv_heads,
                         .head_dim = hd, .block_size = bs, .scale = 0.125f, .sel_indptr = indptr.data(),
                         .sel_blocks = blocks.data(), .block_mass = mass.data()};
  PagedAttentionCpu(p);
  p.out = ref.data();
  p.block_mass = nullptr;
  PagedAttentionNaiveF64(p);
  EXPECT_LT(RelL2(out, ref), 1e-5);
  for (int h = 0; h < heads; ++h) {
    for (int t = 0; t < tokens; ++t) {
      const float* m = mass.data() + (int64_t{h} * tokens + t) * nblocks;
      double total = 0;
      for (int64_t b = 0; b < nblocks; ++b) {
        total += m[b];
        const bool listed = std::find(blocks.begin() + indptr[h / 3], blocks.begin() + indptr[h / 3 + 1], b) !=
                            blocks.begin() + indptr[h / 3 + 1];
        if (!listed) {
          EXPECT_EQ(m[b], 0.0f) << "mass on an unlisted block";
        }
      }
      EXPECT_NEAR(total, 1.0, 1e-5);
    }
  }
  // A dense "selection" of every block is the same as no selection.
  std::vector<int32_t> all_indptr = {0, static_cast<int32_t>(nblocks), static_cast<int32_t>(2 * nblocks)}, all;
  for (int h = 0; h < 2; ++h) {
    for (int64_t b = 0; b < nblocks; ++b) all.push_back(static_cast<int32_t>(b));
  }
  std::vector<float> dense(q.size()), listed(q.size());
  p = {.q = q.data(), .out = dense.data(), .kv_layer = pool.data(), .block_table = table.data(), .context_len = ctx,
       .num_tokens = tokens, .num_heads = heads, .num_kv_heads = kv_heads, .head_dim = hd, .block_size = bs,
       .scale = 0.125f};
  PagedAttentionCpu(p);
  p.out = listed.data();
  p.sel_indptr = all_indptr.data();
  p.sel_blocks = all.data();
  PagedAttentionCpu(p);
  EXPECT_EQ(dense, listed);
  // A head whose list holds no position at or before a query row outputs zeros for it.
  std::vector<int32_t> late_indptr = {0, 1, 2}, late = {static_cast<int32_t>(nblocks - 1), static_cast<int32_t>(nblocks - 1)};
  p.sel_indptr = late_indptr.data();
  p.sel_blocks = late.data();
  p.context_len = (nblocks - 1) * bs + 2;  // the last block holds 2 tokens; 5 queries start before it
  PagedAttentionCpu(p);
  for (int d = 0; d < hd; ++d) EXPECT_EQ(listed[d], 0.0f);  // query 0, head 0: sees nothing
}

}  // namespace
}  // namespace scout::kernels

namespace scout::kernels {
namespace {

// Sliding windows (Mistral, Qwen2): each query sees the `window` positions ending at its own.
// The float64 reference checks every key against the mask directly; windows that cut blocks,
// prefill chunks larger than the window, decode rows, with a selection and the block masses.
TEST(PagedAttentionCpuTest, SlidingWindowMatchesFloat64) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int bs = 16, hd = 32, heads = 4, kv_heads = 2;
  struct WCase {
    int64_t ctx;
    int tokens;
    int64_t window;
  };
  const WCase cases[] = {{100, 100, 24}, {100, 100, 1}, {100, 100, 16}, {100, 100, 17}, {200, 1, 24},
                         {200, 7, 33},   {64, 64, 64},  {64, 64, 500},  {5000, 300, 1000}};
  for (const WCase& c : cases) {
    const int64_t nblocks = (c.ctx + bs - 1) / bs;
    std::vector<int32_t> table(nblocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);
    std::vector<float> pool(nblocks * kv_heads * 2 * bs * hd), q(int64_t{c.tokens} * heads * hd);
    for (float& x : pool) x = normal(rng);
    for (float& x : q) x = 2 * normal(rng);
    std::vector<float> out(q.size(), NAN), ref(q.size(), NAN), mass(int64_t{heads} * c.tokens * nblocks, -1.0f);
    PagedAttentionParams p{.q = q.data(), .out = out.data(), .kv_layer = pool.data(), .block_table = table.data(),
                           .context_len = c.ctx, .num_tokens = c.tokens, .num_heads = heads, .num_kv_heads = kv_heads,
                           .head_dim = hd, .block_size = bs, .scale = 0.2f, .sliding_window = c.window,
                           .block_mass = mass.data()};
    PagedAttentionCpu(p);
    p.out = ref.data();
    p.block_mass = nullptr;
    PagedAttentionNaiveF64(p);
    for (float x : out) ASSERT_TRUE(std::isfinite(x));
    EXPECT_LT(RelL2(out, ref), 1e-5) << "ctx " << c.ctx << " tokens " << c.tokens << " window " << c.window;
    // Mass only on blocks that hold a position of the query's window.
    for (int h = 0; h < heads; ++h) {
      for (int t = 0; t < c.tokens; ++t) {
        const int64_t qpos = c.ctx - c.tokens + t;
        const float* m = mass.data() + (int64_t{h} * c.tokens + t) * nblocks;
        double total = 0;
        for (int64_t b = 0; b < nblocks; ++b) {
          total += m[b];
          const bool in_window = (b + 1) * bs - 1 > qpos - c.window && b * bs <= qpos;
          if (!in_window) {
            EXPECT_EQ(m[b], 0.0f) << "block " << b << " query " << qpos;
          }
        }
        EXPECT_NEAR(total, 1.0, 1e-5);
      }
    }
    // A window covering the whole context is plain causal attention, bit for bit.
    if (c.window >= c.ctx) {
      std::vector<float> full(q.size());
      p.out = full.data();
      p.sliding_window = 0;
      PagedAttentionCpu(p);
      EXPECT_EQ(full, out);
    }
  }
  // Decode of one token with window 1 reads only its own value.
  const int64_t ctx = 40;
  std::vector<int32_t> table = {2, 0, 1};
  std::vector<float> pool(3 * 1 * 2 * bs * 4), q(4, 1.0f), out(4);
  for (size_t i = 0; i < pool.size(); ++i) pool[i] = static_cast<float>(i % 13);
  PagedAttentionParams p{.q = q.data(), .out = out.data(), .kv_layer = pool.data(), .block_table = table.data(),
                         .context_len = ctx, .num_tokens = 1, .num_heads = 1, .num_kv_heads = 1, .head_dim = 4,
                         .block_size = bs, .scale = 1.0f, .sliding_window = 1};
  PagedAttentionCpu(p);
  const float* v = pool.data() + (int64_t{table[(ctx - 1) / bs]} * 2 + 1) * bs * 4 + ((ctx - 1) % bs) * 4;
  for (int d = 0; d < 4; ++d) EXPECT_FLOAT_EQ(out[d], v[d]);
}

}  // namespace
}  // namespace scout::kernels

namespace scout::kernels {
namespace {

// SANTA on the CPU backend's float32 layout: the same estimator as SantaRef (same rows, groups,
// uniforms and hits), and unbiased over seeds.
TEST(SantaAttentionCpuTest, MatchesSantaRefAndIsUnbiased) {
  std::mt19937 rng(77);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const auto& [context, tokens, heads, kv_heads, hd, selected] :
       std::vector<std::tuple<int64_t, int, int, int, int, bool>>{
           {37, 1, 4, 1, 64, false}, {300, 5, 6, 2, 64, true}, {129, 7, 8, 2, 128, false}, {1000, 5, 32, 8, 128, true}}) {
    const int64_t nblocks = (context + 15) / 16;
    std::vector<int32_t> table(nblocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);
    // Values rounded to bf16 first, so SantaRef (bf16 inputs) sees the same numbers.
    auto bf16_round = [](float x) { return Bf16ToFloat(FloatToBf16(x)); };
    std::vector<float> kv(nblocks * kv_heads * 2 * 16 * hd), q(int64_t{tokens} * heads * hd);
    for (float& x : kv) x = bf16_round(normal(rng));
    for (float& x : q) x = bf16_round(normal(rng));
    std::vector<int32_t> sel_indptr = {0}, sel_blocks;
    for (int h = 0; h < kv_heads && selected; ++h) {
      for (int64_t b = 0; b < nblocks; ++b) {
        if (b == 0 || b >= nblocks - 2 || rng() % 3 == 0) sel_blocks.push_back(static_cast<int32_t>(b));
      }
      sel_indptr.push_back(static_cast<int32_t>(sel_blocks.size()));
    }
    PagedAttentionParams p{.q = q.data(), .kv_layer = kv.data(), .block_table = table.data(), .context_len = context,
                           .num_tokens = tokens, .num_heads = heads, .num_kv_heads = kv_heads, .head_dim = hd,
                           .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                           .sel_indptr = selected ? sel_indptr.data() : nullptr,
                           .sel_blocks = selected ? sel_blocks.data() : nullptr, .santa_samples = 64, .santa_seed = 5};
    std::vector<float> got(q.size()), exact(q.size()), ref(q.size()), mean(q.size(), 0.0f);
    p.out = got.data();
    PagedAttentionCpu(p);
    // SantaRef over the same numbers in bf16.
    std::vector<uint16_t> q16(q.size()), kv16(kv.size()), out16(q.size());
    for (size_t i = 0; i < q.size(); ++i) q16[i] = FloatToBf16(q[i]);
    for (size_t i = 0; i < kv.size(); ++i) kv16[i] = FloatToBf16(kv[i]);
    const int32_t q_indptr[2] = {0, tokens}, seq_len = static_cast<int32_t>(context);
    SantaRef({.attn = {.q = q16.data(), .out = out16.data(), .kv = kv16.data(), .q_indptr = q_indptr,
                       .seq_lens = &seq_len, .block_table = table.data(), .max_blocks_per_seq = static_cast<int>(nblocks),
                       .sel_indptr = selected ? sel_indptr.data() : nullptr,
                       .sel_blocks = selected ? sel_blocks.data() : nullptr, .num_seqs = 1, .num_heads = heads,
                       .num_kv_heads = kv_heads, .head_dim = hd, .scale = p.scale},
              .samples = 64, .seed = 5},
             ref.data());
    // float32 against double softmax: a hit can move only where a point falls within rounding of
    // a boundary, so the outputs agree to float precision on these seeded inputs.
    EXPECT_LT(RelL2(got, ref), 1e-4) << "context " << context;
    // Unbiased: the mean over seeds approaches the exact output.
    p.santa_samples = 0;
    p.out = exact.data();
    PagedAttentionCpu(p);
    p.santa_samples = 16;
    const int seeds = 400;
    for (int s = 0; s < seeds; ++s) {
      p.santa_seed = 1000 + s;
      p.out = got.data();
      PagedAttentionCpu(p);
      for (size_t i = 0; i < got.size(); ++i) mean[i] += got[i] / seeds;
    }
    p.santa_seed = 1;
    PagedAttentionCpu(p);
    const double one = RelL2(got, exact), avg = RelL2(mean, exact);
    // Sampling error falls as 1/sqrt(seeds): 400 seeds cut it about 20-fold.
    EXPECT_LT(avg, one / 5) << "context " << context << ": one draw " << one << ", mean of " << seeds << " " << avg;
  }
}

}  // namespace
}  // namespace scout::kernels
