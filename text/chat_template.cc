// A Jinja subset for chat templates. Three stages: the lexer turns the source into text and tag
// tokens (and applies {%- -%}, trim_blocks and lstrip_blocks), the parser builds statement and
// expression trees, the renderer walks them over Python-like values.
//
// Inside this file errors travel as a C++ exception (TemplateError) because every evaluation step
// can fail; Parse and Render catch it and return absl::Status, so nothing escapes the API.
#include "text/chat_template.h"

#include <unicode/uchar.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <functional>
#include <map>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/model_config.h"
#include "text/utf8.h"

namespace scout::text {
namespace jinja {
namespace {

struct TemplateError {
  std::string message;
  int line = 0;
  bool raised = false;  // by raise_exception: the template's own message, shown as is
};

[[noreturn]] void Fail(int line, std::string message) { throw TemplateError{std::move(message), line, false}; }

// ------------------------------------------------------------------------------------------ values

struct Value;
using List = std::vector<Value>;
struct Dict;
struct Function;

struct Value {
  enum class Type { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunction };
  Type type = Type::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;  // kString; for kUndefined the name that was looked up (for error messages)
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;
  std::shared_ptr<const Function> fn;

  static Value None() { return Value{Type::kNone}; }
  static Value Undefined(std::string name = "") {
    Value v;
    v.s = std::move(name);
    return v;
  }
  static Value Bool(bool x) {
    Value v{Type::kBool};
    v.b = x;
    return v;
  }
  static Value Int(int64_t x) {
    Value v{Type::kInt};
    v.i = x;
    return v;
  }
  static Value Float(double x) {
    Value v{Type::kFloat};
    v.f = x;
    return v;
  }
  static Value Str(std::string x) {
    Value v{Type::kString};
    v.s = std::move(x);
    return v;
  }
  static Value MakeList(List items = {}) {
    Value v{Type::kList};
    v.list = std::make_shared<List>(std::move(items));
    return v;
  }
  static Value MakeDict(bool is_namespace = false);

  bool defined() const { return type != Type::kUndefined; }
  bool is_number() const { return type == Type::kInt || type == Type::kFloat || type == Type::kBool; }
  bool is_integral() const { return type == Type::kInt || type == Type::kBool; }
  double num() const { return type == Type::kFloat ? f : static_cast<double>(type == Type::kBool ? b : i); }
  int64_t integer() const { return type == Type::kBool ? b : i; }
};

// A Python dict (insertion-ordered, string keys) or a namespace() object, the one value a
// template may change after creating it.
struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  bool is_namespace = false;
  const Value* Find(absl::string_view key) const {
    for (const auto& [k, v] : items) {
      if (k == key) return &v;
    }
    return nullptr;
  }
  void Set(const std::string& key, Value v) {
    for (auto& [k, old] : items) {
      if (k == key) {
        old = std::move(v);
        return;
      }
    }
    items.emplace_back(key, std::move(v));
  }
};

Value Value::MakeDict(bool is_namespace) {
  Value v{Type::kDict};
  v.dict = std::make_shared<Dict>();
  v.dict->is_namespace = is_namespace;
  return v;
}

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  int line = 0;
  const Value* Kw(absl::string_view name) const {
    for (const auto& [k, v] : kw) {
      if (k == name) return &v;
    }
    return nullptr;
  }
  // Positional argument i, else keyword `name`, else nullptr.
  const Value* Get(size_t i, absl::string_view name) const {
    if (i < pos.size()) return &pos[i];
    return Kw(name);
  }
};

struct Function {
  std::string name;
  std::function<Value(Args&)> call;
};

Value MakeFunction(std::string name, std::function<Value(Args&)> call) {
  Value v{Value::Type::kFunction};
  v.fn = std::make_shared<Function>(Function{std::move(name), std::move(call)});
  return v;
}

const char* TypeName(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined: return "undefined";
    case Value::Type::kNone: return "NoneType";
    case Value::Type::kBool: return "bool";
    case Value::Type::kInt: return "int";
    case Value::Type::kFloat: return "float";
    case Value::Type::kString: return "str";
    case Value::Type::kList: return "list";
    case Value::Type::kDict: return v.dict->is_namespace ? "Namespace" : "dict";
    case Value::Type::kFunction: return "function";
  }
  return "?";
}

bool Truthy(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined:
    case Value::Type::kNone: return false;
    case Value::Type::kBool: return v.b;
    case Value::Type::kInt: return v.i != 0;
    case Value::Type::kFloat: return v.f != 0;
    case Value::Type::kString: return !v.s.empty();
    case Value::Type::kList: return !v.list->empty();
    case Value::Type::kDict: return v.dict->is_namespace || !v.dict->items.empty();
    case Value::Type::kFunction: return true;
  }
  return false;
}

// Python's repr of a float: the shortest digits that read back, in positional notation for
// exponents in [-4, 16), else scientific with at least two exponent digits.
std::string FloatRepr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  const size_t e = sci.find('e');
  std::string mant = sci.substr(0, e);
  const int exp = std::stoi(sci.substr(e + 1));
  std::string sign;
  if (mant[0] == '-') {
    sign = "-";
    mant.erase(0, 1);
  }
  std::string digits;
  for (char c : mant) {
    if (c != '.') digits.push_back(c);
  }
  if (exp >= -4 && exp < 16) {
    std::string out;
    if (exp < 0) {
      out = "0." + std::string(-exp - 1, '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exp + 1) {
      out = digits + std::string(exp + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
    }
    return sign + out;
  }
  std::string m = digits.size() == 1 ? digits : digits.substr(0, 1) + "." + digits.substr(1);
  char ebuf[16];
  std::snprintf(ebuf, sizeof(ebuf), "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
  return sign + m + ebuf;
}

std::string PyRepr(const Value& v);

// Python's str().
std::string PyStr(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined: return "";
    case Value::Type::kNone: return "None";
    case Value::Type::kBool: return v.b ? "True" : "False";
    case Value::Type::kInt: return absl::StrCat(v.i);
    case Value::Type::kFloat: return FloatRepr(v.f);
    case Value::Type::kString: return v.s;
    case Value::Type::kFunction: return absl::StrCat("<function ", v.fn->name, ">");
    default: return PyRepr(v);
  }
}

std::string PyRepr(const Value& v) {
  switch (v.type) {
    case Value::Type::kString: {
      const bool dq = v.s.find('\'') != std::string::npos && v.s.find('"') == std::string::npos;
      const char q = dq ? '"' : '\'';
      std::string out(1, q);
      for (char c : v.s) {
        if (c == q || c == '\\') {
          out += '\\';
          out += c;
        } else if (c == '\n') {
          out += "\\n";
        } else if (c == '\r') {
          out += "\\r";
        } else if (c == '\t') {
          out += "\\t";
        } else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
          char b[8];
          std::snprintf(b, sizeof(b), "\\x%02x", static_cast<unsigned char>(c));
          out += b;
        } else {
          out += c;
        }
      }
      return out + q;
    }
    case Value::Type::kList: {
      std::vector<std::string> parts;
      for (const Value& x : *v.list) parts.push_back(PyRepr(x));
      return absl::StrCat("[", absl::StrJoin(parts, ", "), "]");
    }
    case Value::Type::kDict: {
      std::vector<std::string> parts;
      for (const auto& [k, x] : v.dict->items) parts.push_back(absl::StrCat(PyRepr(Value::Str(k)), ": ", PyRepr(x)));
      if (v.dict->is_namespace) return absl::StrCat("<Namespace {", absl::StrJoin(parts, ", "), "}>");
      return absl::StrCat("{", absl::StrJoin(parts, ", "), "}");
    }
    default: return PyStr(v);
  }
}

bool Equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_integral() && b.is_integral()) return a.integer() == b.integer();
    return a.num() == b.num();
  }
  if (a.type != b.type) return false;
  switch (a.type) {
    case Value::Type::kUndefined:
    case Value::Type::kNone: return true;
    case Value::Type::kString: return a.s == b.s;
    case Value::Type::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t i = 0; i < a.list->size(); ++i) {
        if (!Equal((*a.list)[i], (*b.list)[i])) return false;
      }
      return true;
    case Value::Type::kDict:
      if (a.dict == b.dict) return true;
      if (a.dict->is_namespace || b.dict->is_namespace || a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, x] : a.dict->items) {
        const Value* y = b.dict->Find(k);
        if (y == nullptr || !Equal(x, *y)) return false;
      }
      return true;
    case Value::Type::kFunction: return a.fn == b.fn;
    default: return false;
  }
}

// <0, 0, >0 like Python's ordering; numbers, strings and lists only.
int Compare(const Value& a, const Value& b, int line) {
  if (a.is_number() && b.is_number()) {
    if (a.is_integral() && b.is_integral()) return a.integer() < b.integer() ? -1 : a.integer() > b.integer();
    return a.num() < b.num() ? -1 : a.num() > b.num();
  }
  if (a.type == Value::Type::kString && b.type == Value::Type::kString) return a.s.compare(b.s) < 0 ? -1 : a.s.compare(b.s) > 0;
  if (a.type == Value::Type::kList && b.type == Value::Type::kList) {
    for (size_t i = 0; i < a.list->size() && i < b.list->size(); ++i) {
      if (int c = Compare((*a.list)[i], (*b.list)[i], line); c != 0) return c;
    }
    return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size();
  }
  Fail(line, absl::StrCat("cannot order ", TypeName(a), " and ", TypeName(b)));
}

