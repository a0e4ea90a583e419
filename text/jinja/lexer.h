// The Jinja lexer: source to text and tag tokens, with whitespace control ({%- -%}, trim_blocks,
// lstrip_blocks) applied.
#pragma once

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace scout::text::jinja {

enum class Tok { kText, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof };

struct Token {
  Tok type;
  std::string text;  // text, name, decoded string literal, number or operator
  int line;
};

// TemplateError (text/jinja/value.h) on a malformed tag or literal.
std::vector<Token> Lex(absl::string_view source);

}  // namespace scout::text::jinja
