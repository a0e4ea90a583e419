#include "text/bpe_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <queue>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"
#include "runtime/model_config.h"
#include "text/byte_level.h"
#include "text/utf8.h"

namespace scout::text {
namespace {

using json = nlohmann::json;

// GPT-2's pre-tokenizer pattern, used by ByteLevel with use_regex.
constexpr absl::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct MatchScratch {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* ctx = nullptr;
  pcre2_jit_stack* stack = nullptr;
  MatchScratch() {
    md = pcre2_match_data_create(16, nullptr);
    ctx = pcre2_match_context_create(nullptr);
    // The default 32 KiB JIT stack runs out on long whitespace runs (\s+(?!\S) backtracks).
    stack = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, nullptr);
    if (stack != nullptr) pcre2_jit_stack_assign(ctx, nullptr, stack);
  }
  ~MatchScratch() {
    if (stack != nullptr) pcre2_jit_stack_free(stack);
    pcre2_match_context_free(ctx);
    pcre2_match_data_free(md);
  }
};
MatchScratch& Scratch() {
  thread_local MatchScratch s;
  return s;
}

class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(absl::string_view pattern, bool literal) {
    int err = 0;
    PCRE2_SIZE off = 0;
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : 0);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts, &err, &off, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof(buf));
      return absl::InvalidArgumentError(absl::StrCat("regex does not compile at offset ", off, ": ", reinterpret_cast<char*>(buf)));
    }
    auto r = std::unique_ptr<Regex>(new Regex(code));
    r->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
    return r;
  }
  ~Regex() { pcre2_code_free(code_); }

  // Finds the next match in s at or after `from`; false when there is none.
  bool Find(absl::string_view s, size_t from, size_t* begin, size_t* end) const {
    MatchScratch& m = Scratch();
    const auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    int rc = jit_ ? pcre2_jit_match(code_, subject, s.size(), from, 0, m.md, m.ctx)
                  : pcre2_match(code_, subject, s.size(), from, 0, m.md, m.ctx);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) rc = pcre2_match(code_, subject, s.size(), from, 0, m.md, m.ctx);
    if (rc < 0) return false;  // no match, or a resource limit: the rest stays one piece
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(m.md);
    *begin = ov[0];
    *end = ov[1];
    return true;
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
  bool jit_ = false;
};

enum class SplitBehavior { kIsolated, kRemoved };

// Calls emit for the pieces of s: the matches and the text between them (Isolated), or only the
// text between them (Removed). Empty pieces are not emitted.
void SplitWith(const Regex& re, absl::string_view s, SplitBehavior behavior, absl::FunctionRef<void(absl::string_view)> emit) {
  size_t pos = 0, last = 0, b = 0, e = 0;
  while (pos <= s.size() && re.Find(s, pos, &b, &e)) {
    if (b == e) {  // an empty match splits nothing; step over one character
      if (e >= s.size()) break;
      size_t i = e;
      NextCodePoint(s, &i);
      pos = i;
      continue;
    }
    if (b > last) emit(s.substr(last, b - last));
    if (behavior == SplitBehavior::kIsolated) emit(s.substr(b, e - b));
    last = pos = e;
  }
  if (last < s.size()) emit(s.substr(last));
}

enum class NormForm { kNFC, kNFD, kNFKC, kNFKD };

const icu::Normalizer2* IcuNormalizer(NormForm f) {
  UErrorCode status = U_ZERO_ERROR;
  switch (f) {
    case NormForm::kNFC: return icu::Normalizer2::getNFCInstance(status);
    case NormForm::kNFD: return icu::Normalizer2::getNFDInstance(status);
    case NormForm::kNFKC: return icu::Normalizer2::getNFKCInstance(status);
    case NormForm::kNFKD: return icu::Normalizer2::getNFKDInstance(status);
  }
  return nullptr;
}

struct PreStep {
  enum Kind { kSplit, kByteLevel } kind;
  std::unique_ptr<Regex> regex;  // kSplit, or kByteLevel with use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool add_prefix_space = false;
};