// UTF-8 code points of a string (Python indexes and slices strings by them).
std::vector<std::string> Chars(absl::string_view s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    size_t n = 1;
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0xF0) n = 4;
    else if (c >= 0xE0) n = 3;
    else if (c >= 0xC0) n = 2;
    n = std::min(n, s.size() - i);
    out.emplace_back(s.substr(i, n));
    i += n;
  }
  return out;
}

char32_t DecodeCp(absl::string_view ch) {
  const unsigned char c = static_cast<unsigned char>(ch[0]);
  if (ch.size() == 1) return c;
  char32_t cp = c & (0x7F >> ch.size());
  for (size_t k = 1; k < ch.size(); ++k) cp = (cp << 6) | (static_cast<unsigned char>(ch[k]) & 0x3F);
  return cp;
}

bool IsPySpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

size_t CharLen(char lead) {
  const unsigned char c = static_cast<unsigned char>(lead);
  return c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
}

size_t CountChars(absl::string_view s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// str.strip / lstrip / rstrip: Unicode whitespace, or the characters of `chars`. Works in place
// on the bytes: message contents can be megabytes long.
std::string Strip(absl::string_view s, const Value* chars, bool left, bool right) {
  const bool custom = chars != nullptr && chars->type == Value::Type::kString;
  // A whole UTF-8 character only matches at a character boundary of `chars`.
  auto strip = [&](absl::string_view ch) { return custom ? chars->s.find(ch.data(), 0, ch.size()) != std::string::npos : IsPySpace(DecodeCp(ch)); };
  size_t b = 0, e = s.size();
  if (left) {
    while (b < e) {
      const size_t n = std::min(CharLen(s[b]), e - b);
      if (!strip(s.substr(b, n))) break;
      b += n;
    }
  }
  if (right) {
    while (e > b) {
      size_t st = e - 1;
      while (st > b && (static_cast<unsigned char>(s[st]) & 0xC0) == 0x80) --st;
      if (!strip(s.substr(st, e - st))) break;
      e = st;
    }
  }
  return std::string(s.substr(b, e - b));
}

std::string MapCase(absl::string_view s, int mode) {  // 0 lower, 1 upper, 2 capitalize, 3 title
  std::string out;
  bool prev_cased = false;
  size_t idx = 0;
  for (const std::string& ch : Chars(s)) {
    const char32_t c = DecodeCp(ch);
    UChar32 m;
    switch (mode) {
      case 0: m = u_tolower(c); break;
      case 1: m = u_toupper(c); break;
      case 2: m = idx == 0 ? u_totitle(c) : u_tolower(c); break;
      default: m = prev_cased ? u_tolower(c) : u_totitle(c); break;
    }
    prev_cased = u_isalpha(c);
    AppendUtf8(static_cast<char32_t>(m), &out);
    ++idx;
  }
  return out;
}

// json.dumps(x, ensure_ascii=False, indent=indent, separators=..., sort_keys=...), which is what
// transformers installs as the tojson filter.
void ToJson(const Value& v, int indent, const std::string& item_sep, const std::string& key_sep, bool sort_keys, int depth,
            std::string* out, int line) {
  auto newline = [&](int d) {
    if (indent < 0) return;
    out->push_back('\n');
    out->append(static_cast<size_t>(indent) * d, ' ');
  };
  switch (v.type) {
    case Value::Type::kNone: *out += "null"; return;
    case Value::Type::kBool: *out += v.b ? "true" : "false"; return;
    case Value::Type::kInt: *out += absl::StrCat(v.i); return;
    case Value::Type::kFloat:
      *out += std::isnan(v.f) ? "NaN" : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity") : FloatRepr(v.f);
      return;
    case Value::Type::kString: {
      out->push_back('"');
      for (char c : v.s) {
        switch (c) {
          case '"': *out += "\\\""; break;
          case '\\': *out += "\\\\"; break;
          case '\n': *out += "\\n"; break;
          case '\r': *out += "\\r"; break;
          case '\t': *out += "\\t"; break;
          case '\b': *out += "\\b"; break;
          case '\f': *out += "\\f"; break;
          default:
            if (static_cast<unsigned char>(c) < 0x20) {
              char b[8];
              std::snprintf(b, sizeof(b), "\\u%04x", static_cast<unsigned char>(c));
              *out += b;
            } else {
              out->push_back(c);
            }
        }
      }
      out->push_back('"');
      return;
    }
    case Value::Type::kList: {
      if (v.list->empty()) {
        *out += "[]";
        return;
      }
      out->push_back('[');
      for (size_t i = 0; i < v.list->size(); ++i) {
        if (i > 0) *out += item_sep;
        newline(depth + 1);
        ToJson((*v.list)[i], indent, item_sep, key_sep, sort_keys, depth + 1, out, line);
      }
      newline(depth);
      out->push_back(']');
      return;
    }
    case Value::Type::kDict: {
      if (v.dict->items.empty()) {
        *out += "{}";
        return;
      }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : v.dict->items) items.push_back(&kv);
      if (sort_keys) std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) { return a->first < b->first; });
      out->push_back('{');
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) *out += item_sep;
        newline(depth + 1);
        ToJson(Value::Str(items[i]->first), indent, item_sep, key_sep, sort_keys, depth + 1, out, line);
        *out += key_sep;
        ToJson(items[i]->second, indent, item_sep, key_sep, sort_keys, depth + 1, out, line);
      }
      newline(depth);
      out->push_back('}');
      return;
    }
    default: Fail(line, absl::StrCat("Object of type ", TypeName(v), " is not JSON serializable"));
  }
}

Value FromJson(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null: return Value::None();
    case nlohmann::ordered_json::value_t::boolean: return Value::Bool(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
    case nlohmann::ordered_json::value_t::number_unsigned: return Value::Int(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_float: return Value::Float(j.get<double>());
    case nlohmann::ordered_json::value_t::string: return Value::Str(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      Value v = Value::MakeList();
      for (const auto& x : j) v.list->push_back(FromJson(x));
      return v;
    }
    case nlohmann::ordered_json::value_t::object: {
      Value v = Value::MakeDict();
      for (const auto& [k, x] : j.items()) v.dict->items.emplace_back(k, FromJson(x));
      return v;
    }
    default: return Value::Undefined();
  }
}

// ------------------------------------------------------------------------------------------ lexer

enum class Tok { kText, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof };

struct Token {
  Tok type;
  std::string text;  // text, name, decoded string literal, number or operator
  int line;
};

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

// ------------------------------------------------------------------------------------------ trees

struct Expr {
  enum Kind {
    kLiteral, kName, kList, kTuple, kDict, kAttr, kItem, kSlice, kCall, kFilter, kTest,
    kNeg, kPos, kNot, kBinary, kAnd, kOr, kCompare, kCond
  } kind;
  int line = 0;
  Value literal;
  std::string name;                        // name, attribute, filter/test name, binary operator
  std::vector<std::unique_ptr<Expr>> kids;  // operands, elements, arguments (after the object)
  std::vector<std::string> kw;             // kCall/kFilter/kTest: names of the trailing keyword arguments
  std::vector<std::string> ops;            // kCompare
  bool negated = false;                    // kTest: "is not"
};
using ExprPtr = std::unique_ptr<Expr>;

struct Node {
  enum Kind { kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue, kBlock } kind;
  int line = 0;
  std::string text;                        // kText
  std::vector<ExprPtr> exprs;              // kOutput: [e]; kIf: conditions; kFor: [iter, filter?]; kSet: [value]
  std::vector<std::vector<Node>> bodies;   // kIf: one per condition (+ else); kFor: [body, else]; kMacro/kSetBlock/kBlock: [body]
  std::vector<std::string> targets;        // kFor/kSet: names; kSet with attr: [namespace, attribute]
  bool attr_target = false;                // kSet: ns.attr = ...
  bool has_filter = false;                 // kFor: "if" condition
  std::string macro_name;                  // kMacro
  std::vector<std::pair<std::string, ExprPtr>> params;  // kMacro: parameters and defaults (null if none)
};

}  // namespace

struct Template {
  std::vector<Node> body;
};

namespace {

class Parser {
 public:
  explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

  std::vector<Node> ParseAll() {
    std::vector<Node> body = ParseBody({});
    if (Cur().type != Tok::kEof) Fail(Cur().line, "unexpected end tag");
    return body;
  }

 private:
  const Token& Cur() const { return t_[p_]; }
  const Token& Peek(size_t k = 1) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool IsOp(const char* op) const { return Cur().type == Tok::kOp && Cur().text == op; }
  bool IsName(const char* n) const { return Cur().type == Tok::kName && Cur().text == n; }
  Token Next() { return t_[p_++]; }
  void ExpectOp(const char* op) {
    if (!IsOp(op)) Fail(Cur().line, absl::StrCat("expected '", op, "', found '", Cur().text, "'"));
    ++p_;
  }
  std::string ExpectName() {
    if (Cur().type != Tok::kName) Fail(Cur().line, absl::StrCat("expected a name, found '", Cur().text, "'"));
    return Next().text;
  }
  void ExpectBlockEnd() {
    if (Cur().type != Tok::kBlockEnd) Fail(Cur().line, absl::StrCat("expected end of tag, found '", Cur().text, "'"));
    ++p_;
  }

