"""Stage 1, parse: recipe text -> `ast.Program`.

One cached LALR parser built from grammar/alg.lark with positions propagated; `_ToAst`
turns the tree into frozen AST nodes with spans. Lark's exceptions become
`AlgSyntaxError`s with a position and a readable list of what was expected; input that
ends too early is flagged `incomplete` so the REPL can ask for more.

The tree is turned into the AST without recursion (an explicit stack), so no input can
overflow Python's stack here. Nesting is limited to `MAX_NESTING` levels (brackets,
calls, unary operators, lambdas, ...); a chain of binary operators `a + b + ... + z` is
one level however long it is, and the checker folds such chains without recursion.
"""

from __future__ import annotations

import ast as pyast
import hashlib
import os
import re
import sys
import tempfile
from functools import cache
from typing import Any

import lark
from lark import Lark, Token, Tree

from . import ast
from .caches import cache_path
from .errors import AlgSyntaxError
from .resources import grammar_path
from .source import Source, Span

# How deeply a recipe's expressions may nest (README, "Limits"): each bracket, call,
# index, unary operator or lambda is a level; a chain `a + b - c * d` is one level.
MAX_NESTING = 200


class _BracketNewlines:
    """Postlexer: a newline inside (), [] is whitespace, not a statement separator."""

    always_accept = ("_NL",)
    _OPEN = {"LPAR", "LSQB"}
    _CLOSE = {"RPAR", "RSQB"}

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type in self._OPEN:
                depth += 1
            elif tok.type in self._CLOSE:
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth > 0:
                continue
            yield tok


@cache
def _lark() -> Lark:
    """The parser. Building its LALR tables takes about a third of a second, most of a
    short command's start, so they are kept in the `parser` cache (caches.py), in a file
    named after what they are built from; lark itself checks the grammar's digest when it
    loads one. A file is written under a temporary name and renamed into place, so a
    concurrent start reads a whole file or none; a failure to write it is no error."""
    path = grammar_path()
    options: dict[str, Any] = dict(parser="lalr", propagate_positions=True, postlex=_BracketNewlines(),
                                   maybe_placeholders=True)
    text = path.read_text(encoding="utf-8")
    key = hashlib.sha256(f"{text}\0{lark.__version__}\0{sys.version_info[:2]}".encode()).hexdigest()[:24]
    target = cache_path("parser") / f"alg-{key}.lark"
    if target.is_file():
        return Lark.open(str(path), cache=str(target), **options)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
    except OSError:
        return Lark.open(str(path), **options)
    os.unlink(tmp)  # lark writes the file itself (an empty one would read as corrupt)
    parser = Lark.open(str(path), cache=tmp, **options)
    try:
        os.replace(tmp, target)
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return parser


_PRETTY = {
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','",
    "EQUAL": "'='", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'",
    "COLON": "':'", "VBAR": "'|'", "SEMICOLON": "';'", "DOT": "'.'", "NAME": "a name", "NUMBER": "a number",
    "STRING": "a string", "_NL": "a newline", "$END": "the end of input",
}


def _pretty(term: str) -> str:
    if term in _PRETTY:
        return _PRETTY[term]
    try:
        pattern = _lark().get_terminal(term).pattern
        if isinstance(pattern, lark.lexer.PatternStr):
            return f"'{pattern.value}'"
    except KeyError:
        pass
    return term.lower()


# terminals that can begin an expression, summarised in messages as "an expression"
_EXPR_START = {"a name", "a number", "a string", "'('", "'['", "'-'", "'+'", "'not'", "'true'",
               "'false'", "'none'", "'lambda'"}


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "end of input"
    if tok.type == "_NL":
        return "newline"
    return f"'{tok}'"


def parse(text: str | Source, name: str = "<string>") -> ast.Program:
    """Parse recipe text into an `ast.Program`; raises `AlgSyntaxError`."""
    source = text if isinstance(text, Source) else Source(text, name)
    masked, literals = _literal_lists(source)
    try:
        tree = _lark().parse(masked)
    except lark.exceptions.UnexpectedInput as e:
        raise _syntax_error(source, e) from None
    except RecursionError:  # a last resort: lark's parser itself does not recurse
        raise AlgSyntaxError("the recipe is nested too deeply to parse",
                             Span(source, 0, min(1, len(source.text)))) from None
    return _ToAst(source, literals).transform(tree)


def parse_expr(text: str | Source, name: str = "<string>") -> ast.Node:
    """Parse a single expression (for `--set` values and REPL commands)."""
    program = parse(text, name)
    if len(program.stmts) != 1 or not isinstance(program.stmts[0], ast.ExprStmt):
        source = text if isinstance(text, Source) else Source(text, name)
        raise AlgSyntaxError("expected a single expression", Span(source, 0, len(source.text)))
    return program.stmts[0].expr