// Added tokens matched literally in the text, leftmost first and then longest (tokenizers'
// LeftmostLongest Aho-Corasick gives the same answer).
class AddedMatcher {
 public:
  AddedMatcher() : nodes_(1) {}
  void Add(absl::string_view content, int32_t id) {
    if (content.empty()) return;
    first_[static_cast<uint8_t>(content[0])] = true;
    int32_t n = 0;
    for (char c : content) {
      int32_t next = Child(n, static_cast<uint8_t>(c));
      if (next < 0) {
        next = static_cast<int32_t>(nodes_.size());
        nodes_[n].next.emplace_back(static_cast<uint8_t>(c), next);
        nodes_.emplace_back();
      }
      n = next;
    }
    if (nodes_[n].id < 0) nodes_[n].id = id;  // the first token with this content wins, as in tokenizers
    empty_ = false;
  }
  bool empty() const { return empty_; }
  // Calls text(segment) for runs between matches and token(id) for each match, in order.
  void Split(absl::string_view s, absl::FunctionRef<void(absl::string_view)> text, absl::FunctionRef<void(int32_t)> token) const {
    size_t last = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      if (!first_[static_cast<uint8_t>(s[i])]) continue;
      int32_t n = 0, best_id = -1;
      size_t best_end = 0;
      for (size_t k = i; k < s.size(); ++k) {
        n = Child(n, static_cast<uint8_t>(s[k]));
        if (n < 0) break;
        if (nodes_[n].id >= 0) best_id = nodes_[n].id, best_end = k + 1;
      }
      if (best_id < 0) continue;
      if (i > last) text(s.substr(last, i - last));
      token(best_id);
      last = best_end;
      i = last - 1;
    }
    if (last < s.size()) text(s.substr(last));
  }

 private:
  // A byte trie of the tokens' contents: a match walks only as far as the text agrees with some token.
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> next;
    int32_t id = -1;
  };
  int32_t Child(int32_t n, uint8_t c) const {
    for (const auto& [b, child] : nodes_[n].next) {
      if (b == c) return child;
    }
    return -1;
  }
  std::vector<Node> nodes_;
  std::array<bool, 256> first_{};
  bool empty_ = true;
};

// Why a JSON field is rejected: "<origin>: <field>: <why>".
absl::Status Bad(absl::string_view origin, absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(origin, ": ", field, ": ", why));
}
absl::Status Unsupported(absl::string_view origin, absl::string_view field, absl::string_view what) {
  return absl::UnimplementedError(absl::StrCat(origin, ": ", field, ": ", what, " is not supported"));
}

std::string TypeOf(const json& j) { return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>() : ""; }

bool FlagSet(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() && it->get<bool>();
}

}  // namespace

struct BpeTokenizer::Impl {
  // Model: vocabulary keyed by the raw bytes a token stands for.
  absl::flat_hash_map<std::string, int32_t> bytes_to_id;
  absl::flat_hash_map<std::string, int32_t> token_to_id;  // as written in tokenizer.json, plus added tokens
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  absl::flat_hash_map<uint64_t, Merge> merges;  // (left id << 32 | right id) -> rank and result
  std::array<int32_t, 256> byte_id;
  bool ignore_merges = false;

  // Decoding, by id.
  enum Kind : uint8_t { kHole, kModel, kAdded, kSpecial };
  std::vector<std::string> id_bytes;
  std::vector<Kind> id_kind;

  AddedMatcher raw_added, normalized_added;
  std::vector<NormForm> normalizers;
  std::vector<PreStep> steps;
  std::vector<int32_t> template_prefix, template_suffix;
  int32_t bos = -1;
  std::vector<int32_t> eos;

  // Pre-token (raw bytes) -> ids. Bounded: once full, new words are merged without being kept.
  static constexpr size_t kCacheEntries = 1 << 16;
  static constexpr size_t kCacheMaxWord = 64;
  mutable absl::Mutex cache_mu;
  mutable absl::flat_hash_map<std::string, absl::InlinedVector<int32_t, 4>> cache ABSL_GUARDED_BY(cache_mu);

