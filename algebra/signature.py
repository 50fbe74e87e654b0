"""Builtin signatures and argument binding: alg's value types, how a call's arguments
bind to a builtin's parameters (positions, keywords, defaults, variadic lists) and are
checked against their annotations, and how values print.

A builtin is declared by its alg signature, a `def` header parsed by alg's own parser,
and a Python function that receives the bound arguments (`make_builtin`); families
declare them (family.py) and the registry assembles them (registry.py).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import ast
from .ast import literal_value
from .errors import AlgError, AlgTypeError, did_you_mean
from .schedule import Schedule, is_param
from .source import Span
from .types import Function, type_name
from .values import Closure, Model, Namespace

if TYPE_CHECKING:
    from .check import Checker

# ---- types --------------------------------------------------------------------------

# Param: a number or a per-layer/per-tensor value (ramp, where; see schedule.py), for
# method weights; Scalar stays strict where a real number is required (range, rtol); Int is
# a Scalar that is a whole number in INT_RANGE (seeds, counts, layer indices), bound as an int
TYPE_NAMES = ("Any", "Scalar", "Int", "Param", "Schedule", "String", "Bool", "None", "Checkpoint",
              "Function", "List", "Module")

# Every number of alg is finite and at most FLOAT_MAX in size (a float64 can hold it):
# number literals, arithmetic results and arguments are checked against this.
FLOAT_MAX = sys.float_info.max
INT_RANGE = (-(2**63), 2**63 - 1)  # what an Int may be: a signed 64-bit integer


def is_finite(v: Any) -> bool:
    """Whether a number is one alg allows (see FLOAT_MAX); other values pass."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return -FLOAT_MAX <= v <= FLOAT_MAX  # exact: Python compares int and float exactly
    return True


def show_number(text: str) -> str:
    """A number's literal text for a message, shortened when it is long."""
    return text if len(text) <= 24 else f"{text[:12]}...{text[-4:]} ({len(text)} characters)"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return (_is_number(v) and is_finite(v) and float(v).is_integer()
            and INT_RANGE[0] <= v <= INT_RANGE[1])


def check_type_expr(t: ast.TypeExpr, value_types: Iterable[str] = ()) -> None:
    """Whether an annotation names known types: alg's own (TYPE_NAMES) or the value types
    that families declare (Reward, Responses, ...; `Registry.value_types`)."""
    value_types = tuple(value_types)
    if t.name == "|":
        for a in t.args:
            check_type_expr(a, value_types)
        return
    if t.name not in TYPE_NAMES and t.name not in value_types:
        known = (*TYPE_NAMES, *value_types)
        raise AlgTypeError(f"unknown type '{t.name}'{did_you_mean(t.name, known)}", t.span)
    if t.args and t.name != "List":
        raise AlgTypeError(f"type '{t.name}' takes no parameters", t.span)
    if len(t.args) > 1:
        raise AlgTypeError("List takes one element type", t.span)
    for a in t.args:
        check_type_expr(a, value_types)


def conforms(value: Any, t: ast.TypeExpr) -> bool:
    name = t.name
    if name == "|":
        return any(conforms(value, a) for a in t.args)
    if name == "Any":
        return True
    if name == "Scalar":
        return _is_number(value) and is_finite(value)
    if name == "Int":
        return _is_int(value)
    if name == "Param":
        return is_param(value) and is_finite(value)
    if name == "Schedule":
        return isinstance(value, Schedule)
    if name == "String":
        return isinstance(value, str)
    if name == "Bool":
        return isinstance(value, bool)
    if name == "None":
        return value is None
    if name == "Checkpoint":
        return isinstance(value, Model)
    if name == "Function":
        return isinstance(value, Function)
    if name == "Module":
        return isinstance(value, Namespace)
    if name == "List":
        return isinstance(value, tuple) and (not t.args or all(conforms(v, t.args[0]) for v in value))
    # a value type a family declares: its class names it (`alg_type`, see types.type_name)
    return type_name(value) == name


# ---- calls --------------------------------------------------------------------------


