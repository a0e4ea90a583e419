#include "text/jinja/lexer.h"

#include <unicode/uchar.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>

#include "absl/strings/str_join.h"
#include "text/utf8.h"

#include "text/jinja/value.h"

namespace scout::text::jinja {

namespace {

struct RawTag {
  size_t token_begin;  // index of the begin token in the token list (or of the comment placeholder)
  bool block;          // {% %} or {# #}: lstrip_blocks and trim_blocks apply
  bool left_minus, left_plus, right_minus, right_plus;
};

class Lexer {
 public:
  explicit Lexer(absl::string_view src) : src_(src) {}

  std::vector<Token> Run() {
    std::vector<Token> toks;
    // Text tokens are kept with their neighbouring tags so whitespace control can run after.
    struct TextRef {
      size_t token;
      int prev_tag = -1, next_tag = -1;
    };
    std::vector<TextRef> texts;
    std::vector<RawTag> tags;
    size_t pos = 0;
    while (pos <= src_.size()) {
      size_t at = FindTag(pos);
      const size_t text_end = at == std::string::npos ? src_.size() : at;
      if (text_end > pos || at == std::string::npos) {
        texts.push_back({toks.size(), tags.empty() ? -1 : static_cast<int>(tags.size()) - 1, -1});
        toks.push_back({Tok::kText, std::string(src_.substr(pos, text_end - pos)), LineAt(pos)});
      } else {
        texts.push_back({toks.size(), tags.empty() ? -1 : static_cast<int>(tags.size()) - 1, -1});
        toks.push_back({Tok::kText, "", LineAt(pos)});
      }
      if (at == std::string::npos) break;
      texts.back().next_tag = static_cast<int>(tags.size());
      const char kind = src_[at + 1];
      size_t p = at + 2;
      RawTag tag{toks.size(), kind != '{', false, false, false, false};
      if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) {
        (src_[p] == '-' ? tag.left_minus : tag.left_plus) = true;
        ++p;
      }
      if (kind == '#') {
        const size_t end = src_.find("#}", p);
        if (end == std::string::npos) Fail(LineAt(at), "unclosed comment");
        if (end > p && src_[end - 1] == '-') tag.right_minus = true;
        if (end > p && src_[end - 1] == '+') tag.right_plus = true;
        toks.push_back({Tok::kText, "", LineAt(at)});  // placeholder: comments render nothing
        pos = end + 2;
      } else {
        toks.push_back({kind == '{' ? Tok::kVarBegin : Tok::kBlockBegin, "", LineAt(at)});
        pos = LexTag(p, kind == '{' ? '}' : '%', &tag, &toks);
      }
      tags.push_back(tag);
    }
    // Whitespace control: {%- / -%} strip all whitespace beside the tag; lstrip_blocks strips the
    // spaces and tabs that start a block tag's line; trim_blocks drops the newline after one.
    for (const TextRef& t : texts) {
      std::string& s = toks[t.token].text;
      const std::string original = s;
      if (t.next_tag >= 0) {
        const RawTag& n = tags[t.next_tag];
        if (n.left_minus) {
          s.erase(s.find_last_not_of(" \t\n\r\f\v") + 1);
        } else if (n.block && !n.left_plus) {
          const size_t nl = original.rfind('\n');
          const size_t line_start = nl == std::string::npos ? 0 : nl + 1;
          const bool at_line_start = nl != std::string::npos || t.prev_tag < 0;
          if (at_line_start && original.find_first_not_of(" \t", line_start) == std::string::npos) s.erase(line_start);
        }
      }
      if (t.prev_tag >= 0) {
        const RawTag& p = tags[t.prev_tag];
        if (p.right_minus) {
          const size_t k = s.find_first_not_of(" \t\n\r\f\v");
          s.erase(0, k == std::string::npos ? s.size() : k);
        } else if (p.block && !p.right_plus && !s.empty() && s[0] == '\n') {
          s.erase(0, 1);
        }
      }
    }
    toks.push_back({Tok::kEof, "", LineAt(src_.size())});
    return toks;
  }

 private:
  size_t FindTag(size_t from) const {
    for (size_t i = src_.find('{', from); i != std::string::npos && i + 1 < src_.size(); i = src_.find('{', i + 1)) {
      const char c = src_[i + 1];
      if (c == '{' || c == '%' || c == '#') return i;
    }
    return std::string::npos;
  }

  int LineAt(size_t pos) const {
    while (line_pos_ < pos && line_pos_ < src_.size()) {
      if (src_[line_pos_] == '\n') ++line_;
      ++line_pos_;
    }
    return line_;
  }

