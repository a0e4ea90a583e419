#include "runtime/cpu_model.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <random>

#include "gtest/gtest.h"
#include "kernels/test_util.h"
#include "nlohmann/json.hpp"
#include "runtime/generator.h"
#include "runtime/safetensors.h"
#include "runtime/test_model.h"
#include "text/tokenizer.h"

namespace scout::runtime {
namespace {

using testing::FreshDir;
using testing::RandomTokens;
using testing::TinyConfig;
using testing::WriteRandomModel;

double RelL2(std::span<const float> a, std::span<const float> b) { return kernels::testing::RelL2(a, b); }

std::unique_ptr<CpuModel> LoadTiny(const ModelConfig& c, int shards = 1, int64_t kv_tokens = 0) {
  std::filesystem::path dir = FreshDir("model");
  WriteRandomModel(dir, c, 42, shards);
  absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(dir, {.kv_budget_tokens = kv_tokens});
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

// Logits of every position of `tokens`, computed in one pass from an empty cache.
std::vector<float> FullPass(CpuModel& m, SequenceId id, std::span<const int32_t> tokens) {
  EXPECT_TRUE(m.AddSequence(id).ok());
  std::vector<float> logits;
  SequenceInput in{.seq = id, .tokens = tokens, .all_logits = true};
  EXPECT_TRUE(m.Forward({&in, 1}, &logits).ok());
  EXPECT_TRUE(m.ReleaseSequence(id).ok());
  return logits;
}

// The prompt's first kPrompt tokens prefilled in chunks of each size, then the rest one token at
// a time, all logits kept: they equal `ref`, the logits of one pass over all tokens.
void ExpectPagedDecodeMatches(CpuModel& m, const std::vector<int32_t>& tokens, int prompt, std::vector<int> chunks,
                              const std::vector<float>& ref) {
  const int total = static_cast<int>(tokens.size());
  for (int chunk : chunks) {
    ASSERT_TRUE(m.AddSequence(2).ok());
    std::vector<float> got, logits;
    for (int at = 0; at < total;) {
      int n = at < prompt ? std::min(chunk, prompt - at) : 1;
      SequenceInput in{.seq = 2, .tokens = std::span<const int32_t>(tokens).subspan(at, n), .all_logits = true};
      ASSERT_TRUE(m.Forward({&in, 1}, &logits).ok());
      got.insert(got.end(), logits.begin(), logits.end());
      at += n;
    }
    ASSERT_EQ(got.size(), ref.size());
    // float32 with different summation grouping (BLAS blocking by row count): ~1e-6.
    EXPECT_LT(RelL2(got, ref), 1e-5) << "chunk " << chunk;
    ASSERT_TRUE(m.ReleaseSequence(2).ok());
  }
}

// Decoding token by token over the paged cache (crossing block boundaries, with llama3 RoPE
// and shards) gives the logits of recomputing the whole sequence at once.
TEST(CpuModelTest, PagedDecodeMatchesRecompute) {
  ModelConfig c = TinyConfig();
  c.rope = {.type = "llama3", .theta = 500000, .factor = 4, .low_freq_factor = 1, .high_freq_factor = 4,
            .original_max_position_embeddings = 64};
  std::unique_ptr<CpuModel> m = LoadTiny(c, /*shards=*/2);
  ASSERT_NE(m, nullptr);
  const int kPrompt = 37, kTotal = 90;
  std::vector<int32_t> tokens = RandomTokens(kTotal, c.vocab_size, 1);
  std::vector<float> ref = FullPass(*m, 1, tokens);

  ExpectPagedDecodeMatches(*m, tokens, kPrompt, {kPrompt, 5, 16}, ref);
  EXPECT_EQ(m->block_tables().allocator().num_used(), 0);
}

TEST(CpuModelTest, BatchOfSequencesMatchesEachAlone) {
  ModelConfig c = TinyConfig();
  c.tie_word_embeddings = true;
  std::unique_ptr<CpuModel> m = LoadTiny(c);
  ASSERT_NE(m, nullptr);
  std::vector<int32_t> a = RandomTokens(23, c.vocab_size, 2), b = RandomTokens(40, c.vocab_size, 3);
  std::vector<float> ra = FullPass(*m, 10, a), rb = FullPass(*m, 11, b);
  // Sequence 20 prefilled with a[0:20] first, then its last 3 tokens batched with all of b.
  ASSERT_TRUE(m->AddSequence(20).ok());
  ASSERT_TRUE(m->AddSequence(21).ok());
  std::vector<float> logits;
  SequenceInput first{.seq = 20, .tokens = std::span<const int32_t>(a).first(20)};
  ASSERT_TRUE(m->Forward({&first, 1}, &logits).ok());
  SequenceInput both[] = {{.seq = 20, .tokens = std::span<const int32_t>(a).subspan(20), .all_logits = true},
                          {.seq = 21, .tokens = b, .all_logits = false}};
  ASSERT_TRUE(m->Forward(both, &logits).ok());
  ASSERT_EQ(logits.size(), size_t(4 * c.vocab_size));
  EXPECT_LT(RelL2(std::span(logits).first(3 * c.vocab_size), std::span(ra).subspan(20 * c.vocab_size)), 1e-5);
  EXPECT_LT(RelL2(std::span(logits).subspan(3 * c.vocab_size), std::span(rb).subspan(39 * c.vocab_size)), 1e-5);
}

// Rolling back rejected tokens and feeding others gives the logits of the accepted path.
TEST(CpuModelTest, TruncateThenContinueMatchesFreshSequence) {
  ModelConfig c = TinyConfig();
  std::unique_ptr<CpuModel> m = LoadTiny(c);
  ASSERT_NE(m, nullptr);
  std::vector<int32_t> good = RandomTokens(50, c.vocab_size, 4), bad = RandomTokens(20, c.vocab_size, 5);
  std::vector<float> ref = FullPass(*m, 1, good);
  ASSERT_TRUE(m->AddSequence(2).ok());
  std::vector<float> logits;
  SequenceInput p{.seq = 2, .tokens = std::span<const int32_t>(good).first(30)};
  ASSERT_TRUE(m->Forward({&p, 1}, &logits).ok());
  SequenceInput wrong{.seq = 2, .tokens = bad};
  ASSERT_TRUE(m->Forward({&wrong, 1}, &logits).ok());
  ASSERT_TRUE(m->TruncateSequence(2, 30).ok());
  SequenceInput rest{.seq = 2, .tokens = std::span<const int32_t>(good).subspan(30), .all_logits = true};
  ASSERT_TRUE(m->Forward({&rest, 1}, &logits).ok());
  EXPECT_LT(RelL2(logits, std::span(ref).subspan(30 * c.vocab_size)), 1e-5);
}

// A sequence's KV reserved empty (ImportKv with no data) and filled unit by unit in any order
// (WriteKvUnits, as a cluster worker fetching from a KV home lazily) continues exactly as the
// sequence it came from, partial last block included; bad units are refused by name.
TEST(CpuModelTest, KvWrittenUnitByUnitContinuesTheSameWay) {
  ModelConfig c = TinyConfig();
  std::unique_ptr<CpuModel> m = LoadTiny(c);
  ASSERT_NE(m, nullptr);
  std::vector<int32_t> prompt = RandomTokens(37, c.vocab_size, 8), next = RandomTokens(4, c.vocab_size, 9);
  ASSERT_TRUE(m->AddSequence(1).ok());
  std::vector<float> unused, want, got;
  SequenceInput in{.seq = 1, .tokens = prompt};
  ASSERT_TRUE(m->Forward({&in, 1}, &unused).ok());
  const int blocks = 3, L = static_cast<int>(c.num_hidden_layers), H = static_cast<int>(c.num_key_value_heads);
  const size_t unit = m->kv_unit_bytes();
  std::vector<std::byte> kv(static_cast<size_t>(blocks) * L * H * unit);
  ASSERT_TRUE(m->ExportKv(1, 0, blocks, kv.data()).ok());
  ASSERT_TRUE(m->AddSequence(2).ok());
  ASSERT_TRUE(m->ImportKv(2, 37, nullptr).ok());
  EXPECT_EQ(*m->SequenceLength(2), 37);
  std::vector<KvUnitRef> units;
  std::vector<std::byte> data;
  for (int i = blocks * L * H - 1; i >= 0; --i) {  // export order is (block, layer, head): reversed here
    units.push_back({.layer = (i / H) % L, .head = i % H, .block = i / (L * H)});
    data.insert(data.end(), kv.begin() + static_cast<ptrdiff_t>(i * unit), kv.begin() + static_cast<ptrdiff_t>((i + 1) * unit));
  }
  ASSERT_TRUE(m->WriteKvUnits(2, units, data.data()).ok());
  const KvUnitRef bad[] = {{.layer = 0, .head = 0, .block = 3}};
  absl::Status st = m->WriteKvUnits(2, bad, data.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kOutOfRange) << st;
  EXPECT_NE(st.message().find("block 3"), std::string::npos) << st;
  EXPECT_EQ(m->WriteKvUnits(5, units, data.data()).code(), absl::StatusCode::kNotFound);
  SequenceInput a{.seq = 1, .tokens = next, .all_logits = true}, b{.seq = 2, .tokens = next, .all_logits = true};
  ASSERT_TRUE(m->Forward({&a, 1}, &want).ok());
  ASSERT_TRUE(m->Forward({&b, 1}, &got).ok());
  EXPECT_EQ(got, want);  // the same float32 KV, the same pass
}

TEST(CpuModelTest, FullPoolIsCleanErrorAndOtherSequencesGoOn) {
  ModelConfig c = TinyConfig();
  std::unique_ptr<CpuModel> m = LoadTiny(c, 1, /*kv_tokens=*/64);  // 4 blocks
  ASSERT_NE(m, nullptr);
  std::vector<int32_t> t = RandomTokens(60, c.vocab_size, 6);
  ASSERT_TRUE(m->AddSequence(1).ok());
  ASSERT_TRUE(m->AddSequence(2).ok());
  std::vector<float> logits;
  SequenceInput a{.seq = 1, .tokens = std::span<const int32_t>(t).first(40)};
  ASSERT_TRUE(m->Forward({&a, 1}, &logits).ok());
  SequenceInput big{.seq = 2, .tokens = t};
  absl::Status s = m->Forward({&big, 1}, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_EQ(*m->SequenceLength(2), 0);
  SequenceInput more{.seq = 1, .tokens = std::span<const int32_t>(t).subspan(40, 5)};
  EXPECT_TRUE(m->Forward({&more, 1}, &logits).ok());
  EXPECT_EQ(*m->SequenceLength(1), 45);
}

TEST(CpuModelTest, BadInputsAreRejectedWithoutSideEffects) {
  ModelConfig c = TinyConfig();
  std::unique_ptr<CpuModel> m = LoadTiny(c);
  ASSERT_NE(m, nullptr);
  ASSERT_TRUE(m->AddSequence(1).ok());
  std::vector<float> logits;
  int32_t bad[] = {3, 99};
  SequenceInput in{.seq = 1, .tokens = bad};
  EXPECT_EQ(m->Forward({&in, 1}, &logits).code(), absl::StatusCode::kInvalidArgument);
  SequenceInput unknown{.seq = 7, .tokens = std::span<const int32_t>(bad, 1)};
  EXPECT_EQ(m->Forward({&unknown, 1}, &logits).code(), absl::StatusCode::kNotFound);
  SequenceInput dup[] = {{.seq = 1, .tokens = std::span<const int32_t>(bad, 1)}, {.seq = 1, .tokens = std::span<const int32_t>(bad, 1)}};
  EXPECT_EQ(m->Forward(dup, &logits).code(), absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> too_long(c.max_position_embeddings + 1, 3);
  SequenceInput lng{.seq = 1, .tokens = too_long};
  EXPECT_EQ(m->Forward({&lng, 1}, &logits).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(*m->SequenceLength(1), 0);
  EXPECT_EQ(m->AddSequence(1).code(), absl::StatusCode::kAlreadyExists);
}

// A missing file, a truncated shard, an unsupported architecture and a config that contradicts
// the weights each fail with the file and the cause named.
TEST(CpuModelTest, LoadErrorsNameFileAndCause) {
  const ModelConfig c = TinyConfig();
  std::filesystem::path dir = FreshDir("bad");
  WriteRandomModel(dir, c, 1, /*shards=*/2);
  const std::string shard = (dir / "model-00002-of-00002.safetensors").string();

  auto expect_error = [&](absl::StatusCode code, const std::string& a, const std::string& b) {
    absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(dir);
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), code) << m.status();
    EXPECT_NE(m.status().message().find(a), std::string::npos) << m.status();
    EXPECT_NE(m.status().message().find(b), std::string::npos) << m.status();
  };
  // Config/weights mismatch: the config says a wider MLP than the weights have.
  ModelConfig wide = c;
  wide.intermediate_size = 64;
  std::ofstream(dir / "config.json") << testing::ConfigJson(wide);
  expect_error(absl::StatusCode::kInvalidArgument, "mlp.gate_proj.weight", "config.json implies [64, 32]");
  // Fewer layers in the config than in the checkpoint.
  ModelConfig shallow = c;
  shallow.num_hidden_layers = 1;
  std::ofstream(dir / "config.json") << testing::ConfigJson(shallow);
  expect_error(absl::StatusCode::kInvalidArgument, "model.layers.1.", "num_hidden_layers = 1");
  // More layers in the config than in the checkpoint.
  ModelConfig deep = c;
  deep.num_hidden_layers = 3;
  std::ofstream(dir / "config.json") << testing::ConfigJson(deep);
  expect_error(absl::StatusCode::kNotFound, "model.layers.2.", "not found");
  // Unsupported architecture.
  std::ofstream(dir / "config.json") << R"({"architectures": ["MambaForCausalLM"], "model_type": "mamba"})";
  expect_error(absl::StatusCode::kUnimplemented, "config.json", "MambaForCausalLM");
  // Truncated shard.
  std::ofstream(dir / "config.json") << testing::ConfigJson(c);
  ASSERT_TRUE(CpuModel::Load(dir).ok());
  std::filesystem::resize_file(shard, std::filesystem::file_size(shard) / 2);
  expect_error(absl::StatusCode::kDataLoss, shard, "truncated");
  // Missing shard, then missing config.
  std::filesystem::remove(shard);
  expect_error(absl::StatusCode::kNotFound, shard, "no such file");
  std::filesystem::remove(dir / "config.json");
  expect_error(absl::StatusCode::kNotFound, (dir / "config.json").string(), "no such file");
}

TEST(GeneratorTest, GreedyGenerationIsDeterministicAndReleasesTheSequence) {
  ModelConfig c = TinyConfig();
  std::unique_ptr<CpuModel> m = LoadTiny(c);
  ASSERT_NE(m, nullptr);
  std::vector<int32_t> prompt = RandomTokens(21, c.vocab_size, 8);
  GenerateOptions opt{.max_tokens = 30, .prefill_chunk = 8};
  absl::StatusOr<GenerateResult> a = Generate(*m, 1, prompt, opt);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->tokens.size(), 30u);
  EXPECT_EQ(m->block_tables().num_sequences(), 0u);
  // The same tokens as argmax over a full recomputation of each prefix.
  std::vector<int32_t> seq = prompt;
  for (int i = 0; i < 30; ++i) {
    std::vector<float> logits = FullPass(*m, 5, seq);
    int32_t next = ArgMax(std::span(logits).subspan((seq.size() - 1) * c.vocab_size, c.vocab_size));
    ASSERT_EQ(next, a->tokens[i]) << "step " << i;
    seq.push_back(next);
  }
  // Stop ids end generation; the prompt limit is enforced.
  opt.stop_ids = {a->tokens[3]};
  absl::StatusOr<GenerateResult> b = Generate(*m, 1, prompt, opt);
  ASSERT_TRUE(b.ok());
  EXPECT_LE(b->tokens.size(), 4u);
  std::vector<int32_t> huge(c.max_position_embeddings + 1, 3);
  EXPECT_EQ(Generate(*m, 1, huge, opt).status().code(), absl::StatusCode::kOutOfRange);
}

TEST(TokenizerTest, ByteTokenizerRoundTripsAndLoads) {
  std::filesystem::path dir = FreshDir("tok");
  EXPECT_EQ(text::LoadTokenizer(dir).status().code(), absl::StatusCode::kNotFound);
  std::ofstream(dir / "scout_tokenizer.json") << R"({"type": "bytes", "bos_token_id": 256, "eos_token_id": 257, "vocab_size": 258})";
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> t = text::LoadTokenizer(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  std::string text = "héllo\n\x01\xff";
  std::vector<int32_t> ids = (*t)->Encode(text, true);
  ASSERT_EQ(ids.size(), text.size() + 1);
  EXPECT_EQ(ids[0], 256);
  EXPECT_EQ(ids.back(), 255);
  ids.push_back(257);
  EXPECT_EQ(*(*t)->Decode(ids), text);
  int32_t bad[] = {300};
  EXPECT_EQ((*t)->Decode(bad).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*t)->eos_ids(), std::vector<int32_t>{257});
}

}  // namespace
}  // namespace scout::runtime

namespace scout::runtime {
namespace {

// New tokens always see their own blocks, even when a list leaves them out (review
// 2026-11-27: with a short window they could attend to nothing); malformed lists are refused.
TEST(CpuModelTest, SelectionAlwaysCoversTheNewTokensBlocks) {
  ModelConfig c = TinyConfig();
  std::unique_ptr<CpuModel> m = LoadTiny(c);
  ASSERT_NE(m, nullptr);
  std::vector<int32_t> t = RandomTokens(40, c.vocab_size, 13);
  auto run = [&](const kvstore::Selection& sel) {
    EXPECT_TRUE(m->AddSequence(1).ok());
    std::vector<float> logits;
    SequenceInput pre{.seq = 1, .tokens = std::span<const int32_t>(t).first(30)};
    EXPECT_TRUE(m->Forward({&pre, 1}, &logits).ok());
    SequenceInput in{.seq = 1, .tokens = std::span<const int32_t>(t).subspan(30), .all_logits = true, .selection = &sel};
    absl::Status s = m->Forward({&in, 1}, &logits);
    EXPECT_TRUE(m->ReleaseSequence(1).ok());
    return s.ok() ? logits : std::vector<float>{};
  };
  // Tokens 30..39 fall in blocks 1 and 2. Lists of block 0 only, and of blocks 0, 1, 2.
  kvstore::Selection only0{.num_layers = 2, .num_kv_heads = 2, .indptr = {0, 1, 2, 3, 4}, .blocks = {0, 0, 0, 0}};
  kvstore::Selection all{.num_layers = 2, .num_kv_heads = 2, .indptr = {0, 3, 6, 9, 12},
                         .blocks = {0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2}};
  std::vector<float> a = run(only0), b = run(all);
  ASSERT_FALSE(a.empty());
  EXPECT_EQ(a, b);
  kvstore::Selection bad{.num_layers = 2, .num_kv_heads = 2, .indptr = {0, 2, 1, 2, 2}, .blocks = {0, 1}};
  EXPECT_TRUE(run(bad).empty());
}

}  // namespace
}  // namespace scout::runtime

namespace scout::runtime {
namespace {

// A float32 checkpoint of c's shapes with random weights (std 0.2, norms near 1) and, when
// bias_std >= 0, q/k/v biases (and an o_proj bias with with_o_bias), under config.json `config`.
void WriteArchModel(const std::filesystem::path& dir, const ModelConfig& c, const nlohmann::json& config,
                    uint32_t seed, float bias_std, bool with_o_bias = false, const std::string& skip = "") {
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << config.dump(2);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::map<std::string, TensorData> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float mean, float std) {
    if (name == skip) return;
    TensorData t{.dtype = DType::kF32, .shape = shape, .data = {}};
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    t.data.resize(n * 4);
    for (int64_t i = 0; i < n; ++i) {
      const float x = mean + std * normal(rng);
      std::memcpy(t.data.data() + i * 4, &x, 4);
    }
    tensors[name] = std::move(t);
  };
  const int64_t d = c.hidden_size, hd = c.head_dim, nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  add("model.embed_tokens.weight", {c.vocab_size, d}, 0, 0.2f);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {d}, 1, 0.2f);
    add(p + "self_attn.q_proj.weight", {nh * hd, d}, 0, 0.2f);
    add(p + "self_attn.k_proj.weight", {nkv * hd, d}, 0, 0.2f);
    add(p + "self_attn.v_proj.weight", {nkv * hd, d}, 0, 0.2f);
    if (bias_std >= 0) {
      add(p + "self_attn.q_proj.bias", {nh * hd}, 0, bias_std);
      add(p + "self_attn.k_proj.bias", {nkv * hd}, 0, bias_std);
      add(p + "self_attn.v_proj.bias", {nkv * hd}, 0, bias_std);
    }
    add(p + "self_attn.o_proj.weight", {d, nh * hd}, 0, 0.2f);
    if (with_o_bias) add(p + "self_attn.o_proj.bias", {d}, 0, std::max(bias_std, 0.0f));
    add(p + "post_attention_layernorm.weight", {d}, 1, 0.2f);
    add(p + "mlp.gate_proj.weight", {c.intermediate_size, d}, 0, 0.2f);
    add(p + "mlp.up_proj.weight", {c.intermediate_size, d}, 0, 0.2f);
    add(p + "mlp.down_proj.weight", {d, c.intermediate_size}, 0, 0.2f);
  }
  add("model.norm.weight", {d}, 1, 0.2f);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, d}, 0, 0.2f);
  ASSERT_TRUE(WriteSafetensors(dir / "model.safetensors", tensors).ok());
}

