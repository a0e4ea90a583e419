#include "text/bpe_tokenizer.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/model_config.h"
#include "text/utf8.h"

namespace scout::text {
namespace {

using json = nlohmann::json;

const std::filesystem::path kTokenizers = std::filesystem::path(SCOUT_SOURCE_DIR) / "models" / "tokenizers";

// GPT-2's bytes_to_unicode, written out again here so the tests do not trust the code under test.
std::string ByteChar(uint8_t b) {
  int cp = b;
  if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174))) {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174))) ++n;
    }
    cp = 256 + n;
  }
  std::string s;
  AppendUtf8(static_cast<char32_t>(cp), &s);
  return s;
}
std::string ByteLevel(absl::string_view raw) {
  std::string s;
  for (char c : raw) s += ByteChar(static_cast<uint8_t>(c));
  return s;
}

constexpr const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// A byte-level tokenizer.json: ids 0..255 are the bytes, then one token per merge (raw strings,
// in rank order), then the added tokens.
json TinyTokenizer(const std::vector<std::pair<std::string, std::string>>& merges, bool ignore_merges = false,
                   const std::vector<std::string>& extra_vocab = {}) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteChar(static_cast<uint8_t>(b))] = b;
  json mj = json::array();
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(ByteLevel(a + b))) vocab[ByteLevel(a + b)] = static_cast<int>(vocab.size());
    mj.push_back(ByteLevel(a) + " " + ByteLevel(b));
  }
  for (const std::string& v : extra_vocab) vocab[ByteLevel(v)] = static_cast<int>(vocab.size());
  const int n = static_cast<int>(vocab.size());
  return json{
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens",
       {{{"id", n}, {"content", "<|bos|>"}, {"single_word", false}, {"lstrip", false}, {"rstrip", false}, {"normalized", false}, {"special", true}},
        {{"id", n + 1}, {"content", "<|eot|>"}, {"single_word", false}, {"lstrip", false}, {"rstrip", false}, {"normalized", false}, {"special", true}},
        {{"id", n + 2}, {"content", "<tool>"}, {"single_word", false}, {"lstrip", false}, {"rstrip", false}, {"normalized", false}, {"special", false}},
        {{"id", n + 3}, {"content", "<|eot|>x"}, {"single_word", false}, {"lstrip", false}, {"rstrip", false}, {"normalized", false}, {"special", true}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"}, {"pattern", {{"Regex", kLlama3Pattern}}}, {"behavior", "Isolated"}, {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {{{"SpecialToken", {{"id", "<|bos|>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair", json::array()},
        {"special_tokens", {{"<|bos|>", {{"id", "<|bos|>"}, {"ids", {n}}, {"tokens", {"<|bos|>"}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", ignore_merges},
        {"vocab", vocab}, {"merges", mj}}}};
}

std::unique_ptr<BpeTokenizer> Make(const json& j) {
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> t = BpeTokenizer::FromJson(j.dump(), "test");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : nullptr;
}

int32_t Id(const BpeTokenizer& t, absl::string_view raw) {
  std::optional<int32_t> id = t.TokenToId(ByteLevel(raw));
  EXPECT_TRUE(id.has_value()) << raw;
  return id.value_or(-1);
}

TEST(BpeTokenizerTest, MergesByRankLeftmostFirst) {
  auto t = Make(TinyTokenizer({{"a", "b"}, {"b", "c"}}));
  EXPECT_EQ(t->Encode("abc", false), (std::vector<int32_t>{Id(*t, "ab"), 'c'}));
  auto u = Make(TinyTokenizer({{"b", "c"}, {"a", "b"}}));
  EXPECT_EQ(u->Encode("abc", false), (std::vector<int32_t>{'a', Id(*u, "bc")}));
  // Equal pairs merge left to right.
  auto v = Make(TinyTokenizer({{"a", "a"}, {"aa", "aa"}}));
  EXPECT_EQ(v->Encode("aaaaa", false), (std::vector<int32_t>{Id(*v, "aaaa"), 'a'}));
}

TEST(BpeTokenizerTest, PreTokenizerSplitsAndSpacesJoinTheNextWord) {
  auto t = Make(TinyTokenizer({{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {" ", "w"}, {" w", "o"}, {" wo", "r"}, {" wor", "l"},
                               {" worl", "d"}, {"'", "s"}}));
  EXPECT_EQ(t->Encode("hello world", false), (std::vector<int32_t>{Id(*t, "hello"), Id(*t, " world")}));
  // "helloworld" is one pre-token with no merge joining "hello" and "w".
  EXPECT_EQ(t->Encode("helloworld", false), (std::vector<int32_t>{Id(*t, "hello"), 'w', 'o', 'r', 'l', 'd'}));
  // Contractions are split off case-insensitively; digits go in threes.
  EXPECT_EQ(t->Encode("hello's", false), (std::vector<int32_t>{Id(*t, "hello"), Id(*t, "'s")}));
  EXPECT_EQ(t->Encode("HELLO'S", false), (std::vector<int32_t>{'H', 'E', 'L', 'L', 'O', '\'', 'S'}));
  EXPECT_EQ(t->Encode("", false), std::vector<int32_t>{});
  for (const char* s : {"hello world", "  two  spaces\t\ttabs\r\n\n", "12345678", "x = f(y) + 3;", "héllo wörld 😀 你好"}) {
    EXPECT_EQ(*t->DecodeText(t->Encode(s, false), false), s);
  }
}

TEST(BpeTokenizerTest, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  // "abc" is in the vocabulary but no merge makes it.
  auto with = Make(TinyTokenizer({{"a", "b"}}, /*ignore_merges=*/true, {"abc"}));
  auto without = Make(TinyTokenizer({{"a", "b"}}, /*ignore_merges=*/false, {"abc"}));
  EXPECT_EQ(with->Encode("abc", false), (std::vector<int32_t>{Id(*with, "abc")}));
  EXPECT_EQ(without->Encode("abc", false), (std::vector<int32_t>{Id(*without, "ab"), 'c'}));
}

TEST(BpeTokenizerTest, AddedAndSpecialTokens) {
  auto t = Make(TinyTokenizer({{"h", "i"}}));
  const int32_t bos = *t->TokenToId("<|bos|>"), eot = *t->TokenToId("<|eot|>"), tool = *t->TokenToId("<tool>");
  const int32_t eotx = *t->TokenToId("<|eot|>x");
  EXPECT_EQ(t->bos_id(), bos);
  EXPECT_TRUE(t->IsSpecial(bos));
  EXPECT_FALSE(t->IsSpecial(tool));
  EXPECT_EQ(t->Encode("hi", true), (std::vector<int32_t>{bos, Id(*t, "hi")}));
  // Literal special tokens in the text are recognised, the longest at the leftmost position.
  std::vector<int32_t> ids = t->Encode("<|bos|>hi<tool><|eot|>x<|eot|>y<|bo", false);
  std::vector<int32_t> want = {bos, Id(*t, "hi"), tool, eotx, eot, 'y', '<', '|', 'b', 'o'};
  EXPECT_EQ(ids, want);
  EXPECT_EQ(*t->DecodeText(ids, false), "<|bos|>hi<tool><|eot|>x<|eot|>y<|bo");
  EXPECT_EQ(*t->DecodeText(ids, true), "hi<tool>y<|bo");
  EXPECT_EQ(*t->Decode(ids), "hi<tool>y<|bo");  // the Tokenizer contract: specials decode to nothing
  int32_t bad[] = {static_cast<int32_t>(t->vocab_size())};
  EXPECT_EQ(t->Decode(bad).status().code(), absl::StatusCode::kInvalidArgument);
  int32_t neg[] = {-1};
  EXPECT_EQ(t->DecodeText(neg, false).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BpeTokenizerTest, InvalidUtf8EncodesByteByByteAndDecodeRepairsIt) {
  auto t = Make(TinyTokenizer({}));
  const std::string raw = "a\xff\xfe\xe2\x82 b\xc3";
  std::vector<int32_t> ids = t->Encode(raw, false);
  EXPECT_EQ(*t->Decode(ids), raw);
  EXPECT_EQ(*t->DecodeText(ids, false), "a\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD b\xEF\xBF\xBD");
}

TEST(BpeTokenizerTest, NormalizerNfc) {
  json j = TinyTokenizer({{"\xc3", "\xa9"}});
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}}}};
  auto t = Make(j);
  EXPECT_EQ(t->Encode("e\xcc\x81", false), std::vector<int32_t>{Id(*t, "\xc3\xa9")});  // e + U+0301 -> é
  EXPECT_EQ(*t->DecodeText(t->Encode("Cafe\xcc\x81 \xe1\xba\x9b\xcc\xa3", false), false), "Caf\xc3\xa9 \xe1\xba\x9b\xcc\xa3");
}

TEST(BpeTokenizerTest, LongWordsMergeLikeAReferenceBpe) {
  // Random merges over {a, b, c}; words long enough to take the heap path are checked against a
  // plain "merge the lowest-ranked pair, leftmost first" loop.
  std::mt19937 rng(7);
  std::vector<std::string> tokens = {"a", "b", "c"};
  std::vector<std::pair<std::string, std::string>> merges;
  std::map<std::pair<std::string, std::string>, int> rank;
  while (merges.size() < 60) {
    const std::string& x = tokens[rng() % tokens.size()];
    const std::string& y = tokens[rng() % tokens.size()];
    if (rank.count({x, y}) || x.size() + y.size() > 12) continue;
    bool exists = std::find(tokens.begin(), tokens.end(), x + y) != tokens.end();
    rank[{x, y}] = static_cast<int>(merges.size());
    merges.push_back({x, y});
    if (!exists) tokens.push_back(x + y);
  }
  auto t = Make(TinyTokenizer(merges));
  for (int trial = 0; trial < 200; ++trial) {
    std::string w;
    const int n = 1 + static_cast<int>(rng() % 120);
    for (int i = 0; i < n; ++i) w.push_back("abc"[rng() % 3]);
    std::vector<std::string> sym;
    for (char c : w) sym.push_back(std::string(1, c));
    while (true) {
      int best = -1, best_rank = INT32_MAX;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = rank.find({sym[i], sym[i + 1]});
        if (it != rank.end() && it->second < best_rank) best_rank = it->second, best = static_cast<int>(i);
      }
      if (best < 0) break;
      sym[best] += sym[best + 1];
      sym.erase(sym.begin() + best + 1);
    }
    std::vector<int32_t> want;
    for (const std::string& s : sym) want.push_back(Id(*t, s));
    ASSERT_EQ(t->Encode(w, false), want) << w;
  }
}

TEST(BpeTokenizerTest, HugePreTokensRoundTrip) {
  // One 1 MB word (the heap merge), and whitespace runs long enough to exhaust PCRE2's default JIT
  // stack on \s+(?!\S) backtracking.
  auto t = Make(TinyTokenizer({{"a", "a"}, {"aa", "aa"}, {" ", " "}, {"\n", "\n"}}));
  for (const std::string& s : {std::string(1 << 20, 'a'), std::string(200000, ' ') + "x", std::string(100000, '\n') + " y ",
                               "a" + std::string(300000, '\t') + "b"}) {
    std::vector<int32_t> ids = t->Encode(s, false);
    EXPECT_LE(ids.size(), s.size());
    EXPECT_EQ(*t->Decode(ids), s);
  }
}

TEST(BpeTokenizerTest, StreamingDecodeNeverSplitsACharacter) {
  auto t = Make(TinyTokenizer({}));  // bytes only: every multi-byte character spans several tokens
  const std::string text = "h\xc3\xa9llo \xf0\x9f\x98\x80 \xe4\xbd\xa0\xe5\xa5\xbd \xff end\xe2\x82";
  std::vector<int32_t> ids = t->Encode(text, false);
  StreamingDecoder d(*t);
  std::string all;
  for (int32_t id : ids) {
    absl::StatusOr<std::string> piece = d.Add(id);
    ASSERT_TRUE(piece.ok());
    EXPECT_TRUE(IsValidUtf8(*piece)) << *piece;
    all += *piece;
  }
  all += d.Finish();
  EXPECT_EQ(all, *t->DecodeText(ids, true));
  EXPECT_FALSE(d.Add(-5).ok());
}

TEST(Utf8Test, LossyReplacesMaximalSubparts) {
  auto lossy = [](absl::string_view s) {
    std::string o;
    AppendUtf8Lossy(s, &o);
    return o;
  };
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(lossy("abc"), "abc");
  EXPECT_EQ(lossy("\xe2\x82"), r);                        // truncated: one replacement
  EXPECT_EQ(lossy("\xe2\x82x"), r + "x");                 // broken: one for the maximal subpart
  EXPECT_EQ(lossy("\xed\xa0\x80"), r + r + r);            // a surrogate: E D may not take A0
  EXPECT_EQ(lossy("\xf0\x80\x80"), r + r + r);            // overlong
  EXPECT_EQ(lossy("\xc0\xaf"), r + r);
  EXPECT_EQ(lossy("\xf4\x90\x80\x80"), r + r + r + r);    // above U+10FFFF
  EXPECT_EQ(Utf8CompletePrefix("ab\xf0\x9f\x98"), 2u);
  EXPECT_EQ(Utf8CompletePrefix("ab\xff"), 3u);
  EXPECT_EQ(Utf8CompletePrefix("ab\xe2\x28"), 4u);
}

TEST(BpeTokenizerTest, ErrorsNameTheFileAndField) {
  EXPECT_EQ(BpeTokenizer::FromJson("{not json", "x.json").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BpeTokenizer::FromJson("[1]", "x.json").status().code(), absl::StatusCode::kInvalidArgument);
  json j = TinyTokenizer({});
  j["model"]["type"] = "WordPiece";
  absl::Status s = BpeTokenizer::FromJson(j.dump(), "x.json").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(s.message().find("x.json: model.type"), std::string::npos) << s;
  j = TinyTokenizer({});
  j["normalizer"] = {{"type", "Lowercase"}};
  s = BpeTokenizer::FromJson(j.dump(), "x.json").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(s.message().find("normalizer"), std::string::npos) << s;
  j = TinyTokenizer({});
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithNext";
  s = BpeTokenizer::FromJson(j.dump(), "x.json").status();
  EXPECT_NE(s.message().find("pre_tokenizer.pretokenizers[0].behavior"), std::string::npos) << s;
  j = TinyTokenizer({});
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  EXPECT_EQ(BpeTokenizer::FromJson(j.dump(), "x.json").status().code(), absl::StatusCode::kInvalidArgument);
  j = TinyTokenizer({});
  j["model"]["merges"] = {"a"};
  EXPECT_EQ(BpeTokenizer::FromJson(j.dump(), "x.json").status().code(), absl::StatusCode::kInvalidArgument);
  j = TinyTokenizer({});
  j["model"]["merges"] = {"x y"};  // "xy" is not in the vocabulary
  EXPECT_EQ(BpeTokenizer::FromJson(j.dump(), "x.json").status().code(), absl::StatusCode::kInvalidArgument);
  j = TinyTokenizer({});
  j["added_tokens"][0]["id"] = "seven";
  EXPECT_EQ(BpeTokenizer::FromJson(j.dump(), "x.json").status().code(), absl::StatusCode::kInvalidArgument);
  j = TinyTokenizer({});
  j["decoder"] = {{"type", "Metaspace"}};
  EXPECT_EQ(BpeTokenizer::FromJson(j.dump(), "x.json").status().code(), absl::StatusCode::kUnimplemented);
  j = TinyTokenizer({});
  j["post_processor"]["single"][0]["SpecialToken"]["id"] = 5;  // wrong JSON type deep inside
  EXPECT_EQ(BpeTokenizer::FromJson(j.dump(), "x.json").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BpeTokenizer::FromFile("/nonexistent/tokenizer.json").status().code(), absl::StatusCode::kNotFound);
}

TEST(BpeTokenizerTest, MergesAsPairsLoadLikeStrings) {
  json j = TinyTokenizer({{"a", "b"}});
  j["model"]["merges"] = json::array({json::array({"a", "b"})});
  auto t = Make(j);
  EXPECT_EQ(t->Encode("ab", false), std::vector<int32_t>{Id(*t, "ab")});
}

std::filesystem::path TempDir(const std::string& name) {
  std::filesystem::path d = std::filesystem::path(::testing::TempDir()) / absl::StrCat("scout_tok_", name, "_", getpid());
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

TEST(LoadTokenizerTest, HuggingFaceFolderTakesEosFromTheConfigs) {
  std::filesystem::path dir = TempDir("hf");
  std::ofstream(dir / "tokenizer.json") << TinyTokenizer({{"h", "i"}}).dump();
  std::ofstream(dir / "tokenizer_config.json") << R"({"eos_token": {"content": "<|eot|>"}, "bos_token": "<|bos|>"})";
  std::ofstream(dir / "generation_config.json") << R"({"eos_token_id": [259, 256]})";
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = LoadTokenizer(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->eos_ids(), (std::vector<int32_t>{258, 259, 256}));  // <|eot|> = 258 (256 bytes + "hi" + <|bos|>)
  EXPECT_EQ((*t)->bos_id(), 257);
  EXPECT_EQ((*t)->Encode("hi", true), (std::vector<int32_t>{257, 256}));
  std::ofstream(dir / "tokenizer.json") << "{";
  EXPECT_EQ(LoadTokenizer(dir).status().code(), absl::StatusCode::kInvalidArgument);
}

// ------------------------------------------------------------------------------------- goldens
// models/tokenizers/NAME/encode_golden.json, written by tools/make_tokenizer_fixtures.py from
// tokenizers on the same tokenizer.json.

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, EncodeAndDecodeMatchTokenizers) {
  const std::filesystem::path dir = kTokenizers / GetParam();
  if (!std::filesystem::exists(dir / "encode_golden.json")) GTEST_SKIP() << "no goldens in " << dir;
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tok = BpeTokenizer::FromFile(dir / "tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  absl::StatusOr<std::string> text = runtime::ReadFile(dir / "encode_golden.json");
  ASSERT_TRUE(text.ok());
  const json golden = json::parse(*text);
  int cases = 0, bad_ids = 0, bad_special = 0, bad_decode = 0, bad_stream = 0;
  for (const json& c : golden["cases"]) {
    ++cases;
    const std::string s = c["text"].get<std::string>();
    const std::vector<int32_t> want = c["ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> got = (*tok)->Encode(s, false);
    if (got != want && ++bad_ids <= 10) {
      ADD_FAILURE() << GetParam() << " ids differ for " << json(s).dump() << "\n  want " << json(want).dump() << "\n  got  " << json(got).dump();
    }
    if (c.contains("ids_with_special") && (*tok)->Encode(s, true) != c["ids_with_special"].get<std::vector<int32_t>>() &&
        ++bad_special <= 5) {
      ADD_FAILURE() << GetParam() << " ids with special tokens differ for " << json(s).dump();
    }
    // Decode is checked on the golden ids, so an encoding difference does not hide a decoding one.
    absl::StatusOr<std::string> d = (*tok)->DecodeText(want, false), ds = (*tok)->DecodeText(want, true);
    if ((!d.ok() || *d != c["decode"].get<std::string>() || !ds.ok() || *ds != c["decode_skip_special"].get<std::string>()) &&
        ++bad_decode <= 10) {
      ADD_FAILURE() << GetParam() << " decode differs for " << json(want).dump() << "\n  want " << c["decode"].dump() << "\n  got  "
                    << (d.ok() ? json(*d).dump() : d.status().ToString());
    }
    StreamingDecoder stream(**tok);
    std::string streamed;
    bool partial = false;
    for (int32_t id : want) {
      absl::StatusOr<std::string> piece = stream.Add(id);
      partial = partial || !piece.ok() || !IsValidUtf8(*piece);
      if (piece.ok()) streamed += *piece;
    }
    streamed += stream.Finish();
    if ((partial || streamed != c["decode_skip_special"].get<std::string>()) && ++bad_stream <= 5) {
      ADD_FAILURE() << GetParam() << " streaming decode differs for " << json(s).dump();
    }
  }
  EXPECT_GT(cases, 1000);
  EXPECT_EQ(bad_ids, 0) << "of " << cases;
  EXPECT_EQ(bad_special, 0);
  EXPECT_EQ(bad_decode, 0);
  EXPECT_EQ(bad_stream, 0);
}

INSTANTIATE_TEST_SUITE_P(Families, GoldenTest, ::testing::Values("llama3", "qwen2", "mistral"));

}  // namespace
}  // namespace scout::text
