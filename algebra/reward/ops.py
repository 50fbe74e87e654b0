"""The pointwise operations of rewards: one registry, one definition per operation.

A `PointwiseOp` is all that alg knows about one pointwise operation on rewards: its name,
its arity, its math and its help line. Its `fn` is written once, with numpy, and serves
both uses:

- float64 arrays, one value per (prompt, response), when `pointwise.TreeEval` evaluates a
  reward tree;
- numbers, when a recipe applies the operation to numbers (`logsig(0)`, `sum(1, 2)`),
  through `PointwiseOp.scalar`: the same fn on 0-d float64 arrays, converted back to a
  Python float. An op marked `exact` (its fn only adds, subtracts, multiplies, divides
  and compares) runs on 0-d object arrays instead, which is Python's own arithmetic:
  whole numbers stay exact whole numbers, as in alg's `+ - * /` (`sum(1, 2)` is 3).

Everything else reads this registry: reward/builtins.py declares one alg function per op
(`header`), `values.Op` checks arities and prints operators, `pointwise.TreeEval` applies
`fn`, and convert/signatures.py knows the names (this module imports neither numpy nor
torch at start-up, so `alg check` and `alg convert` read it for free).

Adding a reward transform is one `register(PointwiseOp(...))` call here; tests add theirs
inside `scoped()`, which removes them again on exit.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

REWARD_ARG = "Reward | Scalar"  # the alg type of an argument that is a reward or a number


class _Numpy:
    """numpy, imported on first use: checking a recipe needs the names, not the math."""

    def __getattr__(self, name: str) -> Any:
        import numpy

        return getattr(numpy, name)


np: Any = _Numpy()


@dataclass(frozen=True)
class PointwiseOp:
    name: str
    # how many reward arguments (the tree node's children); None: one or more, any number
    arity: int | None
    # the math: float64 numpy arrays (all of one shape) -> an array of that shape; also
    # given 0-d arrays (see `scalar`). Non-finite values follow IEEE, numpy's warnings off.
    fn: Callable[..., Any]
    doc: str  # the alg function's help text ("" for an operator)
    # an operator (+ - * /, unary -): written with that symbol, no alg function of the name
    symbol: str | None = None
    # the alg parameter list, when not `arity` arguments of type Reward | Scalar (clip's lo,
    # hi are numbers only; a reward argument enters the tree as itself, a number as a Const)
    params: str | None = None
    # fn only adds, subtracts, multiplies, divides and compares: numbers use Python's exact
    # arithmetic (whole numbers stay whole), otherwise float64
    exact: bool = False
    # a precondition on the arguments (name -> value): None, or (parameter, message)
    check: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None

    @property
    def header(self) -> str | None:
        """The alg function's declaration, `name(params)`; None for an operator."""
        if self.symbol is not None:
            return None
        if self.params is not None:
            return f"{self.name}({self.params})"
        if self.arity is None:
            return f"{self.name}(xs: Any)"  # variadic: f(a, b, ...) or f([a, b, ...])
        return f"{self.name}({', '.join(f'{p}: {REWARD_ARG}' for p in self.arg_names)})"

    @property
    def arg_names(self) -> tuple[str, ...]:
        """The names of the fixed-arity arguments, in order (fn's argument order)."""
        if self.params is not None:
            return tuple(p.split(":")[0].strip() for p in self.params.split(","))
        if self.arity is None:
            return ("xs",)
        return ("x", "y", "z")[: self.arity] if self.arity <= 3 else tuple(f"x{i + 1}" for i in range(self.arity))

    def scalar(self, *xs: Any) -> Any:
        """fn on numbers: the same definition as on arrays (see the module docstring). The
        result may be non-finite (inf, nan) or raise OverflowError/ZeroDivisionError in
        Python's arithmetic; the caller decides what that means."""
        import numpy

        with numpy.errstate(all="ignore"):
            if self.exact:
                out = self.fn(*(numpy.array(x, dtype=object) for x in xs))
                return out.item() if isinstance(out, numpy.ndarray) else out
            return float(self.fn(*(numpy.array(float(x)) for x in xs)))


# ---- the registry ------------------------------------------------------------------------------

POINTWISE: dict[str, PointwiseOp] = {}  # name -> op, in registration order

# Listeners (reward/builtins.py installs one that declares each op as an alg function): each
# gets every op, now and when it is registered, and returns how to retract what it did.
_listeners: list[Callable[[PointwiseOp], Callable[[], None]]] = []
_retract: dict[str, list[Callable[[], None]]] = {}