  // Statements until a block tag whose keyword is in `ends` (left unconsumed, at its keyword).
  std::vector<Node> ParseBody(const std::vector<std::string>& ends) {
    std::vector<Node> out;
    while (Cur().type != Tok::kEof) {
      const Token& tok = Cur();
      if (tok.type == Tok::kText) {
        if (!tok.text.empty()) out.push_back(Node{Node::kText, tok.line, tok.text});
        ++p_;
      } else if (tok.type == Tok::kVarBegin) {
        ++p_;
        Node n{Node::kOutput, tok.line};
        n.exprs.push_back(ParseExpression());
        if (Cur().type != Tok::kVarEnd) Fail(Cur().line, absl::StrCat("expected '}}', found '", Cur().text, "'"));
        ++p_;
        out.push_back(std::move(n));
      } else if (tok.type == Tok::kBlockBegin) {
        const Token& kw = Peek();
        if (kw.type != Tok::kName) Fail(kw.line, "expected a statement keyword");
        if (std::find(ends.begin(), ends.end(), kw.text) != ends.end()) {
          ++p_;  // leave the keyword for the caller
          return out;
        }
        ++p_;
        out.push_back(ParseStatement());
      } else {
        Fail(tok.line, absl::StrCat("unexpected '", tok.text, "'"));
      }
    }
    if (!ends.empty()) Fail(Cur().line, absl::StrCat("missing {% ", ends.back(), " %}"));
    return out;
  }

  Node ParseStatement() {
    const Token kw = Next();
    const int line = kw.line;
    if (kw.text == "if") {
      Node n{Node::kIf, line};
      n.exprs.push_back(ParseExpression());
      ExpectBlockEnd();
      while (true) {
        n.bodies.push_back(ParseBody({"elif", "else", "endif"}));
        const std::string k = Next().text;
        if (k == "elif") {
          n.exprs.push_back(ParseExpression());
          ExpectBlockEnd();
        } else if (k == "else") {
          ExpectBlockEnd();
          n.bodies.push_back(ParseBody({"endif"}));
          ++p_;
          ExpectBlockEnd();
          break;
        } else {
          ExpectBlockEnd();
          break;
        }
      }
      return n;
    }
    if (kw.text == "for") {
      Node n{Node::kFor, line};
      n.targets.push_back(ExpectName());
      while (IsOp(",")) {
        ++p_;
        n.targets.push_back(ExpectName());
      }
      if (!IsName("in")) Fail(Cur().line, "expected 'in' in for loop");
      ++p_;
      n.exprs.push_back(ParseExpression(/*with_condexpr=*/false));
      if (IsName("if")) {
        ++p_;
        n.exprs.push_back(ParseExpression());
        n.has_filter = true;
      }
      if (IsName("recursive")) Fail(Cur().line, "recursive loops are not supported");
      ExpectBlockEnd();
      n.bodies.push_back(ParseBody({"else", "endfor"}));
      if (Next().text == "else") {
        ExpectBlockEnd();
        n.bodies.push_back(ParseBody({"endfor"}));
        ++p_;
      } else {
        n.bodies.emplace_back();
      }
      ExpectBlockEnd();
      return n;
    }
    if (kw.text == "set") {
      std::string first = ExpectName();
      if (IsOp(".")) {
        ++p_;
        Node n{Node::kSet, line};
        n.attr_target = true;
        n.targets = {first, ExpectName()};
        ExpectOp("=");
        n.exprs.push_back(ParseExpression());
        ExpectBlockEnd();
        return n;
      }
      Node n{Node::kSet, line};
      n.targets.push_back(first);
      while (IsOp(",")) {
        ++p_;
        n.targets.push_back(ExpectName());
      }
      if (Cur().type == Tok::kBlockEnd && n.targets.size() == 1) {
        ++p_;
        n.kind = Node::kSetBlock;
        n.bodies.push_back(ParseBody({"endset"}));
        ++p_;
        ExpectBlockEnd();
        return n;
      }
      ExpectOp("=");
      n.exprs.push_back(ParseTupleOrExpression());
      ExpectBlockEnd();
      return n;
    }
    if (kw.text == "macro") {
      Node n{Node::kMacro, line};
      n.macro_name = ExpectName();
      ExpectOp("(");
      while (!IsOp(")")) {
        std::string name = ExpectName();
        ExprPtr dflt;
        if (IsOp("=")) {
          ++p_;
          dflt = ParseExpression();
        }
        n.params.emplace_back(std::move(name), std::move(dflt));
        if (!IsOp(")")) ExpectOp(",");
      }
      ++p_;
      ExpectBlockEnd();
      n.bodies.push_back(ParseBody({"endmacro"}));
      ++p_;
      ExpectBlockEnd();
      return n;
    }
    if (kw.text == "break" || kw.text == "continue") {
      ExpectBlockEnd();
      return Node{kw.text == "break" ? Node::kBreak : Node::kContinue, line};
    }
    if (kw.text == "generation") {  // transformers' marker for assistant tokens: renders its body
      ExpectBlockEnd();
      Node n{Node::kBlock, line};
      n.bodies.push_back(ParseBody({"endgeneration"}));
      ++p_;
      ExpectBlockEnd();
      return n;
    }
    Fail(line, absl::StrCat("unsupported statement '", kw.text, "'"));
  }

  ExprPtr Make(Expr::Kind k, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->line = line;
    return e;
  }

  // "a, b" without parentheses makes a tuple (set x = 1, 2).
  ExprPtr ParseTupleOrExpression() {
    const int line = Cur().line;
    ExprPtr first = ParseExpression();
    if (!IsOp(",")) return first;
    ExprPtr t = Make(Expr::kTuple, line);
    t->kids.push_back(std::move(first));
    while (IsOp(",")) {
      ++p_;
      if (Cur().type == Tok::kBlockEnd || Cur().type == Tok::kVarEnd) break;
      t->kids.push_back(ParseExpression());
    }
    return t;
  }

  ExprPtr ParseExpression(bool with_condexpr = true) {
    ExprPtr e = ParseOr();
    if (!with_condexpr) return e;
    while (IsName("if")) {
      const int line = Next().line;
      ExprPtr cond = ParseOr();
      ExprPtr c = Make(Expr::kCond, line);
      c->kids.push_back(std::move(e));
      c->kids.push_back(std::move(cond));
      if (IsName("else")) {
        ++p_;
        c->kids.push_back(ParseExpression());
      }
      e = std::move(c);
    }
    return e;
  }

  ExprPtr ParseOr() {
    ExprPtr e = ParseAnd();
    while (IsName("or")) {
      const int line = Next().line;
      ExprPtr o = Make(Expr::kOr, line);
      o->kids.push_back(std::move(e));
      o->kids.push_back(ParseAnd());
      e = std::move(o);
    }
    return e;
  }

  ExprPtr ParseAnd() {
    ExprPtr e = ParseNot();
    while (IsName("and")) {
      const int line = Next().line;
      ExprPtr a = Make(Expr::kAnd, line);
      a->kids.push_back(std::move(e));
      a->kids.push_back(ParseNot());
      e = std::move(a);
    }
    return e;
  }

  ExprPtr ParseNot() {
    if (IsName("not")) {
      const int line = Next().line;
      ExprPtr n = Make(Expr::kNot, line);
      n->kids.push_back(ParseNot());
      return n;
    }
    return ParseCompare();
  }

  ExprPtr ParseCompare() {
    const int line = Cur().line;
    ExprPtr first = ParseMath1();
    ExprPtr c;
    while (true) {
      std::string op;
      if (Cur().type == Tok::kOp && (Cur().text == "==" || Cur().text == "!=" || Cur().text == "<" || Cur().text == ">" ||
                                     Cur().text == "<=" || Cur().text == ">=")) {
        op = Next().text;
      } else if (IsName("in")) {
        ++p_;
        op = "in";
      } else if (IsName("not") && Peek().type == Tok::kName && Peek().text == "in") {
        p_ += 2;
        op = "not in";
      } else {
        break;
      }
      if (!c) {
        c = Make(Expr::kCompare, line);
        c->kids.push_back(std::move(first));
      }
      c->ops.push_back(op);
      c->kids.push_back(ParseMath1());
    }
    return c ? std::move(c) : std::move(first);
  }

  ExprPtr Binary(const std::string& op, ExprPtr l, ExprPtr r, int line) {
    ExprPtr b = Make(Expr::kBinary, line);
    b->name = op;
    b->kids.push_back(std::move(l));
    b->kids.push_back(std::move(r));
    return b;
  }

  ExprPtr ParseMath1() {
    ExprPtr e = ParseConcat();
    while (IsOp("+") || IsOp("-")) {
      const Token op = Next();
      e = Binary(op.text, std::move(e), ParseConcat(), op.line);
    }
    return e;
  }

  ExprPtr ParseConcat() {
    ExprPtr e = ParseMath2();
    while (IsOp("~")) {
      const Token op = Next();
      e = Binary("~", std::move(e), ParseMath2(), op.line);
    }
    return e;
  }

  ExprPtr ParseMath2() {
    ExprPtr e = ParsePow();
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const Token op = Next();
      e = Binary(op.text, std::move(e), ParsePow(), op.line);
    }
    return e;
  }

  ExprPtr ParsePow() {
    ExprPtr e = ParseUnary(true);
    while (IsOp("**")) {
      const Token op = Next();
      e = Binary("**", std::move(e), ParseUnary(true), op.line);
    }
    return e;
  }

  ExprPtr ParseUnary(bool with_filter) {
    ExprPtr e;
    if (IsOp("-") || IsOp("+")) {
      const Token op = Next();
      e = Make(op.text == "-" ? Expr::kNeg : Expr::kPos, op.line);
      e->kids.push_back(ParseUnary(false));
    } else {
      e = ParsePrimary();
    }
    e = ParsePostfix(std::move(e));
    if (with_filter) e = ParseFilterExpr(std::move(e));
    return e;
  }