def _syntax_error(source: Source, e: lark.exceptions.UnexpectedInput) -> AlgSyntaxError:
    pos = getattr(e, "pos_in_stream", None) or 0
    incomplete = False
    unclosed = None
    if isinstance(e, lark.exceptions.UnexpectedToken):
        tok = e.token
        at_end = not source.text[tok.start_pos :].strip() if tok.type == "_NL" else False
        if tok.type == "$END" or at_end:
            incomplete = True
            pos = len(source.text.rstrip())
            span = Span(source, max(0, pos - 1), pos)
        else:
            span = Span(source, tok.start_pos, tok.end_pos or tok.start_pos + 1)
        expected = {_pretty(t) for t in e.expected if not t.startswith("__")}
        if {"a name", "a number", "a string"} <= expected:
            expected = (expected - _EXPR_START) | {"an expression"}
        opener = _open_bracket(source.text[: tok.start_pos])
        if opener and "','" in expected:
            # inside a call or list, operators would also do, but the separator is the fix
            expected = {"','", "')'" if opener == "(" else "']'"}
            if source.line_col(opener.start_pos)[0] < source.line_col(tok.start_pos)[0]:
                unclosed = Span(source, opener.start_pos, opener.end_pos)
        elif not opener and "a newline" in expected and len(expected) > 3:
            expected = {"an operator", "a newline", "';'"}
        elif len(expected) > 1:
            expected.discard("a newline")  # accepted by the postlexer, rarely the fix
        expected = sorted(expected)
        msg = f"unexpected {_describe(tok)}"
        if expected and len(expected) <= 8:
            msg += "; expected " + (", ".join(expected[:-1]) + " or " if len(expected) > 1 else "")
            msg += expected[-1]
    elif isinstance(e, lark.exceptions.UnexpectedCharacters):
        ch = source.text[pos] if pos < len(source.text) else ""
        span = Span(source, pos, pos + 1)
        if ch in "\"'":
            msg = "unterminated string"
        else:
            msg = f"unexpected character {ch!r}"
    else:  # UnexpectedEOF
        incomplete = True
        pos = len(source.text.rstrip())
        span = Span(source, max(0, pos - 1), pos)
        msg = "unexpected end of input"
    err = AlgSyntaxError(msg, span)
    if unclosed is not None:
        err.with_note(f"the '{unclosed.text()}' opened here is not closed", unclosed)
    err.incomplete = incomplete  # type: ignore[attr-defined]
    return err


def _open_bracket(prefix: str) -> Token | None:
    """The innermost bracket still open at the end of `prefix`, or None."""
    stack: list[Token] = []
    try:
        for tok in _lark().lex(prefix, dont_ignore=False):
            if tok.type in ("LPAR", "LSQB"):
                stack.append(tok)
            elif tok.type in ("RPAR", "RSQB") and stack:
                stack.pop()
    except lark.exceptions.LarkError:
        pass
    return stack[-1] if stack else None


def _span(source: Source, meta_or_tok) -> Span:
    if isinstance(meta_or_tok, Token):
        return Span(source, meta_or_tok.start_pos, meta_or_tok.end_pos)
    return Span(source, meta_or_tok.start_pos, meta_or_tok.end_pos)


_KEYWORDS = {"def", "use", "import", "as", "lambda", "for", "in", "if", "else", "and", "or", "not",
             "true", "false", "none"}


# rules that only gather their children for the rule above: no nesting level of their own
_GATHER = {"args", "params", "lparams", "comp_op"}
_BINOPS = {"add", "sub", "mul", "div", "and_op", "or_op"}


