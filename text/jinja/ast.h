// The Jinja engine's trees: expressions and statements, as the parser builds them and the
// renderer walks them.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "text/jinja/value.h"

namespace scout::text::jinja {

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

struct Template {
  std::vector<Node> body;
};

}  // namespace scout::text::jinja