  void EncodeWord(absl::string_view w, std::vector<int32_t>* out) const;
  void MergeWord(absl::string_view w, absl::InlinedVector<int32_t, 4>* out) const;
  void PreTokenize(size_t step, absl::string_view s, absl::FunctionRef<void(absl::string_view)> emit) const;
  void EncodeNormalized(absl::string_view s, std::vector<int32_t>* out) const;
  void EncodeSegment(absl::string_view s, std::vector<int32_t>* out) const;
  std::string Normalize(absl::string_view s) const;
  absl::Status DecodeInto(std::span<const int32_t> ids, bool skip_special, std::string* out) const;
};

void BpeTokenizer::Impl::MergeWord(absl::string_view w, absl::InlinedVector<int32_t, 4>* out) const {
  struct Sym {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  absl::InlinedVector<Sym, 32> sym;
  for (char c : w) {
    const int32_t id = byte_id[static_cast<uint8_t>(c)];
    if (id < 0) continue;  // a byte missing from the vocabulary is dropped, as tokenizers does without unk
    const int32_t n = static_cast<int32_t>(sym.size());
    sym.push_back({id, n - 1, n + 1, true});
  }
  if (sym.empty()) return;
  sym.back().next = -1;
  auto find = [&](int32_t a, int32_t b) -> const Merge* {
    auto it = merges.find((static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b));
    return it == merges.end() ? nullptr : &it->second;
  };
  if (sym.size() <= 24) {
    // Short words: scan for the lowest-ranked pair (leftmost on ties) until none is left; the
    // same order as the heap below, without its bookkeeping.
    absl::InlinedVector<int32_t, 32> ids;
    for (const Sym& s : sym) ids.push_back(s.id);
    absl::InlinedVector<Merge, 32> pair;  // pair[i]: merge of ids[i], ids[i+1]
    for (size_t i = 0; i + 1 < ids.size(); ++i) {
      const Merge* m = find(ids[i], ids[i + 1]);
      pair.push_back(m ? *m : Merge{INT32_MAX, -1});
    }
    while (!pair.empty()) {
      size_t best = 0;
      for (size_t i = 1; i < pair.size(); ++i) {
        if (pair[i].rank < pair[best].rank) best = i;
      }
      if (pair[best].id < 0) break;
      ids[best] = pair[best].id;
      ids.erase(ids.begin() + best + 1);
      pair.erase(pair.begin() + best);
      if (best < pair.size()) {
        const Merge* m = find(ids[best], ids[best + 1]);
        pair[best] = m ? *m : Merge{INT32_MAX, -1};
      }
      if (best > 0) {
        const Merge* m = find(ids[best - 1], ids[best]);
        pair[best - 1] = m ? *m : Merge{INT32_MAX, -1};
      }
    }
    out->assign(ids.begin(), ids.end());
    return;
  }
  // Long words: a heap of candidate merges ordered by (rank, position), as tokenizers' Word::merge_all.
  struct Cand {
    int32_t rank, pos, id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) {
    if (const Merge* m = find(sym[i].id, sym[i + 1].id)) heap.push({m->rank, i, m->id});
  }
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& s = sym[c.pos];
    if (!s.alive || s.next < 0) continue;
    const Merge* m = find(s.id, sym[s.next].id);
    if (m == nullptr || m->id != c.id) continue;  // stale: a neighbour has changed since
    Sym& right = sym[s.next];
    s.id = c.id;
    right.alive = false;
    s.next = right.next;
    if (s.next >= 0) sym[s.next].prev = c.pos;
    if (s.prev >= 0) {
      if (const Merge* pm = find(sym[s.prev].id, s.id)) heap.push({pm->rank, s.prev, pm->id});
    }
    if (s.next >= 0) {
      if (const Merge* nm = find(s.id, sym[s.next].id)) heap.push({nm->rank, c.pos, nm->id});
    }
  }
  for (int32_t i = 0; i >= 0; i = sym[i].next) out->push_back(sym[i].id);
}