nlohmann::json ConfigAs(const ModelConfig& c, const std::string& arch, const std::string& model_type,
                        const nlohmann::json& extra) {
  nlohmann::json j = nlohmann::json::parse(testing::ConfigJson(c));
  j["architectures"] = {arch};
  j["model_type"] = model_type;
  j.update(extra);
  return j;
}

std::unique_ptr<CpuModel> LoadDir(const std::filesystem::path& dir) {
  absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(dir);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

// Qwen2 checkpoints carry q/k/v biases: zero biases give exactly the Llama model of the same
// weights, non-zero ones change the logits, and a missing bias tensor is NotFound by name.
TEST(ArchTest, Qwen2BiasesLoadAndMissingOnesAreNamed) {
  const ModelConfig c = TinyConfig();
  const nlohmann::json qwen = ConfigAs(c, "Qwen2ForCausalLM", "qwen2", {{"use_sliding_window", false}});
  const std::filesystem::path zero = FreshDir("zero"), some = FreshDir("some"), plain = FreshDir("plain");
  WriteArchModel(zero, c, qwen, 5, /*bias_std=*/0.0f);
  WriteArchModel(some, c, qwen, 5, /*bias_std=*/0.5f);
  WriteArchModel(plain, c, nlohmann::json::parse(testing::ConfigJson(c)), 5, /*bias_std=*/-1);
  std::unique_ptr<CpuModel> mz = LoadDir(zero), ms = LoadDir(some), mp = LoadDir(plain);
  ASSERT_TRUE(mz && ms && mp);
  EXPECT_TRUE(mz->config().qkv_bias);
  EXPECT_FALSE(mp->config().qkv_bias);
  std::vector<int32_t> t = RandomTokens(30, c.vocab_size, 9);
  // The Llama reading of the same files ignores the bias tensors (as transformers' Llama does):
  // the same logits when they are zero, different ones when not.
  std::ofstream(zero / "config.json") << testing::ConfigJson(c);
  std::unique_ptr<CpuModel> mzl = LoadDir(zero);
  ASSERT_NE(mzl, nullptr);
  EXPECT_EQ(FullPass(*mz, 1, t), FullPass(*mzl, 1, t));
  std::ofstream(some / "config.json") << testing::ConfigJson(c);
  std::unique_ptr<CpuModel> msl = LoadDir(some);  // biases ignored, as transformers' Llama ignores them
  ASSERT_NE(msl, nullptr);
  EXPECT_GT(RelL2(FullPass(*ms, 1, t), FullPass(*msl, 1, t)), 1e-2);

  const std::filesystem::path missing = FreshDir("missing");
  WriteArchModel(missing, c, qwen, 5, 0.5f, false, "model.layers.1.self_attn.k_proj.bias");
  absl::StatusOr<std::unique_ptr<CpuModel>> m = CpuModel::Load(missing);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound) << m.status();
  EXPECT_NE(m.status().message().find("\"model.layers.1.self_attn.k_proj.bias\""), std::string::npos) << m.status();
  EXPECT_NE(m.status().message().find("Qwen2ForCausalLM"), std::string::npos) << m.status();
  // Llama's attention_bias also wants o_proj.bias.
  const std::filesystem::path llama_bias = FreshDir("llama_bias");
  WriteArchModel(llama_bias, c, ConfigAs(c, "LlamaForCausalLM", "llama", {{"attention_bias", true}}), 5, 0.5f);
  m = CpuModel::Load(llama_bias);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("\"model.layers.0.self_attn.o_proj.bias\""), std::string::npos) << m.status();
  EXPECT_NE(m.status().message().find("attention_bias"), std::string::npos) << m.status();
  WriteArchModel(llama_bias, c, ConfigAs(c, "LlamaForCausalLM", "llama", {{"attention_bias", true}}), 5, 0.5f, true);
  EXPECT_NE(LoadDir(llama_bias), nullptr);
}

