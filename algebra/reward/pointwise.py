"""Evaluate reward trees at (prompt, response) points, in float64 numpy.

`TreeEval(lookup, data)` walks a tree; model leaves ask `lookup(leaf, points)` for their
scores. The planner runs it with a lookup that records which texts each model must score
and returns zeros; the engine runs it again with the real scores. One traversal serves
both, so the texts planned are exactly the texts evaluated. An `Op` applies its
`reward.ops` definition to float64 arrays.

Per-prompt baselines are computed once per (baseline, prompt) and `normalize`'s mean and
standard deviation once per tree, then reused: "fixed once computed", also across calls
of a TRL reward function that keeps its `TreeEval`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import AlgRuntimeError
from .data import Pairs, Prompt, Responses, show_prompt
from .ops import POINTWISE, logsig, sigmoid
from .values import Baseline, Const, ModelReward, Normalize, Op, Refusal, Reward

Points = list[tuple[Prompt, str]]


def quantile(values: np.ndarray, q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, R's type 7)."""
    return float(np.quantile(values, q, method="linear"))


class TreeEval:
    def __init__(self, lookup: Callable[[ModelReward, Points], np.ndarray],
                 data: Callable[[Any], Responses | Pairs], record: bool = False,
                 sample: Callable[[Any, list[Prompt]], dict[Prompt, list[str]]] | None = None):
        self.lookup = lookup
        self.data = data  # resolves a Generated to its responses
        self.sample = sample  # (Generated, prompts) -> references sampled for them (missing=)
        self.record = record  # planning: values are placeholders, no numerical checks
        self._baselines: dict[Reward, dict[Prompt, float]] = {}
        self._stats: dict[Reward, tuple[float, float]] = {}

    def value(self, r: Reward, points: Points) -> np.ndarray:
        with np.errstate(all="ignore"):
            return self._value(r, points)

    def _value(self, r: Reward, points: Points) -> np.ndarray:
        if not points:
            return np.zeros(0)
        if isinstance(r, ModelReward):
            return np.asarray(self.lookup(r, points), dtype=np.float64)
        if isinstance(r, Const):
            return np.full(len(points), r.value)
        if isinstance(r, Op):
            return np.asarray(POINTWISE[r.op].fn(*(self._value(a, points) for a in r.args)), dtype=np.float64)
        if isinstance(r, Refusal):
            return self._value(r.r, [(p, r.text) for p, _ in points])
        if isinstance(r, Baseline):
            table = self._baseline(r, [p for p, _ in points])
            return np.array([table[p] for p, _ in points])
        if isinstance(r, Normalize):
            mu, sd = self._normalizer(r)
            return (self._value(r.r, points) - mu) / sd
        raise AssertionError(type(r))

    def _baseline(self, b: Baseline, prompts: list[Prompt]) -> dict[Prompt, float]:
        table = self._baselines.setdefault(b, {})
        todo = [p for p in dict.fromkeys(prompts) if p not in table]
        if not todo:
            return table
        refs = self.data(b.refs).by_prompt()
        lacking = [p for p in todo if p not in refs]
        if lacking:
            if isinstance(b.missing, float):  # missing=<number>: a fixed value
                for p in lacking:
                    table[p] = b.missing
                todo = [p for p in todo if p in refs]
            elif b.missing == "error" or self.sample is None:
                raise AlgRuntimeError(f"{b.stat}: the prompt {show_prompt(lacking[0])} has no reference responses "
                                      f"in {b.refs} ({len(lacking)} such prompt(s)); give {b.stat}() a missing= "
                                      "fallback (a number, or generate(policy, ...) to sample references)")
            else:  # missing=generate(...): references sampled for these prompts
                refs = {**refs, **self.sample(b.missing, lacking)}
        points: Points = []
        for p in todo:
            points.extend((p, s) for s in refs[p])
        values = self._value(b.r, points)  # one pass: the model scores all of them together
        i = 0
        for p in todo:
            k = len(refs[p])
            v = values[i : i + k]
            i += k
            table[p] = quantile(v, b.q) if b.stat == "quantile" else float(np.mean(v))
        return table

    def _normalizer(self, n: Normalize) -> tuple[float, float]:
        if n in self._stats:
            return self._stats[n]
        values = self._value(n.r, self.data(n.data).points())
        mu, sd = float(np.mean(values)), float(np.std(values))
        if self.record:
            return mu, 1.0  # placeholders; the real statistics come with the real scores
        if not np.isfinite(mu) or not np.isfinite(sd):
            raise AlgRuntimeError(f"normalize: {n.r} is not finite over {n.data}")
        if sd == 0:
            raise AlgRuntimeError(f"normalize: {n.r} is constant over {n.data} (standard deviation 0)")
        self._stats[n] = (mu, sd)
        return mu, sd


__all__ = ["Points", "TreeEval", "logsig", "quantile", "sigmoid"]
