"""Stage 2, check: AST -> checked values and sinks, from headers only.

Checking is abstract interpretation. Plain values (numbers, strings, lists) are folded;
`def`s, lambdas, comprehensions, `use` and `import` are expanded; every checkpoint
operation is type-checked against its arguments' tensor tables and becomes a node of the
model-level graph. A def's parameter types depend on its call site, so there is no
separate typed AST: the checked program *is* its graph nodes and its ordered sinks.

Invariant: nothing here reads a weight. Every mistake that headers can reveal (unknown
name, wrong argument, missing path, corrupt header, mismatched shapes, existing output)
is raised here, with its position, before execution starts.
"""

from __future__ import annotations

import math
import operator
import os
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ast
from .errors import (
    _WARN,
    SIZE_ENV,
    STEPS_ENV,
    AlgError,
    AlgIOError,
    AlgLimitError,
    AlgNameError,
    AlgTypeError,
    Diagnostic,
    Note,
    did_you_mean,
)
from .graph import Node
from .io.checkpoint import CheckpointSource, MemorySource, open_checkpoint
from .io.files import absolute, joined, missing, read_source, resolved, stat_path
from .options import Options
from .parser import MAX_NESTING, parse
from .registry import in_use
from .resources import stdlib_dir, stdlib_names
from .rules import model_arith, model_neg
from .signature import (
    Builtin,
    Call,
    bind,
    check_type_expr,
    conforms,
    is_finite,
    show_number,
)
from .signature import (
    show as show_value,
)
from .source import Source, Span
from .types import CheckpointType, type_name
from .values import Closure, Env, Model, Namespace, Sink

# Limits of check-time evaluation (README, "Limits"). Checking folds every plain value, so
# a recipe is a program; these bound what checking it may cost, each with a clear error.
MAX_DEPTH = 200  # nested calls of defs and lambdas
MAX_EVAL_DEPTH = 3000  # expressions under evaluation at once: nesting times calls
MAX_STEPS = 2_000_000  # expression evaluations, plus the items of every list built; STEPS_ENV
MAX_SIZE = 1_000_000  # items of one list (nested lists' items count too), characters of a string; SIZE_ENV
LOAD_STEPS = 500  # what one load() costs of the step budget (a file system look-up)
# checkpoint operations applied one on top of another (a + b + ... or a fold): running
# one walks the chain recursively (lower.py), so a longer chain is refused here
MAX_CHAIN = 200
# Python frames that one level of evaluation may take, to size the recursion limit
_FRAMES_PER_LEVEL = 5


def _budget(env: str, default: int) -> int:
    text = os.environ.get(env)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise AlgLimitError(f"{env} must be a positive whole number, not '{text}'")
    return value

STDLIB_PREFIX = "stdlib/"


def _is_stdlib(span: Span) -> bool:
    return span.source.name.startswith(STDLIB_PREFIX)


@dataclass
class SaveRequest:
    model: Model
    path: Path
    dtype: str | None  # safetensors code, or None for the primary input's
    shard_bytes: int
    overwrite: bool
    span: Span
    guard: Any = None  # io.target.OverwriteGuard: re-checked right before replacing
    chat_template: str | None = None  # the output tokenizer's template (chat.choose), or its own


@dataclass
class Checked:
    """The result of checking a program: its sinks in order and the value of its last
    expression statement (the result of `Interpreter.eval`)."""

    sinks: list[Sink] = field(default_factory=list)
    result: Any = None
    has_result: bool = False


