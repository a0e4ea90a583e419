// UTF-8 validation and repair, as the tokenizers and the streaming decoder need them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace scout::text {

// Length of the longest prefix of `s` that ends on a character boundary, treating a trailing run
// that is a valid but incomplete start of a character as not yet complete (it may still be
// finished by the bytes that follow). Invalid bytes before that point count as complete: they
// become U+FFFD in AppendUtf8Lossy. So s[result, size) is 0 to 3 bytes waiting for more.
size_t Utf8CompletePrefix(absl::string_view s);

// Appends `s` to `out` with every ill-formed sequence replaced by U+FFFD, one per maximal subpart
// (the Unicode / WHATWG rule, as Rust's String::from_utf8_lossy and Python's errors="replace").
void AppendUtf8Lossy(absl::string_view s, std::string* out);

bool IsValidUtf8(absl::string_view s);

// Decodes one code point of valid UTF-8 at s[*i]; -1 (and one byte consumed) if ill-formed.
int32_t NextCodePoint(absl::string_view s, size_t* i);

// Appends code point `cp` (must be <= 0x10FFFF) as UTF-8.
void AppendUtf8(char32_t cp, std::string* out);

}  // namespace scout::text