// The window's edge, as transformers masks it (key k visible from query p iff p - W < k <= p):
// with two sliding layers, token 0 reaches position p only while p <= 2W - 2. Changing it leaves
// every later position's logits bit-identical and changes position 2W - 2.
TEST(ArchTest, SlidingWindowEdgeMatchesTransformersConvention) {
  ModelConfig c = TinyConfig();
  const int64_t W = 20;
  const std::filesystem::path dir = FreshDir("mistral");
  WriteArchModel(dir, c, ConfigAs(c, "MistralForCausalLM", "mistral", {{"sliding_window", W}}), 11, -1);
  std::unique_ptr<CpuModel> m = LoadDir(dir);
  ASSERT_NE(m, nullptr);
  ASSERT_EQ(m->config().SlidingWindow(1), W);
  std::vector<int32_t> a = RandomTokens(70, c.vocab_size, 3), b = a;
  b[0] = (a[0] + 1) % static_cast<int32_t>(c.vocab_size);
  std::vector<float> la = FullPass(*m, 1, a), lb = FullPass(*m, 1, b);
  const int64_t v = c.vocab_size;
  auto row = [&](const std::vector<float>& l, int64_t p) { return std::vector<float>(l.begin() + p * v, l.begin() + (p + 1) * v); };
  EXPECT_NE(row(la, 2 * W - 2), row(lb, 2 * W - 2));
  for (int64_t p = 2 * W - 1; p < 70; ++p) EXPECT_EQ(row(la, p), row(lb, p)) << "position " << p;
}

