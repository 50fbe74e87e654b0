"""Per-layer and per-tensor values: `ramp(...)`, `where(...)` and their arithmetic.

A `Param` is a number or a `Schedule`. A schedule is a small frozen, hashable
expression (it goes into graph node parameters, so equal schedules make one node) that
gives one number per tensor of a checkpoint:

    ramp(v0, v1, ..., vk)   piecewise linear over depth: layer i of L gets the
                            interpolation of the k+1 evenly spaced knots at i/(L-1)
                            (mergekit's gradient lists). Tensors outside the layer stack:
                            the input embeddings (and their norm) get v0; the final norm,
                            the output head and every other tensor after the stack get vk.
                            A tied head is the embedding, so it gets v0.
    ramp(..., rule="mergekit")
                            mergekit's own rule, which `alg convert mergekit` writes:
                            layer i of L at i/(L-1) as above, but a stack of one
                            layer gets vk (mergekit's t = 1) and every tensor outside
                            the stack, after it as well as before, gets v0 (mergekit
                            evaluates them at t = 0).
    where(p, x, y)          x for tensors whose name matches the regular expression p
                            (a plain substring such as "self_attn" is one), y elsewhere;
                            x and y may be schedules themselves.
    s + c, c * s, 1 - s     arithmetic with numbers and with other schedules, so the
                            stdlib's `lerp(a, b, t) = (1 - t) * a + t * b` takes t = ramp(0, 1).

Lowering calls `resolve(value, tensor_name, checkpoint_type)` for every parameter of a
node (numbers pass through); the depth of a name comes from `arch.arch_of`, computed
from the headers of the node's own result, so a ramp over a frankenmerge follows the
renumbered layers.

Invariant: resolving reads names and config only, and is a pure function of
(schedule, name, checkpoint type).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .arch import Arch, arch_of
from .errors import AlgTypeError
from .source import Span
from .types import CheckpointType

_SYM = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_param(v: Any) -> bool:
    """A value allowed where a method takes a Param: a number or a schedule."""
    return is_number(v) or isinstance(v, Schedule)


def as_param(v: Any) -> float | Schedule:
    """Numbers enter graph keys as floats so that 1 and 1.0 are one node."""
    return v if isinstance(v, Schedule) else float(v)


class Schedule:
    """A value per tensor; see the module docstring."""

    alg_type = "Schedule"  # its name in alg (types.type_name)

    def at(self, name: str, arch: Arch) -> float:
        raise NotImplementedError

    def wheres(self) -> list[Where]:
        return []

    def uses_depth(self) -> bool:
        return False

    # the checker's operator hook: a schedule combines with numbers and schedules; with
    # a checkpoint it returns NotImplemented and checkpoint arithmetic scales per tensor
    def alg_binop(self, op: str, other: Any, reflected: bool, span: Span, self_span: Span, other_span: Span):
        if not is_param(other):
            return NotImplemented
        left, right = (other, self) if reflected else (self, other)
        if op == "div" and is_number(right) and right == 0:
            raise AlgTypeError("division by zero", other_span if not reflected else self_span)
        return combine(op, as_param(left), as_param(right))

    def alg_unary(self, op: str, span: Span):
        return self if op == "+" else combine("mul", -1.0, self)


RAMP_RULES = ("alg", "mergekit")


@dataclass(frozen=True)
class Ramp(Schedule):
    values: tuple[float, ...]
    rule: str = "alg"  # one of RAMP_RULES

    def at(self, name: str, arch: Arch) -> float:
        if self.rule == "mergekit":
            i = arch.layer_of.get(name)
            if i is None:
                return self.values[0]
            return interpolate(self.values, i / (arch.n_layers - 1) if arch.n_layers > 1 else 1.0)
        return interpolate(self.values, arch.depth(name))

    def uses_depth(self) -> bool:
        return True

    def __repr__(self) -> str:
        rule = "" if self.rule == "alg" else f', rule="{self.rule}"'
        return f"ramp({', '.join(_num(v) for v in self.values)}{rule})"


@dataclass(frozen=True)
class Where(Schedule):
    pattern: str
    then: float | Schedule
    other: float | Schedule
    # where it was written, for warnings; not part of its identity
    span: Span | None = field(default=None, compare=False, hash=False, repr=False)

    def at(self, name: str, arch: Arch) -> float:
        branch = self.then if _regex(self.pattern).search(name) else self.other
        return branch.at(name, arch) if isinstance(branch, Schedule) else branch

    def wheres(self) -> list[Where]:
        return [self, *_wheres(self.then), *_wheres(self.other)]

    def uses_depth(self) -> bool:
        return any(isinstance(b, Schedule) and b.uses_depth() for b in (self.then, self.other))

    def __repr__(self) -> str:
        return f"where({json.dumps(self.pattern)}, {_show(self.then)}, {_show(self.other)})"


@dataclass(frozen=True)
class Arith(Schedule):
    op: str  # add | sub | mul | div
    left: float | Schedule
    right: float | Schedule

    def at(self, name: str, arch: Arch) -> float:
        a = self.left.at(name, arch) if isinstance(self.left, Schedule) else self.left
        b = self.right.at(name, arch) if isinstance(self.right, Schedule) else self.right
        if self.op == "add":
            return a + b
        if self.op == "sub":
            return a - b
        if self.op == "mul":
            return a * b
        if b == 0:
            raise ZeroDivisionError(f"{self!r} divides by zero")
        return a / b

    def wheres(self) -> list[Where]:
        return [*_wheres(self.left), *_wheres(self.right)]

    def uses_depth(self) -> bool:
        return any(isinstance(b, Schedule) and b.uses_depth() for b in (self.left, self.right))

    def __repr__(self) -> str:
        return f"({_show(self.left)} {_SYM[self.op]} {_show(self.right)})"


def combine(op: str, a: float | Schedule, b: float | Schedule) -> float | Schedule:
    """a op b, folding numbers and the identities x*1, x+0, x-0, x/1."""
    if not isinstance(a, Schedule) and not isinstance(b, Schedule):
        return {"add": a + b, "sub": a - b, "mul": a * b}[op] if op != "div" else a / b
    if op in ("add", "sub") and not isinstance(b, Schedule) and b == 0:
        return a
    if op == "add" and not isinstance(a, Schedule) and a == 0:
        return b
    if op in ("mul", "div") and not isinstance(b, Schedule) and b == 1:
        return a
    if op == "mul" and not isinstance(a, Schedule) and a == 1:
        return b
    return Arith(op, a, b)


def neg(v: float | Schedule) -> float | Schedule:
    return combine("mul", -1.0, v)


def recip(v: float | Schedule) -> float | Schedule:
    return combine("div", 1.0, v)


def interpolate(values: tuple[float, ...], x: float) -> float:
    """Piecewise-linear interpolation of evenly spaced knots over [0, 1]; exact at knots."""
    k = len(values) - 1
    p = min(max(x, 0.0), 1.0) * k
    j = min(int(p), k)
    frac = p - j
    if j == k or frac == 0.0:
        return values[j]
    return values[j] + frac * (values[j + 1] - values[j])


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def compile_pattern(pattern: str) -> str | None:
    """None when the pattern compiles, else why it does not."""
    try:
        _regex(pattern)
    except re.error as e:
        return str(e)
    return None


def _wheres(v: Any) -> list[Where]:
    return v.wheres() if isinstance(v, Schedule) else []


def _num(v: float) -> str:
    return f"{v:g}"


def _show(v: float | Schedule) -> str:
    return repr(v) if isinstance(v, Schedule) else _num(v)


def resolve(value: Any, name: str, t: CheckpointType | Arch | None) -> Any:
    """The number a parameter takes for tensor `name` of a checkpoint of type `t` (the
    node's own result type). Numbers and every other value pass through unchanged."""
    if not isinstance(value, Schedule):
        return value
    arch = t if isinstance(t, Arch) else arch_of(t)
    v = value.at(name, arch)
    if not math.isfinite(v):
        raise Overflow(f"{value!r} is not finite for '{name}'")
    return float(v)


class Overflow(ZeroDivisionError):
    """A per-tensor value that overflows (finite knots, e.g. ramp(1e308, 1) * 10): raised
    where a division by zero is, and reported as not finite rather than as a division."""


def resolve_params(params: tuple, name: str, t: CheckpointType) -> tuple:
    """`resolve` over a node's parameters, through nested tuples."""
    if not any(_has_schedule(p) for p in params):
        return params
    return tuple(_resolve_deep(p, name, t) for p in params)


def _has_schedule(p: Any) -> bool:
    if isinstance(p, Schedule):
        return True
    return isinstance(p, tuple) and any(_has_schedule(x) for x in p)


def _resolve_deep(p: Any, name: str, t: CheckpointType) -> Any:
    if isinstance(p, Schedule):
        return resolve(p, name, t)
    if isinstance(p, tuple):
        return tuple(_resolve_deep(x, name, t) for x in p)
    return p


def schedules_in(params: tuple) -> list[Schedule]:
    out: list[Schedule] = []
    for p in params:
        if isinstance(p, Schedule):
            out.append(p)
        elif isinstance(p, tuple):
            out.extend(schedules_in(p))
    return out


__all__ = [
    "RAMP_RULES", "Arith", "Ramp", "Schedule", "Where", "as_param", "combine", "interpolate", "is_param",
    "neg", "recip", "resolve", "resolve_params", "schedules_in",
]