void BpeTokenizer::Impl::EncodeWord(absl::string_view w, std::vector<int32_t>* out) const {
  if (w.size() == 1) {
    if (const int32_t id = byte_id[static_cast<uint8_t>(w[0])]; id >= 0) out->push_back(id);
    return;
  }
  if (ignore_merges) {
    if (auto it = bytes_to_id.find(w); it != bytes_to_id.end()) {
      out->push_back(it->second);
      return;
    }
  }
  const bool cacheable = w.size() <= kCacheMaxWord;
  if (cacheable) {
    absl::ReaderMutexLock lock(&cache_mu);
    if (auto it = cache.find(w); it != cache.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  absl::InlinedVector<int32_t, 4> ids;
  MergeWord(w, &ids);
  out->insert(out->end(), ids.begin(), ids.end());
  if (cacheable) {
    absl::MutexLock lock(&cache_mu);
    if (cache.size() < kCacheEntries) cache.emplace(w, std::move(ids));
  }
}

void BpeTokenizer::Impl::PreTokenize(size_t step, absl::string_view s, absl::FunctionRef<void(absl::string_view)> emit) const {
  if (s.empty()) return;
  if (step == steps.size()) {
    emit(s);
    return;
  }
  const PreStep& p = steps[step];
  auto next = [&](absl::string_view piece) { PreTokenize(step + 1, piece, emit); };
  if (p.kind == PreStep::kSplit) {
    SplitWith(*p.regex, s, p.behavior, next);
    return;
  }
  std::string prefixed;
  if (p.add_prefix_space && s[0] != ' ') {
    prefixed = absl::StrCat(" ", s);
    s = prefixed;
  }
  if (p.regex != nullptr) {
    SplitWith(*p.regex, s, SplitBehavior::kIsolated, next);
  } else {
    next(s);
  }
}

std::string BpeTokenizer::Impl::Normalize(absl::string_view s) const {
  std::string cur(s);
  bool ascii = true;
  for (char c : s) ascii = ascii && static_cast<unsigned char>(c) < 0x80;
  // ASCII is fixed under every normalization form; ill-formed UTF-8 is left as it is.
  if (ascii || !IsValidUtf8(s)) return cur;
  for (NormForm f : normalizers) {
    const icu::Normalizer2* n = IcuNormalizer(f);
    UErrorCode status = U_ZERO_ERROR;
    if (n == nullptr || n->isNormalizedUTF8(icu::StringPiece(cur.data(), static_cast<int32_t>(cur.size())), status)) continue;
    std::string out;
    icu::StringByteSink<std::string> sink(&out, static_cast<int32_t>(cur.size() + 8));
    status = U_ZERO_ERROR;
    n->normalizeUTF8(0, icu::StringPiece(cur.data(), static_cast<int32_t>(cur.size())), sink, nullptr, status);
    if (U_SUCCESS(status)) cur = std::move(out);
  }
  return cur;
}

void BpeTokenizer::Impl::EncodeNormalized(absl::string_view s, std::vector<int32_t>* out) const {
  PreTokenize(0, s, [&](absl::string_view w) { EncodeWord(w, out); });
}

void BpeTokenizer::Impl::EncodeSegment(absl::string_view s, std::vector<int32_t>* out) const {
  if (normalizers.empty()) {
    if (normalized_added.empty()) {
      EncodeNormalized(s, out);
    } else {
      normalized_added.Split(s, [&](absl::string_view t) { EncodeNormalized(t, out); }, [&](int32_t id) { out->push_back(id); });
    }
    return;
  }
  const std::string n = Normalize(s);
  normalized_added.Split(n, [&](absl::string_view t) { EncodeNormalized(t, out); }, [&](int32_t id) { out->push_back(id); });
}

absl::Status BpeTokenizer::Impl::DecodeInto(std::span<const int32_t> ids, bool skip_special, std::string* out) const {
  for (int32_t id : ids) {
    if (id < 0 || id >= static_cast<int32_t>(id_kind.size()) || id_kind[id] == kHole) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " outside vocabulary of ", id_kind.size()));
    }
    if (skip_special && id_kind[id] == kSpecial) continue;
    out->append(id_bytes[id]);
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------------------------------- loading

namespace {

absl::StatusOr<NormForm> ParseNormForm(const json& j, absl::string_view origin, const std::string& field) {
  const std::string t = TypeOf(j);
  if (t == "NFC") return NormForm::kNFC;
  if (t == "NFD") return NormForm::kNFD;
  if (t == "NFKC") return NormForm::kNFKC;
  if (t == "NFKD") return NormForm::kNFKD;
  return Unsupported(origin, field, absl::StrCat("normalizer type \"", t, "\""));
}

absl::Status ParseNormalizer(const json& j, absl::string_view origin, const std::string& field, std::vector<NormForm>* out) {
  if (j.is_null()) return absl::OkStatus();
  if (TypeOf(j) == "Sequence") {
    if (!j.contains("normalizers") || !j["normalizers"].is_array()) return Bad(origin, field, "Sequence without a normalizers array");
    for (size_t i = 0; i < j["normalizers"].size(); ++i) {
      if (absl::Status s = ParseNormalizer(j["normalizers"][i], origin, absl::StrCat(field, ".normalizers[", i, "]"), out); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  absl::StatusOr<NormForm> f = ParseNormForm(j, origin, field);
  if (!f.ok()) return f.status();
  out->push_back(*f);
  return absl::OkStatus();
}

absl::Status ParsePreTokenizer(const json& j, absl::string_view origin, const std::string& field, std::vector<PreStep>* out) {
  if (j.is_null()) return absl::OkStatus();
  const std::string t = TypeOf(j);
  if (t == "Sequence") {
    if (!j.contains("pretokenizers") || !j["pretokenizers"].is_array()) return Bad(origin, field, "Sequence without a pretokenizers array");
    for (size_t i = 0; i < j["pretokenizers"].size(); ++i) {
      if (absl::Status s = ParsePreTokenizer(j["pretokenizers"][i], origin, absl::StrCat(field, ".pretokenizers[", i, "]"), out); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  PreStep step;
  if (t == "ByteLevel") {
    step.kind = PreStep::kByteLevel;
    step.add_prefix_space = FlagSet(j, "add_prefix_space");
    const bool use_regex = !j.contains("use_regex") || FlagSet(j, "use_regex");  // absent in old files: true
    if (use_regex) {
      absl::StatusOr<std::unique_ptr<Regex>> re = Regex::Compile(kGpt2Pattern, false);
      if (!re.ok()) return re.status();
      step.regex = *std::move(re);
    }
  } else if (t == "Split") {
    step.kind = PreStep::kSplit;
    if (FlagSet(j, "invert")) return Unsupported(origin, field + ".invert", "true");
    const std::string behavior = j.value("behavior", std::string("Isolated"));
    if (behavior == "Isolated") {
      step.behavior = SplitBehavior::kIsolated;
    } else if (behavior == "Removed") {
      step.behavior = SplitBehavior::kRemoved;
    } else {
      return Unsupported(origin, field + ".behavior", absl::StrCat("\"", behavior, "\""));
    }
    const json& pat = j.contains("pattern") ? j["pattern"] : json();
    std::unique_ptr<Regex> re;
    if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string()) {
      absl::StatusOr<std::unique_ptr<Regex>> r = Regex::Compile(pat["Regex"].get<std::string>(), false);
      if (!r.ok()) return Bad(origin, field + ".pattern.Regex", r.status().message());
      re = *std::move(r);
    } else if (pat.is_object() && pat.contains("String") && pat["String"].is_string()) {
      absl::StatusOr<std::unique_ptr<Regex>> r = Regex::Compile(pat["String"].get<std::string>(), true);
      if (!r.ok()) return Bad(origin, field + ".pattern.String", r.status().message());
      re = *std::move(r);
    } else {
      return Bad(origin, field + ".pattern", "must be {\"Regex\": ...} or {\"String\": ...}");
    }
    step.regex = std::move(re);
  } else {
    return Unsupported(origin, field, absl::StrCat("pre_tokenizer type \"", t, "\""));
  }
  out->push_back(std::move(step));
  return absl::OkStatus();
}

// The ids a post_processor puts before and after a single sequence (TemplateProcessing,
// Roberta/BertProcessing, Sequences of them; ByteLevel adds none).
absl::Status ParsePostProcessor(const json& post_processor, absl::string_view origin, std::vector<int32_t>* prefix,
                                std::vector<int32_t>* suffix) {
  std::vector<std::pair<json, std::string>> procs = {{post_processor, "post_processor"}};
  for (size_t k = 0; k < procs.size(); ++k) {
    const json pp = procs[k].first;
    const std::string field = procs[k].second;
    const std::string t = TypeOf(pp);
    if (pp.is_null() || t == "ByteLevel") continue;  // ByteLevel only trims offsets
    if (t == "Sequence") {
      if (!pp.contains("processors") || !pp["processors"].is_array()) return Bad(origin, field, "Sequence without a processors array");
      for (size_t i = 0; i < pp["processors"].size(); ++i) procs.emplace_back(pp["processors"][i], absl::StrCat(field, ".processors[", i, "]"));
      continue;
    }
    if (t == "TemplateProcessing") {
      if (!pp.contains("single") || !pp["single"].is_array()) return Bad(origin, field + ".single", "missing or not an array");
      const json specials = pp.value("special_tokens", json::object());
      bool seen_a = false;
      for (size_t i = 0; i < pp["single"].size(); ++i) {
        const json& piece = pp["single"][i];
        if (piece.contains("Sequence")) {
          seen_a = true;
          continue;
        }
        if (!piece.contains("SpecialToken") || !piece["SpecialToken"].contains("id")) {
          return Bad(origin, absl::StrCat(field, ".single[", i, "]"), "neither Sequence nor SpecialToken");
        }
        const std::string name = piece["SpecialToken"]["id"].get<std::string>();
        if (!specials.contains(name) || !specials[name].contains("ids") || !specials[name]["ids"].is_array()) {
          return Bad(origin, field + ".special_tokens", absl::StrCat("no ids for \"", name, "\""));
        }
        for (const json& idj : specials[name]["ids"]) (seen_a ? *suffix : *prefix).push_back(idj.get<int32_t>());
      }
      continue;
    }
    if (t == "RobertaProcessing" || t == "BertProcessing") {
      for (const char* key : {"cls", "sep"}) {
        if (!pp.contains(key) || !pp[key].is_array() || pp[key].size() != 2 || !pp[key][1].is_number_integer()) {
          return Bad(origin, absl::StrCat(field, ".", key), "must be [token, id]");
        }
      }
      prefix->push_back(pp["cls"][1].get<int32_t>());
      suffix->push_back(pp["sep"][1].get<int32_t>());
      continue;
    }
    return Unsupported(origin, field, absl::StrCat("post_processor type \"", t, "\""));
  }
  return absl::OkStatus();
}

}  // namespace

BpeTokenizer::BpeTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BpeTokenizer::~BpeTokenizer() = default;

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::FromFile(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return absl::NotFoundError(absl::StrCat(path.string(), ": no such file"));
  absl::StatusOr<std::string> text = runtime::ReadFile(path);
  if (!text.ok()) return text.status();
  return FromJson(*text, path.string());
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::FromJson(absl::string_view text, absl::string_view origin) {
  json j = json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded()) return Bad(origin, "(file)", "not valid JSON");
  if (!j.is_object()) return Bad(origin, "(file)", "not a JSON object");
  try {
    return FromParsedJson(j, origin);
  } catch (const json::exception& e) {  // a field of the wrong JSON type deep inside
    return Bad(origin, "(file)", e.what());
  }
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::FromParsedJson(const nlohmann::json& j, absl::string_view origin) {
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;

  // --- model
  if (!j.contains("model") || !j["model"].is_object()) return Bad(origin, "model", "missing or not an object");
  const json& model = j["model"];
  const std::string mtype = TypeOf(model);
  if (!mtype.empty() && mtype != "BPE") return Unsupported(origin, "model.type", absl::StrCat("\"", mtype, "\" (only BPE)"));
  if (!model.contains("vocab") || !model["vocab"].is_object()) return Bad(origin, "model.vocab", "missing or not an object");
  if (!model.contains("merges") || !model["merges"].is_array()) return Bad(origin, "model.merges", "missing or not an array");
  if (model.contains("dropout") && !model["dropout"].is_null() && !(model["dropout"].is_number() && model["dropout"].get<double>() == 0.0)) {
    return Unsupported(origin, "model.dropout", "BPE dropout");
  }
  if (FlagSet(model, "byte_fallback")) return Unsupported(origin, "model.byte_fallback", "true");
  for (const char* f : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(f) && model[f].is_string() && !model[f].get<std::string>().empty()) {
      return Unsupported(origin, absl::StrCat("model.", f), "a non-empty value");
    }
  }
  m.ignore_merges = FlagSet(model, "ignore_merges");
  int64_t max_id = -1;
  m.token_to_id.reserve(model["vocab"].size());
  for (const auto& [tok, idj] : model["vocab"].items()) {
    if (!idj.is_number_integer() || idj.get<int64_t>() < 0 || idj.get<int64_t>() > INT32_MAX) {
      return Bad(origin, absl::StrCat("model.vocab[\"", tok, "\"]"), "id must be a non-negative integer");
    }
    m.token_to_id[tok] = static_cast<int32_t>(idj.get<int64_t>());
    max_id = std::max<int64_t>(max_id, idj.get<int64_t>());
  }
  std::vector<std::pair<std::string, int32_t>> added;  // content, id
  struct AddedInfo {
    bool special, normalized;
  };
  std::vector<AddedInfo> added_info;
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) return Bad(origin, "added_tokens", "not an array");
    for (size_t i = 0; i < j["added_tokens"].size(); ++i) {
      const json& a = j["added_tokens"][i];
      const std::string f = absl::StrCat("added_tokens[", i, "]");
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") || !a["content"].is_string()) {
        return Bad(origin, f, "needs an integer id and a string content");
      }
      for (const char* flag : {"lstrip", "rstrip", "single_word"}) {
        if (FlagSet(a, flag)) return Unsupported(origin, absl::StrCat(f, ".", flag), "true");
      }
      const int64_t id = a["id"].get<int64_t>();
      if (id < 0 || id > INT32_MAX) return Bad(origin, f + ".id", "out of range");
      const bool special = FlagSet(a, "special");
      // tokenizers' default: special tokens are matched on the raw text, others after normalization.
      const bool normalized = a.contains("normalized") && a["normalized"].is_boolean() ? a["normalized"].get<bool>() : !special;
      added.emplace_back(a["content"].get<std::string>(), static_cast<int32_t>(id));
      added_info.push_back({special, normalized});
      max_id = std::max<int64_t>(max_id, id);
    }
  }
  m.id_bytes.assign(max_id + 1, std::string());
  m.id_kind.assign(max_id + 1, Impl::kHole);
  m.bytes_to_id.reserve(m.token_to_id.size());
  for (const auto& [tok, id] : m.token_to_id) {
    m.id_bytes[id] = ByteLevelDecodeToken(tok);
    m.id_kind[id] = Impl::kModel;
    if (std::optional<std::string> b = ByteLevelToBytes(tok)) m.bytes_to_id.emplace(*std::move(b), id);
  }
  m.byte_id.fill(-1);
  for (int b = 0; b < 256; ++b) {
    if (auto it = m.bytes_to_id.find(std::string(1, static_cast<char>(b))); it != m.bytes_to_id.end()) m.byte_id[b] = it->second;
  }
  const json& merges = model["merges"];
  m.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& mj = merges[i];
    std::string a, b;
    if (mj.is_string()) {
      const std::string s = mj.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == s.size()) return Bad(origin, absl::StrCat("model.merges[", i, "]"), "not \"left right\"");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (mj.is_array() && mj.size() == 2 && mj[0].is_string() && mj[1].is_string()) {
      a = mj[0].get<std::string>();
      b = mj[1].get<std::string>();
    } else {
      return Bad(origin, absl::StrCat("model.merges[", i, "]"), "neither \"left right\" nor [left, right]");
    }
    auto ia = m.token_to_id.find(a), ib = m.token_to_id.find(b), ic = m.token_to_id.find(a + b);
    if (ia == m.token_to_id.end() || ib == m.token_to_id.end() || ic == m.token_to_id.end()) {
      return Bad(origin, absl::StrCat("model.merges[", i, "]"), absl::StrCat("\"", a, "\" + \"", b, "\" uses or makes a token not in model.vocab"));
    }
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) | static_cast<uint32_t>(ib->second);
    m.merges.try_emplace(key, Impl::Merge{static_cast<int32_t>(i), ic->second});  // the first (best) rank wins
  }
  for (size_t i = 0; i < added.size(); ++i) {
    const auto& [content, id] = added[i];
    m.id_bytes[id] = ByteLevelDecodeToken(content);
    m.id_kind[id] = added_info[i].special ? Impl::kSpecial : Impl::kAdded;
    m.token_to_id[content] = id;
    (added_info[i].normalized ? m.normalized_added : m.raw_added).Add(content, id);
  }

  // --- normalizer, pre-tokenizer, decoder
  if (absl::Status s = ParseNormalizer(j.value("normalizer", json()), origin, "normalizer", &m.normalizers); !s.ok()) return s;
  if (absl::Status s = ParsePreTokenizer(j.value("pre_tokenizer", json()), origin, "pre_tokenizer", &m.steps); !s.ok()) return s;
  if (std::none_of(m.steps.begin(), m.steps.end(), [](const PreStep& p) { return p.kind == PreStep::kByteLevel; })) {
    return Unsupported(origin, "pre_tokenizer", "a tokenizer without a ByteLevel step (only byte-level BPE)");
  }
  const json dec = j.value("decoder", json());
  if (TypeOf(dec) != "ByteLevel") {
    return Unsupported(origin, "decoder", dec.is_null() ? std::string("null") : absl::StrCat("type \"", TypeOf(dec), "\" (only ByteLevel)"));
  }

  // --- post-processor: the ids the single-sequence template puts around the text
  if (absl::Status s = ParsePostProcessor(j.value("post_processor", json()), origin, &m.template_prefix,
                                          &m.template_suffix);
      !s.ok()) {
    return s;
  }
  for (int32_t id : m.template_prefix) {
    if (id < 0 || id >= static_cast<int32_t>(m.id_kind.size()) || m.id_kind[id] == Impl::kHole) {
      return Bad(origin, "post_processor", absl::StrCat("template token id ", id, " is not in the vocabulary"));
    }
  }
  if (!m.template_prefix.empty()) m.bos = m.template_prefix.front();
  return std::unique_ptr<BpeTokenizer>(new BpeTokenizer(std::move(impl)));
}

// ------------------------------------------------------------------------------------- interface

std::vector<int32_t> BpeTokenizer::Encode(absl::string_view text, bool add_bos) const {
  const Impl& m = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_bos) {
    if (!m.template_prefix.empty()) {
      out.insert(out.end(), m.template_prefix.begin(), m.template_prefix.end());
    } else if (m.bos >= 0) {
      out.push_back(m.bos);
    }
  }
  m.raw_added.Split(text, [&](absl::string_view s) { m.EncodeSegment(s, &out); }, [&](int32_t id) { out.push_back(id); });
  if (add_bos) out.insert(out.end(), m.template_suffix.begin(), m.template_suffix.end());
  return out;
}