class _ToAst:
    """lark tree -> AST, bottom-up with an explicit stack (see the module docstring)."""

    def __init__(self, source: Source, literals: dict[int, ast.List] | None = None):
        self.source = source
        self.literals = literals or {}

    def transform(self, tree: Tree) -> ast.Program:
        todo: list[tuple[Any, bool]] = [(tree, False)]
        done: list[tuple[Any, int]] = []  # (result, nesting depth) of finished subtrees
        while todo:
            node, expanded = todo.pop()
            if not isinstance(node, Tree):
                done.append((node, 0))
            elif not expanded:
                todo.append((node, True))
                todo.extend((c, False) for c in reversed(node.children))
            else:
                n = len(node.children)
                kids = done[len(done) - n:] if n else []
                if n:
                    del done[len(done) - n:]
                depths = [d for _, d in kids]
                if node.data in _BINOPS:  # a left operand continues the chain
                    depth = max(depths[0], depths[1] + 1)
                elif node.data in _GATHER:
                    depth = max(depths, default=0)
                else:
                    depth = 1 + max(depths, default=0)
                if depth > MAX_NESTING:
                    raise AlgSyntaxError(
                        f"nested too deeply: more than {MAX_NESTING} levels of brackets, calls "
                        "and operators; give inner parts names (x = ...)", self._s(node.meta))
                done.append((getattr(self, node.data)(node.meta, [v for v, _ in kids]), depth))
        assert len(done) == 1
        return done[0][0]

    def _s(self, meta) -> Span:
        return _span(self.source, meta)

    def _name(self, tok: Token) -> str:
        if str(tok) in _KEYWORDS:
            raise AlgSyntaxError(f"'{tok}' is a keyword and cannot be used as a name", self._s(tok))
        return str(tok)

    # statements
    def start(self, meta, children):
        stmts = tuple(c for c in children if isinstance(c, ast.Node))
        span = Span(self.source, 0, len(self.source.text))
        return ast.Program(stmts, span=span)

    def assign(self, meta, c):
        return ast.Assign(self._name(c[0]), c[1], span=self._s(meta))

    def def_(self, meta, c):
        name, params, body = c
        return ast.Def(self._name(name), tuple(params or ()), body, span=self._s(meta))

    def params(self, meta, c):
        names = [p.name for p in c]
        for i, p in enumerate(c):
            if p.name in names[:i]:
                raise AlgSyntaxError(f"parameter '{p.name}' appears twice", p.span)
        seen_default = False
        for p in c:
            if p.default is not None:
                seen_default = True
            elif seen_default:
                raise AlgSyntaxError(
                    f"parameter '{p.name}' without a default follows one with a default", p.span
                )
        return list(c)

    def param(self, meta, c):
        name, typ, default = c
        return ast.Param(self._name(name), typ, default, span=self._s(meta))

    def type_atom(self, meta, c):
        return ast.TypeExpr(str(c[0]), tuple(x for x in c[1:] if x is not None), span=self._s(meta))

    def union(self, meta, c):
        return ast.TypeExpr("|", tuple(c), span=self._s(meta))

    def use(self, meta, c):
        return ast.Use(str(c[0]), span=self._s(meta))

    def import_(self, meta, c):
        return ast.Import(self._string(c[0]), self._name(c[1]), span=self._s(meta))

    def expr_stmt(self, meta, c):
        return ast.ExprStmt(c[0], span=self._s(meta))

    # expressions
    def lambda_(self, meta, c):
        params, body = c
        names = [self._name(t) for t in (params or [])]
        return ast.Lambda(tuple(names), body, span=self._s(meta))

    def lparams(self, meta, c):
        return list(c)

    def _bin(op):  # noqa: N805 - a factory used at class-creation time
        def method(self, meta, c):
            return ast.BinOp(op, c[0], c[1], span=self._s(meta))

        return method

    add, sub, mul, div = _bin("+"), _bin("-"), _bin("*"), _bin("/")

    def and_op(self, meta, c):
        return ast.BoolOp("and", c[0], c[1], span=self._s(meta))

    def or_op(self, meta, c):
        return ast.BoolOp("or", c[0], c[1], span=self._s(meta))

    def not_op(self, meta, c):
        return ast.Not(c[0], span=self._s(meta))

    def comp_op(self, meta, c):
        return str(c[0])

    def comparison(self, meta, c):
        return ast.Compare(tuple(c[1::2]), tuple(c[0::2]), span=self._s(meta))

    def cond(self, meta, c):
        body, test, orelse = c
        return ast.IfExp(test, body, orelse, span=self._s(meta))

    def neg(self, meta, c):
        return ast.UnaryOp("-", c[0], span=self._s(meta))

    def pos(self, meta, c):
        return ast.UnaryOp("+", c[0], span=self._s(meta))

    def call(self, meta, c):
        func, args = c
        pos_args, kwargs = [], []
        for a in args or ():
            if isinstance(a, ast.Keyword):
                if any(k.name == a.name for k in kwargs):
                    raise AlgSyntaxError(f"keyword argument '{a.name}' given twice", a.span)
                kwargs.append(a)
            elif kwargs:
                raise AlgSyntaxError("positional argument follows keyword argument", a.span)
            else:
                pos_args.append(a)
        return ast.Call(func, tuple(pos_args), tuple(kwargs), span=self._s(meta))

    def args(self, meta, c):
        return list(c)

    def kwarg(self, meta, c):
        return ast.Keyword(self._name(c[0]), c[1], span=self._s(meta))

    def attr(self, meta, c):
        return ast.Attr(c[0], self._name(c[1]), span=self._s(meta))

    def index(self, meta, c):
        return ast.Index(c[0], c[1], span=self._s(meta))

    def number(self, meta, c):
        text = str(c[0])
        # an integer too long to be a finite float reads as inf (without converting
        # thousands of digits); the checker reports out-of-range numbers where they are used
        value: int | float = int(text) if text.isdigit() and len(text) <= 400 else float(text)
        return ast.Num(value, span=self._s(meta))

    def _string(self, tok: Token) -> str:
        try:
            return pyast.literal_eval(str(tok))
        except (ValueError, SyntaxError) as e:
            raise AlgSyntaxError(f"invalid string literal: {e}", self._s(tok)) from None

    def string(self, meta, c):
        return ast.Str(self._string(c[0]), span=self._s(meta))

    def true(self, meta, c):
        return ast.Bool(True, span=self._s(meta))

    def false(self, meta, c):
        return ast.Bool(False, span=self._s(meta))

    def none(self, meta, c):
        return ast.NoneLit(span=self._s(meta))

    def name(self, meta, c):
        return ast.Name(self._name(c[0]), span=self._s(meta))

    def list(self, meta, c):
        if meta.start_pos in self.literals:  # read by _literal_lists, blanked for lark
            return self.literals.pop(meta.start_pos)
        return ast.List(tuple(x for x in c if x is not None), span=self._s(meta))

    def listcomp(self, meta, c):
        elt, var, it, cond = c
        return ast.ListComp(elt, self._name(var), it, cond, span=self._s(meta))


