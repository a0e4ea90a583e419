#include "text/byte_level.h"

#include <array>
#include <cstdint>

#include "text/utf8.h"

namespace scout::text {
namespace {

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes for
// U+0100 onwards, so every byte string becomes printable text.
struct ByteLevelAlphabet {
  std::array<char32_t, 256> byte_to_cp;
  std::array<int16_t, 324> cp_to_byte;  // -1 where no byte maps
  ByteLevelAlphabet() {
    cp_to_byte.fill(-1);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      byte_to_cp[b] = printable ? static_cast<char32_t>(b) : next++;
      cp_to_byte[byte_to_cp[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteLevelAlphabet& Alphabet() {
  static const ByteLevelAlphabet* a = new ByteLevelAlphabet();
  return *a;
}

}  // namespace

std::string ByteLevelDecodeToken(absl::string_view token) {
  std::string out;
  const ByteLevelAlphabet& a = Alphabet();
  for (size_t i = 0; i < token.size();) {
    const int32_t cp = NextCodePoint(token, &i);
    if (cp < 0 || cp >= static_cast<int32_t>(a.cp_to_byte.size()) || a.cp_to_byte[cp] < 0) return std::string(token);
    out.push_back(static_cast<char>(a.cp_to_byte[cp]));
  }
  return out;
}

std::optional<std::string> ByteLevelToBytes(absl::string_view token) {
  std::string out;
  const ByteLevelAlphabet& a = Alphabet();
  for (size_t i = 0; i < token.size();) {
    const int32_t cp = NextCodePoint(token, &i);
    if (cp < 0 || cp >= static_cast<int32_t>(a.cp_to_byte.size()) || a.cp_to_byte[cp] < 0) return std::nullopt;
    out.push_back(static_cast<char>(a.cp_to_byte[cp]));
  }
  return out;
}

}  // namespace scout::text