  ExprPtr ParsePrimary() {
    const Token tok = Next();
    switch (tok.type) {
      case Tok::kName: {
        ExprPtr e = Make(Expr::kLiteral, tok.line);
        if (tok.text == "true" || tok.text == "True") {
          e->literal = Value::Bool(true);
        } else if (tok.text == "false" || tok.text == "False") {
          e->literal = Value::Bool(false);
        } else if (tok.text == "none" || tok.text == "None") {
          e->literal = Value::None();
        } else {
          e->kind = Expr::kName;
          e->name = tok.text;
        }
        return e;
      }
      case Tok::kString: {
        std::string s = tok.text;
        while (Cur().type == Tok::kString) s += Next().text;  // adjacent literals concatenate
        ExprPtr e = Make(Expr::kLiteral, tok.line);
        e->literal = Value::Str(std::move(s));
        return e;
      }
      case Tok::kInt: {
        ExprPtr e = Make(Expr::kLiteral, tok.line);
        e->literal = Value::Int(std::stoll(tok.text));
        return e;
      }
      case Tok::kFloat: {
        ExprPtr e = Make(Expr::kLiteral, tok.line);
        e->literal = Value::Float(std::stod(tok.text));
        return e;
      }
      case Tok::kOp:
        if (tok.text == "(") {
          if (IsOp(")")) {
            ++p_;
            return Make(Expr::kTuple, tok.line);
          }
          ExprPtr first = ParseExpression();
          if (IsOp(")")) {
            ++p_;
            return first;
          }
          ExprPtr t = Make(Expr::kTuple, tok.line);
          t->kids.push_back(std::move(first));
          while (IsOp(",")) {
            ++p_;
            if (IsOp(")")) break;
            t->kids.push_back(ParseExpression());
          }
          ExpectOp(")");
          return t;
        }
        if (tok.text == "[") {
          ExprPtr l = Make(Expr::kList, tok.line);
          while (!IsOp("]")) {
            l->kids.push_back(ParseExpression());
            if (!IsOp("]")) ExpectOp(",");
          }
          ++p_;
          return l;
        }
        if (tok.text == "{") {
          ExprPtr d = Make(Expr::kDict, tok.line);
          while (!IsOp("}")) {
            d->kids.push_back(ParseExpression());
            ExpectOp(":");
            d->kids.push_back(ParseExpression());
            if (!IsOp("}")) ExpectOp(",");
          }
          ++p_;
          return d;
        }
        break;
      default: break;
    }
    Fail(tok.line, absl::StrCat("unexpected '", tok.text.empty() ? "end of tag" : tok.text, "'"));
  }

  ExprPtr ParsePostfix(ExprPtr e) {
    while (true) {
      if (IsOp(".")) {
        const int line = Next().line;
        if (Cur().type == Tok::kInt) {
          ExprPtr it = Make(Expr::kItem, line);
          ExprPtr idx = Make(Expr::kLiteral, line);
          idx->literal = Value::Int(std::stoll(Next().text));
          it->kids.push_back(std::move(e));
          it->kids.push_back(std::move(idx));
          e = std::move(it);
        } else {
          ExprPtr a = Make(Expr::kAttr, line);
          a->name = ExpectName();
          a->kids.push_back(std::move(e));
          e = std::move(a);
        }
      } else if (IsOp("[")) {
        const int line = Next().line;
        ExprPtr parts[3];
        int colons = 0;
        while (!IsOp("]")) {
          if (IsOp(":")) {
            ++p_;
            if (++colons > 2) Fail(line, "bad slice");
            continue;
          }
          if (parts[colons]) Fail(line, "bad subscript");
          parts[colons] = ParseExpression();
        }
        ++p_;
        if (colons == 0) {
          if (!parts[0]) Fail(line, "empty subscript");
          ExprPtr it = Make(Expr::kItem, line);
          it->kids.push_back(std::move(e));
          it->kids.push_back(std::move(parts[0]));
          e = std::move(it);
        } else {
          ExprPtr sl = Make(Expr::kSlice, line);
          sl->kids.push_back(std::move(e));
          for (auto& part : parts) sl->kids.push_back(std::move(part));  // null where omitted
          e = std::move(sl);
        }
      } else if (IsOp("(")) {
        e = ParseCall(std::move(e));
      } else {
        return e;
      }
    }
  }

  // Arguments after "(" into e->kids (positional, then keyword values) and e->kw.
  void ParseArgs(Expr* e) {
    ExpectOp("(");
    std::vector<ExprPtr> pos, kwv;
    while (!IsOp(")")) {
      if (Cur().type == Tok::kName && Peek().type == Tok::kOp && Peek().text == "=") {
        e->kw.push_back(Next().text);
        ++p_;
        kwv.push_back(ParseExpression());
      } else {
        if (!kwv.empty()) Fail(Cur().line, "positional argument after keyword argument");
        pos.push_back(ParseExpression());
      }
      if (!IsOp(")")) ExpectOp(",");
    }
    ++p_;
    for (auto& x : pos) e->kids.push_back(std::move(x));
    for (auto& x : kwv) e->kids.push_back(std::move(x));
  }

  ExprPtr ParseCall(ExprPtr callee) {
    ExprPtr c = Make(Expr::kCall, Cur().line);
    c->kids.push_back(std::move(callee));
    ParseArgs(c.get());
    return c;
  }

  ExprPtr ParseFilterExpr(ExprPtr e) {
    while (true) {
      if (IsOp("|")) {
        const int line = Next().line;
        ExprPtr f = Make(Expr::kFilter, line);
        f->name = ExpectName();
        while (IsOp(".")) {
          ++p_;
          f->name += "." + ExpectName();
        }
        f->kids.push_back(std::move(e));
        if (IsOp("(")) ParseArgs(f.get());
        e = std::move(f);
      } else if (IsName("is")) {
        const int line = Next().line;
        ExprPtr t = Make(Expr::kTest, line);
        if (IsName("not")) {
          ++p_;
          t->negated = true;
        }
        t->name = ExpectName();
        t->kids.push_back(std::move(e));
        if (IsOp("(")) {
          ParseArgs(t.get());
        } else if ((Cur().type == Tok::kName && Cur().text != "else" && Cur().text != "or" && Cur().text != "and" &&
                    Cur().text != "if" && Cur().text != "in" && Cur().text != "not") ||
                   Cur().type == Tok::kString || Cur().type == Tok::kInt || Cur().type == Tok::kFloat || IsOp("[") ||
                   IsOp("{")) {
          t->kids.push_back(ParsePostfix(ParsePrimary()));
        }
        e = std::move(t);
      } else if (IsOp("(")) {
        e = ParseCall(std::move(e));
      } else {
        return e;
      }
    }
  }

  std::vector<Token> t_;
  size_t p_ = 0;
};

