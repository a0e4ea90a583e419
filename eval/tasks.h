// Long-context retrieval tasks in the format the fixture pair was trained on
// (tools/train_fixtures.py): a passkey, or key-value facts, written over filler text, with the
// query at the end of the prompt.
#pragma once

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace scout::eval {


struct RetrievalTask {
  std::string prompt;  // ends right before the answer
  std::string answer;
};

// `length` bytes of prompt + answer over a random window of `filler` (repeated if shorter).
// passkey: "The pass key is NNNNN. ..." once in the first 90%, then "What is the pass key? The
// pass key is " + answer. kv: 4-16 "KEY k = VALUE v" facts spread over the text, then "QUERY k ->
// " + answer for one of them. Deterministic in seed.
RetrievalTask MakePasskeyTask(absl::string_view filler, int64_t length, uint64_t seed);
RetrievalTask MakeKeyValueTask(absl::string_view filler, int64_t length, uint64_t seed);

}  // namespace scout::eval
