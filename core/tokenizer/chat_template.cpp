#include "core/tokenizer/chat_template.hpp"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <optional>
#include <utility>

#include "core/common/error.hpp"

namespace tpe::tokenizer {
namespace {

// ---- values ---------------------------------------------------------------------------------

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // in insertion order, as Python's

struct Value {
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict };
  Kind kind = Kind::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;

  static Value none() { return with(Kind::kNone); }
  static Value boolean(bool v) {
    Value x = with(Kind::kBool);
    x.b = v;
    return x;
  }
  static Value integer(int64_t v) {
    Value x = with(Kind::kInt);
    x.i = v;
    return x;
  }
  static Value real(double v) {
    Value x = with(Kind::kFloat);
    x.f = v;
    return x;
  }
  static Value string(std::string v) {
    Value x = with(Kind::kString);
    x.s = std::move(v);
    return x;
  }
  static Value of_list(List v) {
    Value x = with(Kind::kList);
    x.list = std::make_shared<List>(std::move(v));
    return x;
  }
  static Value of_dict(Dict v) {
    Value x = with(Kind::kDict);
    x.dict = std::make_shared<Dict>(std::move(v));
    return x;
  }
  static Value with(Kind k) {
    Value x;
    x.kind = k;
    return x;
  }
  bool is(Kind k) const { return kind == k; }
  bool number() const { return kind == Kind::kInt || kind == Kind::kFloat || kind == Kind::kBool; }
  double as_double() const {
    return kind == Kind::kFloat ? f : static_cast<double>(kind == Kind::kBool ? b : i);
  }
  const Value* member(std::string_view key) const {
    if (kind != Kind::kDict) return nullptr;
    for (const auto& [k, v] : *dict) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};

using Kind = Value::Kind;

bool truthy(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined:
    case Kind::kNone:
      return false;
    case Kind::kBool:
      return v.b;
    case Kind::kInt:
      return v.i != 0;
    case Kind::kFloat:
      return v.f != 0;
    case Kind::kString:
      return !v.s.empty();
    case Kind::kList:
      return !v.list->empty();
    case Kind::kDict:
      return !v.dict->empty();
  }
  return false;
}

std::string repr(const Value& v);

// As Jinja prints a value ({{ }}, ~, |string).
std::string text(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined:
      return "";
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return v.b ? "True" : "False";
    case Kind::kInt:
      return std::to_string(v.i);
    case Kind::kFloat: {
      if (std::isfinite(v.f) && v.f == std::floor(v.f) && std::fabs(v.f) < 1e16) {
        return fmt::format("{:.1f}", v.f);
      }
      return fmt::format("{}", v.f);
    }
    case Kind::kString:
      return v.s;
    case Kind::kList:
    case Kind::kDict:
      return repr(v);
  }
  return "";
}