def register(op: PointwiseOp) -> PointwiseOp:
    """Add one pointwise op (a ValueError for a name already taken, here or by a listener)."""
    if op.name in POINTWISE:
        raise ValueError(f"a pointwise reward op named '{op.name}' exists")
    if op.arity is not None and op.arity < 1:
        raise ValueError(f"{op.name}: arity must be at least 1 (or None for any number)")
    if op.symbol is None and not op.doc:
        raise ValueError(f"{op.name}: an alg function needs its help text (doc)")
    done: list[Callable[[], None]] = []
    try:
        for listen in _listeners:
            done.append(listen(op))
    except Exception:
        for undo in reversed(done):
            undo()
        raise
    POINTWISE[op.name] = op
    _retract[op.name] = done
    return op


def get(name: str) -> PointwiseOp:
    return POINTWISE[name]


def watch(listener: Callable[[PointwiseOp], Callable[[], None]]) -> None:
    """Call `listener` on every op registered so far and on each one registered later."""
    for op in POINTWISE.values():
        _retract.setdefault(op.name, []).append(listener(op))
    _listeners.append(listener)


@contextmanager
def scoped() -> Iterator[None]:
    """Ops registered inside the block are gone after it (and so are their alg functions),
    however the block ends: tests add theirs without leaking them into later tests."""
    before = set(POINTWISE)
    try:
        yield
    finally:
        for name in [n for n in POINTWISE if n not in before]:
            for undo in reversed(_retract.pop(name, [])):
                undo()
            del POINTWISE[name]


# ---- the shipped ops ---------------------------------------------------------------------------


def logsig(x: Any) -> Any:
    """log sigmoid(x) = -log(1 + e^-x) = -logaddexp(0, -x): no overflow for any x."""
    return -np.logaddexp(0.0, -x)


def sigmoid(x: Any) -> Any:
    """1 / (1 + e^-x), from e^-|x|, which never overflows."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _sum(*xs: Any) -> Any:
    return functools.reduce(operator.add, xs)  # left to right: the same rounding every run


def _mean(*xs: Any) -> Any:
    return _sum(*xs) / len(xs)


def _min(*xs: Any) -> Any:
    return functools.reduce(np.minimum, xs)  # a nan anywhere gives nan


def _max(*xs: Any) -> Any:
    return functools.reduce(np.maximum, xs)


def _clip(x: Any, lo: Any, hi: Any) -> Any:
    return np.minimum(np.maximum(x, lo), hi)


def _clip_bounds(a: dict[str, Any]) -> tuple[str, str] | None:
    if a["lo"] > a["hi"]:
        return "lo", f"clip() needs lo <= hi, got {a['lo']} > {a['hi']}"
    return None


for _op in (
    PointwiseOp("add", 2, operator.add, "", symbol="+", exact=True),
    PointwiseOp("sub", 2, operator.sub, "", symbol="-", exact=True),
    PointwiseOp("mul", 2, operator.mul, "", symbol="*", exact=True),
    PointwiseOp("div", 2, operator.truediv, "", symbol="/", exact=True),
    PointwiseOp("neg", 1, operator.neg, "", symbol="-", exact=True),
    PointwiseOp("logsig", 1, logsig, "log sigmoid(x), computed stably: -log(1 + e^-x). Pointwise on a reward."),
    PointwiseOp("sigmoid", 1, sigmoid, "1 / (1 + e^-x). Pointwise on a reward."),
    PointwiseOp("exp", 1, lambda x: np.exp(x), "e^x. Pointwise on a reward."),
    PointwiseOp("log", 1, lambda x: np.log(x),
                "The natural logarithm. Pointwise on a reward (non-positive values fail the run)."),
    PointwiseOp("clip", 3, _clip, "x limited to [lo, hi]. Pointwise on a reward.",
                params=f"x: {REWARD_ARG}, lo: Scalar, hi: Scalar", exact=True, check=_clip_bounds),
    PointwiseOp("sum", None, _sum, "The sum of its arguments (any number of rewards and numbers, or one list).",
                exact=True),
    PointwiseOp("mean", None, _mean, "The mean of its arguments (rewards and numbers, or one list).", exact=True),
    PointwiseOp("min", None, _min, "The least of its arguments, pointwise for rewards.", exact=True),
    PointwiseOp("max", None, _max, "The greatest of its arguments, pointwise for rewards.", exact=True),
):
    register(_op)


__all__ = ["POINTWISE", "REWARD_ARG", "PointwiseOp", "get", "logsig", "register", "scoped", "sigmoid", "watch"]