absl::StatusOr<std::string> BpeTokenizer::Decode(std::span<const int32_t> ids) const {
  std::string out;
  if (absl::Status s = impl_->DecodeInto(ids, /*skip_special=*/true, &out); !s.ok()) return s;
  return out;
}

absl::StatusOr<std::string> BpeTokenizer::DecodeText(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string raw;
  if (absl::Status s = impl_->DecodeInto(ids, skip_special_tokens, &raw); !s.ok()) return s;
  if (IsValidUtf8(raw)) return raw;
  std::string out;
  AppendUtf8Lossy(raw, &out);
  return out;
}

int64_t BpeTokenizer::vocab_size() const { return static_cast<int64_t>(impl_->id_kind.size()); }
int32_t BpeTokenizer::bos_id() const { return impl_->bos; }
std::vector<int32_t> BpeTokenizer::eos_ids() const { return impl_->eos; }

std::optional<int32_t> BpeTokenizer::TokenToId(absl::string_view token) const {
  auto it = impl_->token_to_id.find(token);
  if (it == impl_->token_to_id.end()) return std::nullopt;
  return it->second;
}

bool BpeTokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < static_cast<int32_t>(impl_->id_kind.size()) && impl_->id_kind[id] == Impl::kSpecial;
}

void BpeTokenizer::set_eos_ids(std::vector<int32_t> ids) { impl_->eos = std::move(ids); }
void BpeTokenizer::set_bos_id(int32_t id) { impl_->bos = id; }

}  // namespace scout::text
