#include "text/jinja/value.h"

#include <unicode/uchar.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>

#include "absl/strings/str_join.h"
#include "text/utf8.h"

namespace scout::text::jinja {

Value Value::MakeDict(bool is_namespace) {
  Value v{Type::kDict};
  v.dict = std::make_shared<Dict>();
  v.dict->is_namespace = is_namespace;
  return v;
}

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

}  // namespace scout::text::jinja
