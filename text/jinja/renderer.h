// The Jinja renderer: walks a template's trees over Python-like values, writing the output.
// Its statements and expressions are in renderer.cc; the filters, tests, string and dict methods
// and the globals (range, namespace, raise_exception, strftime_now) in filters.cc.
#pragma once

#include <string>
#include <vector>

#include "text/jinja/ast.h"

namespace scout::text::jinja {

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  explicit Renderer(std::string* out);

  void SetVar(const std::string& name, Value v) { scopes_.front()[name] = std::move(v); }

  Flow Exec(const std::vector<Node>& body);

 private:
  using Scope = absl::flat_hash_map<std::string, Value>;

  Value Lookup(const std::string& name) const;

  Flow ExecOne(const Node& n);

  void Assign(const std::vector<std::string>& targets, Value v, int line);

  Value CallMacro(const Node& def, Args& a);

  // The items a for loop visits: list elements, dict keys, string characters.
  List Iterate(const Value& v, int line);

  Flow ExecFor(const Node& n);

  Args EvalArgs(const Expr& e, size_t first);

  // Python's obj.name / obj[key] as Jinja's sandbox resolves them: a missing key or attribute is
  // undefined; only reading from an undefined value fails.
  Value GetAttr(const Value& obj, const std::string& name, int line);

  static int64_t NormIndex(int64_t i, int64_t n) { return i < 0 ? i + n : i; }

  Value GetItem(const Value& obj, const Value& key, int line);

  Value Slice(const Value& obj, const Value* start, const Value* stop, const Value* step, int line);

  Value Arith(const std::string& op, const Value& a, const Value& b, int line);

  bool Contains(const Value& container, const Value& x, int line);

  Value Eval(const Expr& e);

  Value EvalCall(const Expr& e);

  Value CallMethod(const Value& obj, const std::string& m, Args& a);

  static std::string Replace(const std::string& s, const std::string& old, const std::string& nw, int64_t count);

  bool ApplyTest(const std::string& name, const Value& v, Args& a);

  // select/reject/selectattr/rejectattr.
  Value Select(const Value& v, Args& a, bool by_attr, bool keep);

  // "a.b.c" as Jinja's attribute filters read it.
  Value GetAttrPath(const Value& x, const std::string& path, int line);

  // Filters of text and structure (tojson, trim, join, map, default, ...); the others go on to
  // ApplyNumberFilter (numbers, order, aggregates, indent, escape), which fails on an unknown one.
  Value ApplyFilter(const std::string& name, const Value& v, Args& a);
  Value ApplyNumberFilter(const std::string& name, const Value& v, Args& a);

  void InstallGlobals();

  std::string* out_;
  std::vector<Scope> scopes_;
  int macro_depth_ = 0;
};

}  // namespace scout::text::jinja