class Checker:
    """Checks programs against one persistent environment (a REPL session keeps one)."""

    def __init__(self, options: Options | None = None, base_dir: Path | None = None, mode: str = "file"):
        self.options = options or Options()
        self.base_dir = (base_dir or Path.cwd()).resolve()
        self.mode = mode  # "file": bare expressions warn; "repl": they show; "eval": last is result
        self.builtins_env = Env(None, dict(in_use().builtins))
        self._sources: dict[tuple, CheckpointSource] = {}
        self._stdlib: dict[str, Env] = {}
        self._imports: dict[Path, Namespace] = {}
        self._depth = 0  # nested closure calls
        self._eval_depth = 0  # nested expression evaluations
        self._steps = 0
        self._checking = False
        self._stmt_span: Span | None = None
        self._chain: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Node -> chain length
        self.max_steps = _budget(STEPS_ENV, MAX_STEPS)
        self.max_size = _budget(SIZE_ENV, MAX_SIZE)
        self._sinks: list[Sink] = []
        self._save_paths: dict[Path, Span] = {}
        # what this program reads and writes: a path written must not also be read
        self._reads: list[tuple[Path, Span | None, str]] = []
        self._writes: list[tuple[Path, Span | None, str]] = []
        self.used_overrides: set[str] = set()
        self.prelude_env = self._library_env("prelude", None)
        self.env = self.prelude_env.child()
        for name, value in self.options.overrides.items():
            self._check_override(name, value)
            self.env.values[name] = value

    def _check_override(self, name: str, value: Any) -> None:
        items = [value]
        while items:
            v = items.pop()
            if isinstance(v, tuple):
                items.extend(v)
            elif not is_finite(v):
                raise AlgLimitError(f"--set {name}: {v} is out of range; numbers are finite and "
                                    f"at most {sys.float_info.max:.4g} in size")

    # ---- diagnostics -----------------------------------------------------------------

    def warning(self, message: str, span: Span | None) -> None:
        self.options.warn(Diagnostic(message, span))

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    # ---- programs --------------------------------------------------------------------

    def check(self, program: ast.Program, env: Env | None = None) -> Checked:
        """Check a whole program; its sinks run only if all of it checks."""
        env = env or self.env
        self._sinks, self._save_paths, self._reads, self._writes = [], {}, [], []
        self._steps, self._checking, self._stmt_span = 0, True, None
        token = _WARN.set(self.warning)
        # evaluation depth is bounded (MAX_EVAL_DEPTH); give Python the stack that needs
        old_limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old_limit, MAX_EVAL_DEPTH * _FRAMES_PER_LEVEL + 2000))
        try:
            return self._check(program, env)
        except RecursionError:  # a last resort: every recursion here has its own limit
            raise AlgLimitError("this statement is nested too deeply to check (Python's stack "
                                "ran out)", self._stmt_span) from None
        finally:
            sys.setrecursionlimit(old_limit)
            _WARN.reset(token)
            self._checking = False
            # a failed entry (REPL) must not keep its sinks or reserve its save paths
            self._sinks, self._save_paths, self._reads, self._writes = [], {}, [], []

    def _check(self, program: ast.Program, env: Env) -> Checked:
        out = Checked()
        for stmt in program.stmts:
            self._stmt_span = stmt.span
            sinks_before = len(self._sinks)
            value, is_expr = self._stmt(stmt, env, top=True)
            if is_expr:
                out.result, out.has_result = value, True
                if self.mode == "repl" and value is not None:
                    self._sinks.append(Sink("show", stmt.span, value))
                elif (self.mode == "file" and value is not None
                      and not (isinstance(value, tuple) and len(self._sinks) > sinks_before)):
                    # a list built for its saves ([save(...) for ...]) is used: it acted
                    self.warning(
                        "this expression's value is unused; a recipe acts through save(...), "
                        "print(...) or info(...)",
                        stmt.span,
                    )
            else:
                out.result, out.has_result = None, False
        out.sinks = self._sinks
        return out

    def _stmt(self, stmt: ast.Node, env: Env, top: bool) -> tuple[Any, bool]:
        if isinstance(stmt, ast.Assign):
            if top and env is self.env and stmt.name in self.options.overrides:
                self.used_overrides.add(stmt.name)  # --set wins over the recipe's value
                return None, False
            env.values[stmt.name] = self.expr(stmt.value, env)
            return None, False
        if isinstance(stmt, ast.Def):
            for p in stmt.params:
                if p.type is not None:
                    check_type_expr(p.type, in_use().value_types)
            env.values[stmt.name] = Closure(stmt.name, stmt.params, stmt.body, env, stmt.span)
            return None, False
        if isinstance(stmt, ast.Use):
            lib = self._library_env(stmt.name, stmt.span)
            for name, value in lib.values.items():
                env.values[name] = value
            return None, False
        if isinstance(stmt, ast.Import):
            env.values[stmt.alias] = self._import(stmt)
            return None, False
        if isinstance(stmt, ast.ExprStmt):
            return self.expr(stmt.expr, env), True
        raise AssertionError(f"unknown statement {stmt!r}")

    def _library_env(self, name: str, span: Span | None) -> Env:
        """The names that stdlib/NAME.alg defines (checked once per session)."""
        if name in self._stdlib:
            return self._stdlib[name]
        path = stdlib_dir() / f"{name}.alg"
        if name not in stdlib_names():  # a known name: no stat of an arbitrary text
            raise AlgNameError(f"no library '{name}'{did_you_mean(name, stdlib_names())}", span).with_note(
                f"the standard libraries are: {', '.join(stdlib_names())}"
            )
        parent = self.builtins_env if name == "prelude" else self.prelude_env
        env = parent.child()
        source = Source(path.read_text(encoding="utf-8"), f"{STDLIB_PREFIX}{name}.alg", path)
        try:
            self._run_library(source, env, source.name)
        except AlgError as err:
            raise err.with_note(f"while loading library '{name}'", span) from None
        self._stdlib[name] = env
        return env

    def _import(self, stmt: ast.Import) -> Namespace:
        path = absolute(stmt.path, stmt.span.source.folder)
        self.note_read(path, stmt.span, "imported", stmt.path)
        if path in self._imports:
            return self._imports[path]
        if path.suffix != ".alg":
            raise AlgIOError(f"import needs an .alg file, not '{stmt.path}'", stmt.span)
        if missing(path):
            raise AlgIOError(f"no such file: '{stmt.path}' (looked in {path.parent})", stmt.span)
        env = self.prelude_env.child()
        self._imports[path] = ns = Namespace(stmt.alias, env)  # a cycle finds it half-built
        try:
            self._run_library(read_source(path, stmt.path), env, stmt.path)
        except AlgError as err:
            del self._imports[path]
            if err.span is None:  # the file itself could not be read
                raise err.at(stmt.span) from None
            raise err.with_note(f"while importing '{stmt.path}'", stmt.span) from None
        return ns

    def _run_library(self, source: Source, env: Env, label: str) -> None:
        program = parse(source)
        saved = self._sinks
        self._sinks = []
        for stmt in program.stmts:
            value, is_expr = self._stmt(stmt, env, top=False)
            if self._sinks or (is_expr and value is not None):
                raise AlgTypeError(
                    f"a library ({label}) may define names but not act: move save, print "
                    "and bare expressions to the recipe",
                    stmt.span,
                )
        self._sinks = saved

    # ---- expressions -----------------------------------------------------------------

    def expr(self, e: ast.Node, env: Env) -> Any:
        if self._eval_depth == 0 and not self._checking:
            self._steps = 0  # an expression evaluated on its own (the REPL's :type)
        self._steps += 1
        if self._steps > self.max_steps:
            self._out_of_steps(e.span)
        self._eval_depth += 1
        try:
            if self._eval_depth > MAX_EVAL_DEPTH:
                raise AlgLimitError(f"nested too deeply: more than {MAX_EVAL_DEPTH} expressions under "
                                    "evaluation at once (deep recursion through defs or lambdas?)", e.span)
            return _DISPATCH[type(e)](self, e, env)
        finally:
            self._eval_depth -= 1

    def charge(self, steps: int, span: Span | None) -> None:
        """Count work other than evaluating an expression against the step budget."""
        self._steps += steps
        if self._steps > self.max_steps:
            self._out_of_steps(span)

    def _out_of_steps(self, span: Span | None) -> None:
        raise AlgLimitError(
            f"checking this recipe takes more than {self.max_steps:,} steps (the step budget of "
            f"check-time evaluation); is a list, loop or recursion much larger than meant? "
            f"{STEPS_ENV}=N raises the budget", span)

    def sized(self, value: Any, span: Span | None) -> Any:
        """A list or string just built, charged to the budgets: at most `max_size` items
        (nested lists' items count) or characters, lists nested at most MAX_NESTING deep."""
        if isinstance(value, str):
            if len(value) > self.max_size:
                raise self._too_big(len(value), True, span)
            self.charge(len(value) // 64, span)
        elif isinstance(value, tuple):
            total = 0
            todo = [(value, 1)]
            while todo:
                t, depth = todo.pop()
                if depth > MAX_NESTING:
                    raise AlgLimitError(f"lists nested more than {MAX_NESTING} deep", span)
                total += len(t)
                if total > self.max_size:
                    raise self._too_big(total, False, span)
                todo.extend((x, depth + 1) for x in t if type(x) is tuple)
            self.charge(total, span)
        return value

    def model_built(self, m: Model, span: Span | None) -> Model:
        """A checkpoint value just built: charge its check (a walk of its tensor table) and
        refuse a chain of operations longer than MAX_CHAIN."""
        self.charge(len(m.type.tensors), span)
        chain = self._chain
        todo = [m.node]
        while todo:
            n = todo[-1]
            if n in chain:
                todo.pop()
                continue
            missing = [a for a in n.args if a not in chain]
            if missing:
                todo.extend(missing)
                continue
            chain[n] = 1 + max((chain[a] for a in n.args), default=0)
            todo.pop()
        if chain[m.node] > MAX_CHAIN:
            raise AlgLimitError(f"this checkpoint is the result of more than {MAX_CHAIN} operations applied "
                                "one on top of another, more than alg computes; combine the parts in "
                                "fewer steps (e.g. linear([...], weights) instead of a + b + c ...)", span)
        return m

    def _too_big(self, n: int, text: bool, span: Span | None) -> AlgLimitError:
        what = f"this string would have {n:,} characters" if text else (
            f"this list would have more than {self.max_size:,} items (nested lists' items count)")
        return AlgLimitError(f"{what}, past the size budget of {self.max_size:,}; {SIZE_ENV}=N raises it",
                             span)

    def _Num(self, e: ast.Num, env: Env) -> Any:
        if not is_finite(e.value):
            raise AlgTypeError(f"the number {show_number(e.span.text())} is out of range: numbers are "
                               f"finite and at most {sys.float_info.max:.4g} in size", e.span)
        return e.value

    def _Str(self, e: ast.Str, env: Env) -> Any:
        return e.value

    _Bool = _Str

    def _NoneLit(self, e: ast.NoneLit, env: Env) -> Any:
        return None

    def _Name(self, e: ast.Name, env: Env) -> Any:
        try:
            scope = env.where(e.id)
        except KeyError:
            raise AlgNameError(
                f"unknown name '{e.id}'{did_you_mean(e.id, env.names())}", e.span
            ) from None
        if scope is self.env and e.id in self.options.overrides:
            self.used_overrides.add(e.id)  # the --set value itself was read
        return scope.values[e.id]

    def _List(self, e: ast.List, env: Env) -> Any:
        return self.sized(tuple([self.expr(x, env) for x in e.items]), e.span)

    def _ListComp(self, e: ast.ListComp, env: Env) -> Any:
        items = self.expr(e.iter, env)
        if not isinstance(items, tuple):
            raise AlgTypeError(f"a comprehension iterates over a List, not {type_name(items)}", e.iter.span)
        out = []
        for item in items:
            inner = env.child({e.var: item})
            if e.cond is not None:
                keep = self.expr(e.cond, inner)
                if not isinstance(keep, bool):
                    raise AlgTypeError(f"a comprehension's condition must be Bool, not {type_name(keep)}", e.cond.span)
                if not keep:
                    continue
            out.append(self.expr(e.elt, inner))
        return self.sized(tuple(out), e.span)

    def _Attr(self, e: ast.Attr, env: Env) -> Any:
        value = self.expr(e.value, env)
        if not isinstance(value, Namespace):
            raise AlgTypeError(f"{type_name(value)} has no attributes; only an imported module does", e.span)
        try:
            return value.env.values[e.name]
        except KeyError:
            raise AlgNameError(
                f"module '{value.name}' has no name '{e.name}'{did_you_mean(e.name, value.env.values)}",
                e.span,
            ) from None

    def _Index(self, e: ast.Index, env: Env) -> Any:
        items = self.expr(e.value, env)
        i = self.expr(e.index, env)
        if not isinstance(items, tuple):
            raise AlgTypeError(f"only a List can be indexed, not {type_name(items)}", e.value.span)
        if isinstance(i, bool) or not isinstance(i, int | float) or not float(i).is_integer():
            raise AlgTypeError(f"a list index must be a whole number, not {show_value(i)}", e.index.span)
        n = len(items)
        if not -n <= int(i) < n:
            raise AlgTypeError(f"index {int(i)} is out of range for a list of {n} item{'s' if n != 1 else ''}"
                               + (f" (0 to {n - 1}, or -1 to {-n} from the end)" if n else ""), e.index.span)
        return items[int(i)]

    def _Lambda(self, e: ast.Lambda, env: Env) -> Any:
        params = tuple(ast.Param(p, None, None, span=e.span) for p in e.params)
        return Closure("lambda", params, e.body, env, e.span)

    def _UnaryOp(self, e: ast.UnaryOp, env: Env) -> Any:
        v = self.expr(e.operand, env)
        hook = getattr(type(v), "alg_unary", None)
        if hook is not None:  # a value type with its own algebra (see `alg_binop`)
            return hook(v, e.op, e.span)
        if isinstance(v, Model):
            return v if e.op == "+" else self.model_built(model_neg(v, e.span), e.span)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return v if e.op == "+" else -v
        raise AlgTypeError(f"cannot apply unary '{e.op}' to {type_name(v)}", e.span)

    def _BinOp(self, e: ast.BinOp, env: Env) -> Any:
        # a chain a + b - c ... is folded from the left without recursion (parser.py)
        chain = []
        node: ast.Node = e
        while isinstance(node, ast.BinOp):
            chain.append(node)
            node = node.left
        acc = self.expr(node, env)
        for i, b in enumerate(reversed(chain)):
            if i:
                self.charge(1, b.span)
            acc = self._binop(b, acc, self.expr(b.right, env))
        return acc

    def _binop(self, e: ast.BinOp, left: Any, right: Any) -> Any:
        op = {"+": "add", "-": "sub", "*": "mul", "/": "div"}[e.op]
        # a value type with its own algebra defines
        #   alg_binop(self, op, other, reflected, span, self_span, other_span)
        # and returns NotImplemented for operands it does not combine with
        for v, other, reflected, vs, os_ in ((left, right, False, e.left.span, e.right.span),
                                            (right, left, True, e.right.span, e.left.span)):
            hook = getattr(type(v), "alg_binop", None)
            if hook is not None:
                result = hook(v, op, other, reflected, e.span, vs, os_)
                if result is not NotImplemented:
                    return result
        if isinstance(left, Model) or isinstance(right, Model):
            return self.model_built(model_arith(op, left, right, e.span, e.left.span, e.right.span), e.span)
        num = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
        if num(left) and num(right):
            if op == "div" and right == 0:
                raise AlgTypeError("division by zero", e.right.span)
            try:
                result = _ARITH[op](left, right)
            except OverflowError:  # an int quotient too large for a float
                result = math.inf
            if not is_finite(result):
                raise AlgTypeError(f"the result of '{e.op}' is out of range: numbers are finite and at "
                                   f"most {sys.float_info.max:.4g} in size", e.span)
            return result
        if op == "add" and (isinstance(left, str) and isinstance(right, str)
                            or isinstance(left, tuple) and isinstance(right, tuple)):
            if len(left) + len(right) > self.max_size:  # refused before it is built
                raise self._too_big(len(left) + len(right), isinstance(left, str), e.span)
            return self.sized(left + right, e.span)
        hint = ""
        if op == "add" and (isinstance(left, str) or isinstance(right, str)):
            hint = "; to build text write str(x), e.g. \"out/m-\" + str(lam)"
        raise AlgTypeError(
            f"cannot apply '{e.op}' to {type_name(left)} and {type_name(right)}{hint}", e.span
        )

    # ---- conditions: comparisons, and/or/not, x if c else y (Python's precedence and
    # short-circuit: an untaken operand or branch is not evaluated, so its errors and sinks
    # do not happen)

    def _Compare(self, e: ast.Compare, env: Env) -> Any:
        left, left_node = self.expr(e.operands[0], env), e.operands[0]
        for op, right_node in zip(e.ops, e.operands[1:], strict=True):
            right = self.expr(right_node, env)
            span = Span(e.span.source, left_node.span.start, right_node.span.end)
            if not _compare(op, left, right, span, left_node.span, right_node.span):
                return False  # chained like Python: a < b < c stops at the first false
            left, left_node = right, right_node
        return True

    def _condition(self, value: Any, what: str, node: ast.Node) -> bool:
        if not isinstance(value, bool):
            raise AlgTypeError(f"{what} must be Bool, not {type_name(value)}; write a comparison, "
                               "e.g. x > 0 or s != \"\"", node.span)
        return value

    def _BoolOp(self, e: ast.BoolOp, env: Env) -> Any:
        # a chain a and b and c ... is folded from the left without recursion (like _BinOp)
        chain = []
        node: ast.Node = e
        while isinstance(node, ast.BoolOp) and node.op == e.op:
            chain.append(node)
            node = node.left
        acc = self._condition(self.expr(node, env), f"an operand of '{e.op}'", node)
        for b in reversed(chain):
            if acc == (b.op == "or"):  # true or ..., false and ...: decided
                return acc
            acc = self._condition(self.expr(b.right, env), f"an operand of '{b.op}'", b.right)
        return acc

    def _Not(self, e: ast.Not, env: Env) -> Any:
        return not self._condition(self.expr(e.operand, env), "the operand of 'not'", e.operand)

    def _IfExp(self, e: ast.IfExp, env: Env) -> Any:
        test = self._condition(self.expr(e.cond, env), "the condition of 'if ... else'", e.cond)
        return self.expr(e.body if test else e.orelse, env)

    def _Call(self, e: ast.Call, env: Env) -> Any:
        func = self.expr(e.func, env)
        args = [(self.expr(a, env), a.span) for a in e.args]
        kwargs = [(k.name, self.expr(k.value, env), k.span, k.value.span) for k in e.kwargs]
        return self.apply(func, args, e.span, kwargs, callee_span=e.func.span)

    def apply(self, func: Any, args: list, span: Span, kwargs: list | None = None, callee_span: Span | None = None) -> Any:
        """Call a function value with evaluated, positioned arguments."""
        kwargs = kwargs or []
        if isinstance(func, Builtin):
            values, spans = bind(func.name, func.params, func.defaults, args, kwargs, span)
            result = func.impl(Call(self, span, spans, func.name), **values)
            if isinstance(result, Model):
                self.model_built(result, span)
            elif isinstance(result, tuple | str):
                self.sized(result, span)
            return result
        if isinstance(func, Closure):
            return self._call_closure(func, args, kwargs, span)
        raise AlgTypeError(f"{type_name(func)} is not a function", callee_span or span)

    def _call_closure(self, f: Closure, args: list, kwargs: list, span: Span) -> Any:
        values, _ = bind(f.name, f.params, None, args, kwargs, span)
        inner = f.env.child()
        # the call is under way from here: a default that calls f again is recursion too
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise AlgTypeError(f"calls nested deeper than {MAX_DEPTH} (runaway recursion?)", span)
            for p in f.params:
                if p.name in values:
                    inner.values[p.name] = values[p.name]
                else:  # defaults are evaluated at call time, in the definition's scope
                    inner.values[p.name] = self.expr(p.default, f.env.child(dict(inner.values)))
                    if p.type is not None and not conforms(inner.values[p.name], p.type):
                        raise AlgTypeError(
                            f"default of '{p.name}' must be {p.type}, not {type_name(inner.values[p.name])}",
                            p.default.span,
                        )
            return self.expr(f.body, inner)
        except AlgError as err:
            if err.span is not None and _is_stdlib(err.span) and not _is_stdlib(span):
                # lead with the user's own line; where the library failed becomes a note
                err.notes.insert(0, Note(f"inside {f.name}(), here", err.span))
                err.message = f"{f.name}(): {err.message}"
                err.span = span
            elif err.notes and err.notes[-1].span is span:
                pass  # recursion: one note per call site is enough
            elif len(err.notes) < 8:
                err.with_note(f"in {f.name}(), called from here", span)
            raise
        finally:
            self._depth -= 1

    # ---- checkpoints and sinks ----------------------------------------------------------

    def load(self, path: str, span: Span) -> Model:
        self.charge(LOAD_STEPS, span)
        p = joined(path, self.base_dir)
        self.note_read(absolute(path, self.base_dir), span, "loaded", path)  # before the stat: it may be written later
        st = stat_path(p, path, span)  # a NUL byte, a loop, a too-long path: said as such
        key = (p.resolve(), st.st_mtime_ns)
        source = self._sources.get(key)
        if source is None:
            try:
                source = open_checkpoint(p)
            except AlgError as err:
                raise err.at(span) from None
            self._sources[key] = source
        return bind_source(source, span)

    # ---- reads and writes ----------------------------------------------------------------

    def note_read(self, path: Path, span: Span | None, what: str, shown: str | None = None) -> None:
        """Record that the program reads `path` (resolved; `shown` as the recipe wrote it).
        A path an earlier statement writes may not be read: every header is read at check
        time, before the first write, so the read would see the old file."""
        from .io.target import overlap

        shown = shown or str(path)
        for w, wspan, wwhat in self._writes:
            if overlap(path, w):
                if path == w:
                    head = f"'{shown}' is written earlier in this recipe ({wwhat})"
                elif w in path.parents:
                    head = f"'{shown}' is inside '{w}', which this recipe writes earlier ({wwhat})"
                else:
                    head = f"'{shown}' holds '{w}', which this recipe writes earlier ({wwhat})"
                err = AlgIOError(f"{head}; a recipe must not read a path it also writes: alg reads "
                                 "every header before the first write, so this read would see the "
                                 "old file", span)
                raise err.with_note("written here", wspan)
        self._reads.append((path, span, what))

    def note_write(self, paths: list[Path], span: Span | None, what: str, shown: str) -> None:
        """Record that the program writes `paths` (one target, lexical and resolved); an
        earlier read of the same path, or of one inside or around it, is an error."""
        from .io.target import overlap

        for r, rspan, rwhat in self._reads:
            for w in paths:
                if not overlap(r, w):
                    continue
                if r == w:
                    how = f"would replace '{r}'"
                elif r in w.parents:
                    how = f"would write inside '{r}'"
                else:
                    how = f"would replace a folder holding '{r}'"
                err = AlgIOError(
                    f"{what} to '{shown}' {how}, which this recipe reads; a recipe must not write a "
                    "path it also reads: alg reads every header before the first write, so the "
                    "result would mix old and new files", span)
                raise err.with_note(f"{rwhat} here", rspan)
        for o, ospan, owhat in self._writes:  # a run's outputs are staged and moved together
            for w in paths:
                if overlap(o, w):
                    how = "the same path as" if o == w else "inside the folder of" if o in w.parents else "around"
                    err = AlgIOError(f"{what} to '{shown}' would write {how} another output of this recipe "
                                     f"('{o}'); each output must be its own path", span)
                    raise err.with_note(f"{owhat} writes it here", ospan)
        self._writes.extend((w, span, what) for w in dict.fromkeys(paths))

    def add_save(self, m: Model, path: str, dtype: str | None, shard_bytes: int, overwrite: bool, call: Call,
                 chat_template: str | None = None) -> None:
        import os

        from .io import target as tio
        from .plan import output_nbytes

        at = call.at("path")
        target = tio.target_path(path, self.base_dir, at)
        real = resolved(target, path, at)
        for t in (target, real):
            if t in self._save_paths:
                raise AlgIOError(f"'{path}' is already the target of another save", at).with_note(
                    "the other save is here", self._save_paths[t]
                )
        inputs = []
        for node in m.node.walk():
            if node.op == "load" and isinstance(node.params[0], CheckpointSource):
                src = node.params[0].path.resolve()
                inputs.append(src)
                if tio.overlap(src, real) or tio.overlap(src, target):
                    how = ("overwrite" if src in (real, target) else "write inside"
                           if src in real.parents else "replace a folder holding")
                    err = AlgIOError(f"save to '{path}' would {how} its own input", at)
                    raise err.with_note("the input is loaded here", node.span) if node.span else err
        self.note_write([target, real], at, "save", path)
        force = overwrite or self.options.force
        guard = tio.OverwriteGuard(path, self.base_dir, [r for r, _, _ in self._reads] + inputs, [self.base_dir])
        if os.path.lexists(target):
            if not force:
                raise AlgIOError(
                    f"'{path}' already exists; pass overwrite=true to save(), or --force to alg run", at
                )
            reason = guard.refusal(target)
            if reason is not None:
                raise AlgIOError(f"refusing to replace '{path}': {reason}", at)
        problem = tio.unwritable(target.parent)
        if problem is not None:
            raise AlgIOError(f"cannot save to '{path}': {problem}", at)
        free = tio.free_bytes(target.parent)
        need = output_nbytes(m, dtype)
        if free is not None and free < need:
            from .types import human_bytes

            self.warning(f"only {human_bytes(free)} free where '{path}' is written; the save needs "
                         f"{human_bytes(need)}", at)
        self._save_paths[target] = self._save_paths[real] = call.span
        request = SaveRequest(m, target, dtype, shard_bytes, force, call.span, guard, chat_template)
        self._sinks.append(Sink("save", call.span, request))


_ARITH = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}
_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
            "==": operator.eq, "!=": operator.ne}


