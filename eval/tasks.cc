#include "eval/tasks.h"

#include <algorithm>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"

namespace scout::eval {
namespace {

std::string Window(absl::string_view filler, int64_t length, std::mt19937_64& rng) {
  std::string out;
  out.reserve(length);
  size_t at = std::uniform_int_distribution<size_t>(0, filler.empty() ? 0 : filler.size() - 1)(rng);
  while (static_cast<int64_t>(out.size()) < length) {
    const size_t take = std::min<size_t>(filler.size() - at, length - out.size());
    out.append(filler.data() + at, take);
    at = 0;
  }
  return out;
}

std::string Hex(std::mt19937_64& rng) {
  static const char kDigits[] = "0123456789abcdef";
  std::string s(6, '0');
  for (char& c : s) c = kDigits[rng() % 16];
  return s;
}

void Put(std::string& text, size_t at, const std::string& what) { text.replace(at, what.size(), what); }

}  // namespace

RetrievalTask MakePasskeyTask(absl::string_view filler, int64_t length, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const std::string ans = std::to_string(std::uniform_int_distribution<int>(10000, 99999)(rng));
  const std::string fact = absl::StrCat("\nThe pass key is ", ans, ". Remember it. ", ans, " is the pass key.\n");
  const std::string query = "\nWhat is the pass key? The pass key is ";
  std::string text = Window(filler, length, rng);
  const int64_t qpos = length - static_cast<int64_t>(query.size() + ans.size());
  const int64_t hi = std::min<int64_t>(static_cast<int64_t>(0.9 * length), qpos) - static_cast<int64_t>(fact.size());
  Put(text, std::uniform_int_distribution<int64_t>(0, std::max<int64_t>(0, hi))(rng), fact);
  text.resize(qpos);
  text += query;
  return {text, ans};
}

RetrievalTask MakeKeyValueTask(absl::string_view filler, int64_t length, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int n = std::uniform_int_distribution<int>(4, 16)(rng);
  std::vector<std::string> keys, vals;
  while (static_cast<int>(keys.size()) < n) {
    std::string k = Hex(rng);
    if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(k), vals.push_back(Hex(rng));
  }
  const int q = std::uniform_int_distribution<int>(0, n - 1)(rng);
  const std::string query = absl::StrCat("\nQUERY ", keys[q], " -> ");
  const int64_t qpos = length - static_cast<int64_t>(query.size()) - 6;
  std::string text = Window(filler, length, rng);
  const int64_t flen = 27, slot = qpos / n;  // one fact per equal slot, spread over the prompt
  for (int i = 0; i < n; ++i) {
    Put(text, i * slot + std::uniform_int_distribution<int64_t>(0, std::max<int64_t>(0, slot - flen))(rng),
        absl::StrCat("\nKEY ", keys[i], " = VALUE ", vals[i], "\n"));
  }
  text.resize(qpos);
  text += query;
  return {text, vals[q]};
}

}  // namespace scout::eval