@dataclass
class Call:
    """What a builtin sees of its call site."""

    checker: Checker
    span: Span  # the whole call
    spans: dict[str, Span]  # argument name -> span of the argument expression
    name: str

    def at(self, param: str) -> Span:
        return self.spans.get(param, self.span)

    def error(self, cls: type[AlgError], message: str, param: str | None = None) -> AlgError:
        return cls(message, self.at(param) if param else self.span)


@dataclass(eq=False)
class Builtin(Function):
    name: str
    params: tuple[ast.Param, ...]
    impl: Callable[..., Any]
    doc: str
    defaults: dict[str, Any]

    def __repr__(self) -> str:
        return f"<builtin {self.signature()}>"

    def signature(self) -> str:
        parts = []
        for p in self.params:
            if isinstance(p, VarParam):
                parts.append(f"{p.name}...: {p.type.args[0] if p.type and p.type.args else 'Any'}")
                continue
            s = p.name + (f": {p.type}" if p.type else "")
            if p.name in self.defaults:
                s += f" = {_show_default(self.defaults[p.name])}"
            parts.append(s)
        return f"{self.name}({', '.join(parts)})"


def _show_default(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


class VarParam(ast.Param):
    """A builtin's first parameter that takes every positional argument, or one list:
    stack(a, b, c) and stack([a, b, c]) bind parts = [a, b, c]. Its type is List[T];
    each item is checked against T at its own position, and `Call.at("parts[i]")` is the
    i-th item's span."""


def _pack(fname: str, p: VarParam, args: list[tuple[Any, Span]]) -> tuple[list, dict[str, Span]]:
    if len(args) == 1 and isinstance(args[0][0], tuple):
        items = [(v, args[0][1]) for v in args[0][0]]
        packed = (args[0][0], args[0][1])
    else:
        items = list(args)
        packed = (tuple(v for v, _ in args), args[0][1].to(args[-1][1]))
    elem = p.type.args[0] if p.type is not None and p.type.args else None
    spans = {}
    for i, (v, s) in enumerate(items):
        spans[f"{p.name}[{i}]"] = s
        if elem is not None and not conforms(v, elem):
            raise AlgTypeError(f"argument {i + 1} of {fname}() must be {elem}, not {type_name(v)}", s)
    return [packed], spans


def _sig_part(p: ast.Param, defaults: dict[str, Any] | None) -> str:
    """How a parameter reads in a short signature: `lam`, `tokenizer=none`, `parts...`."""
    if isinstance(p, VarParam):
        return f"{p.name}..."
    if defaults is not None and p.name in defaults:
        return f"{p.name}={_show_default(defaults[p.name])}"
    return p.name if p.default is None else f"{p.name}=..."


def bind(
    fname: str,
    params: tuple[ast.Param, ...],
    defaults: dict[str, Any] | None,
    args: list[tuple[Any, Span]],
    kwargs: list[tuple[str, Any, Span, Span]],
    call_span: Span,
) -> tuple[dict[str, Any], dict[str, Span]]:
    """Match positional and keyword arguments to parameters; check annotated types.
    `defaults` holds evaluated defaults (builtins); closures pass None and evaluate
    missing defaults themselves (they are marked by absence from the result).
    A variadic builtin's first parameter is a `VarParam`: it takes every positional
    argument (or one list), and item i's span is spans["NAME[i]"]."""
    names = [p.name for p in params]
    item_spans: dict[str, Span] = {}
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    sig = f"{fname}({', '.join(_sig_part(p, defaults) for p in params)})"
    if params and isinstance(params[0], VarParam) and args:
        args, item_spans = _pack(fname, params[0], args)
    if len(args) > len(params):
        raise AlgTypeError(
            f"{fname}() takes at most {len(params)} argument{'s' if len(params) != 1 else ''} "
            f"({', '.join(names)}), got {len(args)}",
            args[len(params)][1],
        )
    for p, (v, s) in zip(params, args, strict=False):
        values[p.name], spans[p.name] = v, s
    for kname, v, kspan, vspan in kwargs:
        if kname not in names:
            raise AlgTypeError(
                f"{fname}() has no parameter '{kname}'{did_you_mean(kname, names)}", kspan
            ).with_note(f"it takes {sig}")
        if kname in values:
            raise AlgTypeError(f"{fname}() got two values for '{kname}'", kspan)
        values[kname], spans[kname] = v, vspan
    for p in params:
        if p.name in values:
            continue
        if defaults is not None and p.name in defaults:
            values[p.name] = defaults[p.name]
        elif p.default is None:
            raise AlgTypeError(f"{fname}() is missing argument '{p.name}'; it takes {sig}", call_span)
    for p in params:
        if p.type is None or p.name not in values:
            continue
        v = values[p.name]
        if not conforms(v, p.type):
            raise AlgTypeError(f"argument '{p.name}' of {fname}() must be {p.type}, not {_mismatch(v, p.type)}",
                               spans.get(p.name, call_span))
        if isinstance(v, float) and _names_int(p.type) and _is_int(v):
            values[p.name] = int(v)  # a whole number given as 3.0 binds as 3 where an Int is wanted
    spans.update(item_spans)
    return values, spans


def _names_int(t: ast.TypeExpr) -> bool:
    return t.name == "Int" or (t.name == "|" and any(_names_int(a) for a in t.args))


def _mismatch(v: Any, t: ast.TypeExpr) -> str:
    """What is wrong with a value that does not conform: its type, or for a number why it
    is not the number wanted."""
    if _is_number(v) and not is_finite(v):
        return f"{v} (not a finite number)"
    if _is_number(v) and _names_int(t):
        why = "not a whole number" if not float(v).is_integer() else (
            f"outside {INT_RANGE[0]} to {INT_RANGE[1]}")
        return f"{show(v)} ({why})"
    return type_name(v)




def make_builtin(header: str, doc: str, fn: Callable[..., Any], variadic: bool = False,
                 value_types: Iterable[str] = ()) -> Builtin:
    """The builtin `def <header>` implemented by `fn`. With variadic=True the first
    parameter (typed List[T]) takes every positional argument (see VarParam)."""
    from .parser import parse

    program = parse(f"def {header} = none", name=f"<builtin {header.split('(')[0]}>")
    d = program.stmts[0]
    assert isinstance(d, ast.Def)
    for p in d.params:
        if p.type is not None:
            check_type_expr(p.type, value_types)
    defaults = {p.name: literal_value(p.default) for p in d.params if p.default is not None}
    params = d.params
    # the header is the signature; the function must take exactly its parameters, in its
    # order, after the Call (so a parameter renamed in one place is an error at start-up)
    taken = list(inspect.signature(fn).parameters.values())[1:]
    names = [p.name for p in taken]
    generic = [p.kind for p in taken] == [inspect.Parameter.VAR_KEYWORD]  # fn(call, **kw): any header
    if not generic and names != [p.name for p in params]:
        raise ValueError(f"builtin {d.name}: the header declares ({', '.join(p.name for p in params)}) "
                         f"but {fn.__module__}.{fn.__qualname__} takes ({', '.join(names)}) after the call")
    if variadic:
        p0 = params[0]
        params = (VarParam(p0.name, p0.type, p0.default, span=p0.span), *params[1:])
    return Builtin(d.name, params, fn, doc, defaults)


def show(v: Any, quote: bool = True) -> str:
    """How print() and the REPL render a value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v) if not v.is_integer() or abs(v) >= 1e16 else f"{v:.1f}"
    if isinstance(v, str):
        return f'"{v}"' if quote else v
    if isinstance(v, tuple):
        return "[" + ", ".join(show(x) for x in v) + "]"
    if isinstance(v, Model):
        return v.type.describe()
    if isinstance(v, Builtin):
        return f"<builtin {v.signature()}>"
    if isinstance(v, Closure):
        return repr(v)
    return str(v)


__all__ = ["Builtin", "Call", "VarParam", "bind", "check_type_expr", "conforms", "make_builtin", "show"]