// ------------------------------------------------------------------------------------------ render

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  explicit Renderer(std::string* out) : out_(out) {
    scopes_.emplace_back();
    InstallGlobals();
  }

  void SetVar(const std::string& name, Value v) { scopes_.front()[name] = std::move(v); }

  Flow Exec(const std::vector<Node>& body) {
    for (const Node& n : body) {
      if (Flow f = ExecOne(n); f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

 private:
  using Scope = absl::flat_hash_map<std::string, Value>;

  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      if (auto f = it->find(name); f != it->end()) return f->second;
    }
    return Value::Undefined(name);
  }

  Flow ExecOne(const Node& n) {
    switch (n.kind) {
      case Node::kText: *out_ += n.text; return Flow::kNormal;
      case Node::kOutput: *out_ += PyStr(Eval(*n.exprs[0])); return Flow::kNormal;
      case Node::kIf:
        for (size_t i = 0; i < n.exprs.size(); ++i) {
          if (Truthy(Eval(*n.exprs[i]))) return Exec(n.bodies[i]);
        }
        if (n.bodies.size() > n.exprs.size()) return Exec(n.bodies.back());
        return Flow::kNormal;
      case Node::kFor: return ExecFor(n);
      case Node::kSet: {
        Value v = Eval(*n.exprs[0]);
        if (n.attr_target) {
          Value ns = Lookup(n.targets[0]);
          if (ns.type != Value::Type::kDict || !ns.dict->is_namespace) {
            Fail(n.line, absl::StrCat("cannot assign attribute on non-namespace object '", n.targets[0], "'"));
          }
          ns.dict->Set(n.targets[1], std::move(v));
        } else {
          Assign(n.targets, std::move(v), n.line);
        }
        return Flow::kNormal;
      }
      case Node::kSetBlock: {
        std::string captured;
        std::swap(captured, *out_);
        Exec(n.bodies[0]);
        std::swap(captured, *out_);
        scopes_.back()[n.targets[0]] = Value::Str(std::move(captured));
        return Flow::kNormal;
      }
      case Node::kMacro: {
        const Node* def = &n;
        scopes_.back()[n.macro_name] = MakeFunction(n.macro_name, [this, def](Args& a) { return CallMacro(*def, a); });
        return Flow::kNormal;
      }
      case Node::kBreak: return Flow::kBreak;
      case Node::kContinue: return Flow::kContinue;
      case Node::kBlock: return Exec(n.bodies[0]);
    }
    return Flow::kNormal;
  }

  void Assign(const std::vector<std::string>& targets, Value v, int line) {
    if (targets.size() == 1) {
      scopes_.back()[targets[0]] = std::move(v);
      return;
    }
    List items = Iterate(v, line);
    if (items.size() != targets.size()) {
      Fail(line, absl::StrCat("cannot unpack ", items.size(), " values into ", targets.size(), " names"));
    }
    for (size_t i = 0; i < targets.size(); ++i) scopes_.back()[targets[i]] = items[i];
  }

  Value CallMacro(const Node& def, Args& a) {
    if (macro_depth_ >= 64) Fail(a.line, absl::StrCat("macro '", def.macro_name, "' recursed too deep"));
    ++macro_depth_;
    struct Unwind {
      int* depth;
      ~Unwind() { --*depth; }
    } unwind{&macro_depth_};
    Scope frame;
    for (size_t i = 0; i < def.params.size(); ++i) {
      const auto& [name, dflt] = def.params[i];
      if (const Value* v = a.Get(i, name)) {
        frame[name] = *v;
      } else {
        frame[name] = dflt ? Eval(*dflt) : Value::Undefined(name);
      }
    }
    // A macro sees the template's top-level variables and its own arguments, not the caller's locals.
    std::vector<Scope> saved;
    saved.swap(scopes_);
    scopes_.push_back(saved.front());
    scopes_.push_back(std::move(frame));
    std::string captured;
    std::swap(captured, *out_);
    try {
      Exec(def.bodies[0]);
    } catch (...) {
      std::swap(captured, *out_);
      scopes_.swap(saved);
      throw;
    }
    std::swap(captured, *out_);
    scopes_.swap(saved);
    return Value::Str(std::move(captured));
  }

  // The items a for loop visits: list elements, dict keys, string characters.
  List Iterate(const Value& v, int line) {
    switch (v.type) {
      case Value::Type::kList: return *v.list;
      case Value::Type::kDict: {
        List keys;
        for (const auto& kv : v.dict->items) keys.push_back(Value::Str(kv.first));
        return keys;
      }
      case Value::Type::kString: {
        List cs;
        for (std::string& c : Chars(v.s)) cs.push_back(Value::Str(std::move(c)));
        return cs;
      }
      case Value::Type::kUndefined: return {};
      default: Fail(line, absl::StrCat("'", TypeName(v), "' object is not iterable"));
    }
  }

  Flow ExecFor(const Node& n) {
    List items = Iterate(Eval(*n.exprs[0]), n.line);
    if (n.has_filter) {
      List kept;
      for (Value& x : items) {
        scopes_.emplace_back();
        Assign(n.targets, x, n.line);
        const bool keep = Truthy(Eval(*n.exprs[1]));
        scopes_.pop_back();
        if (keep) kept.push_back(std::move(x));
      }
      items = std::move(kept);
    }
    if (items.empty()) return Exec(n.bodies[1]);
    const int64_t len = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < len; ++i) {
      scopes_.emplace_back();
      Value loop = Value::MakeDict();
      Dict& d = *loop.dict;
      d.items = {{"index", Value::Int(i + 1)},
                 {"index0", Value::Int(i)},
                 {"revindex", Value::Int(len - i)},
                 {"revindex0", Value::Int(len - i - 1)},
                 {"first", Value::Bool(i == 0)},
                 {"last", Value::Bool(i == len - 1)},
                 {"length", Value::Int(len)},
                 {"previtem", i > 0 ? items[i - 1] : Value::Undefined("previtem")},
                 {"nextitem", i + 1 < len ? items[i + 1] : Value::Undefined("nextitem")}};
      scopes_.back()["loop"] = loop;
      Assign(n.targets, items[i], n.line);
      Flow f;
      try {
        f = Exec(n.bodies[0]);
      } catch (...) {
        scopes_.pop_back();
        throw;
      }
      scopes_.pop_back();
      if (f == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }

  Args EvalArgs(const Expr& e, size_t first) {
    Args a;
    a.line = e.line;
    const size_t npos = e.kids.size() - first - e.kw.size();
    for (size_t i = 0; i < npos; ++i) a.pos.push_back(Eval(*e.kids[first + i]));
    for (size_t i = 0; i < e.kw.size(); ++i) a.kw.emplace_back(e.kw[i], Eval(*e.kids[first + npos + i]));
    return a;
  }

  // Python's obj.name / obj[key] as Jinja's sandbox resolves them: a missing key or attribute is
  // undefined; only reading from an undefined value fails.
  Value GetAttr(const Value& obj, const std::string& name, int line) {
    if (obj.type == Value::Type::kUndefined) {
      Fail(line, absl::StrCat("'", obj.s.empty() ? "value" : obj.s, "' is undefined (reading '", name, "')"));
    }
    if (obj.type == Value::Type::kDict) {
      if (const Value* v = obj.dict->Find(name)) return *v;
    }
    return Value::Undefined(name);
  }

  static int64_t NormIndex(int64_t i, int64_t n) { return i < 0 ? i + n : i; }

  Value GetItem(const Value& obj, const Value& key, int line) {
    if (obj.type == Value::Type::kUndefined) Fail(line, absl::StrCat("'", obj.s.empty() ? "value" : obj.s, "' is undefined"));
    if (obj.type == Value::Type::kDict) {
      if (key.type == Value::Type::kString) return GetAttr(obj, key.s, line);
      return Value::Undefined();
    }
    if (obj.type == Value::Type::kList && key.is_integral()) {
      const int64_t n = static_cast<int64_t>(obj.list->size()), i = NormIndex(key.integer(), n);
      return i >= 0 && i < n ? (*obj.list)[i] : Value::Undefined();
    }
    if (obj.type == Value::Type::kString && key.is_integral()) {
      std::vector<std::string> cs = Chars(obj.s);
      const int64_t n = static_cast<int64_t>(cs.size()), i = NormIndex(key.integer(), n);
      return i >= 0 && i < n ? Value::Str(cs[i]) : Value::Undefined();
    }
    return Value::Undefined();
  }

  Value Slice(const Value& obj, const Value* start, const Value* stop, const Value* step, int line) {
    const int64_t st = step && step->defined() && step->type != Value::Type::kNone ? step->integer() : 1;
    if (st == 0) Fail(line, "slice step cannot be zero");
    List items;
    std::vector<std::string> cs;
    int64_t n;
    if (obj.type == Value::Type::kList) {
      n = static_cast<int64_t>(obj.list->size());
    } else if (obj.type == Value::Type::kString) {
      cs = Chars(obj.s);
      n = static_cast<int64_t>(cs.size());
    } else {
      Fail(line, absl::StrCat("'", TypeName(obj), "' object is not subscriptable"));
    }
    auto bound = [&](const Value* v, int64_t dflt) -> int64_t {
      if (v == nullptr || !v->defined() || v->type == Value::Type::kNone) return dflt;
      int64_t x = v->integer();
      if (x < 0) x += n;
      if (st > 0) return std::clamp<int64_t>(x, 0, n);
      return std::clamp<int64_t>(x, -1, n - 1);
    };
    const int64_t b = bound(start, st > 0 ? 0 : n - 1), e = bound(stop, st > 0 ? n : -1);
    std::string s;
    for (int64_t i = b; st > 0 ? i < e : i > e; i += st) {
      if (obj.type == Value::Type::kList) {
        items.push_back((*obj.list)[i]);
      } else {
        s += cs[i];
      }
    }
    return obj.type == Value::Type::kList ? Value::MakeList(std::move(items)) : Value::Str(std::move(s));
  }

  Value Arith(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "~") return Value::Str(PyStr(a) + PyStr(b));
    auto bad = [&]() -> Value {
      Fail(line, absl::StrCat("unsupported operand types for ", op, ": '", TypeName(a), "' and '", TypeName(b), "'"));
    };
    if (a.type == Value::Type::kUndefined || b.type == Value::Type::kUndefined) {
      const Value& u = a.type == Value::Type::kUndefined ? a : b;
      Fail(line, absl::StrCat("'", u.s.empty() ? "value" : u.s, "' is undefined"));
    }
    if (op == "+") {
      if (a.type == Value::Type::kString && b.type == Value::Type::kString) return Value::Str(a.s + b.s);
      if (a.type == Value::Type::kList && b.type == Value::Type::kList) {
        List l = *a.list;
        l.insert(l.end(), b.list->begin(), b.list->end());
        return Value::MakeList(std::move(l));
      }
    }
    if (op == "*") {
      const Value* seq = a.type == Value::Type::kString || a.type == Value::Type::kList ? &a : &b;
      const Value* cnt = seq == &a ? &b : &a;
      if ((seq->type == Value::Type::kString || seq->type == Value::Type::kList) && cnt->is_integral()) {
        std::string s;
        List l;
        for (int64_t i = 0; i < cnt->integer(); ++i) {
          if (seq->type == Value::Type::kString) s += seq->s;
          else l.insert(l.end(), seq->list->begin(), seq->list->end());
        }
        return seq->type == Value::Type::kString ? Value::Str(std::move(s)) : Value::MakeList(std::move(l));
      }
    }
    if (!a.is_number() || !b.is_number()) return bad();
    const bool ints = a.is_integral() && b.is_integral();
    const int64_t x = a.integer(), y = b.integer();
    const double fx = a.num(), fy = b.num();
    if (op == "+") return ints ? Value::Int(x + y) : Value::Float(fx + fy);
    if (op == "-") return ints ? Value::Int(x - y) : Value::Float(fx - fy);
    if (op == "*") return ints ? Value::Int(x * y) : Value::Float(fx * fy);
    if (op == "/") {
      if (fy == 0) Fail(line, "division by zero");
      return Value::Float(fx / fy);
    }
    if (op == "//" || op == "%") {
      if (fy == 0) Fail(line, "integer division or modulo by zero");
      if (ints) {
        int64_t q = x / y, r = x % y;
        if (r != 0 && ((r < 0) != (y < 0))) {
          --q;
          r += y;
        }
        return Value::Int(op == "//" ? q : r);
      }
      const double q = std::floor(fx / fy);
      return Value::Float(op == "//" ? q : fx - q * fy);
    }
    if (op == "**") {
      if (ints && y >= 0) {
        int64_t r = 1;
        for (int64_t i = 0; i < y; ++i) r *= x;
        return Value::Int(r);
      }
      return Value::Float(std::pow(fx, fy));
    }
    return bad();
  }

  bool Contains(const Value& container, const Value& x, int line) {
    switch (container.type) {
      case Value::Type::kString:
        if (x.type != Value::Type::kString) Fail(line, "'in <string>' requires string as left operand");
        return container.s.find(x.s) != std::string::npos;
      case Value::Type::kList:
        return std::any_of(container.list->begin(), container.list->end(), [&](const Value& v) { return Equal(v, x); });
      case Value::Type::kDict: return x.type == Value::Type::kString && container.dict->Find(x.s) != nullptr;
      case Value::Type::kUndefined: return false;
      default: Fail(line, absl::StrCat("argument of type '", TypeName(container), "' is not iterable"));
    }
  }

  Value Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::kLiteral: return e.literal;
      case Expr::kName: return Lookup(e.name);
      case Expr::kList:
      case Expr::kTuple: {
        List l;
        for (const auto& k : e.kids) l.push_back(Eval(*k));
        return Value::MakeList(std::move(l));
      }
      case Expr::kDict: {
        Value d = Value::MakeDict();
        for (size_t i = 0; i + 1 < e.kids.size(); i += 2) d.dict->Set(PyStr(Eval(*e.kids[i])), Eval(*e.kids[i + 1]));
        return d;
      }
      case Expr::kAttr: return GetAttr(Eval(*e.kids[0]), e.name, e.line);
      case Expr::kItem: return GetItem(Eval(*e.kids[0]), Eval(*e.kids[1]), e.line);
      case Expr::kSlice: {
        Value obj = Eval(*e.kids[0]);
        Value parts[3];
        for (int i = 0; i < 3; ++i) {
          if (e.kids[i + 1]) parts[i] = Eval(*e.kids[i + 1]);
        }
        return Slice(obj, &parts[0], &parts[1], &parts[2], e.line);
      }
      case Expr::kCall: return EvalCall(e);
      case Expr::kFilter: {
        Value v = Eval(*e.kids[0]);
        Args a = EvalArgs(e, 1);
        return ApplyFilter(e.name, v, a);
      }
      case Expr::kTest: {
        Value v = Eval(*e.kids[0]);
        Args a = EvalArgs(e, 1);
        return Value::Bool(ApplyTest(e.name, v, a) != e.negated);
      }
      case Expr::kNeg: {
        Value v = Eval(*e.kids[0]);
        if (!v.is_number()) Fail(e.line, absl::StrCat("bad operand type for unary -: '", TypeName(v), "'"));
        return v.type == Value::Type::kFloat ? Value::Float(-v.f) : Value::Int(-v.integer());
      }
      case Expr::kPos: return Eval(*e.kids[0]);
      case Expr::kNot: return Value::Bool(!Truthy(Eval(*e.kids[0])));
      case Expr::kAnd: {
        Value l = Eval(*e.kids[0]);
        return Truthy(l) ? Eval(*e.kids[1]) : l;
      }
      case Expr::kOr: {
        Value l = Eval(*e.kids[0]);
        return Truthy(l) ? l : Eval(*e.kids[1]);
      }
      case Expr::kBinary: return Arith(e.name, Eval(*e.kids[0]), Eval(*e.kids[1]), e.line);
      case Expr::kCompare: {
        Value l = Eval(*e.kids[0]);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value r = Eval(*e.kids[i + 1]);
          const std::string& op = e.ops[i];
          bool ok;
          if (op == "==") ok = Equal(l, r);
          else if (op == "!=") ok = !Equal(l, r);
          else if (op == "in") ok = Contains(r, l, e.line);
          else if (op == "not in") ok = !Contains(r, l, e.line);
          else {
            const int c = Compare(l, r, e.line);
            ok = op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0;
          }
          if (!ok) return Value::Bool(false);
          l = std::move(r);
        }
        return Value::Bool(true);
      }
      case Expr::kCond: {
        if (Truthy(Eval(*e.kids[1]))) return Eval(*e.kids[0]);
        return e.kids.size() > 2 ? Eval(*e.kids[2]) : Value::Undefined();
      }
    }
    return Value::Undefined();
  }

  Value EvalCall(const Expr& e) {
    const Expr& callee = *e.kids[0];
    if (callee.kind == Expr::kAttr) {  // a method of a string, dict or list
      Value obj = Eval(*callee.kids[0]);
      if (obj.type == Value::Type::kString || (obj.type == Value::Type::kDict && !obj.dict->Find(callee.name)) ||
          obj.type == Value::Type::kList) {
        Args a = EvalArgs(e, 1);
        return CallMethod(obj, callee.name, a);
      }
    }
    Value f = Eval(callee);
    if (f.type != Value::Type::kFunction) {
      Fail(e.line, absl::StrCat("'", callee.kind == Expr::kName ? callee.name : TypeName(f), "' is not callable"));
    }
    Args a = EvalArgs(e, 1);
    return f.fn->call(a);
  }

  Value CallMethod(const Value& obj, const std::string& m, Args& a) {
    const int line = a.line;
    const Value* a0 = a.Get(0, "");
    if (obj.type == Value::Type::kString) {
      const std::string& s = obj.s;
      if (m == "strip") return Value::Str(Strip(s, a0, true, true));
      if (m == "lstrip") return Value::Str(Strip(s, a0, true, false));
      if (m == "rstrip") return Value::Str(Strip(s, a0, false, true));
      if (m == "upper") return Value::Str(MapCase(s, 1));
      if (m == "lower") return Value::Str(MapCase(s, 0));
      if (m == "capitalize") return Value::Str(MapCase(s, 2));
      if (m == "title") return Value::Str(MapCase(s, 3));
      if (m == "startswith" || m == "endswith") {
        if (a0 == nullptr) Fail(line, m + "() takes at least 1 argument");
        std::vector<std::string> probes;
        if (a0->type == Value::Type::kList) {
          for (const Value& p : *a0->list) probes.push_back(PyStr(p));
        } else {
          probes.push_back(PyStr(*a0));
        }
        for (const std::string& p : probes) {
          if (m == "startswith" ? absl::string_view(s).substr(0, p.size()) == p
                                : (s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0)) {
            return Value::Bool(true);
          }
        }
        return Value::Bool(false);
      }
      if (m == "split" || m == "rsplit") {
        const Value* sep = a.Get(0, "sep");
        const Value* maxv = a.Get(1, "maxsplit");
        int64_t maxsplit = maxv && maxv->is_integral() ? maxv->integer() : -1;
        List parts;
        if (sep == nullptr || sep->type == Value::Type::kNone) {
          std::string cur;
          bool in_word = false;
          for (const std::string& c : Chars(s)) {
            if (IsPySpace(DecodeCp(c)) && (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit)) {
              if (in_word) parts.push_back(Value::Str(cur)), cur.clear();
              in_word = false;
            } else {
              cur += c;
              in_word = true;
            }
          }
          if (in_word) parts.push_back(Value::Str(Strip(cur, nullptr, false, true)));
          return Value::MakeList(std::move(parts));
        }
        if (sep->s.empty()) Fail(line, "empty separator");
        size_t from = 0;
        while (true) {
          const size_t at = s.find(sep->s, from);
          if (at == std::string::npos || (maxsplit >= 0 && static_cast<int64_t>(parts.size()) >= maxsplit)) break;
          parts.push_back(Value::Str(s.substr(from, at - from)));
          from = at + sep->s.size();
        }
        parts.push_back(Value::Str(s.substr(from)));
        return Value::MakeList(std::move(parts));
      }
      if (m == "replace") {
        const Value* old = a.Get(0, "old");
        const Value* nw = a.Get(1, "new");
        if (!old || !nw) Fail(line, "replace() takes 2 arguments");
        return Value::Str(Replace(s, PyStr(*old), PyStr(*nw), a.Get(2, "count") ? a.Get(2, "count")->integer() : -1));
      }
      if (m == "find") return Value::Int(a0 ? static_cast<int64_t>(s.find(PyStr(*a0))) : -1);
      if (m == "count") {
        if (!a0 || a0->s.empty()) return Value::Int(0);
        int64_t c = 0;
        for (size_t at = s.find(a0->s); at != std::string::npos; at = s.find(a0->s, at + a0->s.size())) ++c;
        return Value::Int(c);
      }
      if (m == "join") {
        std::string out;
        List items = a0 ? Iterate(*a0, line) : List{};
        for (size_t i = 0; i < items.size(); ++i) out += (i ? s : "") + PyStr(items[i]);
        return Value::Str(out);
      }
      if (m == "isdigit" || m == "isalpha" || m == "isspace" || m == "isupper" || m == "islower") {
        if (s.empty()) return Value::Bool(false);
        for (const std::string& c : Chars(s)) {
          const char32_t cp = DecodeCp(c);
          const bool ok = m == "isdigit" ? u_isdigit(cp) : m == "isalpha" ? u_isalpha(cp) : m == "isspace" ? IsPySpace(cp)
                          : m == "isupper" ? !u_islower(cp) : !u_isupper(cp);
          if (!ok) return Value::Bool(false);
        }
        return Value::Bool(true);
      }
    } else if (obj.type == Value::Type::kDict) {
      if (m == "items") {
        List l;
        for (const auto& [k, v] : obj.dict->items) l.push_back(Value::MakeList({Value::Str(k), v}));
        return Value::MakeList(std::move(l));
      }
      if (m == "keys" || m == "values") {
        List l;
        for (const auto& [k, v] : obj.dict->items) l.push_back(m == "keys" ? Value::Str(k) : v);
        return Value::MakeList(std::move(l));
      }
      if (m == "get") {
        if (a0 && a0->type == Value::Type::kString) {
          if (const Value* v = obj.dict->Find(a0->s)) return *v;
        }
        const Value* d = a.Get(1, "default");
        return d ? *d : Value::None();
      }
    } else if (obj.type == Value::Type::kList) {
      if (m == "index" && a0) {
        for (size_t i = 0; i < obj.list->size(); ++i) {
          if (Equal((*obj.list)[i], *a0)) return Value::Int(static_cast<int64_t>(i));
        }
        Fail(line, "value is not in list");
      }
      if (m == "count" && a0) {
        return Value::Int(std::count_if(obj.list->begin(), obj.list->end(), [&](const Value& v) { return Equal(v, *a0); }));
      }
    }
    Fail(line, absl::StrCat("'", TypeName(obj), "' object has no method '", m, "' here"));
  }

  static std::string Replace(const std::string& s, const std::string& old, const std::string& nw, int64_t count) {
    if (old.empty()) return s;
    std::string out;
    size_t from = 0;
    int64_t n = 0;
    for (size_t at = s.find(old); at != std::string::npos && (count < 0 || n < count); at = s.find(old, from), ++n) {
      out += s.substr(from, at - from) + nw;
      from = at + old.size();
    }
    return out + s.substr(from);
  }

  bool ApplyTest(const std::string& name, const Value& v, Args& a) {
    const int line = a.line;
    const Value* a0 = a.Get(0, "");
    using T = Value::Type;
    if (name == "defined") return v.defined();
    if (name == "undefined") return !v.defined();
    if (name == "none") return v.type == T::kNone;
    if (name == "boolean") return v.type == T::kBool;
    if (name == "true") return v.type == T::kBool && v.b;
    if (name == "false") return v.type == T::kBool && !v.b;
    if (name == "integer") return v.type == T::kInt;
    if (name == "float") return v.type == T::kFloat;
    if (name == "number") return v.is_number();
    if (name == "string") return v.type == T::kString;
    if (name == "mapping") return v.type == T::kDict;
    if (name == "iterable") return v.type == T::kList || v.type == T::kDict || v.type == T::kString;
    if (name == "sequence") return v.type == T::kList || v.type == T::kDict || v.type == T::kString;
    if (name == "callable") return v.type == T::kFunction;
    if (name == "lower") return v.type == T::kString && MapCase(v.s, 0) == v.s;
    if (name == "upper") return v.type == T::kString && MapCase(v.s, 1) == v.s;
    if (name == "odd" || name == "even" || name == "divisibleby") {
      if (!v.is_integral()) Fail(line, absl::StrCat("test '", name, "' needs an integer"));
      if (name == "odd") return v.integer() % 2 != 0;
      if (name == "even") return v.integer() % 2 == 0;
      if (!a0 || !a0->is_integral() || a0->integer() == 0) Fail(line, "divisibleby needs a non-zero integer");
      return v.integer() % a0->integer() == 0;
    }
    if (a0 == nullptr) Fail(line, absl::StrCat("test '", name, "' needs an argument"));
    if (name == "equalto" || name == "eq" || name == "==") return Equal(v, *a0);
    if (name == "ne" || name == "!=") return !Equal(v, *a0);
    if (name == "sameas") {
      if (v.type != a0->type) return false;
      if (v.type == T::kList) return v.list == a0->list;
      if (v.type == T::kDict) return v.dict == a0->dict;
      return Equal(v, *a0);
    }
    if (name == "in") return Contains(*a0, v, line);
    if (name == "gt" || name == ">") return Compare(v, *a0, line) > 0;
    if (name == "ge" || name == ">=") return Compare(v, *a0, line) >= 0;
    if (name == "lt" || name == "<") return Compare(v, *a0, line) < 0;
    if (name == "le" || name == "<=") return Compare(v, *a0, line) <= 0;
    Fail(line, absl::StrCat("unknown test '", name, "'"));
  }

  // select/reject/selectattr/rejectattr.
  Value Select(const Value& v, Args& a, bool by_attr, bool keep) {
    List out;
    const int line = a.line;
    size_t next = 0;
    std::string attr;
    if (by_attr) {
      if (a.pos.empty()) Fail(line, "selectattr/rejectattr need an attribute");
      attr = PyStr(a.pos[next++]);
    }
    std::string test;
    if (next < a.pos.size()) test = PyStr(a.pos[next++]);
    Args targs;
    targs.line = line;
    targs.pos.assign(a.pos.begin() + next, a.pos.end());
    for (const Value& x : Iterate(v, line)) {
      Value probe = by_attr ? GetAttrPath(x, attr, line) : x;
      const bool t = test.empty() ? Truthy(probe) : ApplyTest(test, probe, targs);
      if (t == keep) out.push_back(x);
    }
    return Value::MakeList(std::move(out));
  }

  // "a.b.c" as Jinja's attribute filters read it.
  Value GetAttrPath(const Value& x, const std::string& path, int line) {
    Value cur = x;
    size_t from = 0;
    while (true) {
      const size_t dot = path.find('.', from);
      const std::string part = path.substr(from, dot == std::string::npos ? std::string::npos : dot - from);
      if (!cur.defined()) return cur;
      const bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
      cur = digits && cur.type == Value::Type::kList ? GetItem(cur, Value::Int(std::stoll(part)), line) : GetAttr(cur, part, line);
      if (dot == std::string::npos) return cur;
      from = dot + 1;
    }
  }

  Value ApplyFilter(const std::string& name, const Value& v, Args& a) {
    const int line = a.line;
    const Value* a0 = a.Get(0, "");
    using T = Value::Type;
    if (name == "tojson") {
      const Value* ind = a.Get(0, "indent");
      const int indent = ind && ind->is_integral() ? static_cast<int>(ind->integer()) : -1;
      std::string item_sep = indent >= 0 ? "," : ", ", key_sep = ": ";
      if (const Value* sep = a.Kw("separators"); sep && sep->type == T::kList && sep->list->size() == 2) {
        item_sep = PyStr((*sep->list)[0]);
        key_sep = PyStr((*sep->list)[1]);
      }
      const Value* sk = a.Kw("sort_keys");
      std::string out;
      ToJson(v, indent, item_sep, key_sep, sk && Truthy(*sk), 0, &out, line);
      return Value::Str(std::move(out));
    }
    if (name == "trim") return Value::Str(Strip(PyStr(v), a.Get(0, "chars"), true, true));
    if (name == "length" || name == "count") {
      switch (v.type) {
        case T::kString: return Value::Int(static_cast<int64_t>(CountChars(v.s)));
        case T::kList: return Value::Int(static_cast<int64_t>(v.list->size()));
        case T::kDict: return Value::Int(static_cast<int64_t>(v.dict->items.size()));
        case T::kUndefined: return Value::Int(0);
        default: Fail(line, absl::StrCat("object of type '", TypeName(v), "' has no len()"));
      }
    }
    if (name == "string") return Value::Str(PyStr(v));
    if (name == "safe" || (name == "list" && v.type == T::kList)) return v;
    if (name == "list") return Value::MakeList(Iterate(v, line));
    if (name == "items") {
      if (v.type == T::kUndefined) return Value::MakeList();
      if (v.type != T::kDict) Fail(line, "items filter needs a mapping");
      Args none;
      none.line = line;
      return CallMethod(v, "items", none);
    }
    if (name == "join") {
      const Value* sep = a.Get(0, "d");
      const Value* attr = a.Get(1, "attribute");
      std::string out;
      List items = Iterate(v, line);
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0 && sep) out += PyStr(*sep);
        out += PyStr(attr ? GetAttrPath(items[i], PyStr(*attr), line) : items[i]);
      }
      return Value::Str(std::move(out));
    }
    if (name == "selectattr") return Select(v, a, true, true);
    if (name == "rejectattr") return Select(v, a, true, false);
    if (name == "select") return Select(v, a, false, true);
    if (name == "reject") return Select(v, a, false, false);
    if (name == "map") {
      List out;
      const Value* attr = a.Kw("attribute");
      for (const Value& x : Iterate(v, line)) {
        if (attr) {
          Value got = GetAttrPath(x, PyStr(*attr), line);
          if (!got.defined()) {
            if (const Value* d = a.Kw("default")) got = *d;
          }
          out.push_back(got);
        } else {
          if (a.pos.empty()) Fail(line, "map needs a filter name or attribute=");
          Args rest;
          rest.line = line;
          rest.pos.assign(a.pos.begin() + 1, a.pos.end());
          rest.kw = a.kw;
          out.push_back(ApplyFilter(PyStr(a.pos[0]), x, rest));
        }
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "first" || name == "last") {
      List items = Iterate(v, line);
      if (items.empty()) return Value::Undefined();
      return name == "first" ? items.front() : items.back();
    }
    if (name == "default" || name == "d") {
      const Value* boolean = a.Get(1, "boolean");
      const bool use_default = boolean && Truthy(*boolean) ? !Truthy(v) : !v.defined();
      if (!use_default) return v;
      return a0 ? *a0 : Value::Str("");
    }
    if (name == "upper") return Value::Str(MapCase(PyStr(v), 1));
    if (name == "lower") return Value::Str(MapCase(PyStr(v), 0));
    if (name == "capitalize") return Value::Str(MapCase(PyStr(v), 2));
    if (name == "title") return Value::Str(MapCase(PyStr(v), 3));
    if (name == "replace") {
      const Value* old = a.Get(0, "old");
      const Value* nw = a.Get(1, "new");
      if (!old || !nw) Fail(line, "replace needs old and new");
      const Value* cnt = a.Get(2, "count");
      return Value::Str(Replace(PyStr(v), PyStr(*old), PyStr(*nw), cnt && cnt->is_integral() ? cnt->integer() : -1));
    }
    if (name == "int") {
      if (v.is_number()) return Value::Int(static_cast<int64_t>(v.num()));
      if (v.type == T::kString) {
        try {
          return Value::Int(std::stoll(Strip(v.s, nullptr, true, true)));
        } catch (...) {
        }
      }
      return a0 ? *a0 : Value::Int(0);
    }
    if (name == "float") {
      if (v.is_number()) return Value::Float(v.num());
      if (v.type == T::kString) {
        try {
          return Value::Float(std::stod(v.s));
        } catch (...) {
        }
      }
      return a0 ? *a0 : Value::Float(0);
    }
    if (name == "abs") {
      if (!v.is_number()) Fail(line, "abs needs a number");
      return v.type == T::kFloat ? Value::Float(std::fabs(v.f)) : Value::Int(std::llabs(v.integer()));
    }
    if (name == "round") {
      const Value* prec = a.Get(0, "precision");
      const Value* method = a.Get(1, "method");
      const double p = std::pow(10.0, prec ? prec->num() : 0);
      const std::string m = method ? PyStr(*method) : "common";
      const double x = v.num() * p;
      return Value::Float((m == "ceil" ? std::ceil(x) : m == "floor" ? std::floor(x) : std::round(x)) / p);
    }
    if (name == "unique") {
      List out;
      for (const Value& x : Iterate(v, line)) {
        if (std::none_of(out.begin(), out.end(), [&](const Value& y) { return Equal(x, y); })) out.push_back(x);
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "reverse") {
      if (v.type == T::kString) {
        std::vector<std::string> cs = Chars(v.s);
        std::reverse(cs.begin(), cs.end());
        return Value::Str(absl::StrJoin(cs, ""));
      }
      List items = Iterate(v, line);
      std::reverse(items.begin(), items.end());
      return Value::MakeList(std::move(items));
    }
    if (name == "sort") {
      List items = Iterate(v, line);
      const Value* rev = a.Get(0, "reverse");
      const Value* attr = a.Kw("attribute");
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
        const Value kx = attr ? GetAttrPath(x, PyStr(*attr), line) : x, ky = attr ? GetAttrPath(y, PyStr(*attr), line) : y;
        return Compare(kx, ky, line) < 0;
      });
      if (rev && Truthy(*rev)) std::reverse(items.begin(), items.end());
      return Value::MakeList(std::move(items));
    }
    if (name == "dictsort") {
      if (v.type != T::kDict) Fail(line, "dictsort needs a mapping");
      Args none;
      none.line = line;
      List items = *CallMethod(v, "items", none).list;
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) { return Compare((*x.list)[0], (*y.list)[0], line) < 0; });
      return Value::MakeList(std::move(items));
    }
    if (name == "indent") {
      const Value* w = a.Get(0, "width");
      const Value* first = a.Get(1, "first");
      const Value* blank = a.Get(2, "blank");
      const std::string pad = w && w->type == T::kString ? w->s : std::string(w ? w->integer() : 4, ' ');
      const std::string s = PyStr(v);
      std::string out;
      size_t from = 0, line_no = 0;
      while (from <= s.size()) {
        const size_t nl = s.find('\n', from);
        const std::string ln = s.substr(from, nl == std::string::npos ? std::string::npos : nl - from);
        const bool indent_it = (line_no > 0 || (first && Truthy(*first))) && (!ln.empty() || (blank && Truthy(*blank)));
        out += (indent_it ? pad : "") + ln;
        if (nl == std::string::npos) break;
        out += "\n";
        from = nl + 1;
        ++line_no;
      }
      return Value::Str(std::move(out));
    }
    if (name == "wordcount") {
      Args none;
      none.line = line;
      return Value::Int(static_cast<int64_t>(CallMethod(Value::Str(PyStr(v)), "split", none).list->size()));
    }
    if (name == "e" || name == "escape") {
      std::string out;
      for (char c : PyStr(v)) {
        switch (c) {
          case '&': out += "&amp;"; break;
          case '<': out += "&lt;"; break;
          case '>': out += "&gt;"; break;
          case '"': out += "&#34;"; break;
          case '\'': out += "&#39;"; break;
          default: out += c;
        }
      }
      return Value::Str(std::move(out));
    }
    if (name == "min" || name == "max" || name == "sum") {
      List items = Iterate(v, line);
      if (name == "sum") {
        Value acc = Value::Int(0);
        for (const Value& x : items) acc = Arith("+", acc, x, line);
        return acc;
      }
      if (items.empty()) return Value::Undefined();
      Value best = items[0];
      for (const Value& x : items) {
        const int c = Compare(x, best, line);
        if (name == "min" ? c < 0 : c > 0) best = x;
      }
      return best;
    }
    Fail(line, absl::StrCat("unknown filter '", name, "'"));
  }

  void InstallGlobals() {
    Scope& g = scopes_.front();
    g["raise_exception"] = MakeFunction("raise_exception", [](Args& a) -> Value {
      throw TemplateError{a.pos.empty() ? std::string("raise_exception") : PyStr(a.pos[0]), a.line, true};
    });
    g["namespace"] = MakeFunction("namespace", [](Args& a) {
      Value ns = Value::MakeDict(/*is_namespace=*/true);
      for (const Value& p : a.pos) {
        if (p.type == Value::Type::kDict) {
          for (const auto& [k, v] : p.dict->items) ns.dict->Set(k, v);
        }
      }
      for (const auto& [k, v] : a.kw) ns.dict->Set(k, v);
      return ns;
    });
    g["dict"] = MakeFunction("dict", [](Args& a) {
      Value d = Value::MakeDict();
      for (const auto& [k, v] : a.kw) d.dict->Set(k, v);
      return d;
    });
    g["range"] = MakeFunction("range", [](Args& a) {
      int64_t start = 0, stop = 0, step = 1;
      if (a.pos.size() == 1) {
        stop = a.pos[0].integer();
      } else if (a.pos.size() >= 2) {
        start = a.pos[0].integer();
        stop = a.pos[1].integer();
        if (a.pos.size() > 2) step = a.pos[2].integer();
      }
      if (step == 0) Fail(a.line, "range() step must not be zero");
      List l;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        l.push_back(Value::Int(i));
        if (l.size() > 1000000) Fail(a.line, "range() too long");
      }
      return Value::MakeList(std::move(l));
    });
    g["strftime_now"] = MakeFunction("strftime_now", [](Args& a) {
      const std::string fmt = a.pos.empty() ? std::string("%Y-%m-%d") : PyStr(a.pos[0]);
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
      const size_t n = std::strftime(buf, sizeof(buf), fmt.c_str(), &tm);
      return Value::Str(std::string(buf, n));
    });
  }

  std::string* out_;
  std::vector<Scope> scopes_;
  int macro_depth_ = 0;
};

}  // namespace
}  // namespace jinja