// Python's repr, for lists and dicts printed whole.
std::string repr(const Value& v) {
  if (v.is(Kind::kString)) {
    std::string out = "'";
    for (const char c : v.s) {
      if (c == '\'' || c == '\\') out += '\\';
      if (c == '\n') {
        out += "\\n";
        continue;
      }
      out += c;
    }
    return out + "'";
  }
  if (v.is(Kind::kList)) {
    std::string out = "[";
    for (size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + repr((*v.list)[k]);
    return out + "]";
  }
  if (v.is(Kind::kDict)) {
    std::string out = "{";
    for (size_t k = 0; k < v.dict->size(); ++k) {
      out += (k ? ", " : "") + repr(Value::string((*v.dict)[k].first)) + ": " +
             repr((*v.dict)[k].second);
    }
    return out + "}";
  }
  return text(v);
}

bool equal(const Value& a, const Value& b) {
  if (a.number() && b.number()) return a.as_double() == b.as_double();
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Kind::kUndefined:
    case Kind::kNone:
      return true;
    case Kind::kString:
      return a.s == b.s;
    case Kind::kList: {
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k) {
        if (!equal((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    }
    case Kind::kDict:
      return repr(a) == repr(b);
    default:
      return false;
  }
}

// ---- lexing: text and tags, with transformers' trim_blocks and lstrip_blocks ----------------

struct Piece {
  enum class Type { kText, kOutput, kStatement } type;
  std::string body;
  size_t at;  // byte offset of the tag in the template
};

class Failer {
 public:
  Failer(const std::string& source, std::string_view tmpl) : source_(source), tmpl_(tmpl) {}
  template <typename... Args>
  [[noreturn]] void at(size_t offset, fmt::format_string<Args...> format, Args&&... args) const {
    size_t line = 1;
    for (size_t k = 0; k < offset && k < tmpl_.size(); ++k) line += tmpl_[k] == '\n';
    // The detail quotes the template (a token, a raise_exception message): one line, escaped.
    fail("{}: chat template, line {}: {}", printable(source_), line,
         printable(fmt::format(format, std::forward<Args>(args)...)));
  }

 private:
  const std::string& source_;
  std::string_view tmpl_;
};

std::vector<Piece> lex(std::string_view t, const Failer& failer) {
  std::vector<Piece> out;
  size_t pos = 0;
  bool strip_next = false;    // the previous tag ended with '-'
  bool trim_newline = false;  // the previous tag was a block or comment (trim_blocks)
  while (pos <= t.size()) {
    size_t open = t.find('{', pos);
    while (open != std::string_view::npos && open + 1 < t.size() && t[open + 1] != '{' &&
           t[open + 1] != '%' && t[open + 1] != '#') {
      open = t.find('{', open + 1);
    }
    if (open + 1 >= t.size()) open = std::string_view::npos;
    std::string text(t.substr(pos, open == std::string_view::npos ? t.size() - pos : open - pos));
    const char kind = open == std::string_view::npos ? 0 : t[open + 1];
    const bool left_minus = kind != 0 && open + 2 < t.size() && t[open + 2] == '-';
    if (left_minus) {
      const size_t end = text.find_last_not_of(" \t\r\n");
      text.erase(end == std::string::npos ? 0 : end + 1);
    } else if (kind == '%' || kind == '#') {
      // lstrip_blocks: spaces and tabs from the start of a line up to a block or comment tag go.
      const size_t line_start = text.find_last_of('\n');
      const bool at_line_start = line_start != std::string::npos || pos == 0 || t[pos - 1] == '\n';
      const size_t from = line_start == std::string::npos ? 0 : line_start + 1;
      if (at_line_start && text.find_first_not_of(" \t", from) == std::string::npos) {
        text.erase(from);
      }
    }
    // trim_blocks: the newline right after a block or comment tag goes; '-' strips all.
    if (trim_newline && !text.empty() && text[0] == '\n') text.erase(0, 1);
    if (strip_next) text.erase(0, text.find_first_not_of(" \t\r\n"));
    if (open == std::string_view::npos) {
      if (!text.empty()) out.push_back({Piece::Type::kText, text, pos});
      break;
    }
    if (!text.empty()) out.push_back({Piece::Type::kText, text, pos});
    const std::string_view close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    size_t k = open + 2 + (left_minus ? 1 : 0);
    size_t end = std::string_view::npos;
    if (kind == '#') {
      end = t.find(close, k);
    } else {
      char quote = 0;
      for (; k + 1 < t.size(); ++k) {
        if (quote != 0) {
          if (t[k] == '\\') {
            ++k;
          } else if (t[k] == quote) {
            quote = 0;
          }
        } else if (t[k] == '\'' || t[k] == '"') {
          quote = t[k];
        } else if (t.substr(k, 2) == close) {
          end = k;
          break;
        }
      }
    }
    if (end == std::string_view::npos) failer.at(open, "'{}' is never closed", t.substr(open, 2));
    const bool right_minus = end > open + 2 && t[end - 1] == '-';
    const size_t body_begin = open + 2 + (left_minus ? 1 : 0);
    const size_t body_end = right_minus ? end - 1 : end;
    if (kind != '#') {
      out.push_back({kind == '{' ? Piece::Type::kOutput : Piece::Type::kStatement,
                     std::string(t.substr(body_begin, body_end - body_begin)), open});
    }
    strip_next = right_minus;
    trim_newline = kind != '{';
    pos = end + 2;
  }
  return out;
}

// ---- expressions -------------------------------------------------------------------------------

struct Token {
  enum class Type { kName, kString, kInt, kFloat, kOp, kEnd } type;
  std::string text;
  size_t at;
};

std::vector<Token> tokenize(std::string_view s, size_t base, const Failer& failer) {
  std::vector<Token> out;
  size_t k = 0;
  while (k < s.size()) {
    const char c = s[k];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      ++k;
      continue;
    }
    const size_t at = base + k;
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t e = k;
      while (e < s.size() && (std::isalnum(static_cast<unsigned char>(s[e])) || s[e] == '_')) ++e;
      out.push_back({Token::Type::kName, std::string(s.substr(k, e - k)), at});
      k = e;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t e = k;
      bool real = false;
      while (e < s.size() && (std::isdigit(static_cast<unsigned char>(s[e])) || s[e] == '.')) {
        real = real || s[e] == '.';
        ++e;
      }
      out.push_back(
          {real ? Token::Type::kFloat : Token::Type::kInt, std::string(s.substr(k, e - k)), at});
      k = e;
    } else if (c == '\'' || c == '"') {
      std::string v;
      size_t e = k + 1;
      for (; e < s.size() && s[e] != c; ++e) {
        if (s[e] == '\\' && e + 1 < s.size()) {
          const char n = s[++e];
          v += n == 'n' ? '\n' : n == 't' ? '\t' : n == 'r' ? '\r' : n;
        } else {
          v += s[e];
        }
      }
      if (e >= s.size()) failer.at(at, "a string is never closed");
      out.push_back({Token::Type::kString, v, at});
      k = e + 1;
    } else {
      static constexpr std::string_view kTwo[] = {"==", "!=", "<=", ">=", "//", "**"};
      std::string op(1, c);
      for (const std::string_view two : kTwo) {
        if (s.substr(k, 2) == two) op = std::string(two);
      }
      if (std::string_view("()[]{},.:|=<>+-*/%~!").find(c) == std::string_view::npos) {
        failer.at(at, "unexpected character '{}'", c);
      }
      out.push_back({Token::Type::kOp, op, at});
      k += op.size();
    }
  }
  out.push_back({Token::Type::kEnd, "", base + s.size()});
  return out;
}

struct Expr {
  enum class Type {
    kLiteral,
    kName,
    kList,
    kDict,
    kAttr,
    kIndex,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kUnary,
    kBinary,
    kIf
  } type;
  Value literal;
  std::string name;                         // name, attribute, operator, filter or test
  std::vector<std::unique_ptr<Expr>> args;  // operands, in order
  bool negate = false;                      // `is not`
  size_t at = 0;
};
using ExprPtr = std::unique_ptr<Expr>;

class ExprParser {
 public:
  ExprParser(std::vector<Token> tokens, const Failer& failer)
      : t_(std::move(tokens)), failer_(failer) {}

  // Nesting is bounded: a hostile template must not exhaust the stack.
  ExprPtr expression() {
    if (++depth_ > kMaxDepth) failer_.at(peek().at, "expressions nest deeper than {}", kMaxDepth);
    ExprPtr e = ternary();
    --depth_;
    return e;
  }
  const Token& peek() const { return t_[k_]; }
  bool at_end() const { return t_[k_].type == Token::Type::kEnd; }
  bool name_is(std::string_view n) const {
    return t_[k_].type == Token::Type::kName && t_[k_].text == n;
  }
  bool op_is(std::string_view op) const {
    return t_[k_].type == Token::Type::kOp && t_[k_].text == op;
  }
  Token take() { return t_[k_++]; }
  void expect_op(std::string_view op) {
    if (!op_is(op)) failer_.at(peek().at, "expected '{}', found '{}'", op, peek().text);
    ++k_;
  }
  std::string expect_name() {
    if (peek().type != Token::Type::kName) {
      failer_.at(peek().at, "expected a name, found '{}'", peek().text);
    }
    return take().text;
  }
  void expect_end() {
    if (!at_end()) failer_.at(peek().at, "unexpected '{}'", peek().text);
  }

 private:
  ExprPtr node(Expr::Type type, size_t at, std::string name = {}) {
    auto e = std::make_unique<Expr>();
    e->type = type;
    e->name = std::move(name);
    e->at = at;
    return e;
  }
  ExprPtr binary(std::string op, ExprPtr a, ExprPtr b, size_t at) {
    ExprPtr e = node(Expr::Type::kBinary, at, std::move(op));
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }
  ExprPtr ternary() {
    ExprPtr value = or_expr();
    if (name_is("if")) {
      const size_t at = take().at;
      ExprPtr cond = or_expr();
      ExprPtr e = node(Expr::Type::kIf, at);
      ExprPtr otherwise;
      if (name_is("else")) {
        take();
        otherwise = ternary();
      } else {
        otherwise = node(Expr::Type::kLiteral, at);  // undefined
      }
      e->args.push_back(std::move(cond));
      e->args.push_back(std::move(value));
      e->args.push_back(std::move(otherwise));
      return e;
    }
    return value;
  }
  ExprPtr or_expr() {
    ExprPtr a = and_expr();
    while (name_is("or")) {
      const size_t at = take().at;
      a = binary("or", std::move(a), and_expr(), at);
    }
    return a;
  }
  ExprPtr and_expr() {
    ExprPtr a = not_expr();
    while (name_is("and")) {
      const size_t at = take().at;
      a = binary("and", std::move(a), not_expr(), at);
    }
    return a;
  }
  ExprPtr not_expr() {
    if (name_is("not")) {
      const size_t at = take().at;
      ExprPtr e = node(Expr::Type::kUnary, at, "not");
      e->args.push_back(expression_at_not());
      return e;
    }
    return comparison();
  }
  ExprPtr comparison() {
    ExprPtr a = concat();
    for (;;) {
      static constexpr std::string_view kOps[] = {"==", "!=", "<", ">", "<=", ">="};
      bool matched = false;
      for (const std::string_view op : kOps) {
        if (op_is(op)) {
          const size_t at = take().at;
          a = binary(std::string(op), std::move(a), concat(), at);
          matched = true;
          break;
        }
      }
      if (matched) continue;
      if (name_is("in")) {
        const size_t at = take().at;
        a = binary("in", std::move(a), concat(), at);
      } else if (name_is("not") && t_[k_ + 1].type == Token::Type::kName &&
                 t_[k_ + 1].text == "in") {
        const size_t at = take().at;
        take();
        ExprPtr e = node(Expr::Type::kUnary, at, "not");
        e->args.push_back(binary("in", std::move(a), concat(), at));
        a = std::move(e);
      } else if (name_is("is")) {
        const size_t at = take().at;
        ExprPtr e = node(Expr::Type::kTest, at);
        if (name_is("not")) {
          take();
          e->negate = true;
        }
        e->name = expect_name();
        e->args.push_back(std::move(a));
        if (peek().type != Token::Type::kEnd && !op_is(")") && !name_is("and") && !name_is("or") &&
            !name_is("else") && !name_is("if") && !op_is(",") && !op_is("]") && !op_is("%") &&
            (peek().type == Token::Type::kString || peek().type == Token::Type::kInt ||
             op_is("("))) {
          if (op_is("(")) {
            take();
            e->args.push_back(expression());
            expect_op(")");
          } else {
            e->args.push_back(primary());
          }
        }
        a = std::move(e);
      } else {
        return a;
      }
    }
  }
  ExprPtr concat() {
    ExprPtr a = additive();
    while (op_is("~")) {
      const size_t at = take().at;
      a = binary("~", std::move(a), additive(), at);
    }
    return a;
  }
  ExprPtr additive() {
    ExprPtr a = multiplicative();
    while (op_is("+") || op_is("-")) {
      const Token op = take();
      a = binary(op.text, std::move(a), multiplicative(), op.at);
    }
    return a;
  }
  ExprPtr multiplicative() {
    ExprPtr a = unary();
    while (op_is("*") || op_is("/") || op_is("//") || op_is("%")) {
      const Token op = take();
      a = binary(op.text, std::move(a), unary(), op.at);
    }
    return a;
  }
  // `not not ...` and `- - ...` count towards the nesting bound too.
  ExprPtr expression_at_not() {
    if (++depth_ > kMaxDepth) failer_.at(peek().at, "expressions nest deeper than {}", kMaxDepth);
    ExprPtr e = not_expr();
    --depth_;
    return e;
  }
  ExprPtr unary() {
    if (op_is("-")) {
      const size_t at = take().at;
      ExprPtr e = node(Expr::Type::kUnary, at, "-");
      if (++depth_ > kMaxDepth) failer_.at(at, "expressions nest deeper than {}", kMaxDepth);
      e->args.push_back(unary());
      --depth_;
      return e;
    }
    return filtered();
  }
  ExprPtr filtered() {
    ExprPtr a = postfix();
    while (op_is("|")) {
      const size_t at = take().at;
      ExprPtr e = node(Expr::Type::kFilter, at, expect_name());
      e->args.push_back(std::move(a));
      if (op_is("(")) arguments(*e);
      a = std::move(e);
    }
    return a;
  }
  void arguments(Expr& call) {
    expect_op("(");
    while (!op_is(")")) {
      if (peek().type == Token::Type::kName && t_[k_ + 1].type == Token::Type::kOp &&
          t_[k_ + 1].text == "=") {
        failer_.at(peek().at, "keyword arguments ('{}=') are not supported", peek().text);
      }
      call.args.push_back(expression());
      if (!op_is(")")) expect_op(",");
    }
    expect_op(")");
  }
  ExprPtr postfix() {
    ExprPtr a = primary();
    for (;;) {
      if (op_is(".")) {
        const size_t at = take().at;
        ExprPtr e = node(Expr::Type::kAttr, at, expect_name());
        e->args.push_back(std::move(a));
        a = std::move(e);
      } else if (op_is("[")) {
        const size_t at = take().at;
        ExprPtr first = op_is(":") ? nullptr : expression();
        if (op_is(":")) {
          take();
          ExprPtr e = node(Expr::Type::kSlice, at);
          e->args.push_back(std::move(a));
          e->args.push_back(first ? std::move(first) : node(Expr::Type::kLiteral, at));
          e->args.push_back(op_is("]") ? node(Expr::Type::kLiteral, at) : expression());
          expect_op("]");
          a = std::move(e);
        } else {
          expect_op("]");
          ExprPtr e = node(Expr::Type::kIndex, at);
          e->args.push_back(std::move(a));
          e->args.push_back(std::move(first));
          a = std::move(e);
        }
      } else if (op_is("(")) {
        ExprPtr e = node(Expr::Type::kCall, peek().at);
        e->args.push_back(std::move(a));
        arguments(*e);
        a = std::move(e);
      } else {
        return a;
      }
    }
  }
  ExprPtr primary() {
    const Token tok = take();
    switch (tok.type) {
      case Token::Type::kString: {
        ExprPtr e = node(Expr::Type::kLiteral, tok.at);
        e->literal = Value::string(tok.text);
        // Adjacent string literals concatenate, as in Python and Jinja.
        while (peek().type == Token::Type::kString) e->literal.s += take().text;
        return e;
      }
      case Token::Type::kInt: {
        ExprPtr e = node(Expr::Type::kLiteral, tok.at);
        int64_t v = 0;
        const char* end = tok.text.data() + tok.text.size();
        const auto [stop, error] = std::from_chars(tok.text.data(), end, v);
        if (error != std::errc() || stop != end) {
          failer_.at(tok.at, "integer '{}' is out of range (64-bit)", tok.text);
        }
        e->literal = Value::integer(v);
        return e;
      }
      case Token::Type::kFloat: {
        ExprPtr e = node(Expr::Type::kLiteral, tok.at);
        char* end = nullptr;
        const double v = std::strtod(tok.text.c_str(), &end);  // too large: inf, as in Python
        if (end != tok.text.c_str() + tok.text.size()) {
          failer_.at(tok.at, "'{}' is not a number", tok.text);
        }
        e->literal = Value::real(v);
        return e;
      }
      case Token::Type::kName: {
        ExprPtr e = node(Expr::Type::kLiteral, tok.at);
        if (tok.text == "true" || tok.text == "True") {
          e->literal = Value::boolean(true);
        } else if (tok.text == "false" || tok.text == "False") {
          e->literal = Value::boolean(false);
        } else if (tok.text == "none" || tok.text == "None") {
          e->literal = Value::none();
        } else {
          e->type = Expr::Type::kName;
          e->name = tok.text;
        }
        return e;
      }
      case Token::Type::kOp:
        if (tok.text == "(") {
          ExprPtr e = expression();
          if (op_is(",")) failer_.at(tok.at, "tuples are not supported");
          expect_op(")");
          return e;
        }
        if (tok.text == "[") {
          ExprPtr e = node(Expr::Type::kList, tok.at);
          while (!op_is("]")) {
            e->args.push_back(expression());
            if (!op_is("]")) expect_op(",");
          }
          expect_op("]");
          return e;
        }
        if (tok.text == "{") {
          ExprPtr e = node(Expr::Type::kDict, tok.at);
          while (!op_is("}")) {
            e->args.push_back(expression());
            expect_op(":");
            e->args.push_back(expression());
            if (!op_is("}")) expect_op(",");
          }
          expect_op("}");
          return e;
        }
        failer_.at(tok.at, "unexpected '{}'", tok.text);
      case Token::Type::kEnd:
        failer_.at(tok.at, "the expression ends too early");
    }
    failer_.at(tok.at, "unexpected '{}'", tok.text);
  }

  static constexpr int kMaxDepth = 100;
  std::vector<Token> t_;
  size_t k_ = 0;
  int depth_ = 0;
  const Failer& failer_;
};

// ---- statements -------------------------------------------------------------------------------

struct Node {
  enum class Type { kText, kOutput, kIf, kFor, kSet } type;
  std::string text;            // kText
  std::vector<ExprPtr> exprs;  // kOutput: [value]; kIf: conditions; kFor: [iterable]; kSet: [value]
  std::vector<std::vector<Node>> bodies;  // kIf: per condition, then else; kFor: body, else
  std::string target;                     // kFor, kSet
  std::string target2;                    // kFor over pairs: `for k, v in ...`
  size_t at = 0;
};

class Parser {
 public:
  Parser(std::vector<Piece> pieces, const Failer& failer)
      : pieces_(std::move(pieces)), failer_(failer) {}

  std::vector<Node> parse() {
    std::vector<Node> out = block({});
    if (k_ < pieces_.size()) failer_.at(pieces_[k_].at, "'{}' without its opening tag", word());
    return out;
  }

 private:
  std::string word() const {
    const std::string& b = pieces_[k_].body;
    const size_t s = b.find_first_not_of(" \t\r\n");
    if (s == std::string::npos) return "";
    const size_t e = b.find_first_of(" \t\r\n", s);
    return b.substr(s, e == std::string::npos ? std::string::npos : e - s);
  }
  ExprParser expr_parser(const std::string& body, size_t at, size_t skip) {
    return ExprParser(tokenize(std::string_view(body).substr(skip), at, failer_), failer_);
  }
  // Nodes up to a statement whose first word is in `ends` (left unconsumed).
  std::vector<Node> block(const std::vector<std::string_view>& ends) {
    if (++depth_ > 100)
      failer_.at(pieces_[std::min(k_, pieces_.size() - 1)].at, "blocks nest deeper than 100");
    struct Leave {
      int& depth;
      ~Leave() { --depth; }
    } leave{depth_};
    std::vector<Node> out;
    while (k_ < pieces_.size()) {
      const Piece& p = pieces_[k_];
      if (p.type == Piece::Type::kText) {
        out.push_back({Node::Type::kText, p.body, {}, {}, {}, {}, p.at});
        ++k_;
        continue;
      }
      if (p.type == Piece::Type::kOutput) {
        ExprParser ep = expr_parser(p.body, p.at + 2, 0);
        Node n{Node::Type::kOutput, {}, {}, {}, {}, {}, p.at};
        n.exprs.push_back(ep.expression());
        ep.expect_end();
        out.push_back(std::move(n));
        ++k_;
        continue;
      }
      const std::string w = word();
      for (const std::string_view e : ends) {
        if (w == e) return out;
      }
      const size_t skip = p.body.find(w) + w.size();
      if (w == "if") {
        out.push_back(if_node(skip));
      } else if (w == "for") {
        out.push_back(for_node(skip));
      } else if (w == "set") {
        out.push_back(set_node(skip));
      } else if (w == "endif" || w == "endfor" || w == "elif" || w == "else") {
        return out;  // the caller reports it when it is not the one it waits for
      } else {
        failer_.at(p.at, "'{{% {} %}}' is not supported (chat templates may use if, for, set)",
                   printable(w));
      }
    }
    return out;
  }
  void expect(std::string_view w, size_t open_at) {
    if (k_ >= pieces_.size() || pieces_[k_].type != Piece::Type::kStatement || word() != w) {
      failer_.at(open_at, "this block is never closed with '{{% {} %}}'", w);
    }
  }
  Node if_node(size_t skip) {
    const Piece& p = pieces_[k_];
    Node n{Node::Type::kIf, {}, {}, {}, {}, {}, p.at};
    ExprParser ep = expr_parser(p.body, p.at + 2 + skip, skip);
    n.exprs.push_back(ep.expression());
    ep.expect_end();
    ++k_;
    n.bodies.push_back(block({"elif", "else", "endif"}));
    for (;;) {
      if (k_ >= pieces_.size()) failer_.at(p.at, "this block is never closed with '{{% endif %}}'");
      const std::string w = word();
      const Piece& q = pieces_[k_];
      const size_t qskip = q.body.find(w) + w.size();
      if (w == "elif") {
        ExprParser eq = expr_parser(q.body, q.at + 2 + qskip, qskip);
        n.exprs.push_back(eq.expression());
        eq.expect_end();
        ++k_;
        n.bodies.push_back(block({"elif", "else", "endif"}));
      } else if (w == "else") {
        ++k_;
        n.bodies.push_back(block({"endif"}));
        expect("endif", p.at);
        ++k_;
        return n;
      } else if (w == "endif") {
        ++k_;
        return n;
      } else {
        failer_.at(q.at, "'{}' inside an if block that is not closed", printable(w));
      }
    }
  }
  Node for_node(size_t skip) {
    const Piece& p = pieces_[k_];
    Node n{Node::Type::kFor, {}, {}, {}, {}, {}, p.at};
    ExprParser ep = expr_parser(p.body, p.at + 2 + skip, skip);
    n.target = ep.expect_name();
    if (ep.op_is(",")) {
      ep.take();
      n.target2 = ep.expect_name();
    }
    if (!ep.name_is("in")) failer_.at(p.at, "expected 'in' in the for loop");
    ep.take();
    n.exprs.push_back(ep.expression());
    if (ep.name_is("recursive")) failer_.at(p.at, "recursive loops are not supported");
    ep.expect_end();
    ++k_;
    n.bodies.push_back(block({"else", "endfor"}));
    if (k_ < pieces_.size() && word() == "else") {
      ++k_;
      n.bodies.push_back(block({"endfor"}));
    }
    expect("endfor", p.at);
    ++k_;
    return n;
  }
  Node set_node(size_t skip) {
    const Piece& p = pieces_[k_];
    Node n{Node::Type::kSet, {}, {}, {}, {}, {}, p.at};
    ExprParser ep = expr_parser(p.body, p.at + 2 + skip, skip);
    n.target = ep.expect_name();
    if (ep.op_is(".")) failer_.at(p.at, "setting an attribute (namespace) is not supported");
    if (!ep.op_is("=")) failer_.at(p.at, "block '{{% set %}}' (without '=') is not supported");
    ep.take();
    n.exprs.push_back(ep.expression());
    ep.expect_end();
    ++k_;
    return n;
  }

  std::vector<Piece> pieces_;
  size_t k_ = 0;
  int depth_ = 0;
  const Failer& failer_;
};

// ---- evaluation -------------------------------------------------------------------------------

class Renderer {
 public:
  Renderer(const Failer& failer) : failer_(failer) { scopes_.emplace_back(); }

  void define(const std::string& name, Value v) { scopes_.front()[name] = std::move(v); }

  void run(const std::vector<Node>& nodes, std::string& out) {
    for (const Node& n : nodes) {
      // Bounded work: a hostile template must not loop for hours or fill memory.
      if (++steps_ > kMaxSteps || out.size() > kMaxOutput) {
        failer_.at(n.at, "the template renders more than {} steps or {} MiB", kMaxSteps,
                   kMaxOutput >> 20);
      }
      switch (n.type) {
        case Node::Type::kText:
          out += n.text;
          break;
        case Node::Type::kOutput:
          out += text(eval(*n.exprs[0]));
          break;
        case Node::Type::kSet:
          scopes_.back()[n.target] = eval(*n.exprs[0]);
          break;
        case Node::Type::kIf: {
          size_t branch = 0;
          while (branch < n.exprs.size() && !truthy(eval(*n.exprs[branch]))) ++branch;
          if (branch < n.bodies.size()) run(n.bodies[branch], out);
          break;
        }
        case Node::Type::kFor:
          loop(n, out);
          break;
      }
    }
  }

 private:
  void loop(const Node& n, std::string& out) {
    const Value items = eval(*n.exprs[0]);
    List list;
    if (items.is(Kind::kList)) {
      list = *items.list;
    } else if (items.is(Kind::kDict)) {
      for (const auto& [k, v] : *items.dict) list.push_back(Value::string(k));
    } else if (items.is(Kind::kString)) {
      for (const char c : items.s) list.push_back(Value::string(std::string(1, c)));
    } else if (!items.is(Kind::kUndefined) && !items.is(Kind::kNone)) {
      failer_.at(n.at, "cannot loop over a {}", kind_name(items));
    }
    if (list.empty()) {
      if (n.bodies.size() > 1) run(n.bodies[1], out);
      return;
    }
    for (size_t k = 0; k < list.size(); ++k) {
      scopes_.emplace_back();
      auto& scope = scopes_.back();
      if (!n.target2.empty()) {
        const Value& pair = list[k];
        if (!pair.is(Kind::kList) || pair.list->size() != 2) {
          failer_.at(n.at, "'for {}, {}' over items that are not pairs", n.target, n.target2);
        }
        scope[n.target] = (*pair.list)[0];
        scope[n.target2] = (*pair.list)[1];
      } else {
        scope[n.target] = list[k];
      }
      const auto n_items = static_cast<int64_t>(list.size());
      const auto index = static_cast<int64_t>(k);
      scope["loop"] = Value::of_dict({{"index", Value::integer(index + 1)},
                                      {"index0", Value::integer(index)},
                                      {"revindex", Value::integer(n_items - index)},
                                      {"revindex0", Value::integer(n_items - index - 1)},
                                      {"first", Value::boolean(k == 0)},
                                      {"last", Value::boolean(k + 1 == list.size())},
                                      {"length", Value::integer(n_items)}});
      run(n.bodies[0], out);
      scopes_.pop_back();
    }
  }

  static std::string kind_name(const Value& v) {
    switch (v.kind) {
      case Kind::kUndefined:
        return "undefined value";
      case Kind::kNone:
        return "none";
      case Kind::kBool:
        return "boolean";
      case Kind::kInt:
        return "integer";
      case Kind::kFloat:
        return "float";
      case Kind::kString:
        return "string";
      case Kind::kList:
        return "list";
      case Kind::kDict:
        return "mapping";
    }
    return "value";
  }

  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      const auto found = it->find(name);
      if (found != it->end()) return found->second;
    }
    return {};
  }

  Value eval(const Expr& e) {
    switch (e.type) {
      case Expr::Type::kLiteral:
        return e.literal;
      case Expr::Type::kName:
        return lookup(e.name);
      case Expr::Type::kList: {
        List items;
        for (const auto& a : e.args) items.push_back(eval(*a));
        return Value::of_list(std::move(items));
      }
      case Expr::Type::kDict: {
        Dict items;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          const Value key = eval(*e.args[k]);
          if (!key.is(Kind::kString)) failer_.at(e.at, "mapping keys must be strings");
          items.emplace_back(key.s, eval(*e.args[k + 1]));
        }
        return Value::of_dict(std::move(items));
      }
      case Expr::Type::kAttr:
        return attribute(eval(*e.args[0]), e.name);
      case Expr::Type::kIndex:
        return index(eval(*e.args[0]), eval(*e.args[1]), e.at);
      case Expr::Type::kSlice:
        return slice(eval(*e.args[0]), eval(*e.args[1]), eval(*e.args[2]), e.at);
      case Expr::Type::kCall:
        return call(e);
      case Expr::Type::kFilter:
        return filter(e);
      case Expr::Type::kTest: {
        const bool r = test(e);
        return Value::boolean(e.negate ? !r : r);
      }
      case Expr::Type::kUnary: {
        const Value v = eval(*e.args[0]);
        if (e.name == "not") return Value::boolean(!truthy(v));
        if (v.is(Kind::kInt)) return Value::integer(-v.i);
        if (v.number()) return Value::real(-v.as_double());
        failer_.at(e.at, "'-' of a {}", kind_name(v));
      }
      case Expr::Type::kBinary:
        return binary(e);
      case Expr::Type::kIf:
        return truthy(eval(*e.args[0])) ? eval(*e.args[1]) : eval(*e.args[2]);
    }
    return {};
  }

  Value attribute(const Value& v, const std::string& name) {
    if (const Value* m = v.member(name)) return *m;
    // A method: resolved by the call around it.
    Value method = Value::with(Kind::kUndefined);
    method.s = name;
    method.list = std::make_shared<List>(List{v});
    return method;
  }

  Value index(const Value& v, const Value& i, size_t at) {
    if (v.is(Kind::kDict)) {
      if (!i.is(Kind::kString)) return {};
      const Value* m = v.member(i.s);
      return m != nullptr ? *m : Value{};
    }
    if ((v.is(Kind::kList) || v.is(Kind::kString)) && i.is(Kind::kInt)) {
      const auto n = static_cast<int64_t>(v.is(Kind::kList) ? v.list->size() : v.s.size());
      const int64_t k = i.i < 0 ? i.i + n : i.i;
      if (k < 0 || k >= n) return {};
      return v.is(Kind::kList) ? (*v.list)[static_cast<size_t>(k)]
                               : Value::string(std::string(1, v.s[static_cast<size_t>(k)]));
    }
    if (v.is(Kind::kUndefined)) failer_.at(at, "indexing an undefined value");
    return {};
  }

  Value slice(const Value& v, const Value& from, const Value& to, size_t at) {
    if (!v.is(Kind::kList) && !v.is(Kind::kString)) failer_.at(at, "slicing a {}", kind_name(v));
    const auto n = static_cast<int64_t>(v.is(Kind::kList) ? v.list->size() : v.s.size());
    const auto bound = [&](const Value& b, int64_t fallback) {
      if (!b.is(Kind::kInt)) return fallback;
      const int64_t k = b.i < 0 ? b.i + n : b.i;
      return std::clamp<int64_t>(k, 0, n);
    };
    const int64_t a = bound(from, 0);
    const int64_t b = std::max(a, bound(to, n));
    if (v.is(Kind::kString))
      return Value::string(v.s.substr(static_cast<size_t>(a), static_cast<size_t>(b - a)));
    return Value::of_list(List(v.list->begin() + a, v.list->begin() + b));
  }

  std::vector<Value> evaluated_args(const Expr& e, size_t first) {
    std::vector<Value> out;
    for (size_t k = first; k < e.args.size(); ++k) out.push_back(eval(*e.args[k]));
    return out;
  }

  Value call(const Expr& e) {
    const Expr& callee = *e.args[0];
    std::vector<Value> args = evaluated_args(e, 1);
    if (callee.type == Expr::Type::kName && callee.name == "raise_exception") {
      failer_.at(e.at, "the template refused the conversation: {}",
                 args.empty() ? std::string() : printable(text(args[0])));
    }
    if (callee.type == Expr::Type::kName && callee.name == "range") {
      const int64_t from = args.size() > 1 ? args[0].i : 0;
      const int64_t to = args.empty() ? 0 : args.size() > 1 ? args[1].i : args[0].i;
      List items;
      for (int64_t k = from; k < to && items.size() < 100000; ++k)
        items.push_back(Value::integer(k));
      return Value::of_list(std::move(items));
    }
    if (callee.type != Expr::Type::kAttr) {
      failer_.at(e.at, "calling '{}' is not supported",
                 callee.type == Expr::Type::kName ? callee.name : std::string("this"));
    }
    const Value self = eval(*callee.args[0]);
    return method(self, callee.name, args, e.at);
  }

  static std::string strip(const std::string& s, const std::string& chars, bool left, bool right) {
    size_t a = 0;
    size_t b = s.size();
    while (left && a < b && chars.find(s[a]) != std::string::npos) ++a;
    while (right && b > a && chars.find(s[b - 1]) != std::string::npos) --b;
    return s.substr(a, b - a);
  }

  Value method(const Value& self, const std::string& name, const std::vector<Value>& args,
               size_t at) {
    if (self.is(Kind::kString)) {
      const std::string chars =
          !args.empty() && args[0].is(Kind::kString) ? args[0].s : " \t\r\n\f\v";
      if (name == "strip") return Value::string(strip(self.s, chars, true, true));
      if (name == "lstrip") return Value::string(strip(self.s, chars, true, false));
      if (name == "rstrip") return Value::string(strip(self.s, chars, false, true));
      if (name == "upper" || name == "lower") {
        std::string s = self.s;
        for (char& c : s)
          c = static_cast<char>(name == "upper" ? std::toupper(static_cast<unsigned char>(c))
                                                : std::tolower(static_cast<unsigned char>(c)));
        return Value::string(s);
      }
      if ((name == "startswith" || name == "endswith") && !args.empty() &&
          args[0].is(Kind::kString)) {
        const std::string& x = args[0].s;
        return Value::boolean(name == "startswith" ? self.s.starts_with(x) : self.s.ends_with(x));
      }
      if (name == "split") {
        List parts;
        if (args.empty()) {  // Python: runs of whitespace, no empty parts
          size_t pos = 0;
          for (;;) {
            pos = self.s.find_first_not_of(" \t\r\n\f\v", pos);
            if (pos == std::string::npos) break;
            const size_t next = self.s.find_first_of(" \t\r\n\f\v", pos);
            parts.push_back(Value::string(self.s.substr(pos, next - pos)));
            pos = next;
          }
          return Value::of_list(std::move(parts));
        }
        if (!args[0].is(Kind::kString) || args[0].s.empty()) {
          failer_.at(at, "split() needs a non-empty string separator");
        }
        const std::string& sep = args[0].s;
        for (size_t pos = 0;;) {
          const size_t next = self.s.find(sep, pos);
          parts.push_back(Value::string(
              self.s.substr(pos, next == std::string::npos ? std::string::npos : next - pos)));
          if (next == std::string::npos) break;
          pos = next + sep.size();
        }
        return Value::of_list(std::move(parts));
      }
      if (name == "replace" && args.size() == 2 && args[0].is(Kind::kString) &&
          args[1].is(Kind::kString) && !args[0].s.empty()) {
        std::string s = self.s;
        for (size_t pos = 0; (pos = s.find(args[0].s, pos)) != std::string::npos;
             pos += args[1].s.size()) {
          s.replace(pos, args[0].s.size(), args[1].s);
        }
        return Value::string(s);
      }
    }
    if (self.is(Kind::kDict)) {
      if (name == "get" && !args.empty() && args[0].is(Kind::kString)) {
        const Value* m = self.member(args[0].s);
        return m != nullptr ? *m : args.size() > 1 ? args[1] : Value::none();
      }
      if (name == "items" || name == "keys" || name == "values") {
        List out;
        for (const auto& [k, v] : *self.dict) {
          out.push_back(name == "keys"     ? Value::string(k)
                        : name == "values" ? v
                                           : Value::of_list({Value::string(k), v}));
        }
        return Value::of_list(std::move(out));
      }
    }
    failer_.at(at, "method '{}' of a {} is not supported", printable(name), kind_name(self));
  }

  Value filter(const Expr& e) {
    const Value v = eval(*e.args[0]);
    const std::vector<Value> args = evaluated_args(e, 1);
    const std::string& f = e.name;
    if (f == "trim") return Value::string(strip(text(v), " \t\r\n\f\v", true, true));
    if (f == "upper" || f == "lower") return method(Value::string(text(v)), f, {}, e.at);
    if (f == "string") return Value::string(text(v));
    if (f == "length" || f == "count") {
      if (v.is(Kind::kString)) return Value::integer(static_cast<int64_t>(v.s.size()));
      if (v.is(Kind::kList)) return Value::integer(static_cast<int64_t>(v.list->size()));
      if (v.is(Kind::kDict)) return Value::integer(static_cast<int64_t>(v.dict->size()));
      failer_.at(e.at, "'length' of a {}", kind_name(v));
    }
    if ((f == "first" || f == "last") && v.is(Kind::kList)) {
      if (v.list->empty()) return {};
      return f == "first" ? v.list->front() : v.list->back();
    }
    if (f == "join" && v.is(Kind::kList)) {
      std::string out;
      const std::string sep = args.empty() ? "" : text(args[0]);
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? sep : "") + text((*v.list)[k]);
      return Value::string(out);
    }
    if (f == "default" || f == "d") {
      return v.is(Kind::kUndefined) ? (args.empty() ? Value::string("") : args[0]) : v;
    }
    if (f == "capitalize") {
      std::string s = text(v);
      for (size_t k = 0; k < s.size(); ++k) {
        s[k] = static_cast<char>(k == 0 ? std::toupper(static_cast<unsigned char>(s[k]))
                                        : std::tolower(static_cast<unsigned char>(s[k])));
      }
      return Value::string(s);
    }
    if (f == "int")
      return Value::integer(v.is(Kind::kString) ? std::atoll(v.s.c_str())
                                                : static_cast<int64_t>(v.as_double()));
    failer_.at(e.at, "filter '{}' is not supported", printable(f));
  }

  bool test(const Expr& e) {
    const Value v = eval(*e.args[0]);
    const std::string& t = e.name;
    if (t == "defined") return !v.is(Kind::kUndefined);
    if (t == "undefined") return v.is(Kind::kUndefined);
    if (t == "none") return v.is(Kind::kNone);
    if (t == "string") return v.is(Kind::kString);
    if (t == "number") return v.is(Kind::kInt) || v.is(Kind::kFloat);
    if (t == "integer") return v.is(Kind::kInt);
    if (t == "boolean") return v.is(Kind::kBool);
    if (t == "mapping") return v.is(Kind::kDict);
    if (t == "sequence" || t == "iterable") {
      return v.is(Kind::kList) || v.is(Kind::kString) || v.is(Kind::kDict);
    }
    if (t == "true") return v.is(Kind::kBool) && v.b;
    if (t == "false") return v.is(Kind::kBool) && !v.b;
    if (t == "odd" || t == "even") return v.is(Kind::kInt) && (v.i % 2 != 0) == (t == "odd");
    if ((t == "equalto" || t == "eq" || t == "sameas") && e.args.size() > 1) {
      return equal(v, eval(*e.args[1]));
    }
    if (t == "divisibleby" && e.args.size() > 1) {
      const Value d = eval(*e.args[1]);
      return v.is(Kind::kInt) && d.is(Kind::kInt) && d.i != 0 && v.i % d.i == 0;
    }
    failer_.at(e.at, "test 'is {}' is not supported", printable(t));
  }

  Value binary(const Expr& e) {
    const std::string& op = e.name;
    if (op == "and") {
      const Value a = eval(*e.args[0]);
      return truthy(a) ? eval(*e.args[1]) : a;
    }
    if (op == "or") {
      const Value a = eval(*e.args[0]);
      return truthy(a) ? a : eval(*e.args[1]);
    }
    const Value a = eval(*e.args[0]);
    const Value b = eval(*e.args[1]);
    if (op == "~") return Value::string(text(a) + text(b));
    if (op == "==") return Value::boolean(equal(a, b));
    if (op == "!=") return Value::boolean(!equal(a, b));
    if (op == "in") {
      if (b.is(Kind::kString) && a.is(Kind::kString))
        return Value::boolean(b.s.find(a.s) != std::string::npos);
      if (b.is(Kind::kList)) {
        for (const Value& x : *b.list) {
          if (equal(a, x)) return Value::boolean(true);
        }
        return Value::boolean(false);
      }
      if (b.is(Kind::kDict)) return Value::boolean(a.is(Kind::kString) && b.member(a.s) != nullptr);
      failer_.at(e.at, "'in' a {}", kind_name(b));
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int c = 0;
      if (a.number() && b.number()) {
        c = a.as_double() < b.as_double() ? -1 : a.as_double() > b.as_double() ? 1 : 0;
      } else if (a.is(Kind::kString) && b.is(Kind::kString)) {
        c = a.s.compare(b.s);
      } else {
        failer_.at(e.at, "comparing a {} with a {}", kind_name(a), kind_name(b));
      }
      return Value::boolean(op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0);
    }
    if (op == "+") {
      if (a.is(Kind::kString) && b.is(Kind::kString)) return Value::string(a.s + b.s);
      if (a.is(Kind::kList) && b.is(Kind::kList)) {
        List items = *a.list;
        items.insert(items.end(), b.list->begin(), b.list->end());
        return Value::of_list(std::move(items));
      }
    }
    if (a.number() && b.number()) {
      const bool ints = !a.is(Kind::kFloat) && !b.is(Kind::kFloat);
      const double x = a.as_double();
      const double y = b.as_double();
      if (op == "+") return ints ? Value::integer(a.i + b.i) : Value::real(x + y);
      if (op == "-") return ints ? Value::integer(a.i - b.i) : Value::real(x - y);
      if (op == "*") return ints ? Value::integer(a.i * b.i) : Value::real(x * y);
      if (y == 0 && (op == "/" || op == "//" || op == "%")) failer_.at(e.at, "division by zero");
      if (op == "/") return Value::real(x / y);
      if (op == "//")
        return ints ? Value::integer(static_cast<int64_t>(std::floor(x / y)))
                    : Value::real(std::floor(x / y));
      if (op == "%")
        return ints ? Value::integer(((a.i % b.i) + b.i) % b.i) : Value::real(std::fmod(x, y));
    }
    if (op == "*" && a.is(Kind::kString) && b.is(Kind::kInt)) {
      std::string out;
      for (int64_t k = 0; k < b.i && out.size() < (1u << 20); ++k) out += a.s;
      return Value::string(out);
    }
    failer_.at(e.at, "'{}' of a {} and a {}", op, kind_name(a), kind_name(b));
  }

  static constexpr int64_t kMaxSteps = 10'000'000;
  static constexpr size_t kMaxOutput = size_t{16} << 20;
  const Failer& failer_;
  std::vector<std::map<std::string, Value>> scopes_;
  int64_t steps_ = 0;
};

}  // namespace

std::string render_chat_template(std::string_view source_text, const std::string& source,
                                 const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt,
                                 const std::map<std::string, std::string>& variables) {
  const Failer failer(source, source_text);
  const std::vector<Node> nodes = Parser(lex(source_text, failer), failer).parse();
  Renderer renderer(failer);
  List list;
  for (const ChatMessage& m : messages) {
    list.push_back(
        Value::of_dict({{"role", Value::string(m.role)}, {"content", Value::string(m.content)}}));
  }
  renderer.define("messages", Value::of_list(std::move(list)));
  renderer.define("add_generation_prompt", Value::boolean(add_generation_prompt));
  for (const auto& [name, value] : variables) renderer.define(name, Value::string(value));
  std::string out;
  renderer.run(nodes, out);
  return out;
}

}  // namespace tpe::tokenizer
