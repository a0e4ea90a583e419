// Byte-level BPE's alphabet (GPT-2's bytes_to_unicode): every byte string written as printable
// text, and back.
#pragma once

#include <optional>
#include <string>

#include "absl/strings/string_view.h"

namespace scout::text {

// The ByteLevel decoder's rule for one token: its characters mapped back to bytes, or, when any
// character is outside the alphabet, the token's own UTF-8.
std::string ByteLevelDecodeToken(absl::string_view token);

// The inverse: nullopt when a character is not in the alphabet (such a token is never produced
// by merging bytes).
std::optional<std::string> ByteLevelToBytes(absl::string_view token);

}  // namespace scout::text
