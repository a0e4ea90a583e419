#include "kernels/attention_cpu.h"

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
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
