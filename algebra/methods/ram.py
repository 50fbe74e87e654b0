"""RAM, Reinforced Agent Merging (arXiv:2601.13572): `ram` and `ramplus_tl`, as mergekit
0.1.5 defines them. The rule is in `ops/ram.py`.

`ram` is elementwise: one `ram_combine` primitive per tensor. `ramplus_tl` rescales each
model's unique entries by a lambda_i that depends on how many of its updated entries of
the tensor are shared or unique: a streamed reduction (`RamCounts`) counts them first,
and `RamLambda` turns the counts into lambda_i, read by the write pass as a symbolic
scalar. Memory stays at a few chunks per model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import AlgRuntimeError, AlgTypeError
from ..family import Family
from ..graph import Node
from ..lower import Lowerer, Map, Reduction, Sym, TExpr
from ..ops.ram import counts
from ..rules import derived
from ..signature import Call
from ..values import Model
from .common import TOKENIZER_PARAM, model_list, same_as_base, with_tokenizer

family = Family("ram")
builtin = family.builtin

# mergekit's defaults: an entry with |d_i| above epsilon counts as updated; RAM+'s r, alpha
DEFAULTS = {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
PARAMS = {"ram": ("epsilon",), "ramplus_tl": ("r", "alpha", "epsilon")}  # each node's params, in order
AT_LEAST_0 = ("alpha", "epsilon")  # r may be negative (it shrinks unique entries), as in mergekit


@dataclass(eq=False)
class RamCounts(Reduction):
    """Per model, over one tensor: how many of its updated entries are shared with
    another model and how many are its alone. Value: (shared_0, unique_0, shared_1, ...)."""

    base: TExpr
    ms: tuple[TExpr, ...]
    epsilon: float
    label: str
    deps: tuple[Reduction, ...] = field(default=())

    def __post_init__(self) -> None:
        self.deps = self._find_deps()

    def exprs(self) -> list[TExpr]:
        return [self.base, *self.ms]

    def _per_tensor_first(self) -> list[TExpr]:
        return [self.base]

    def buffers(self, cs: int, rule) -> float:
        n = len(self.ms)
        # the inputs, the task vectors, their masks and the counts
        return rule(self.base, cs) + sum(rule(m, cs) for m in self.ms) + 2.0 * n + 1.0

    def describe(self) -> str:
        return f"{self.label}: shared and unique updated entries of {len(self.ms)} model(s)"

    def run(self, ev: Any, chunk: int) -> tuple[int, ...]:
        n = self.base.numel
        totals = [0] * (2 * len(self.ms))
        for e0 in range(0, n, chunk):
            e1 = min(n, e0 + chunk)
            base = ev.eval(self.base, e0, e1)
            ms = [ev.eval(m, e0, e1) for m in self.ms]
            for i, (shared, unique) in enumerate(counts(base, ms, self.epsilon)):
                totals[2 * i] += shared
                totals[2 * i + 1] += unique
            for x in (base, *ms):
                ev.pool.give(x)
        return tuple(totals)

    def __repr__(self) -> str:
        return f"RamCounts({self.label})"


@dataclass(eq=False)
class RamLambda(Sym):
    """Model i's factor on its unique entries: 1 + r * clamp(shared / max(unique, epsilon),
    0, alpha)."""

    red: RamCounts
    i: int
    r: float
    alpha: float
    epsilon: float

    @property
    def deps(self) -> tuple[Reduction, ...]:
        return (self.red,)

    def value(self, results: dict) -> float:
        shared, unique = results[self.red][2 * self.i: 2 * self.i + 2]
        rho = shared / max(unique, self.epsilon)
        return 1.0 + self.r * min(max(rho, 0.0), self.alpha)

    def __repr__(self) -> str:
        return f"ram_lambda({self.red.label}, {self.i})"


# ---- builtins --------------------------------------------------------------------------------


def _params(call: Call, values: tuple[Any, ...]) -> tuple[Any, ...]:
    """The node's parameters (`PARAMS`): numbers as floats, checked against `AT_LEAST_0`;
    per-layer values unchanged (checked when lowered)."""
    out = []
    for param, value in zip(PARAMS[call.name], values, strict=True):
        if isinstance(value, int | float) and not isinstance(value, bool):
            if param in AT_LEAST_0 and not value >= 0:
                raise call.error(AlgTypeError, f"{call.name}(): {param} must be at least 0, got {value:g}", param)
            value = float(value)
        out.append(value)
    return tuple(out)


def _models(call: Call, base: Model, ms: Any, tokenizer: Any) -> tuple[Model, tuple[Model, ...]]:
    base, models = with_tokenizer(call, tokenizer, base, model_list(call, ms, "ms", at_least=1))
    same_as_base(call, base, models)
    return base, models


_RULE = ("Per element, with d_i = m_i - base: model i updated it iff |d_i| > epsilon. An element "
         "one model updated takes that model's d_i{unique}; one several updated takes the mean of "
         "their d_i; one nobody updated stays base's. Config of base.")


@builtin(
    f"ram(base: Checkpoint, ms: List[Checkpoint], epsilon: Param = {DEFAULTS['epsilon']}, {TOKENIZER_PARAM})",
    "RAM, Reinforced Agent Merging (mergekit's ram). " + _RULE.format(unique=""),
)
def _ram(call: Call, base: Model, ms: Any, epsilon: Any, tokenizer: Any = None) -> Model:
    base, models = _models(call, base, ms, tokenizer)
    return derived(Node("ram", (base.node, *(m.node for m in models)), _params(call, (epsilon,)),
                        span=call.span), base)


@builtin(
    f"ramplus_tl(base: Checkpoint, ms: List[Checkpoint], r: Param = {DEFAULTS['r']}, "
    f"alpha: Param = {DEFAULTS['alpha']}, epsilon: Param = {DEFAULTS['epsilon']}, {TOKENIZER_PARAM})",
    "RAM+, tensor-local (mergekit's ramplus_tl): as ram, but model i's unique entries are "
    "scaled by 1 + r·clamp(shared_i / unique_i, 0, alpha), shared_i and unique_i counting "
    "model i's updated entries of the tensor that others updated too, or none did (r < 0 "
    "shrinks them; alpha and epsilon are at least 0). "
    + _RULE.format(unique=" (scaled)"),
)
def _ramplus_tl(call: Call, base: Model, ms: Any, r: Any, alpha: Any, epsilon: Any, tokenizer: Any = None) -> Model:
    base, models = _models(call, base, ms, tokenizer)
    return derived(Node("ramplus_tl", (base.node, *(m.node for m in models)), _params(call, (r, alpha, epsilon)),
                        span=call.span), base)


# ---- lowering and rendering ------------------------------------------------------------------------


def _numbers(low: Lowerer, node: Node, name: str) -> dict[str, float]:
    """The node's parameters as they apply to tensor `name`, checked against `AT_LEAST_0`
    (a per-layer value is known only here)."""
    out = {}
    for param, value in zip(PARAMS[node.op], node.params, strict=True):
        x = out[param] = float(low.param(value, node, name))
        if param in AT_LEAST_0 and not x >= 0:
            raise AlgRuntimeError(f"{node.op}(): {param} must be at least 0, got {x:g} for '{name}'", node.span)
    return out


@family.lowering("ram")
@family.lowering("ramplus_tl")
def _lower(low: Lowerer, node: Node, name: str) -> TExpr:
    base, *ms = (low.tensor(a, name) for a in node.args)
    p = _numbers(low, node, name)
    epsilon = p["epsilon"]
    lambdas: list[Any] = [1.0] * len(ms)
    if node.op == "ramplus_tl":
        r, alpha = p["r"], p["alpha"]
        red = low.reduction((id(node), name, "ram counts"),
                            lambda: RamCounts(base, tuple(ms), epsilon, f"ramplus_tl {name}"))
        lambdas = [RamLambda(red, i, r, alpha, epsilon) for i in range(len(ms))]
    return Map("ram_combine", (base, *ms), (epsilon, *lambdas), base.spec)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else repr(v)


def _describe(node: Node, a: list[str]) -> str:
    kw = [f"{k}={_fmt(v)}" for k, v in zip(PARAMS[node.op], node.params, strict=True) if v != DEFAULTS[k]]
    return f"{node.op}({a[0]}, [{', '.join(a[1:])}]{''.join(', ' + x for x in kw)})"


family.describes["ram"] = _describe
family.describes["ramplus_tl"] = _describe

__all__ = ["AT_LEAST_0", "DEFAULTS", "PARAMS", "RamCounts", "RamLambda"]