// ------------------------------------------------------------------------------------------ API

ChatTemplate::ChatTemplate(std::shared_ptr<const jinja::Template> t) : template_(std::move(t)) {}
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(absl::string_view source) {
  try {
    auto t = std::make_shared<jinja::Template>();
    t->body = jinja::Parser(jinja::Lexer(source).Run()).ParseAll();
    return ChatTemplate(std::move(t));
  } catch (const jinja::TemplateError& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template line ", e.line, ": ", e.message));
  }
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& context) const {
  if (!context.is_object()) return absl::InvalidArgumentError("chat template context must be a JSON object");
  std::string out;
  try {
    jinja::Renderer r(&out);
    for (const auto& [k, v] : context.items()) r.SetVar(k, jinja::FromJson(v));
    r.Exec(template_->body);
  } catch (const jinja::TemplateError& e) {
    if (e.raised) return absl::InvalidArgumentError(e.message);
    return absl::InvalidArgumentError(absl::StrCat("chat template line ", e.line, ": ", e.message));
  }
  return out;
}

absl::StatusOr<std::string> ModelChatTemplate::Render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                                      const nlohmann::ordered_json& extra) const {
  nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
  if (!bos_token.empty()) ctx["bos_token"] = bos_token;
  if (!eos_token.empty()) ctx["eos_token"] = eos_token;
  if (extra.is_object()) {
    for (const auto& [k, v] : extra.items()) ctx[k] = v;
  }
  ctx["messages"] = messages;
  ctx["add_generation_prompt"] = add_generation_prompt;
  return chat_template.Render(ctx);
}

