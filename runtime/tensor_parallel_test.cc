// Tensor parallelism over NCCL against one GPU (ctest labels gpu, multi_gpu: nvidia-h100-x2).
#include "runtime/tensor_parallel.h"

#include <cuda_runtime.h>

#include <cstdlib>
#include <random>

#include "gtest/gtest.h"
#include "kernels/test_util.h"
#include "runtime/test_model.h"
#include "text/tokenizer.h"

namespace scout::runtime {
namespace {

const std::filesystem::path kModels =
    std::filesystem::path(std::getenv("SCOUT_SOURCE_DIR") ? std::getenv("SCOUT_SOURCE_DIR") : SCOUT_SOURCE_DIR) / "models";

int Gpus() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

int32_t Argmax(std::span<const float> row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

// Greedy tokens and the per-step logits of `steps` decode steps after `prompt`.
void Decode(ModelBackend& m, std::span<const int32_t> prompt, int steps, std::vector<int32_t>* out,
            std::vector<float>* all_logits) {
  ASSERT_TRUE(m.AddSequence(1).ok());
  std::vector<int32_t> next(prompt.begin(), prompt.end());
  for (int i = 0; i < steps; ++i) {
    std::vector<float> logits;
    SequenceInput in{.seq = 1, .tokens = next};
    absl::Status s = m.Forward({&in, 1}, &logits);
    ASSERT_TRUE(s.ok()) << s;
    out->push_back(Argmax(logits));
    all_logits->insert(all_logits->end(), logits.begin(), logits.end());
    next = {out->back()};
  }
  ASSERT_TRUE(m.ReleaseSequence(1).ok());
}

TEST(TensorParallelTest, TwoShardsGiveTheGreedyTokensOfOne) {
  if (Gpus() < 2) GTEST_SKIP() << "needs 2 GPUs";
  absl::StatusOr<std::unique_ptr<TensorParallelModel>> one =
      TensorParallelModel::Load(kModels / "scout-tiny-target", {.devices = {0}, .kv_budget_tokens = 8192});
  absl::StatusOr<std::unique_ptr<TensorParallelModel>> two =
      TensorParallelModel::Load(kModels / "scout-tiny-target", {.devices = {0, 1}, .kv_budget_tokens = 8192});
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_TRUE(two.ok()) << two.status();
  absl::StatusOr<std::string> text = ReadFile(kModels / "goldens" / "long_prompt.txt");
  ASSERT_TRUE(text.ok());
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> tok = text::LoadTokenizer(kModels / "scout-tiny-target");
  ASSERT_TRUE(tok.ok());
  std::vector<int32_t> prompt = (*tok)->Encode(text->substr(0, 2000), true);
  std::vector<int32_t> t1, t2;
  std::vector<float> l1, l2;
  Decode(**one, prompt, 128, &t1, &l1);
  Decode(**two, prompt, 128, &t2, &l2);
  // Same bf16 weights and caches; the shards' partial sums add in another order than one GEMM's.
  const double rel = kernels::testing::RelL2(l2, l1);
  std::printf("TP=2 vs TP=1: relative L2 of logits over 128 steps %.3g\n", rel);
  EXPECT_LT(rel, 2e-2);
  EXPECT_EQ(t2, t1);
}

TEST(TensorParallelTest, ShardsReadOnlyTheirHeadsOfASelection) {
  if (Gpus() < 2) GTEST_SKIP() << "needs 2 GPUs";
  ModelConfig c = testing::TinyConfig();
  c.hidden_size = 128;
  c.intermediate_size = 192;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.vocab_size = 70;
  std::filesystem::path dir = testing::FreshDir("tp");
  testing::WriteRandomModel(dir, c, 3);
  auto one = TensorParallelModel::Load(dir, {.devices = {0}});
  auto two = TensorParallelModel::Load(dir, {.devices = {0, 1}});
  ASSERT_TRUE(one.ok() && two.ok());
  std::mt19937 rng(5);
  std::vector<int32_t> prompt(300), step(5);
  for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % c.vocab_size);
  for (int32_t& t : step) t = static_cast<int32_t>(rng() % c.vocab_size);
  const int nb = static_cast<int>(kvstore::BlocksFor(305));
  kvstore::Selection sel{.num_layers = 2, .num_kv_heads = 2, .indptr = {0}, .blocks = {}};
  for (int u = 0; u < 4; ++u) {
    for (int b = 0; b < nb; ++b) {
      if (rng() % (u + 2) == 0) sel.blocks.push_back(b);  // different lists per KV head
    }
    sel.indptr.push_back(static_cast<int32_t>(sel.blocks.size()));
  }
  std::vector<float> want, got, unused;
  for (auto* m : {one->get(), two->get()}) {
    ASSERT_TRUE(m->AddSequence(4).ok());
    SequenceInput pre{.seq = 4, .tokens = prompt};
    ASSERT_TRUE(m->Forward({&pre, 1}, &unused).ok());
    SequenceInput in{.seq = 4, .tokens = step, .all_logits = true, .selection = &sel};
    absl::Status s = m->Forward({&in, 1}, m == one->get() ? &want : &got);
    ASSERT_TRUE(s.ok()) << s;
  }
  EXPECT_LT(kernels::testing::RelL2(got, want), 2e-2);
  // The host KV tier per shard: the same steps as the resident two shards, with a GPU cache of
  // 20 units per layer per shard (a shard holds one KV head): the 300-token context (19 blocks)
  // fits, and another sequence's 200 tokens in between evict most of it, so every step fetches
  // units back from the host store.
  auto tier = TensorParallelModel::Load(dir, {.devices = {0, 1}, .host_kv_tokens = 4096, .gpu_cache_units = 40});
  ASSERT_TRUE(tier.ok()) << tier.status();
  std::vector<float> tier_got;
  ASSERT_TRUE((*tier)->AddSequence(4).ok());
  {
    SequenceInput pre{.seq = 4, .tokens = prompt};
    ASSERT_TRUE((*tier)->Forward({&pre, 1}, &unused).ok());
  }
  std::vector<int32_t> other(200);
  for (int32_t& t : other) t = static_cast<int32_t>(rng() % c.vocab_size);
  for (int round = 0; round < 3; ++round) {
    ASSERT_TRUE((*tier)->AddSequence(10 + round).ok());
    SequenceInput in_between{.seq = 10 + round, .tokens = other};
    ASSERT_TRUE((*tier)->Forward({&in_between, 1}, &unused).ok());
    ASSERT_TRUE((*tier)->ReleaseSequence(10 + round).ok());
    for (auto* m : {two->get(), tier->get()}) {
      ASSERT_TRUE(m->TruncateSequence(4, 300).ok());  // verify the same rows again
      SequenceInput in{.seq = 4, .tokens = step, .all_logits = true, .selection = &sel};
      absl::Status s = m->Forward({&in, 1}, m == two->get() ? &want : &tier_got);
      ASSERT_TRUE(s.ok()) << s;
    }
    EXPECT_LT(kernels::testing::RelL2(tier_got, want), 1e-5) << "round " << round;
  }
  const HostKvTierStats ts = (*tier)->host_tier_stats();
  EXPECT_TRUE(ts.enabled);
  EXPECT_GT(ts.unit_misses, 0);
  // Sizes that do not divide the heads are refused, naming the field.
  auto three = TensorParallelModel::Load(dir, {.devices = {0, 1, 2}});
  EXPECT_EQ(three.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace scout::runtime