# ---- long literal lists ----------------------------------------------------------------
#
# lark spends some 50 us on each item of a list, so a list literal of 10^5 numbers took
# seconds. A list of at least FAST_LIST plain literals (numbers, -numbers, strings, true,
# false, none; whitespace and newlines between them) is read here with one regular
# expression instead, into the very AST lark would give, and lark sees the brackets with
# blanks between them. Strings and comments are skipped so that text inside them is
# never taken for a list; a list that follows a name or a bracket (an index) is left alone.

FAST_LIST = 32
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?![A-Za-z0-9_.])"
_STR = r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'"""
_KW = r"(?:true|false|none)(?![A-Za-z0-9_])"
_ITEM = rf"(?:-[ \t\f]*)?{_NUM}|{_STR}|{_KW}"
_W = r"[ \t\f\r\n]*"
_SCAN = re.compile(
    rf"(?P<skip>{_STR}|#[^\n]*)"
    rf"|(?P<list>\[(?:{_W}(?:{_ITEM}){_W},){{{FAST_LIST - 1},}}{_W}(?:(?:{_ITEM}){_W})?\])"
)
_ITEMS = re.compile(rf"(?P<neg>-[ \t\f]*)?(?P<num>{_NUM})|(?P<str>{_STR})|(?P<kw>{_KW})")


def _literal_lists(source: Source) -> tuple[str, dict[int, ast.List]]:
    text = source.text
    if text.count(",") < FAST_LIST - 1:
        return text, {}
    found: dict[int, ast.List] = {}
    parts: list[str] = []
    done = 0
    for m in _SCAN.finditer(text):
        if m.group("list") is None:
            continue
        start, end = m.span()
        before = text[:start].rstrip()
        if before and (before[-1].isalnum() or before[-1] in "_)]\"'"):
            continue  # an index such as x[1, 2, ...]: lark reports what is wrong
        items = []
        for it in _ITEMS.finditer(text, start + 1, end - 1):
            if it.group("num") is not None:
                ns, ne = it.span("num")
                digits = text[ns:ne]
                value = int(digits) if digits.isdigit() and len(digits) <= 400 else float(digits)
                node: ast.Node = ast.Num(value, span=Span(source, ns, ne))
                if it.group("neg") is not None:
                    node = ast.UnaryOp("-", node, span=Span(source, it.start(), ne))
            elif it.group("str") is not None:
                try:
                    value = pyast.literal_eval(it.group("str"))
                except (ValueError, SyntaxError):
                    items = None
                    break
                node = ast.Str(value, span=Span(source, *it.span()))
            else:
                kw = it.group("kw")
                sp = Span(source, *it.span())
                node = ast.NoneLit(span=sp) if kw == "none" else ast.Bool(kw == "true", span=sp)
            items.append(node)
        if items is None:
            continue  # an odd string: lark and _string report it
        found[start] = ast.List(tuple(items), span=Span(source, start, end))
        blank = "".join(ch if ch == "\n" else " " for ch in text[start + 1 : end - 1])
        parts.append(text[done : start + 1])
        parts.append(blank)
        done = end - 1
    if not found:
        return text, {}
    parts.append(text[done:])
    return "".join(parts), found
