"""The registry of elementwise tensor primitives.

A primitive is a small pure torch function over equally shaped float tensors (in the
compute dtype) plus scalar parameters, declared once here with its arity and how many
chunk-sized buffers it allocates beyond its result (for the planner's memory
prediction). No I/O and no globals inside a primitive. Linear combinations are not
primitives: `lower.lin` folds them and the executor accumulates them in place.

Declare a primitive on a family with `@family.primitive("name", arity=N)` (here: the
`ops` family's `primitive`); the registry (registry.py) assembles them, and `OPS` is the
registry in use's table; `lower` refers to a primitive by name.
Two flags widen what a primitive may depend on: `positional` (it receives `e0=`, the
index of the chunk's first element in its own tensor, for rules that depend on an
element's position: counter-based random draws, ties broken by index) and `rowwise`
(it sees whole rows, rows being the last dimension of its result: the evaluator widens
a range to whole rows, and the planner aligns write chunks to rows). A third,
`pooled`, hands it the evaluator's chunk pool (`pool=`): it takes its chunk-sized
temporaries and its result from there, and gives back all but the result. A fourth,
`stored`, hands it the compute dtype (`dtype=`) and lets the evaluator pass an input
chunk as the checkpoint stores it (bfloat16, already checked finite in this step:
`Evaluator.stored`) for a compiled loop to convert as it reads; whatever it does not
read so, it converts to `dtype` itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from ..errors import did_you_mean
from ..family import Family, Primitive, in_use
from ..lazy import torch

family = Family("ops")
primitive = family.primitive


class _InUse(Mapping):
    """The primitives of the registry in use (family.in_use), by name."""

    def __getitem__(self, name: str) -> Primitive:
        return in_use().primitives[name]

    def __iter__(self) -> Iterator[str]:
        return iter(in_use().primitives)

    def __len__(self) -> int:
        return len(in_use().primitives)


OPS: Mapping[str, Primitive] = _InUse()


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
