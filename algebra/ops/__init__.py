"""The registry of elementwise tensor primitives.

A primitive is a small pure torch function over equally shaped float tensors (in the
compute dtype) plus scalar parameters, declared once here with its arity and how many
chunk-sized buffers it allocates beyond its result (for the planner's memory
prediction). No I/O and no globals inside a primitive. Linear combinations are not
primitives: `lower.lin` folds them and the executor accumulates them in place.

Add a primitive with `@primitive("name", arity=N)`; `lower` refers to it by name.
Two flags widen what a primitive may depend on: `positional` (it receives `e0=`, the
index of the chunk's first element in its own tensor, for rules that depend on an
element's position: counter-based random draws, ties broken by index) and `rowwise`
(it sees whole rows, rows being the last dimension of its result: the evaluator widens
a range to whole rows, and the planner aligns write chunks to rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import did_you_mean
from ..lazy import torch


@dataclass(frozen=True)
class Primitive:
    name: str
    fn: Callable[..., torch.Tensor]
    arity: int  # tensor arguments (-1: any number); scalar parameters follow them
    doc: str
    # extra chunk-sized buffers alive during the call, beyond the result: a number, or a
    # function of the Map expression (for primitives whose scratch depends on their arity)
    scratch: float | Callable[[object], float] = 0
    positional: bool = False  # fn receives e0= (see the module docstring)
    # fn sees whole rows of its result's last dimension (or a function of the Map
    # expression saying whether this call needs them)
    rowwise: bool | Callable[[object], bool] = False

    def scratch_for(self, expr: object) -> float:
        return float(self.scratch(expr) if callable(self.scratch) else self.scratch)

    def rowwise_for(self, expr: object) -> bool:
        return bool(self.rowwise(expr) if callable(self.rowwise) else self.rowwise)


OPS: dict[str, Primitive] = {}


def primitive(name: str, arity: int, scratch: float | Callable[[object], float] = 0,
              positional: bool = False, rowwise: bool | Callable[[object], bool] = False):
    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in OPS:
            raise ValueError(f"primitive '{name}' is defined twice")
        OPS[name] = Primitive(name, fn, arity, (fn.__doc__ or "").strip(), scratch, positional, rowwise)
        return fn

    return register


def get(name: str) -> Primitive:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"no primitive '{name}'{did_you_mean(name, OPS)}") from None


@primitive("mul", arity=2)
def mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * y, elementwise."""
    return torch.mul(x, y)


@primitive("div", arity=2)
def div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x / y, elementwise (IEEE: x/0 is inf or nan, caught by the finiteness check)."""
    return torch.div(x, y)


@primitive("close_excess", arity=2, scratch=1)
def close_excess(x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """|x - y| - (atol + rtol*|y|): positive exactly where x and y are not close."""
    return torch.sub(x, y).abs_().sub_(y.abs().mul_(rtol).add_(atol))


@primitive("rdiv", arity=1)
def rdiv(x: torch.Tensor, c: float) -> torch.Tensor:
    """c / x, elementwise."""
    return torch.reciprocal(x).mul_(c)
