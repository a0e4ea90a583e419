// The CUDA backend against the CPU backend (ctest label gpu: runs on the GPU machine).
#include "runtime/cuda_model.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <random>

#include "gtest/gtest.h"
#include "kernels/test_util.h"
#include "runtime/cpu_model.h"
#include "runtime/test_model.h"
#include "text/tokenizer.h"

namespace scout::runtime {
namespace {

using testing::FreshDir;
using testing::RandomTokens;
using testing::WriteRandomModel;

// The source tree: SCOUT_SOURCE_DIR in the environment (the GPU machine runs a copy elsewhere),
// else where this was built.
const std::filesystem::path kModels =
    std::filesystem::path(std::getenv("SCOUT_SOURCE_DIR") ? std::getenv("SCOUT_SOURCE_DIR") : SCOUT_SOURCE_DIR) / "models";

double RelL2(std::span<const float> a, std::span<const float> b) { return kernels::testing::RelL2(a, b); }

int32_t Argmax(std::span<const float> row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

// A small GQA model with the head dim the GPU attention supports.
ModelConfig SmallConfig() {
  ModelConfig c = testing::TinyConfig();
  c.hidden_size = 128;
  c.intermediate_size = 160;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.vocab_size = 75;
  c.max_position_embeddings = 1024;
  c.rope = {.type = "llama3", .theta = 500000, .factor = 8, .low_freq_factor = 1, .high_freq_factor = 4,
            .original_max_position_embeddings = 128};
  return c;
}

struct Pair {
  std::unique_ptr<CpuModel> cpu;
  std::unique_ptr<CudaModel> gpu;
};

Pair LoadPair(const std::filesystem::path& dir, int64_t kv_tokens = 0) {
  Pair p;
  absl::StatusOr<std::unique_ptr<CpuModel>> cpu = CpuModel::Load(dir, {.kv_budget_tokens = kv_tokens});
  EXPECT_TRUE(cpu.ok()) << cpu.status();
  absl::StatusOr<std::unique_ptr<CudaModel>> gpu = CudaModel::Load(dir, {.kv_budget_tokens = kv_tokens});
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  if (cpu.ok()) p.cpu = std::move(*cpu);
  if (gpu.ok()) p.gpu = std::move(*gpu);
  return p;
}

Pair SmallPair(int64_t kv_tokens = 0) {
  std::filesystem::path dir = FreshDir("small");
  WriteRandomModel(dir, SmallConfig(), 7);
  return LoadPair(dir, kv_tokens);
}

// The GPU runs bf16 activations into its GEMMs and a bf16 KV cache where the CPU keeps float32:
// each rounding is a relative 2^-9, and a few dozen of them per layer add up to 1e-2 to 4e-2
// (measured on the H100: 3.4e-2 for the fixture target and 4.0e-2 for the draft at 3000 tokens,
// worst row) on the logits.
constexpr double kLogitTol = 6e-2;

TEST(CudaModelTest, BatchOfUnevenSequencesMatchesCpu) {
  Pair p = SmallPair();
  ASSERT_TRUE(p.cpu && p.gpu);
  const int vocab = static_cast<int>(SmallConfig().vocab_size);
  // Prefills of 1, 17, 16 and 300 tokens (block boundaries), then mixed decode steps.
  std::vector<std::vector<int32_t>> prompts = {RandomTokens(1, vocab, 1), RandomTokens(17, vocab, 2),
                                               RandomTokens(16, vocab, 3), RandomTokens(300, vocab, 4)};
  for (ModelBackend* m : {static_cast<ModelBackend*>(p.cpu.get()), static_cast<ModelBackend*>(p.gpu.get())}) {
    for (int s = 0; s < 4; ++s) ASSERT_TRUE(m->AddSequence(s).ok());
  }
  for (int round = 0; round < 3; ++round) {
    std::vector<SequenceInput> batch;
    std::vector<std::vector<int32_t>> step(4);
    for (int s = 0; s < 4; ++s) {
      step[s] = round == 0 ? prompts[s] : RandomTokens(1 + (s + round) % 5, vocab, 10 * round + s);
      batch.push_back({.seq = s, .tokens = step[s], .all_logits = (s + round) % 2 == 0});
    }
    std::vector<float> want, got;
    ASSERT_TRUE(p.cpu->Forward(batch, &want).ok());
    absl::Status st = p.gpu->Forward(batch, &got);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(RelL2(got, want), kLogitTol) << "round " << round;
    for (size_t r = 0; r < want.size() / vocab; ++r) {
      for (float v : std::span<const float>(got).subspan(r * vocab, vocab)) ASSERT_TRUE(std::isfinite(v));
    }
  }
}

TEST(CudaModelTest, SelectionAndBlockMassMatchCpu) {
  Pair p = SmallPair();
  ASSERT_TRUE(p.cpu && p.gpu);
  const ModelConfig c = SmallConfig();
  std::vector<int32_t> prompt = RandomTokens(200, static_cast<int>(c.vocab_size), 5);
  std::vector<float> want, got, mass_want, mass_got;
  for (ModelBackend* m : {static_cast<ModelBackend*>(p.cpu.get()), static_cast<ModelBackend*>(p.gpu.get())}) {
    ASSERT_TRUE(m->AddSequence(9).ok());
    SequenceInput in{.seq = 9, .tokens = prompt};
    std::vector<float> unused;
    ASSERT_TRUE(m->Forward({&in, 1}, &unused).ok());
  }
  // A draft-like step: 3 tokens, dense, with the attention mass per block.
  std::vector<int32_t> step = RandomTokens(3, static_cast<int>(c.vocab_size), 6);
  SequenceInput dense_cpu{.seq = 9, .tokens = step, .all_logits = true, .block_mass = &mass_want};
  SequenceInput dense_gpu{.seq = 9, .tokens = step, .all_logits = true, .block_mass = &mass_got};
  ASSERT_TRUE(p.cpu->Forward({&dense_cpu, 1}, &want).ok());
  absl::Status st = p.gpu->Forward({&dense_gpu, 1}, &got);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_LT(RelL2(got, want), kLogitTol);
  ASSERT_EQ(mass_got.size(), mass_want.size());
  EXPECT_LT(RelL2(mass_got, mass_want), 5e-2);  // probabilities from bf16 keys and queries
  // A verify-like step over random per-(layer, KV head) lists (the new tokens' blocks are
  // always seen, whatever the lists say).
  std::mt19937 rng(3);
  kvstore::Selection sel{.num_layers = static_cast<int>(c.num_hidden_layers),
                         .num_kv_heads = static_cast<int>(c.num_key_value_heads), .indptr = {0}, .blocks = {}};
  const int nb = static_cast<int>(kvstore::BlocksFor(203 + 5));
  for (int u = 0; u < sel.num_layers * sel.num_kv_heads; ++u) {
    for (int b = 0; b < nb; ++b) {
      if (rng() % 3 == 0) sel.blocks.push_back(b);
    }
    sel.indptr.push_back(static_cast<int32_t>(sel.blocks.size()));
  }
  std::vector<int32_t> verify = RandomTokens(5, static_cast<int>(c.vocab_size), 7);
  SequenceInput sparse{.seq = 9, .tokens = verify, .all_logits = true, .selection = &sel};
  ASSERT_TRUE(p.cpu->Forward({&sparse, 1}, &want).ok());
  st = p.gpu->Forward({&sparse, 1}, &got);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_LT(RelL2(got, want), kLogitTol);
}

TEST(CudaModelTest, TruncateThenContinueEqualsFreshSequence) {
  Pair p = SmallPair();
  ASSERT_TRUE(p.gpu);
  const int vocab = static_cast<int>(SmallConfig().vocab_size);
  std::vector<int32_t> a = RandomTokens(40, vocab, 8), b = RandomTokens(6, vocab, 9);
  CudaModel& m = *p.gpu;
  ASSERT_TRUE(m.AddSequence(1).ok());
  std::vector<float> logits;
  SequenceInput in{.seq = 1, .tokens = a};
  ASSERT_TRUE(m.Forward({&in, 1}, &logits).ok());
  std::vector<int32_t> wrong_tokens = RandomTokens(7, vocab, 10);
  SequenceInput wrong{.seq = 1, .tokens = wrong_tokens};
  ASSERT_TRUE(m.Forward({&wrong, 1}, &logits).ok());
  ASSERT_TRUE(m.TruncateSequence(1, 40).ok());
  SequenceInput cont{.seq = 1, .tokens = b, .all_logits = true};
  std::vector<float> got;
  ASSERT_TRUE(m.Forward({&cont, 1}, &got).ok());

  std::vector<int32_t> ab = a;
  ab.insert(ab.end(), b.begin(), b.end());
  ASSERT_TRUE(m.AddSequence(2).ok());
  SequenceInput fresh{.seq = 2, .tokens = ab, .all_logits = true};
  std::vector<float> all;
  ASSERT_TRUE(m.Forward({&fresh, 1}, &all).ok());
  std::vector<float> want(all.end() - 6 * vocab, all.end());
  // Same arithmetic on the same bf16 cache, but a prefill and a 6-token step split the
  // attention differently (splits, row groups): float32 sums in another order.
  EXPECT_LT(RelL2(got, want), 1e-3);
}

// A cluster worker adopting a sequence: its whole blocks exported from one model (GPU-resident or
// host tier) and imported into another continue exactly as the original does.
TEST(CudaModelTest, ExportedKvImportedElsewhereContinuesTheSameWay) {
  std::filesystem::path dir = FreshDir("export");
  WriteRandomModel(dir, SmallConfig(), 7);
  const int vocab = static_cast<int>(SmallConfig().vocab_size);
  for (const bool tier_from : {false, true}) {
    for (const bool tier_to : {false, true}) {
      auto load = [&](bool tier) {
        absl::StatusOr<std::unique_ptr<CudaModel>> m =
            tier ? CudaModel::Load(dir, {.host_kv_tokens = 4096, .gpu_cache_units = 256})
                 : CudaModel::Load(dir, {.kv_budget_tokens = 4096});
        EXPECT_TRUE(m.ok()) << m.status();
        return std::move(*m);
      };
      std::unique_ptr<CudaModel> a = load(tier_from), b = load(tier_to);
      ASSERT_EQ(a->kv_unit_bytes(), size_t{2} * 16 * 64 * 2);
      std::vector<int32_t> prompt = RandomTokens(53, vocab, 3), next = RandomTokens(3, vocab, 4);
      ASSERT_TRUE(a->AddSequence(1).ok());
      std::vector<float> unused, want, got;
      SequenceInput in{.seq = 1, .tokens = prompt};
      ASSERT_TRUE(a->Forward({&in, 1}, &unused).ok());
      // 3 whole blocks (48 tokens) travel; the 5 tokens of the partial block are run again.
      const size_t units = 3 * SmallConfig().num_hidden_layers * SmallConfig().num_key_value_heads;
      std::vector<std::byte> kv(units * a->kv_unit_bytes());
      ASSERT_TRUE(a->ExportKv(1, 0, 3, kv.data()).ok());
      EXPECT_EQ(a->ExportKv(1, 2, 5, kv.data()).code(), absl::StatusCode::kOutOfRange);
      ASSERT_TRUE(b->AddSequence(7).ok());
      ASSERT_TRUE(b->ImportKv(7, 48, kv.data()).ok());
      EXPECT_EQ(*b->SequenceLength(7), 48);
      EXPECT_EQ(b->ImportKv(7, 48, kv.data()).code(), absl::StatusCode::kFailedPrecondition);
      SequenceInput tail{.seq = 7, .tokens = std::span<const int32_t>(prompt).subspan(48)};
      ASSERT_TRUE(b->Forward({&tail, 1}, &unused).ok());
      SequenceInput cont_a{.seq = 1, .tokens = next, .all_logits = true}, cont_b{.seq = 7, .tokens = next, .all_logits = true};
      ASSERT_TRUE(a->Forward({&cont_a, 1}, &want).ok());
      ASSERT_TRUE(b->Forward({&cont_b, 1}, &got).ok());
      // The same bf16 KV; only the 5-token tail ran as its own pass rather than inside the
      // prefill (float32 sums in another order), as in TruncateThenContinueEqualsFreshSequence.
      EXPECT_LT(RelL2(got, want), 1e-3) << "from tier " << tier_from << " to tier " << tier_to;
      // Reserved empty and filled unit by unit (a worker fetching lazily), partial block too:
      // the same bf16 KV as `a` had before its continuation, so the same logits.
      std::unique_ptr<CudaModel> c = load(tier_to);
      const int L = static_cast<int>(SmallConfig().num_hidden_layers), H = static_cast<int>(SmallConfig().num_key_value_heads);
      std::vector<std::byte> all(4 * L * H * a->kv_unit_bytes());
      ASSERT_TRUE(a->TruncateSequence(1, 53).ok());
      ASSERT_TRUE(a->ExportKv(1, 0, 4, all.data()).ok());
      ASSERT_TRUE(c->AddSequence(9).ok());
      ASSERT_TRUE(c->ImportKv(9, 53, nullptr).ok());
      std::vector<KvUnitRef> refs;
      std::vector<std::byte> bytes;
      const size_t unit = a->kv_unit_bytes();
      for (int i = 4 * L * H - 1; i >= 0; --i) {
        refs.push_back({.layer = (i / H) % L, .head = i % H, .block = i / (L * H)});
        bytes.insert(bytes.end(), all.begin() + static_cast<ptrdiff_t>(i * unit), all.begin() + static_cast<ptrdiff_t>((i + 1) * unit));
      }
      ASSERT_TRUE(c->WriteKvUnits(9, refs, bytes.data()).ok());
      const KvUnitRef bad[] = {{.layer = L, .head = 0, .block = 0}};
      EXPECT_EQ(c->WriteKvUnits(9, bad, bytes.data()).code(), absl::StatusCode::kOutOfRange);
      SequenceInput cont_c{.seq = 9, .tokens = next, .all_logits = true};
      std::vector<float> lazy;
      ASSERT_TRUE(c->Forward({&cont_c, 1}, &lazy).ok());
      EXPECT_LT(RelL2(lazy, want), 1e-6) << "unit by unit, tier " << tier_to;
    }
  }
}

TEST(CudaModelTest, BadInputsLeaveStateUnchanged) {
  Pair p = SmallPair(/*kv_tokens=*/64);
  ASSERT_TRUE(p.gpu);
  CudaModel& m = *p.gpu;
  ASSERT_TRUE(m.AddSequence(1).ok());
  std::vector<float> logits;
  std::vector<int32_t> ok_tokens = {1, 2, 3};
  std::vector<int32_t> bad_tokens = {1, 75};
  SequenceInput bad{.seq = 1, .tokens = bad_tokens};
  EXPECT_EQ(m.Forward({&bad, 1}, &logits).code(), absl::StatusCode::kInvalidArgument);
  SequenceInput unknown{.seq = 5, .tokens = ok_tokens};
  EXPECT_EQ(m.Forward({&unknown, 1}, &logits).code(), absl::StatusCode::kNotFound);
  std::vector<int32_t> big(80, 3);
  SequenceInput too_big{.seq = 1, .tokens = big};
  EXPECT_EQ(m.Forward({&too_big, 1}, &logits).code(), absl::StatusCode::kResourceExhausted);
  StsBudget budget{.budget_fraction = 0.5};
  SequenceInput quest{.seq = 1, .tokens = ok_tokens, .quest_budget = &budget};
  EXPECT_EQ(m.Forward({&quest, 1}, &logits).code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(*m.SequenceLength(1), 0);
  SequenceInput good{.seq = 1, .tokens = ok_tokens};
  EXPECT_TRUE(m.Forward({&good, 1}, &logits).ok());
  EXPECT_EQ(*m.SequenceLength(1), 3);
}

// A step enqueued with the device-side options (argmax on the GPU) and the same step captured
// in a CUDA graph and replayed give the synchronous path's logits and greedy tokens.
TEST(CudaModelTest, DeviceStepAndGraphReplayMatchForward) {
  Pair p = SmallPair();
  ASSERT_TRUE(p.gpu);
  CudaModel& m = *p.gpu;
  const int vocab = static_cast<int>(SmallConfig().vocab_size);
  std::vector<int32_t> prompt = RandomTokens(50, vocab, 11), step = {4, 5};
  ASSERT_TRUE(m.AddSequence(1).ok());
  ASSERT_TRUE(m.AddSequence(2).ok());
  std::vector<float> logits;
  SequenceInput pre[2] = {{.seq = 1, .tokens = prompt}, {.seq = 2, .tokens = prompt}};
  ASSERT_TRUE(m.Forward(pre, &logits).ok());
  SequenceInput batch[2] = {{.seq = 1, .tokens = step, .all_logits = true}, {.seq = 2, .tokens = step}};
  std::vector<float> want;
  ASSERT_TRUE(m.Forward(batch, &want).ok());
  ASSERT_EQ(want.size(), 3u * vocab);
  int32_t* argmax = nullptr;
  ASSERT_EQ(cudaMalloc(&argmax, 3 * sizeof(int32_t)), cudaSuccess);
  for (int mode = 0; mode < 2; ++mode) {
    ASSERT_TRUE(m.TruncateSequence(1, 50).ok());
    ASSERT_TRUE(m.TruncateSequence(2, 50).ok());
    ASSERT_EQ(cudaMemset(argmax, 0xff, 3 * sizeof(int32_t)), cudaSuccess);
    if (mode == 0) {
      ASSERT_TRUE(m.EnqueueForward(batch, {.argmax = argmax}).ok());
    } else {
      absl::StatusOr<int> g = m.CaptureForward(batch, {.argmax = argmax});
      ASSERT_TRUE(g.ok()) << g.status();
      ASSERT_TRUE(m.Replay(*g).ok());
      ASSERT_TRUE(m.Replay(*g).ok());  // same positions again: same result
    }
    ASSERT_TRUE(m.Synchronize().ok());
    std::vector<float> got(want.size());
    ASSERT_EQ(cudaMemcpy(got.data(), m.logits_device(), got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(got, want) << "mode " << mode;
    int32_t tokens[3];
    ASSERT_EQ(cudaMemcpy(tokens, argmax, sizeof(tokens), cudaMemcpyDeviceToHost), cudaSuccess);
    for (int r = 0; r < 3; ++r) EXPECT_EQ(tokens[r], Argmax(std::span<const float>(want).subspan(r * vocab, vocab)));
  }
  cudaFree(argmax);
}

// Random weights of a config's shapes, in memory (biases included when the config has them).
// The host KV tier against the GPU-resident cache, step for step: dense prefills, batches of
// selected and dense members, rollback, release and reuse of ids, with a GPU cache small enough
// that units are evicted between steps and come back from the host store.
TEST(CudaModelTest, HostKvTierMatchesGpuResidentCache) {
  std::filesystem::path dir = FreshDir("tier");
  const ModelConfig c = SmallConfig();
  WriteRandomModel(dir, c, 7);
  absl::StatusOr<std::unique_ptr<CudaModel>> resident = CudaModel::Load(dir, {.kv_budget_tokens = 4096});
  absl::StatusOr<std::unique_ptr<CudaModel>> tier =
      CudaModel::Load(dir, {.host_kv_tokens = 4096, .gpu_cache_units = 64});
  ASSERT_TRUE(resident.ok()) << resident.status();
  ASSERT_TRUE(tier.ok()) << tier.status();
  CudaModel& a = **resident;
  CudaModel& b = **tier;
  ASSERT_TRUE(b.host_tier());
  const int vocab = static_cast<int>(c.vocab_size);
  const int L = static_cast<int>(c.num_hidden_layers), nkv = static_cast<int>(c.num_key_value_heads);
  std::mt19937 rng(11);
  auto both = [&](std::span<const SequenceInput> batch, const std::string& what) {
    std::vector<float> want, got;
    absl::Status sa = a.Forward(batch, &want);
    absl::Status sb = b.Forward(batch, &got);
    ASSERT_TRUE(sa.ok()) << what << ": " << sa;
    ASSERT_TRUE(sb.ok()) << what << ": " << sb;
    ASSERT_EQ(got.size(), want.size());
    // Same kernels over the same bf16 values read from other addresses.
    EXPECT_LT(RelL2(got, want), 1e-5) << what;
  };
  auto random_selection = [&](int64_t length) {
    kvstore::Selection sel{.num_layers = L, .num_kv_heads = nkv, .indptr = {0}, .blocks = {}};
    const int nb = static_cast<int>(kvstore::BlocksFor(length));
    for (int u = 0; u < L * nkv; ++u) {
      for (int blk = 0; blk < nb; ++blk) {
        if (blk == 0 || rng() % 5 == 0) sel.blocks.push_back(blk);
      }
      sel.indptr.push_back(static_cast<int32_t>(sel.blocks.size()));
    }
    return sel;
  };
  const std::vector<int> prompt_len = {1, 17, 16, 150};
  for (int s = 0; s < 4; ++s) {
    for (CudaModel* m : {&a, &b}) ASSERT_TRUE(m->AddSequence(s).ok());
    std::vector<int32_t> prompt = RandomTokens(prompt_len[s], vocab, 20 + s);
    SequenceInput in{.seq = s, .tokens = prompt, .all_logits = true};
    both({&in, 1}, "prefill " + std::to_string(s));
  }
  {  // a second chunk of 150 over a selection: 40 units would not fit beside a dense read
    std::vector<int32_t> chunk = RandomTokens(150, vocab, 30);
    kvstore::Selection sel = random_selection(300);
    SequenceInput in{.seq = 3, .tokens = chunk, .all_logits = true, .selection = &sel};
    both({&in, 1}, "second chunk");
  }
  for (int round = 0; round < 12; ++round) {
    std::vector<std::vector<int32_t>> toks(4);
    std::vector<kvstore::Selection> sels(4);
    std::vector<SequenceInput> batch;
    for (int s = 0; s < 4; ++s) {
      if ((s + round) % 3 == 2) continue;  // not every sequence in every step
      toks[s] = RandomTokens(1 + static_cast<int>(rng() % 5), vocab, 100 * round + s);
      absl::StatusOr<int64_t> len = b.SequenceLength(s);
      ASSERT_TRUE(len.ok());
      const bool dense = *len < 40;  // short sequences read every block
      if (!dense) sels[s] = random_selection(*len + static_cast<int64_t>(toks[s].size()));
      batch.push_back({.seq = s, .tokens = toks[s], .all_logits = true, .selection = dense ? nullptr : &sels[s]});
    }
    both(batch, "round " + std::to_string(round));
    if (round % 4 == 3) {  // reject the last step's tokens of one sequence: rollback
      const SequenceId s = batch.front().seq;
      absl::StatusOr<int64_t> len = b.SequenceLength(s);
      ASSERT_TRUE(len.ok());
      for (CudaModel* m : {&a, &b}) ASSERT_TRUE(m->TruncateSequence(s, *len - 1).ok());
    }
    if (round == 6) {  // a released id comes back empty
      for (CudaModel* m : {&a, &b}) {
        ASSERT_TRUE(m->ReleaseSequence(1).ok());
        ASSERT_TRUE(m->AddSequence(1).ok());
      }
      std::vector<int32_t> prompt = RandomTokens(23, vocab, 77);
      SequenceInput in{.seq = 1, .tokens = prompt, .all_logits = true};
      both({&in, 1}, "re-added");
    }
  }
  const HostKvTierStats st = b.host_tier_stats();
  EXPECT_GT(st.unit_hits, 0);
  EXPECT_GT(st.unit_misses, 0);
  EXPECT_GT(st.bytes_flushed, 0);
  // More moved than the cache holds: units were evicted and came back from the host store.
  EXPECT_GT(st.unit_misses, 64) << "the test should force evictions";

  // A step whose new tokens leave no room for two segments of one block fails with a clear
  // error and changes nothing; the same tokens over a selection then work.
  std::vector<int64_t> lens;
  std::vector<std::vector<int32_t>> more(4);
  std::vector<SequenceInput> dense_all;
  for (int s = 0; s < 4; ++s) {
    absl::StatusOr<int64_t> l = b.SequenceLength(s);
    ASSERT_TRUE(l.ok());
    lens.push_back(*l);
    more[s] = RandomTokens(40, vocab, 5 + s);
    dense_all.push_back({.seq = s, .tokens = more[s]});
  }
  std::vector<float> logits;
  absl::Status too_big = b.Forward(dense_all, &logits);
  EXPECT_EQ(too_big.code(), absl::StatusCode::kResourceExhausted) << too_big;
  EXPECT_NE(too_big.message().find("GPU block cache"), std::string::npos) << too_big;
  for (int s = 0; s < 4; ++s) {
    absl::StatusOr<int64_t> l = b.SequenceLength(s);
    ASSERT_TRUE(l.ok());
    EXPECT_EQ(*l, lens[s]) << "sequence " << s << " changed by a refused step";
  }
  const int64_t* len = &lens[3];
  const std::vector<int32_t>& more3 = more[3];
  kvstore::Selection sel = random_selection(*len + 2);
  SequenceInput sparse{.seq = 3, .tokens = more3, .all_logits = true, .selection = &sel};
  both({&sparse, 1}, "after the refused step");
  // The tier refuses what it cannot do, by name.
  EXPECT_EQ(b.CaptureForward({&sparse, 1}, {}).status().code(), absl::StatusCode::kUnimplemented);
  // A dense step over more units than the cache holds (every block of all four sequences) runs
  // in segments (SegmentedAttention); each segment's output is rounded to bf16 before the merge,
  // so the logits agree to the bf16 rounding of one attention output, not bit for bit (and the
  // KV the step writes differs as much from then on: this comes last).
  {
    std::vector<std::vector<int32_t>> two(4);
    std::vector<SequenceInput> dense_all;
    for (int s = 0; s < 4; ++s) {
      two[s] = RandomTokens(2, vocab, 50 + s);
      dense_all.push_back({.seq = s, .tokens = two[s], .all_logits = true});
    }
    std::vector<float> want, got;
    ASSERT_TRUE(a.Forward(dense_all, &want).ok());
    absl::Status st = b.Forward(dense_all, &got);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_LT(RelL2(got, want), 1e-2);
  }
}

// A prompt longer than the host tier's GPU cache holds for a layer: its chunks attend to the
// earlier context in segments (two in flight, merged by log-sum-exp), and then decode steps too;
// the logits follow the GPU-resident model's to the bf16 rounding of the segments' outputs, and
// the units came through the cache more than once.
TEST(CudaModelTest, HostKvTierAttendsPastItsCacheInSegments) {
  std::filesystem::path dir = FreshDir("segments");
  const ModelConfig c = SmallConfig();
  WriteRandomModel(dir, c, 9);
  const int L = static_cast<int>(c.num_hidden_layers);
  absl::StatusOr<std::unique_ptr<CudaModel>> resident = CudaModel::Load(dir, {.kv_budget_tokens = 1024});
  // 40 units a layer: a 64-token chunk writes up to 10 (2 KV heads), leaving segments of 7
  // blocks; the 900-token context is 57 blocks, 114 units a layer.
  absl::StatusOr<std::unique_ptr<CudaModel>> tier =
      CudaModel::Load(dir, {.host_kv_tokens = 1024, .gpu_cache_units = 40 * L});
  ASSERT_TRUE(resident.ok()) << resident.status();
  ASSERT_TRUE(tier.ok()) << tier.status();
  CudaModel& a = **resident;
  CudaModel& b = **tier;
  for (CudaModel* m : {&a, &b}) ASSERT_TRUE(m->AddSequence(1).ok());
  const std::vector<int32_t> prompt = RandomTokens(900, static_cast<int>(c.vocab_size), 3);
  double worst = 0;
  for (size_t at = 0; at < prompt.size(); at += 64) {
    const size_t n = std::min<size_t>(64, prompt.size() - at);
    SequenceInput in{.seq = 1, .tokens = std::span<const int32_t>(prompt).subspan(at, n), .all_logits = true};
    std::vector<float> want, got;
    ASSERT_TRUE(a.Forward({&in, 1}, &want).ok());
    absl::Status st = b.Forward({&in, 1}, &got);
    ASSERT_TRUE(st.ok()) << "chunk at " << at << ": " << st;
    worst = std::max(worst, RelL2(got, want));
  }
  // Each segment's output is rounded to bf16 before the merge (up to 8 segments here), and the
  // KV written after a segmented layer inherits that: 1.0-1.5% on the H100 (2026-12-07), where a
  // wrong merge or a missing segment is of order one.
  constexpr double kSegmentTol = 3e-2;
  EXPECT_LT(worst, kSegmentTol);
  const int64_t misses_after_prefill = b.host_tier_stats().unit_misses;
  // The later chunks read all earlier blocks through a cache that holds a third of them.
  EXPECT_GT(misses_after_prefill, 2 * 114);
  int32_t token = prompt.back();
  for (int step = 0; step < 8; ++step) {  // both fed the resident model's greedy tokens
    SequenceInput in{.seq = 1, .tokens = std::span<const int32_t>(&token, 1)};
    std::vector<float> want, got;
    ASSERT_TRUE(a.Forward({&in, 1}, &want).ok());
    absl::Status st = b.Forward({&in, 1}, &got);
    ASSERT_TRUE(st.ok()) << "decode step " << step << ": " << st;
    EXPECT_LT(RelL2(got, want), kSegmentTol) << "decode step " << step;
    token = Argmax(want);
  }
  EXPECT_GT(b.host_tier_stats().unit_misses, misses_after_prefill);
  absl::StatusOr<int64_t> len = b.SequenceLength(1);
  ASSERT_TRUE(len.ok());
  EXPECT_EQ(*len, 908);
}

// Sampling on the GPU: the tokens ForwardSampled returns are what the reference draws from the
// same step's logits (greedy, temperature, top-k, top-p), and a wrong row count is refused.
TEST(CudaModelTest, ForwardSampledMatchesTheReferenceOnTheStepsLogits) {
  Pair p = SmallPair();
  ASSERT_TRUE(p.gpu);
  CudaModel& m = *p.gpu;
  const int vocab = static_cast<int>(SmallConfig().vocab_size);
  std::vector<std::vector<int32_t>> prompts = {RandomTokens(20, vocab, 1), RandomTokens(33, vocab, 2),
                                               RandomTokens(5, vocab, 3)};
  for (int s = 0; s < 3; ++s) {
    ASSERT_TRUE(m.AddSequence(s).ok());
    SequenceInput in{.seq = s, .tokens = prompts[s]};
    std::vector<float> unused;
    ASSERT_TRUE(m.Forward({&in, 1}, &unused).ok());
  }
  for (int step = 0; step < 6; ++step) {
    std::vector<std::vector<int32_t>> toks(3);
    std::vector<SequenceInput> batch;
    for (int s = 0; s < 3; ++s) {
      toks[s] = RandomTokens(1 + (s == 1 ? step % 3 : 0), vocab, 10 * step + s);
      batch.push_back({.seq = s, .tokens = toks[s], .all_logits = s == 1});
    }
    std::vector<float> logits;
    ASSERT_TRUE(m.Forward(batch, &logits).ok());
    const int rows = static_cast<int>(logits.size() / vocab);
    for (int s = 0; s < 3; ++s) {
      absl::StatusOr<int64_t> len = m.SequenceLength(s);
      ASSERT_TRUE(len.ok());
      ASSERT_TRUE(m.TruncateSequence(s, *len - static_cast<int64_t>(toks[s].size())).ok());
    }
    std::vector<kernels::SampleRowParams> params;
    for (int r = 0; r < rows; ++r) {
      params.push_back({.temperature = (r + step) % 4 == 0 ? 0.0f : 0.8f, .top_k = (r % 3) * 7,
                        .top_p = r % 2 == 0 ? 1.0f : 0.7f, .seed = static_cast<uint64_t>(100 * step + r)});
    }
    std::vector<int32_t> want(rows);
    kernels::SampleRef({.logits = logits.data(), .row = params.data(), .out = want.data(), .rows = rows, .vocab = vocab});
    std::vector<int32_t> got;
    absl::Status st = m.ForwardSampled(batch, params, &got);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(got, want) << "step " << step;
    // The pass's logit rows (logprobs): those the same step gave through Forward.
    const std::vector<int64_t> some = {rows - 1, 0};
    std::vector<float> kept;
    ASSERT_TRUE(m.LastLogitRows(some, &kept).ok());
    for (size_t i = 0; i < some.size(); ++i) {
      EXPECT_EQ(std::vector<float>(kept.begin() + i * vocab, kept.begin() + (i + 1) * vocab),
                std::vector<float>(logits.begin() + some[i] * vocab, logits.begin() + (some[i] + 1) * vocab))
          << "row " << some[i] << " of step " << step;
    }
    EXPECT_EQ(m.LastLogitRows(std::vector<int64_t>{rows}, &kept).code(), absl::StatusCode::kOutOfRange);
  }
  std::vector<int32_t> one = RandomTokens(1, vocab, 99), got;
  SequenceInput in{.seq = 0, .tokens = one};
  EXPECT_EQ(m.ForwardSampled({&in, 1}, {}, &got).code(), absl::StatusCode::kInvalidArgument);
}

LlamaWeights RandomWeights(const ModelConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.2f);
  auto fill = [&](int64_t n, float offset = 0.0f) {
    std::vector<float> v(n);
    for (float& x : v) x = offset + normal(rng);
    return v;
  };
  const int64_t d = c.hidden_size, hd = c.head_dim, qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
  LlamaWeights w;
  w.embed = fill(c.vocab_size * d);
  w.norm = fill(d, 1.0f);
  if (!c.tie_word_embeddings) w.lm_head = fill(c.vocab_size * d);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LlamaLayerWeights lw;
    lw.attn_norm = fill(d, 1.0f);
    lw.wqkv = fill(qkv * d);
    lw.wo = fill(d * c.num_attention_heads * hd);
    lw.mlp_norm = fill(d, 1.0f);
    lw.w_gate_up = fill(2 * c.intermediate_size * d);
    lw.w_down = fill(d * c.intermediate_size);
    if (c.qkv_bias) lw.bqkv = fill(qkv);
    if (c.o_bias) lw.bo = fill(d);
    w.layers.push_back(std::move(lw));
  }
  return w;
}

// Qwen2-style q/k/v biases, an output bias and YaRN RoPE (its attention scaling) on the GPU agree
// with the CPU backend (which matches transformers: runtime/arch_golden_test.cc).
TEST(CudaModelTest, BiasesAndYarnMatchCpu) {
  ModelConfig c = SmallConfig();
  c.qkv_bias = true;
  c.o_bias = true;
  c.rope = {.type = "yarn", .theta = 10000, .factor = 4, .original_max_position_embeddings = 64};
  LlamaWeights w = RandomWeights(c, 21);
  absl::StatusOr<std::unique_ptr<CudaModel>> gpu = CudaModel::Create(c, w);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  absl::StatusOr<std::unique_ptr<CpuModel>> cpu = CpuModel::Create(c, w);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  LlamaWeights plain = w;  // the same without biases: the biases must matter
  for (LlamaLayerWeights& l : plain.layers) {
    std::fill(l.bqkv.begin(), l.bqkv.end(), 0.0f);
    std::fill(l.bo.begin(), l.bo.end(), 0.0f);
  }
  absl::StatusOr<std::unique_ptr<CudaModel>> gpu_plain = CudaModel::Create(c, plain);
  ASSERT_TRUE(gpu_plain.ok());
  std::vector<int32_t> prompt = RandomTokens(230, static_cast<int>(c.vocab_size), 22);  // past 64: YaRN's range
  std::vector<float> want, got, other;
  for (auto [m, out] : {std::pair<ModelBackend*, std::vector<float>*>{cpu->get(), &want}, {gpu->get(), &got},
                        {gpu_plain->get(), &other}}) {
    ASSERT_TRUE(m->AddSequence(1).ok());
    SequenceInput in{.seq = 1, .tokens = prompt, .all_logits = true};
    absl::Status s = m->Forward({&in, 1}, out);
    ASSERT_TRUE(s.ok()) << s;
  }
  EXPECT_LT(RelL2(got, want), kLogitTol);
  EXPECT_GT(RelL2(other, want), 5 * kLogitTol);  // H100: 0.557 without the biases
}

// Sliding-window attention (Mistral everywhere, Qwen2 on some layers) over a prompt several
// windows long, prefilled at once and then decoded token by token across block boundaries.
TEST(CudaModelTest, SlidingWindowMatchesCpu) {
  ModelConfig c = SmallConfig();
  c.sliding_window = 37;  // not a multiple of the 16-token block
  c.sliding_layers = {false, true};
  c.max_position_embeddings = 2048;
  LlamaWeights w = RandomWeights(c, 31);
  absl::StatusOr<std::unique_ptr<CudaModel>> gpu = CudaModel::Create(c, w);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  absl::StatusOr<std::unique_ptr<CpuModel>> cpu = CpuModel::Create(c, w);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  // 1100 tokens at once: the prefill kernel (kernels::PrefillAttentionPays); then decode steps.
  std::vector<int32_t> prompt = RandomTokens(1100, static_cast<int>(c.vocab_size), 32);
  std::vector<float> want, got;
  for (auto [m, out] : {std::pair<ModelBackend*, std::vector<float>*>{cpu->get(), &want}, {gpu->get(), &got}}) {
    ASSERT_TRUE(m->AddSequence(1).ok());
    SequenceInput in{.seq = 1, .tokens = prompt, .all_logits = true};
    absl::Status s = m->Forward({&in, 1}, out);
    ASSERT_TRUE(s.ok()) << s;
    for (int i = 0; i < 20; ++i) {  // single-token steps
      std::vector<int32_t> one = {static_cast<int32_t>((7 * i + 3) % c.vocab_size)};
      std::vector<float> step;
      SequenceInput st{.seq = 1, .tokens = one};
      ASSERT_TRUE(m->Forward({&st, 1}, &step).ok());
      out->insert(out->end(), step.begin(), step.end());
    }
  }
  EXPECT_LT(RelL2(got, want), kLogitTol);
}

// The fixture pair: the GPU's logits over a long prompt agree with the CPU's, and 128 greedy
// tokens are the same.
void GreedyMatches(const std::string& model) {
  Pair p = LoadPair(kModels / model, 8192);
  ASSERT_TRUE(p.cpu && p.gpu);
  absl::StatusOr<std::string> text = ReadFile(kModels / "goldens" / "long_prompt.txt");
  ASSERT_TRUE(text.ok()) << text.status();
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> tok = text::LoadTokenizer(kModels / model);
  ASSERT_TRUE(tok.ok());
  std::vector<int32_t> prompt = (*tok)->Encode(text->substr(0, 3000), /*add_bos=*/true);
  std::vector<int32_t> cpu_out, gpu_out;
  double worst = 0;
  for (ModelBackend* m : {static_cast<ModelBackend*>(p.cpu.get()), static_cast<ModelBackend*>(p.gpu.get())}) {
    std::vector<int32_t>& out = m == p.cpu.get() ? cpu_out : gpu_out;
    ASSERT_TRUE(m->AddSequence(1).ok());
    std::vector<int32_t> next = prompt;
    for (int i = 0; i < 128; ++i) {
      std::vector<float> logits;
      SequenceInput in{.seq = 1, .tokens = next};
      absl::Status s = m->Forward({&in, 1}, &logits);
      ASSERT_TRUE(s.ok()) << s;
      out.push_back(Argmax(logits));
      next = {out.back()};
    }
  }
  // Teacher-forced logits along the CPU's tokens, for the tolerance figure.
  for (ModelBackend* m : {static_cast<ModelBackend*>(p.cpu.get()), static_cast<ModelBackend*>(p.gpu.get())}) {
    ASSERT_TRUE(m->AddSequence(2).ok());
  }
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), cpu_out.begin(), cpu_out.end() - 1);
  std::vector<float> want, got;
  SequenceInput in{.seq = 2, .tokens = all, .all_logits = true};
  ASSERT_TRUE(p.cpu->Forward({&in, 1}, &want).ok());
  ASSERT_TRUE(p.gpu->Forward({&in, 1}, &got).ok());
  const int64_t vocab = p.cpu->config().vocab_size;
  for (size_t r = 0; r < want.size() / vocab; ++r) {
    worst = std::max(worst, RelL2(std::span<const float>(got).subspan(r * vocab, vocab),
                                  std::span<const float>(want).subspan(r * vocab, vocab)));
  }
  std::printf("%s: %zu prompt tokens, worst per-row relative L2 of logits GPU vs CPU %.3g\n", model.c_str(),
              prompt.size(), worst);
  EXPECT_LT(worst, kLogitTol);
  EXPECT_EQ(gpu_out, cpu_out);
}

TEST(CudaModelTest, FixtureTargetGreedyMatchesCpu) { GreedyMatches("scout-tiny-target"); }
TEST(CudaModelTest, FixtureDraftGreedyMatchesCpu) { GreedyMatches("scout-tiny-draft"); }

}  // namespace
}  // namespace scout::runtime