def _plain(v: Any) -> bool:
    """Data that compares by value: Scalar, String, Bool, None and lists of them."""
    return v is None or isinstance(v, int | float | str) or (isinstance(v, tuple) and all(map(_plain, v)))


def _compare(op: str, left: Any, right: Any, span: Span, lspan: Span, rspan: Span) -> bool:
    """One comparison of plain data; anything else is a positioned error that says why."""
    from .schedule import Schedule

    if op in ("==", "!=") and (left is None or right is None):  # x == none: is x given?
        return (left is None) == (right is None) if op == "==" else (left is None) != (right is None)
    for v, vs in ((left, lspan), (right, rspan)):
        if isinstance(v, Model):
            raise AlgTypeError(f"a checkpoint (or reward model) cannot be compared with '{op}': a "
                               "comparison is of Scalars, Strings or Bools; compare numbers derived "
                               "from it instead", vs)
        if isinstance(v, Schedule):
            raise AlgTypeError(f"a per-layer value ({type_name(v)}) cannot be compared with '{op}': a "
                               "comparison gives one Bool, not one per layer; to choose values by "
                               "layer use where(pattern, a, b)", vs)
    num = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
    if op in ("==", "!="):
        ok = _plain(left) and _plain(right) and (
            left is None or right is None or (num(left) and num(right))
            or type(left) is type(right))
    else:
        ok = (num(left) and num(right)) or (isinstance(left, str) and isinstance(right, str))
    if not ok:
        allowed = ("Scalars, Strings, Bools or lists of the same kind (or none)" if op in ("==", "!=")
                   else "two Scalars or two Strings")
        raise AlgTypeError(f"cannot compare {type_name(left)} and {type_name(right)} with '{op}'; "
                           f"'{op}' compares {allowed}", span)
    return _COMPARE[op](left, right)
_DISPATCH = {cls: getattr(Checker, "_" + cls.__name__)
             for cls in (ast.Num, ast.Str, ast.Bool, ast.NoneLit, ast.Name, ast.List, ast.ListComp,
                         ast.Attr, ast.Index, ast.Lambda, ast.UnaryOp, ast.BinOp, ast.Call,
                         ast.Compare, ast.BoolOp, ast.Not, ast.IfExp)}


def bind_source(source: CheckpointSource | MemorySource, span: Span | None) -> Model:
    node = Node("load", (), (source,), span=span)
    return Model(node, CheckpointType(source.tensors, source, source.config))


__all__ = ["Checker", "Checked", "SaveRequest", "bind_source"]
