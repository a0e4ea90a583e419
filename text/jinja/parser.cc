#include "text/jinja/parser.h"

#include <unicode/uchar.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>

#include "absl/strings/str_join.h"
#include "text/utf8.h"

namespace scout::text::jinja {

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

}  // namespace

std::vector<Node> ParseTokens(std::vector<Token> tokens) { return Parser(std::move(tokens)).ParseAll(); }

}  // namespace scout::text::jinja
