// The renderer's filters, tests, methods of str, list and dict, and globals.
#include "text/jinja/renderer.h"

#include <unicode/uchar.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>

#include "absl/strings/str_join.h"
#include "text/utf8.h"

namespace scout::text::jinja {

Value Renderer::CallMethod(const Value& obj, const std::string& m, Args& a) {
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

std::string Renderer::Replace(const std::string& s, const std::string& old, const std::string& nw, int64_t count) {
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

bool Renderer::ApplyTest(const std::string& name, const Value& v, Args& a) {
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

Value Renderer::Select(const Value& v, Args& a, bool by_attr, bool keep) {
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

Value Renderer::GetAttrPath(const Value& x, const std::string& path, int line) {
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

Value Renderer::ApplyFilter(const std::string& name, const Value& v, Args& a) {
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
  return ApplyNumberFilter(name, v, a);
}

Value Renderer::ApplyNumberFilter(const std::string& name, const Value& v, Args& a) {
  const int line = a.line;
  const Value* a0 = a.Get(0, "");
  using T = Value::Type;
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

void Renderer::InstallGlobals() {
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

}  // namespace scout::text::jinja