absl::StatusOr<std::optional<ModelChatTemplate>> LoadChatTemplate(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "tokenizer_config.json";
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return std::optional<ModelChatTemplate>();
  absl::StatusOr<std::string> text = runtime::ReadFile(path);
  if (!text.ok()) return text.status();
  const nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
  std::string source;
  if (auto it = j.find("chat_template"); it != j.end() && it->is_string()) {
    source = it->get<std::string>();
  } else if (it != j.end() && it->is_array()) {
    for (const nlohmann::json& t : *it) {
      if (t.is_object() && t.value("name", "") == "default" && t.contains("template") && t["template"].is_string()) {
        source = t["template"].get<std::string>();
      }
    }
    if (source.empty()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": chat_template list has no \"default\""));
  }
  if (source.empty()) return std::optional<ModelChatTemplate>();
  absl::StatusOr<ChatTemplate> t = ChatTemplate::Parse(source);
  if (!t.ok()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": ", t.status().message()));
  auto token = [&](const char* key) -> std::string {
    auto it = j.find(key);
    if (it == j.end()) return "";
    if (it->is_string()) return it->get<std::string>();
    if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) return (*it)["content"].get<std::string>();
    return "";
  };
  return std::optional<ModelChatTemplate>(ModelChatTemplate{*std::move(t), token("bos_token"), token("eos_token")});
}

}  // namespace scout::text
