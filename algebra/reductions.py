"""Streamed reductions: values known only after a pass over a group of tensors.

A `Reduction` reads tensor expressions (`ir.TExpr`) chunk by chunk and accumulates a
small value (numbers, a small array) that symbolic coefficients (`ir.Sym`) then read.
Like an expression kind, each reduction is one class with all of its rules side by
side: what it reads (`exprs`), how many chunks that takes (`chunks`), its memory rule
(`buffers`), the line `alg plan` shows (`describe`) and its evaluation rule (`run`,
given the executor's evaluator). The core ones live here (`Gram`, `GramMatrix`); merge
methods define their own beside their lowering (`methods/`). Evaluation imports torch
when it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .ir import TExpr, expr_deps
from .ops import sums


class Reduction:
    """A streamed reduction over a group of tensor expressions: its value is known only
    after a pass over the whole group, and symbolic coefficients (`Sym`) read it. A
    subclass says what it reads (`exprs`), how many chunks that takes, how many
    chunk-sized buffers it holds (for the planner), and how to accumulate (`run`, given
    the executor's evaluator). Values are plain Python/numpy data, never tensors."""

    label: str
    deps: tuple[Reduction, ...]

    def exprs(self) -> list[TExpr]:
        raise NotImplementedError

    def chunks(self, chunk: int) -> int:
        return sum(math.ceil(x.numel / chunk) for x in self._per_tensor_first())

    def _per_tensor_first(self) -> list[TExpr]:
        return self.exprs()

    def biggest(self) -> int:
        return max((x.numel for x in self.exprs()), default=0)

    def buffers(self, cs: int, rule) -> float:
        """Peak chunk-sized buffers (compute-dtype units); `rule(expr, cs)` is an
        expression's own (`ir.buffers`)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def run(self, ev: Any, chunk: int) -> Any:
        raise NotImplementedError

    def _find_deps(self) -> tuple[Reduction, ...]:
        found: dict[int, Reduction] = {}
        for x in self.exprs():
            for g in expr_deps(x):
                found.setdefault(id(g), g)
        return tuple(found.values())

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


def _widened(ev: Any, exprs, e0: int, e1: int):
    return [ev.wide(x, e0, e1) for x in exprs]


@dataclass(eq=False)
class Gram(Reduction):
    """Over every (x, y) pair of tensors in a group, the sums of x.y, x.x and y.y (in
    float64): what a SLERP angle needs."""

    items: tuple[tuple[TExpr, TExpr], ...]
    label: str
    deps: tuple[Reduction, ...] = field(default=())

    def __post_init__(self) -> None:
        self.deps = self._find_deps()

    def exprs(self) -> list[TExpr]:
        return [x for pair in self.items for x in pair]

    def _per_tensor_first(self) -> list[TExpr]:
        return [x for x, _ in self.items]

    def buffers(self, cs: int, rule) -> float:
        # x, then y, in the compute dtype; in float32 each is widened to float64 for the
        # dot products, and both float64 copies are held for them, with one float64
        # chunk of products (ops/sums.py: sums that do not depend on the thread count)
        if cs >= 8:
            return max(max(rule(x, cs), 1.0 + rule(y, cs)) for x, y in self.items) + 1.0
        return max(max(rule(x, cs), rule(y, cs)) for x, y in self.items) + 3 * (8 / cs)

    def describe(self) -> str:
        return f"{self.label}: dot and norms over {len(self.items)} tensor(s)"

    def run(self, ev: Any, chunk: int) -> tuple[float, float, float]:
        import torch

        xy = xx = yy = 0.0
        for x, y in self.items:
            for e0 in range(0, x.numel, chunk):
                e1 = min(x.numel, e0 + chunk)
                a, b = _widened(ev, (x, y), e0, e1)
                prod = ev.pool.take(e1 - e0, torch.float64)
                xy += sums.dot(a, b, out=prod)
                xx += sums.dot(a, a, out=prod)
                yy += sums.dot(b, b, out=prod)
                for t in (a, b, prod):
                    ev.pool.give(t)
        return (xy, xx, yy)

    def __repr__(self) -> str:
        return f"Gram({self.label}, {len(self.items)} tensors)"


@dataclass(eq=False)
class GramMatrix(Reduction):
    """The n x n matrix of inner products <x_i, x_j> summed over a group of tensors (each
    item is one tensor's n expressions), in float64. Everything that depends on the
    vectors only through their lengths and angles (spherical means, Model Stock's
    cosines, Karcher means) is a small solve over this matrix: one streamed pass, then
    a linear write pass with the solved coefficients."""

    items: tuple[tuple[TExpr, ...], ...]
    label: str
    deps: tuple[Reduction, ...] = field(default=())

    def __post_init__(self) -> None:
        self.deps = self._find_deps()

    @property
    def n(self) -> int:
        return len(self.items[0]) if self.items else 0

    def exprs(self) -> list[TExpr]:
        return [x for row in self.items for x in row]

    def _per_tensor_first(self) -> list[TExpr]:
        return [row[0] for row in self.items]

    def buffers(self, cs: int, rule) -> float:
        # each expression is evaluated then widened; all n float64 copies are held, with
        # one float64 chunk of products
        wide = 1.0 if cs >= 8 else 8 / cs
        return max(max(rule(x, cs) for x in row) for row in self.items) + (len(self.items[0]) + 1) * wide

    def describe(self) -> str:
        return f"{self.label}: {self.n}x{self.n} inner products over {len(self.items)} tensor(s)"

    def run(self, ev: Any, chunk: int):
        import numpy as np
        import torch

        total = np.zeros((self.n, self.n))
        for row in self.items:
            numel = row[0].numel
            for e0 in range(0, numel, chunk):
                e1 = min(numel, e0 + chunk)
                vs = _widened(ev, row, e0, e1)
                prod = ev.pool.take(e1 - e0, torch.float64)
                for i in range(self.n):
                    for j in range(i, self.n):
                        total[i, j] += sums.dot(vs[i], vs[j], out=prod)
                for v in (*vs, prod):
                    ev.pool.give(v)
        iu = np.triu_indices(self.n, 1)
        total[iu[1], iu[0]] = total[iu[0], iu[1]]
        return total

    def __repr__(self) -> str:
        return f"GramMatrix({self.label}, {self.n} vectors, {len(self.items)} tensors)"


__all__ = ["Gram", "GramMatrix", "Reduction"]