  // Lexes expression tokens up to the closing "}}" or "%}" (with its - or +); returns the position
  // after it.
  size_t LexTag(size_t p, char close, RawTag* tag, std::vector<Token>* toks) {
    const Tok end_type = close == '}' ? Tok::kVarEnd : Tok::kBlockEnd;
    while (true) {
      while (p < src_.size() && std::isspace(static_cast<unsigned char>(src_[p]))) ++p;
      if (p >= src_.size()) Fail(LineAt(p), "unclosed tag");
      const int line = LineAt(p);
      auto closes_at = [&](size_t q) { return q + 1 < src_.size() && src_[q] == close && src_[q + 1] == '}'; };
      if ((src_[p] == '-' || src_[p] == '+') && closes_at(p + 1)) {
        (src_[p] == '-' ? tag->right_minus : tag->right_plus) = true;
        toks->push_back({end_type, "", line});
        return p + 3;
      }
      if (closes_at(p)) {
        toks->push_back({end_type, "", line});
        return p + 2;
      }
      const char c = src_[p];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t q = p;
        while (q < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        toks->push_back({Tok::kName, std::string(src_.substr(p, q - p)), line});
        p = q;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t q = p;
        bool is_float = false;
        while (q < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        if (q + 1 < src_.size() && src_[q] == '.' && std::isdigit(static_cast<unsigned char>(src_[q + 1]))) {
          is_float = true;
          ++q;
          while (q < src_.size() && std::isdigit(static_cast<unsigned char>(src_[q]))) ++q;
        }
        if (q < src_.size() && (src_[q] == 'e' || src_[q] == 'E')) {
          size_t r = q + 1;
          if (r < src_.size() && (src_[r] == '+' || src_[r] == '-')) ++r;
          if (r < src_.size() && std::isdigit(static_cast<unsigned char>(src_[r]))) {
            is_float = true;
            q = r;
            while (q < src_.size() && std::isdigit(static_cast<unsigned char>(src_[q]))) ++q;
          }
        }
        std::string num;
        for (size_t k = p; k < q; ++k) {
          if (src_[k] != '_') num.push_back(src_[k]);
        }
        toks->push_back({is_float ? Tok::kFloat : Tok::kInt, num, line});
        p = q;
      } else if (c == '\'' || c == '"') {
        std::string s;
        size_t q = p + 1;
        while (true) {
          if (q >= src_.size()) Fail(line, "unclosed string literal");
          if (src_[q] == c) break;
          if (src_[q] == '\\' && q + 1 < src_.size()) {
            const char e = src_[q + 1];
            q += 2;
            switch (e) {
              case 'n': s += '\n'; break;
              case 't': s += '\t'; break;
              case 'r': s += '\r'; break;
              case '\\': s += '\\'; break;
              case '\'': s += '\''; break;
              case '"': s += '"'; break;
              case '0': s += '\0'; break;
              case 'a': s += '\a'; break;
              case 'b': s += '\b'; break;
              case 'f': s += '\f'; break;
              case 'v': s += '\v'; break;
              case '\n': break;
              case 'x':
              case 'u':
              case 'U': {
                const size_t n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                if (q + n > src_.size()) Fail(line, "truncated escape in string literal");
                const std::string hex(src_.substr(q, n));
                AppendUtf8(static_cast<char32_t>(std::stoul(hex, nullptr, 16)), &s);
                q += n;
                break;
              }
              default:  // Python keeps unknown escapes as written
                s += '\\';
                s += e;
            }
            continue;
          }
          s += src_[q++];
        }
        toks->push_back({Tok::kString, s, line});
        p = q + 1;
      } else {
        static const char* kOps[] = {"**", "//", "==", "!=", "<=", ">=", "(", ")", "[", "]", "{", "}", ".", ",", ":",
                                     "|",  "~",  "+",  "-",  "*",  "/",  "%", "<", ">", "="};
        bool found = false;
        for (const char* op : kOps) {
          const size_t n = std::strlen(op);
          if (src_.substr(p, n) == op) {
            toks->push_back({Tok::kOp, op, line});
            p += n;
            found = true;
            break;
          }
        }
        if (!found) Fail(line, absl::StrCat("unexpected character '", std::string(1, c), "'"));
      }
    }
  }

  absl::string_view src_;
  mutable size_t line_pos_ = 0;
  mutable int line_ = 1;
};

}  // namespace

std::vector<Token> Lex(absl::string_view source) { return Lexer(source).Run(); }

}  // namespace scout::text::jinja