// Biases, per-layer sliding windows (Qwen2 layer_types) and YaRN together: decoding over the
// paged cache, in chunks that cross blocks and the window, gives the logits of one full pass.
TEST(ArchTest, WindowsBiasesYarnPagedDecodeMatchesRecompute) {
  ModelConfig c = TinyConfig();
  c.num_hidden_layers = 3;
  const std::filesystem::path dir = FreshDir("qwen2");
  nlohmann::json j = ConfigAs(c, "Qwen2ForCausalLM", "qwen2",
                              {{"use_sliding_window", true}, {"sliding_window", 21}, {"max_window_layers", 1},
                               {"layer_types", {"full_attention", "sliding_attention", "sliding_attention"}}});
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 10000.0}, {"factor", 4.0},
                          {"original_max_position_embeddings", 32}};
  WriteArchModel(dir, c, j, 17, 0.3f);
  std::unique_ptr<CpuModel> m = LoadDir(dir);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->config().sliding_layers, (std::vector<bool>{false, true, true}));
  EXPECT_EQ(m->config().rope.type, "yarn");
  const int kPrompt = 45, kTotal = 100;
  std::vector<int32_t> tokens = RandomTokens(kTotal, c.vocab_size, 21);
  std::vector<float> ref = FullPass(*m, 1, tokens);
  ExpectPagedDecodeMatches(*m, tokens, kPrompt, {kPrompt, 5, 16, 30}, ref);
}

}  // namespace
}  // namespace scout::runtime
