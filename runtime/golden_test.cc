// The committed fixture pair against logits and greedy tokens written by transformers
// (tools/train_fixtures.py, models/goldens/).
#include <cmath>
#include <cstring>

#include "gtest/gtest.h"
#include "kernels/test_util.h"
#include "runtime/cpu_model.h"
#include "runtime/generator.h"
#include "runtime/safetensors.h"
#include "text/tokenizer.h"

namespace scout::runtime {
namespace {

const std::filesystem::path kModels = std::filesystem::path(SCOUT_SOURCE_DIR) / "models";

std::vector<int64_t> Ints(const SafetensorsFile& f, const std::string& name) {
  const TensorView* t = f.Find(name);
  EXPECT_NE(t, nullptr) << name;
  if (t == nullptr) return {};
  EXPECT_EQ(t->dtype, DType::kI64);
  std::vector<int64_t> v(t->numel());
  std::memcpy(v.data(), t->data, t->nbytes);
  return v;
}

std::vector<float> Floats(const SafetensorsFile& f, const std::string& name) {
  const TensorView* t = f.Find(name);
  EXPECT_NE(t, nullptr) << name;
  if (t == nullptr) return {};
  std::vector<float> v(t->numel());
  EXPECT_TRUE(ToFloat32(*t, v).ok());
  return v;
}

double RelL2(std::span<const float> a, std::span<const float> b) { return kernels::testing::RelL2(a, b); }

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, LogitsAndGreedyTokensMatchTransformers) {
  const std::string name = GetParam();
  absl::StatusOr<std::unique_ptr<CpuModel>> model = CpuModel::Load(kModels / ("scout-tiny-" + name));
  ASSERT_TRUE(model.ok()) << model.status();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> golden = SafetensorsFile::Open(kModels / "goldens" / (name + ".safetensors"));
  ASSERT_TRUE(golden.ok()) << golden.status();
  const int64_t vocab = (*model)->config().vocab_size;
  CpuModel& m = **model;

  for (const std::string which : {"short", "long"}) {
    std::vector<int64_t> ids64 = Ints(**golden, which + "_ids");
    std::vector<int32_t> ids(ids64.begin(), ids64.end());
    std::vector<float> want = Floats(**golden, which + "_logits");
    std::vector<int64_t> positions;
    if (which == "short") {
      for (size_t i = 0; i < ids.size(); ++i) positions.push_back(static_cast<int64_t>(i));
    } else {
      positions = Ints(**golden, "long_positions");
      ASSERT_GE(ids.size(), 4096u);
    }
    ASSERT_EQ(want.size(), positions.size() * vocab);
    // Chunked prefill over the paged cache, keeping every position's logits.
    ASSERT_TRUE(m.AddSequence(1).ok());
    std::vector<float> all, logits;
    for (size_t at = 0; at < ids.size(); at += 512) {
      SequenceInput in{.seq = 1, .tokens = std::span<const int32_t>(ids).subspan(at, std::min<size_t>(512, ids.size() - at)),
                       .all_logits = true};
      ASSERT_TRUE(m.Forward({&in, 1}, &logits).ok());
      all.insert(all.end(), logits.begin(), logits.end());
    }
    ASSERT_TRUE(m.ReleaseSequence(1).ok());
    std::vector<float> got;
    for (int64_t p : positions) got.insert(got.end(), all.begin() + p * vocab, all.begin() + (p + 1) * vocab);
    const double err = RelL2(got, want);
    RecordProperty(which + "_rel_l2", std::to_string(err));
    std::printf("[%s] %s prompt (%zu tokens): relative L2 vs transformers %.3g\n", name.c_str(), which.c_str(),
                ids.size(), err);
    EXPECT_LE(err, 1e-3) << which;

    // 64 greedy tokens, no stop on EOS, as the golden was made.
    std::vector<int64_t> greedy = Ints(**golden, "greedy_" + which);
    absl::StatusOr<GenerateResult> r = Generate(m, 2, ids, {.max_tokens = 64, .prefill_chunk = 256});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(std::vector<int64_t>(r->tokens.begin(), r->tokens.end()), greedy) << which;
  }
}

INSTANTIATE_TEST_SUITE_P(FixturePair, GoldenTest, ::testing::Values("target", "draft"));

// The prompts file and the fixture tokenizer agree on the ids the goldens were made from.
TEST(GoldenPromptsTest, TokenizerReproducesGoldenIds) {
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> tok = text::LoadTokenizer(kModels / "scout-tiny-target");
  ASSERT_TRUE(tok.ok()) << tok.status();
  absl::StatusOr<std::string> text = ReadFile(kModels / "goldens" / "prompts.json");
  ASSERT_TRUE(text.ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> golden = SafetensorsFile::Open(kModels / "goldens" / "target.safetensors");
  ASSERT_TRUE(golden.ok());
  std::vector<int64_t> ids = Ints(**golden, "short_ids");
  std::vector<int32_t> enc = (*tok)->Encode("def fibonacci(n):\n    ", true);
  EXPECT_EQ(std::vector<int64_t>(enc.begin(), enc.end()), ids);
}

}  // namespace
}  // namespace scout::runtime
