#include "text/jinja/renderer.h"

#include <unicode/uchar.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>

#include "absl/strings/str_join.h"
#include "text/utf8.h"

namespace scout::text::jinja {

Renderer::Renderer(std::string* out) : out_(out) {
  scopes_.emplace_back();
  InstallGlobals();
}

Flow Renderer::Exec(const std::vector<Node>& body) {
  for (const Node& n : body) {
    if (Flow f = ExecOne(n); f != Flow::kNormal) return f;
  }
  return Flow::kNormal;
}

Value Renderer::Lookup(const std::string& name) const {
  for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
    if (auto f = it->find(name); f != it->end()) return f->second;
  }
  return Value::Undefined(name);
}

Flow Renderer::ExecOne(const Node& n) {
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

void Renderer::Assign(const std::vector<std::string>& targets, Value v, int line) {
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

Value Renderer::CallMacro(const Node& def, Args& a) {
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

List Renderer::Iterate(const Value& v, int line) {
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

Flow Renderer::ExecFor(const Node& n) {
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

Args Renderer::EvalArgs(const Expr& e, size_t first) {
  Args a;
  a.line = e.line;
  const size_t npos = e.kids.size() - first - e.kw.size();
  for (size_t i = 0; i < npos; ++i) a.pos.push_back(Eval(*e.kids[first + i]));
  for (size_t i = 0; i < e.kw.size(); ++i) a.kw.emplace_back(e.kw[i], Eval(*e.kids[first + npos + i]));
  return a;
}

Value Renderer::GetAttr(const Value& obj, const std::string& name, int line) {
  if (obj.type == Value::Type::kUndefined) {
    Fail(line, absl::StrCat("'", obj.s.empty() ? "value" : obj.s, "' is undefined (reading '", name, "')"));
  }
  if (obj.type == Value::Type::kDict) {
    if (const Value* v = obj.dict->Find(name)) return *v;
  }
  return Value::Undefined(name);
}

Value Renderer::GetItem(const Value& obj, const Value& key, int line) {
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

Value Renderer::Slice(const Value& obj, const Value* start, const Value* stop, const Value* step, int line) {
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

Value Renderer::Arith(const std::string& op, const Value& a, const Value& b, int line) {
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

bool Renderer::Contains(const Value& container, const Value& x, int line) {
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

Value Renderer::Eval(const Expr& e) {
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

Value Renderer::EvalCall(const Expr& e) {
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

}  // namespace scout::text::jinja
