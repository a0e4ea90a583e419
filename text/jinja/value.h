// The Jinja engine's values: Python-like (None, bool, int, float, str, list, dict, namespace,
// function, undefined), their Python str/repr, comparison and truth, and JSON both ways. Errors
// inside the engine travel as TemplateError (text/chat_template.cc turns them into a Status).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace scout::text::jinja {

struct TemplateError {
  std::string message;
  int line = 0;
  bool raised = false;  // by raise_exception: the template's own message, shown as is
};

[[noreturn]] inline void Fail(int line, std::string message) { throw TemplateError{std::move(message), line, false}; }

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

Value MakeFunction(std::string name, std::function<Value(Args&)> call);
const char* TypeName(const Value& v);
bool Truthy(const Value& v);
// Python's repr of a float: the shortest digits that read back, in positional notation for
// exponents in [-4, 16), else scientific with at least two exponent digits.
std::string FloatRepr(double x);
std::string PyRepr(const Value& v);

// Python's str().
std::string PyStr(const Value& v);
std::string PyRepr(const Value& v);
bool Equal(const Value& a, const Value& b);
// <0, 0, >0 like Python's ordering; numbers, strings and lists only.
int Compare(const Value& a, const Value& b, int line);
// UTF-8 code points of a string (Python indexes and slices strings by them).
std::vector<std::string> Chars(absl::string_view s);
char32_t DecodeCp(absl::string_view ch);
bool IsPySpace(char32_t c);
size_t CharLen(char lead);
size_t CountChars(absl::string_view s);
// str.strip / lstrip / rstrip: Unicode whitespace, or the characters of `chars`. Works in place
// on the bytes: message contents can be megabytes long.
std::string Strip(absl::string_view s, const Value* chars, bool left, bool right);
std::string MapCase(absl::string_view s, int mode);  // 0 lower, 1 upper, 2 capitalize, 3 title
// json.dumps(x, ensure_ascii=False, indent=indent, separators=..., sort_keys=...), which is what
// transformers installs as the tojson filter.
void ToJson(const Value& v, int indent, const std::string& item_sep, const std::string& key_sep, bool sort_keys, int depth,
            std::string* out, int line);
Value FromJson(const nlohmann::ordered_json& j);

}  // namespace scout::text::jinja
