// The Jinja parser: tokens to statement and expression trees.
#pragma once

#include <vector>

#include "text/jinja/ast.h"
#include "text/jinja/lexer.h"

namespace scout::text::jinja {

// TemplateError on a syntax error or an unknown statement.
std::vector<Node> ParseTokens(std::vector<Token> tokens);

}  // namespace scout::text::jinja
