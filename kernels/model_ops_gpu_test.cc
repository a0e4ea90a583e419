// CUDA model operations against their C++ references (ctest label gpu).
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "kernels/bf16.h"
#include "kernels/cuda_test_util.h"
#include "kernels/gpu_test_util.h"
#include "kernels/model_ops.cuh"
#include "kernels/sparse_decode.cuh"
#include "kernels/sparse_decode_problem.h"

namespace scout::kernels {
namespace {

// Device copies that free themselves.
struct Dev {
  std::vector<void*> owned;
  ~Dev() {
    for (void* p : owned) cudaFree(p);
  }
  template <typename T>
  T* Put(const std::vector<T>& v) {
    return testing::Upload(v, &owned);
  }
  template <typename T>
  std::vector<T> Get(const T* d, size_t n) {
    std::vector<T> v(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
};

std::vector<float> Normal(size_t n, std::mt19937& rng, float sd = 1.0f) {
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

std::vector<uint16_t> NormalBf16(size_t n, std::mt19937& rng, float sd = 1.0f) {
  std::vector<uint16_t> v(n);
  std::normal_distribution<float> d(0.0f, sd);
  for (uint16_t& x : v) x = FloatToBf16(d(rng));
  return v;
}

// bf16 results may differ by one unit in the last place where float32 work differs in order
// (reductions, sincos, expf): the references sum serially, the kernels in trees.
void ExpectBf16Near(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 5; ++i) {
    if (got[i] == want[i]) continue;  // also the untouched poison (NaN) of both
    const float g = Bf16ToFloat(got[i]), w = Bf16ToFloat(want[i]);
    const float tol = std::abs(w) * (1.0f / 128.0f) + 1e-6f;  // one bf16 ulp (8 mantissa bits)
    if (!(std::abs(g - w) <= tol)) {
      ADD_FAILURE() << what << "[" << i << "] = " << g << ", reference " << w;
      ++bad;
    }
  }
}

TEST(ModelOpsGpu, EmbedIsExact) {
  std::mt19937 rng(1);
  for (int dim : {1, 17, 384}) {
    const int vocab = 37, rows = 9;
    std::vector<uint16_t> table = NormalBf16(vocab * dim, rng);
    std::vector<int32_t> tokens(rows);
    for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % vocab);
    std::vector<float> want(rows * dim, NAN);
    EmbedRef({.table = table.data(), .tokens = tokens.data(), .out = want.data(), .rows = rows, .dim = dim});
    Dev dev;
    float* out = dev.Put(std::vector<float>(rows * dim, NAN));
    ASSERT_EQ(Embed({.table = dev.Put(table), .tokens = dev.Put(tokens), .out = out, .rows = rows, .dim = dim}, nullptr),
              cudaSuccess);
    EXPECT_EQ(dev.Get(out, want.size()), want);
  }
}

TEST(ModelOpsGpu, RmsNormMatchesReference) {
  std::mt19937 rng(2);
  for (int dim : {1, 17, 384, 4096}) {
    for (int rows : {1, 5}) {
      std::vector<float> x = Normal(rows * dim, rng, 3.0f), w = Normal(dim, rng);
      std::vector<uint16_t> want(rows * dim, 0xffff);
      RmsNormRef({.x = x.data(), .weight = w.data(), .out = want.data(), .rows = rows, .dim = dim, .eps = 1e-5f});
      Dev dev;
      uint16_t* out = dev.Put(std::vector<uint16_t>(rows * dim, 0xffff));
      ASSERT_EQ(RmsNorm({.x = dev.Put(x), .weight = dev.Put(w), .out = out, .rows = rows, .dim = dim, .eps = 1e-5f}, nullptr),
                cudaSuccess);
      ExpectBf16Near(dev.Get(out, want.size()), want, "rmsnorm");
    }
  }
}

TEST(ModelOpsGpu, RopeAppendMatchesReferenceAndTouchesOnlyItsSlots) {
  std::mt19937 rng(3);
  struct Shape {
    int nh, nkv, hd, rows;
  };
  for (int variant = 0; variant < 10; ++variant) {
    const Shape s = std::array{Shape{6, 2, 64, 1}, Shape{6, 2, 64, 33}, Shape{32, 8, 128, 5}, Shape{4, 4, 16, 17},
                               Shape{3, 1, 64, 2}}[variant % 5];
    // Variants 5..9 write into a pool of units (the host KV tier's GPU cache) through unit_slots.
    const bool units = variant >= 5;
    const int num_blocks = 11;
    std::vector<float> qkv = Normal(int64_t{s.rows} * (s.nh + 2 * s.nkv) * s.hd, rng);
    std::vector<int32_t> positions(s.rows), phys(s.rows);
    // Distinct (block, slot) per row; positions up to 1M so the float32 angles are large.
    std::vector<int32_t> cells(num_blocks * kKvBlockSize);
    for (size_t i = 0; i < cells.size(); ++i) cells[i] = static_cast<int32_t>(i);
    std::shuffle(cells.begin(), cells.end(), rng);
    for (int r = 0; r < s.rows; ++r) {
      phys[r] = cells[r] / kKvBlockSize;
      positions[r] = static_cast<int32_t>(rng() % (1 << 20)) / kKvBlockSize * kKvBlockSize + cells[r] % kKvBlockSize;
    }
    // Unit mode: (block, head) cells map to distinct units through a random permutation.
    std::vector<int32_t> unit_of(num_blocks * s.nkv), unit_slots;
    for (size_t i = 0; i < unit_of.size(); ++i) unit_of[i] = static_cast<int32_t>(i);
    std::shuffle(unit_of.begin(), unit_of.end(), rng);
    for (int r = 0; r < s.rows && units; ++r) {
      for (int h = 0; h < s.nkv; ++h) unit_slots.push_back(unit_of[phys[r] * s.nkv + h]);
    }
    std::vector<float> inv_freq(s.hd / 2);
    for (int i = 0; i < s.hd / 2; ++i) inv_freq[i] = std::pow(500000.0f, -2.0f * i / s.hd);
    std::vector<uint16_t> q_want(int64_t{s.rows} * s.nh * s.hd, 0xffff);
    std::vector<uint16_t> kv_want(int64_t{num_blocks} * s.nkv * 2 * kKvBlockSize * s.hd, 0x7fbf);  // poison
    Dev dev;
    uint16_t* q = dev.Put(q_want);
    uint16_t* kv = dev.Put(kv_want);
    // Every other shape with Qwen2-style biases and a YaRN-style attention scaling.
    const bool extras = (s.rows % 2) == 1;
    std::vector<float> bias = Normal(int64_t{s.nh + 2 * s.nkv} * s.hd, rng, 0.5f);
    RopeAppendParams p{.qkv = qkv.data(), .positions = positions.data(), .phys_blocks = phys.data(),
                       .inv_freq = inv_freq.data(), .q = q_want.data(), .kv = kv_want.data(), .rows = s.rows,
                       .num_heads = s.nh, .num_kv_heads = s.nkv, .head_dim = s.hd,
                       .bias = extras ? bias.data() : nullptr, .attention_scaling = extras ? 1.1386f : 1.0f,
                       .unit_slots = units ? unit_slots.data() : nullptr};
    RopeAppendRef(p);
    if (extras) p.bias = dev.Put(bias);
    if (units) p.unit_slots = dev.Put(unit_slots);
    p.qkv = dev.Put(qkv);
    p.positions = dev.Put(positions);
    p.phys_blocks = dev.Put(phys);
    p.inv_freq = dev.Put(inv_freq);
    p.q = q;
    p.kv = kv;
    ASSERT_EQ(RopeAppend(p, nullptr), cudaSuccess);
    ExpectBf16Near(dev.Get(q, q_want.size()), q_want, "q");
    std::vector<uint16_t> kv_got = dev.Get(kv, kv_want.size());
    for (size_t i = 0; i < kv_got.size(); ++i) {
      if (kv_want[i] == 0x7fbf) {
        ASSERT_EQ(kv_got[i], 0x7fbf) << "kernel wrote outside its slots at " << i;
      }
    }
    ExpectBf16Near(kv_got, kv_want, "kv");
  }
}

TEST(ModelOpsGpu, AddBiasMatchesReference) {
  std::mt19937 rng(9);
  for (int n : {1, 33, 4096}) {
    const int rows = 3;
    std::vector<float> y = Normal(rows * n, rng), b = Normal(n, rng), want = y;
    AddBiasRef({.y = want.data(), .bias = b.data(), .rows = rows, .n = n});
    Dev dev;
    float* dy = dev.Put(y);
    ASSERT_EQ(AddBias({.y = dy, .bias = dev.Put(b), .rows = rows, .n = n}, nullptr), cudaSuccess);
    EXPECT_EQ(dev.Get(dy, want.size()), want);  // one float add each: exact
  }
}

TEST(ModelOpsGpu, SiluMulMatchesReference) {
  std::mt19937 rng(4);
  for (int inter : {1, 7, 1536}) {
    const int rows = 3;
    std::vector<float> gu = Normal(rows * 2 * inter, rng, 4.0f);
    std::vector<uint16_t> want(rows * inter, 0xffff);
    SiluMulRef({.gate_up = gu.data(), .out = want.data(), .rows = rows, .inter = inter});
    Dev dev;
    uint16_t* out = dev.Put(std::vector<uint16_t>(rows * inter, 0xffff));
    ASSERT_EQ(SiluMul({.gate_up = dev.Put(gu), .out = out, .rows = rows, .inter = inter}, nullptr), cudaSuccess);
    ExpectBf16Near(dev.Get(out, want.size()), want, "silu");
  }
}

// Three segments merged on the device against the reference: awkward row counts, head dims 64
// and 128, rows a segment gives nothing to (-inf), the bf16 output on the last.
TEST(ModelOpsGpu, MergeAttentionMatchesReference) {
  std::mt19937 rng(23);
  for (int hd : {64, 128}) {
    for (int rows : {1, 37 * 5, 4099}) {
      Dev dev;
      std::vector<float> acc(static_cast<size_t>(rows) * hd, 0.0f), acc_lse(rows, 0.0f);
      float* d_acc = dev.Put(acc);
      float* d_acc_lse = dev.Put(acc_lse);
      uint16_t* d_out = dev.Put(std::vector<uint16_t>(acc.size(), 0xffff));
      std::vector<uint16_t> want(acc.size());
      for (int k = 0; k < 3; ++k) {
        const std::vector<uint16_t> part = NormalBf16(acc.size(), rng);
        std::vector<float> lse = Normal(rows, rng, 8.0f);
        for (int r = 0; r < rows; r += 7) lse[r] = -INFINITY;
        const bool last = k == 2;
        MergeAttentionRef({.part = part.data(), .part_lse = lse.data(), .acc = acc.data(), .acc_lse = acc_lse.data(),
                           .out = last ? want.data() : nullptr, .rows = rows, .head_dim = hd, .first = k == 0});
        ASSERT_EQ(MergeAttention({.part = dev.Put(part), .part_lse = dev.Put(lse), .acc = d_acc, .acc_lse = d_acc_lse,
                                  .out = last ? d_out : nullptr, .rows = rows, .head_dim = hd, .first = k == 0},
                                 nullptr),
                  cudaSuccess);
      }
      const std::vector<float> got = dev.Get(d_acc, acc.size()), got_lse = dev.Get(d_acc_lse, rows);
      for (size_t i = 0; i < acc.size(); ++i) ASSERT_NEAR(got[i], acc[i], 1e-5f + 1e-5f * std::fabs(acc[i])) << i;
      for (int r = 0; r < rows; ++r) {
        if (std::isinf(acc_lse[r])) {
          ASSERT_EQ(got_lse[r], acc_lse[r]) << r;
        } else {
          ASSERT_NEAR(got_lse[r], acc_lse[r], 1e-5f + 1e-6f * std::fabs(acc_lse[r])) << r;
        }
      }
      ExpectBf16Near(dev.Get(d_out, acc.size()), want, "merged output");
    }
  }
}

TEST(ModelOpsGpu, ArgmaxMatchesReferenceWithTiesAndNan) {
  std::mt19937 rng(5);
  for (int vocab : {1, 2, 259, 128256}) {
    const int rows = 6;
    std::vector<float> logits = Normal(int64_t{rows} * vocab, rng);
    if (vocab > 2) {
      logits[0 * vocab + vocab - 1] = 100.0f;  // the last entry wins
      logits[1 * vocab + 1] = logits[1 * vocab + vocab - 2] = 50.0f;  // a tie: the lower index
      for (int i = 0; i < vocab; ++i) logits[2 * vocab + i] = NAN;  // all NaN: 0
      logits[3 * vocab + 0] = NAN;
      logits[3 * vocab + 2] = 70.0f;  // NaN first, then a winner
    }
    std::vector<int32_t> want(rows, -1);
    ArgmaxRef({.logits = logits.data(), .out = want.data(), .rows = rows, .vocab = vocab});
    Dev dev;
    int32_t* out = dev.Put(std::vector<int32_t>(rows, -1));
    ASSERT_EQ(Argmax({.logits = dev.Put(logits), .out = out, .rows = rows, .vocab = vocab}, nullptr), cudaSuccess);
    EXPECT_EQ(dev.Get(out, rows), want) << "vocab " << vocab;
  }
}

TEST(ModelOpsGpu, GemvMatchesReference) {
  std::mt19937 rng(8);
  struct Shape {
    int rows, in, out;
  };
  for (Shape sh : {Shape{1, 8, 1}, Shape{1, 2056, 1000}, Shape{3, 64, 4099}, Shape{5, 4096, 37}, Shape{8, 14336, 300},
                   Shape{7, 200, 2}, Shape{2, 2048, 2048}}) {
    for (float beta : {0.0f, 1.0f}) {
      std::vector<uint16_t> w = NormalBf16(int64_t{sh.out} * sh.in, rng, 0.05f), x = NormalBf16(int64_t{sh.rows} * sh.in, rng);
      std::vector<float> y0 = Normal(int64_t{sh.rows} * sh.out, rng), want = y0;
      GemvParams p{.w = w.data(), .x = x.data(), .y = want.data(), .rows = sh.rows, .in = sh.in, .out = sh.out, .beta = beta};
      GemvRef(p);
      Dev dev;
      p.w = dev.Put(w);
      p.x = dev.Put(x);
      p.y = dev.Put(y0);
      ASSERT_EQ(Gemv(p, nullptr), cudaSuccess);
      std::vector<float> got = dev.Get(p.y, want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        // float32 sums of `in` products in another order than the double reference: a few ulps
        // of the sum of magnitudes (~0.05 * sqrt(in) here).
        const float tol = 1e-5f * std::sqrt(static_cast<float>(sh.in)) + 1e-5f * std::abs(want[i]);
        ASSERT_NEAR(got[i], want[i], tol) << "rows " << sh.rows << " in " << sh.in << " out " << sh.out << " at " << i;
      }
    }
  }
  GemvParams bad{.rows = 9, .in = 8, .out = 1};
  EXPECT_EQ(Gemv(bad, nullptr), cudaErrorInvalidValue);
  bad.rows = 1;
  bad.in = 12;
  EXPECT_EQ(Gemv(bad, nullptr), cudaErrorInvalidValue);
}

TEST(ModelOpsGpu, RandomFillMatchesHost) {
  for (int64_t n : {int64_t{1}, int64_t{1000003}}) {
    std::vector<uint16_t> want(n);
    RandomFillRef({.out = want.data(), .n = n, .seed = 42, .scale = 0.02f, .offset = 0.0f});
    Dev dev;
    uint16_t* out = dev.Put(std::vector<uint16_t>(n, 0xffff));
    ASSERT_EQ(RandomFill({.out = out, .n = n, .seed = 42, .scale = 0.02f, .offset = 0.0f}, nullptr), cudaSuccess);
    EXPECT_EQ(dev.Get(out, n), want);
  }
}

// The attention kernel's log-sum-exp against the reference's, then the block masses computed
// from it: they match the reference and sum to one per row (the probabilities they come from).
TEST(ModelOpsGpu, LseAndBlockMassMatchReference) {
  struct Case {
    std::vector<int> lens, q_tokens;
    int nh, nkv, hd;
    double keep = -1;  // < 0 dense, else the fraction of blocks listed
  };
  for (const Case& c : {Case{{1}, {1}, 4, 1, 64}, Case{{17, 300, 33}, {1, 5, 2}, 6, 2, 64},
                        Case{{4097}, {5}, 32, 8, 128}, Case{{16, 48}, {16, 3}, 3, 1, 64},
                        Case{{17, 300, 33}, {1, 5, 2}, 6, 2, 64, 0.3}, Case{{4097, 1000}, {1, 1}, 32, 8, 64, 0.1}}) {
    DecodeShape shape{.seq_lens = c.lens, .q_tokens = c.q_tokens, .num_heads = c.nh, .num_kv_heads = c.nkv,
                      .head_dim = c.hd, .keep_fraction = c.keep};
    DecodeProblem pr = MakeDecodeProblem(shape, 7);
    const int rows = pr.total_q_rows();
    std::vector<float> lse_want(rows * c.nh, NAN);
    SparseDecodeParams ref = pr.PagedParams();
    ref.lse = lse_want.data();
    SparseDecodeRef(ref);

    Dev dev;
    SparseDecodeParams p = ref;
    p.q = dev.Put(pr.q);
    p.out = dev.Put(pr.out);
    p.kv = dev.Put(pr.kv);
    p.q_indptr = dev.Put(pr.q_indptr);
    p.seq_lens = dev.Put(pr.seq_lens);
    p.block_table = dev.Put(pr.block_table);
    if (c.keep >= 0) {
      p.sel_indptr = dev.Put(pr.sel_indptr);
      p.sel_blocks = dev.Put(pr.sel_blocks);
    }
    p.lse = dev.Put(std::vector<float>(rows * c.nh, NAN));
    int sms = 0;
    ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
    const int rpc = SparseDecodeRowsPerCta();
    SparseDecodePlan plan = PlanSparseDecode(p.num_seqs, c.nh, c.nkv, pr.max_q_tokens(), pr.max_list_blocks(), rows, c.hd,
                                             sms, SparseDecodeCtasPerSm(c.hd, rpc), 0, rpc);
    void* ws = nullptr;
    ASSERT_EQ(cudaMalloc(&ws, std::max<size_t>(plan.workspace_bytes, 4)), cudaSuccess);
    dev.owned.push_back(ws);
    ASSERT_EQ(SparseDecode(p, plan, ws, nullptr), cudaSuccess);
    std::vector<float> lse_got = dev.Get(p.lse, lse_want.size());
    for (size_t i = 0; i < lse_got.size(); ++i) {
      // Scores in float32 summed in another order; base-2 log of sums of O(1000) terms.
      ASSERT_NEAR(lse_got[i], lse_want[i], 1e-3f * std::max(1.0f, std::abs(lse_want[i]))) << "row-head " << i;
    }

    const int max_t = pr.max_q_tokens(), nb_max = pr.max_blocks_per_seq;
    const int64_t seq_stride = int64_t{max_t} * c.nh * nb_max;
    std::vector<float> mass_want(c.lens.size() * seq_stride, -1.0f);
    BlockMassParams bp{.attn = ref, .mass = mass_want.data(), .mass_seq_stride = seq_stride,
                       .mass_token_stride = int64_t{c.nh} * nb_max, .mass_head_stride = nb_max};
    BlockMassRef(bp);
    bp.attn = p;  // device pointers, the kernel's own lse
    bp.mass = dev.Put(std::vector<float>(mass_want.size(), -1.0f));
    ASSERT_EQ(BlockMass(bp, c.keep >= 0 ? pr.max_list_blocks() : nb_max, max_t, nullptr), cudaSuccess);
    std::vector<float> mass_got = dev.Get(bp.mass, mass_want.size());
    for (size_t s = 0; s < c.lens.size(); ++s) {
      const int nb = (c.lens[s] + kKvBlockSize - 1) / kKvBlockSize;
      for (int t = 0; t < max_t; ++t) {
        for (int h = 0; h < c.nh; ++h) {
          double total = 0;
          for (int b = 0; b < nb_max; ++b) {
            const size_t i = s * seq_stride + (int64_t{t} * c.nh + h) * nb_max + b;
            if (t >= c.q_tokens[s] || b >= nb || mass_want[i] == -1.0f) {  // the reference left it: unlisted
              ASSERT_EQ(mass_got[i], -1.0f) << "wrote outside the sequence's rows and listed blocks";
              continue;
            }
            ASSERT_NEAR(mass_got[i], mass_want[i], 2e-4f + 2e-3f * mass_want[i]) << "seq " << s << " t " << t << " h " << h << " b " << b;
            total += mass_got[i];
          }
          if (t < c.q_tokens[s]) {
            EXPECT_NEAR(total, 1.0, 2e-3);
          }
        }
      }
    }

    // The same masses from the attention pass's own per-block log-sum-exp (no second key read):
    // the kernel's block_lse against the reference's, then the masses against the ones above.
    const int stride = nb_max;
    std::vector<float> blse_want(static_cast<size_t>(rows) * c.nh * stride, -7.0f);
    SparseDecodeParams ref2 = ref;
    ref2.block_lse = blse_want.data();
    ref2.block_lse_stride = stride;
    SparseDecodeRef(ref2);
    SparseDecodeParams p2 = p;
    p2.block_lse = dev.Put(std::vector<float>(blse_want.size(), -7.0f));
    p2.block_lse_stride = stride;
    ASSERT_EQ(SparseDecode(p2, plan, ws, nullptr), cudaSuccess);
    std::vector<float> blse_got = dev.Get(p2.block_lse, blse_want.size());
    for (size_t i = 0; i < blse_got.size(); ++i) {
      if (blse_want[i] == -7.0f || blse_want[i] == -INFINITY) {
        ASSERT_EQ(blse_got[i], blse_want[i]) << "block_lse entry " << i;
      } else {
        ASSERT_NEAR(blse_got[i], blse_want[i], 1e-3f * std::max(1.0f, std::abs(blse_want[i]))) << "block_lse entry " << i;
      }
    }
    BlockMassParams bp2 = bp;
    bp2.attn = p2;
    bp2.mass = dev.Put(std::vector<float>(mass_want.size(), -1.0f));
    ASSERT_EQ(BlockMass(bp2, c.keep >= 0 ? pr.max_list_blocks() : nb_max, max_t, nullptr), cudaSuccess);
    std::vector<float> mass_fused = dev.Get(bp2.mass, mass_want.size());
    for (size_t i = 0; i < mass_fused.size(); ++i) {
      if (mass_want[i] == -1.0f) {
        ASSERT_EQ(mass_fused[i], -1.0f) << "fused mass wrote outside the listed blocks at " << i;
      } else {
        ASSERT_NEAR(mass_fused[i], mass_want[i], 2e-4f + 2e-3f * mass_want[i]) << "fused mass " << i;
      }
    }
  }
}

}  // namespace
}  // namespace scout::kernels
