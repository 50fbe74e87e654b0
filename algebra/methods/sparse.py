"""The task-vector merges: linear, task arithmetic, TIES, DARE, breadcrumbs, DELLA, SCE.

Per tensor, with d_i = m_i - base computed in the compute dtype (float32, or float64
with --float64):

    linear            Σ w_i m_i, over Σ w_i when normalising
    task_arithmetic   base + scale Σ w_i d_i
    ties              trim each d_i to its top ⌊density N⌋ magnitudes (at least one);
                      elect s = sign Σ w_i d'_i (zero counts as +); keep the entries whose
                      w_i d'_i is nonzero with sign s; base + scale Σ kept w_i d'_i, over
                      the kept Σ w_i (1 where none) when normalising
    dare_*            drop each entry with probability 1 - density, survivors / density;
                      then as task_arithmetic (dare_linear) or ties without the trim
    breadcrumbs*      drop the ⌊gamma N⌋ largest magnitudes, keep the next ⌊density N⌋
    della*            per row, keep with probability density - epsilon (smallest
                      magnitude) .. density + epsilon (largest) by rank, survivors / p
    sce               select the top ⌊topk · nonzero⌋ elements by variance across models,
                      weight each model by its mean squared selected d_i, erase entries
                      against the elected sign (of Σ d_i), fuse: Σ w_i d_i / Σ w_i (kept)

Linear methods fold into one `Lin`. The others lower to one `tv_combine` primitive over
the task vectors (`ops/sparse.py`) whose magnitude thresholds come from a streamed
per-tensor `Select` reduction (`methods/select.py`) and whose random draws come from a
counter-based generator keyed by (seed, tensor name, model index, element index).
Tensors that are not float are copied from the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import AlgRuntimeError, AlgTypeError
from ..family import Family
from ..graph import Node
from ..ir import Lin
from ..lower import Lowerer, Map, Sym, TExpr, lin, s_mul
from ..ops.sparse import Combine, Sparsify, rng_key
from ..plan import row_length
from ..rules import derived, same_tables
from ..schedule import Schedule, resolve
from ..signature import Call
from ..values import Model
from .common import (
    OVERFLOW,
    TOKENIZER_PARAM,
    check_normalisable,
    model_list,
    per_model,
    same_as_base,
    weight_sum,
    with_tokenizer,
)
from .select import KEEP_ALL, KEEP_NONE, MaskedSquares, OfNonzero, Pick, SceWeight, Select

family = Family("sparse")
builtin = family.builtin

# method -> (sparsifier, consensus)
METHODS = {
    "ties": ("top", "sum"),
    "dare_linear": ("dare", "none"),
    "dare_ties": ("dare", "sum"),
    "breadcrumbs": ("window", "none"),
    "breadcrumbs_ties": ("window", "sum"),
    "della": ("della", "sum"),
    "della_linear": ("della", "none"),
    "sce": ("none", "sce"),
    "task_arithmetic": ("none", "none"),
}


@dataclass(frozen=True)
class TVParams:
    """The parameters of one task-vector merge node (hashable: part of the node key)."""

    weights: tuple[Any, ...]
    density: tuple[Any, ...] = ()
    normalize: bool = False
    scale: Any = 1.0
    gamma: Any = 0.0
    epsilon: Any = 0.0
    seed: int = 0
    topk: Any = 1.0

    def __repr__(self) -> str:
        def show(v):
            return "[" + ", ".join(f"{x:g}" if isinstance(x, float) else repr(x) for x in v) + "]" \
                if isinstance(v, tuple) else (f"{v:g}" if isinstance(v, float) else repr(v))
        parts = [f"weights={show(self.weights)}"]
        if self.density:
            parts.append(f"density={show(self.density)}")
        for k in ("normalize", "scale", "gamma", "epsilon", "seed", "topk"):
            v, default = getattr(self, k), getattr(TVParams, k)
            if v != default:
                parts.append(f"{k}={show(v).lower() if isinstance(v, bool) else show(v)}")
        return ", ".join(parts)


# ---- argument checks -----------------------------------------------------------------------


def _fraction(call: Call, value: Any, models: tuple[Model, ...], param: str) -> tuple[Any, ...]:
    """A scalar or per-model list of numbers in (0, 1]; a per-layer value is checked on
    every float tensor it will apply to."""
    items = per_model(call, value, len(models), param)
    why = "it is the fraction of each task vector's entries kept"
    for v in items:
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise call.error(AlgTypeError, f"{call.name}(): {param} must lie in (0, 1], got {v:g}; {why}", param)
        if isinstance(v, Schedule):
            t = models[0].type
            for name, spec in t.tensors.items():
                x = resolve(v, name, t) if spec.is_float else 0.5
                if not 0.0 < x <= 1.0:
                    raise call.error(AlgTypeError, f"{call.name}(): {param} {v!r} is {x:g} for tensor "
                                     f"'{name}', outside (0, 1]; {why}", param)
    return items


def _number(call: Call, value: Any, param: str, lo: float, hi: float, closed_hi: bool = True) -> float:
    if not lo <= value <= hi or (not closed_hi and value == hi):
        rng = f"[{lo:g}, {hi:g}{']' if closed_hi else ')'}"
        raise call.error(AlgTypeError, f"{call.name}(): {param} must lie in {rng}, got {value:g}", param)
    return float(value)


def as_number(v: Any) -> Any:
    """A number as a float (1 and 1.0 make one graph node); a per-layer value unchanged."""
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def _seed(call: Call, seed: Any) -> int:
    if not float(seed).is_integer() or seed < 0:
        raise call.error(AlgTypeError, f"{call.name}(): seed must be a whole number >= 0, got {seed!r}", "seed")
    return int(seed)


def _node(call: Call, op: str, base: Model, ms: tuple[Model, ...], params: TVParams) -> Model:
    same_as_base(call, base, ms)
    return derived(Node(op, (base.node, *(m.node for m in ms)), (params,), span=call.span), base)


def _models(call: Call, ms: Any) -> tuple[Model, ...]:
    return model_list(call, ms, "ms", at_least=1)


def _arguments(call: Call, base: Model, ms: Any, weights: Any, density: Any,
               tokenizer: Any) -> tuple[Model, tuple[Model, ...], tuple, tuple]:
    """The checks every task-vector method starts with: the models (aligned first with
    `tokenizer=`), per-model weights and densities (empty when not given)."""
    base, models = with_tokenizer(call, tokenizer, base, _models(call, ms))
    w = per_model(call, weights, len(models), "weights") if weights is not None else ()
    d = _fraction(call, density, models, "density") if density is not None else ()
    return base, models, w, d


# ---- builtins --------------------------------------------------------------------------------


@builtin(
    "linear(ms: List[Checkpoint], weights: Param | List[Param], normalize: Bool = true, "
    f"{TOKENIZER_PARAM})",
    "Weighted average of checkpoints: Σ w_i m_i, divided by Σ w_i when normalize (an error if "
    "the weights sum to 0). weights: one number for all, or one per model. Config of ms[0].",
)
def _linear(call: Call, ms: Any, weights: Any, normalize: bool, tokenizer: Any = None) -> Model:
    _, ms = with_tokenizer(call, tokenizer, None, _models(call, ms))
    models = _models(call, ms)
    w = per_model(call, weights, len(models), "weights")
    if normalize:
        check_normalisable(call, w, "pass weights with a nonzero sum, or normalize=false")
    for m in models[1:]:
        same_tables(models[0], m, f"{call.name}()", call.span, call.at("ms"), call.at("ms"))
    node = Node("linear", tuple(m.node for m in models), (TVParams(w, normalize=normalize),), span=call.span)
    return derived(node, models[0])


@builtin(
    "task_arithmetic(base: Checkpoint, ms: List[Checkpoint], weights: Param | List[Param], "
    "scale: Param = 1.0, "
    f"{TOKENIZER_PARAM})",
    "base + scale * Σ w_i (m_i - base): add weighted task vectors to the base. "
    "weights: one number for all, or one per model. Config of base.",
)
def _task_arithmetic(call: Call, base: Model, ms: Any, weights: Any, scale: float, tokenizer: Any = None) -> Model:
    base, models, w, _ = _arguments(call, base, ms, weights, None, tokenizer)
    return _node(call, "task_arithmetic", base, models, TVParams(w, scale=as_number(scale)))


@builtin(
    "ties(base: Checkpoint, ms: List[Checkpoint], weights: Param | List[Param], "
    "density: Param | List[Param], normalize: Bool = true, scale: Param = 1.0, "
    f"{TOKENIZER_PARAM})",
    "TIES-merging: keep each task vector's top ⌊density·N⌋ entries by magnitude per tensor "
    "(at least one; ties at the threshold kept lowest index first), elect a sign per entry "
    "from Σ w_i d_i (zero counts as +), drop entries that disagree, then base + scale · Σ w_i d_i "
    "over the agreeing weights (normalize) or not. The threshold is an exact streamed selection.",
)
def _ties(call: Call, base: Model, ms: Any, weights: Any, density: Any, normalize: bool, scale: float, tokenizer: Any = None) -> Model:
    base, models, w, d = _arguments(call, base, ms, weights, density, tokenizer)
    return _node(call, "ties", base, models, TVParams(w, d, normalize, as_number(scale)))


@builtin(
    "dare_linear(base: Checkpoint, ms: List[Checkpoint], weights: Param | List[Param], "
    "density: Param | List[Param], seed: Int = 0, scale: Param = 1.0, "
    f"{TOKENIZER_PARAM})",
    "DARE: drop each task-vector entry with probability 1 - density, rescale survivors by "
    "1/density, then task arithmetic. Draws come from a generator keyed by (seed, tensor name, "
    "model index, element index): the same recipe gives the same bits on any schedule or device.",
)
def _dare_linear(call: Call, base: Model, ms: Any, weights: Any, density: Any, seed: Any, scale: float, tokenizer: Any = None) -> Model:
    base, models, w, d = _arguments(call, base, ms, weights, density, tokenizer)
    return _node(call, "dare_linear", base, models, TVParams(w, d, scale=as_number(scale), seed=_seed(call, seed)))


@builtin(
    "dare_ties(base: Checkpoint, ms: List[Checkpoint], weights: Param | List[Param], "
    "density: Param | List[Param], seed: Int = 0, normalize: Bool = true, scale: Param = 1.0, "
    f"{TOKENIZER_PARAM})",
    "DARE's random drop (see dare_linear), then TIES' sign election and combination (no "
    "magnitude trim).",
)
def _dare_ties(call: Call, base: Model, ms: Any, weights: Any, density: Any, seed: Any, normalize: bool,
               scale: float, tokenizer: Any = None) -> Model:
    base, models, w, d = _arguments(call, base, ms, weights, density, tokenizer)
    return _node(call, "dare_ties", base, models, TVParams(w, d, normalize, as_number(scale), seed=_seed(call, seed)))


@builtin(
    "breadcrumbs(base: Checkpoint, ms: List[Checkpoint], weights: Param | List[Param], "
    "density: Param | List[Param], gamma: Scalar = 0.01, scale: Param = 1.0, "
    f"{TOKENIZER_PARAM})",
    "Model Breadcrumbs: per tensor, drop the ⌊gamma·N⌋ largest task-vector magnitudes and keep "
    "the next ⌊density·N⌋ below them (at least one), then task arithmetic.",
)
def _breadcrumbs(call: Call, base: Model, ms: Any, weights: Any, density: Any, gamma: float, scale: float, tokenizer: Any = None) -> Model:
    base, models, w, d = _arguments(call, base, ms, weights, density, tokenizer)
    g = _number(call, gamma, "gamma", 0.0, 1.0, closed_hi=False)
    return _node(call, "breadcrumbs", base, models, TVParams(w, d, scale=as_number(scale), gamma=g))


@builtin(
    "breadcrumbs_ties(base: Checkpoint, ms: List[Checkpoint], weights: Param | List[Param], "
    "density: Param | List[Param], gamma: Scalar = 0.01, normalize: Bool = true, scale: Param = 1.0, "
    f"{TOKENIZER_PARAM})",
    "Breadcrumbs' selection (see breadcrumbs), then TIES' sign election and combination.",
)
def _breadcrumbs_ties(call: Call, base: Model, ms: Any, weights: Any, density: Any, gamma: float,
                      normalize: bool, scale: float, tokenizer: Any = None) -> Model:
    base, models, w, d = _arguments(call, base, ms, weights, density, tokenizer)
    g = _number(call, gamma, "gamma", 0.0, 1.0, closed_hi=False)
    return _node(call, "breadcrumbs_ties", base, models, TVParams(w, d, normalize, as_number(scale), gamma=g))


def _della_params(call: Call, models, weights, density, epsilon, seed, normalize=False, scale=1.0) -> TVParams:
    w = per_model(call, weights, len(models), "weights")
    d = _fraction(call, density, models, "density")
    eps = _number(call, epsilon, "epsilon", 0.0, 1.0)
    for x in d:
        if isinstance(x, float) and not (x - eps > 0 and x + eps <= 1):
            raise call.error(AlgTypeError, f"{call.name}(): keep probabilities density ± epsilon must "
                             f"lie in (0, 1], but density {x:g} with epsilon {eps:g} gives "
                             f"[{x - eps:g}, {x + eps:g}]; choose a smaller epsilon", "epsilon")
    return TVParams(w, d, normalize, as_number(scale), epsilon=eps, seed=_seed(call, seed))


@builtin(
    "della(base: Checkpoint, ms: List[Checkpoint], weights: Param | List[Param], "
    "density: Param | List[Param], epsilon: Scalar = 0.15, seed: Int = 0, normalize: Bool = true, "
    "scale: Param = 1.0, "
    f"{TOKENIZER_PARAM})",
    "DELLA: per row (the last dimension; a 1-D tensor is one row), keep each task-vector entry "
    "with probability density - epsilon + 2·epsilon·r/(R-1) for its magnitude rank r (0 = "
    "smallest; equal magnitudes: the lower index ranks higher), rescale survivors by 1/p, then "
    "TIES' sign election and combination. Draws as in dare_linear.",
)
def _della(call: Call, base: Model, ms: Any, weights: Any, density: Any, epsilon: float, seed: Any,
           normalize: bool, scale: float, tokenizer: Any = None) -> Model:
    base, models, _, _ = _arguments(call, base, ms, None, None, tokenizer)
    return _node(call, "della", base, models, _della_params(call, models, weights, density, epsilon, seed,
                                                             normalize, scale))


@builtin(
    "della_linear(base: Checkpoint, ms: List[Checkpoint], weights: Param | List[Param], "
    "density: Param | List[Param], epsilon: Scalar = 0.15, seed: Int = 0, scale: Param = 1.0, "
    f"{TOKENIZER_PARAM})",
    "DELLA's per-row magnitude-ranked drop (see della), then task arithmetic.",
)
def _della_linear(call: Call, base: Model, ms: Any, weights: Any, density: Any, epsilon: float, seed: Any,
                  scale: float, tokenizer: Any = None) -> Model:
    base, models, _, _ = _arguments(call, base, ms, None, None, tokenizer)
    return _node(call, "della_linear", base, models,
                 _della_params(call, models, weights, density, epsilon, seed, scale=scale))


@builtin(
    "sce(base: Checkpoint, ms: List[Checkpoint], topk: Scalar = 1.0, "
    f"{TOKENIZER_PARAM})",
    "SCE (as mergekit's): per tensor, select the top ⌊topk·nonzero⌋ entries by variance of the "
    "task vectors across models (topk = 1 keeps all), weight model i by the mean of its squared "
    "selected task vector over the sum of those means (equal weights if that sum is below "
    "1e-6), erase entries whose sign disagrees with sign Σ d_i, and fuse: base + Σ w_i d_i / "
    "Σ w_i over the kept entries.",
)
def _sce(call: Call, base: Model, ms: Any, topk: float, tokenizer: Any = None) -> Model:
    base, models, _, _ = _arguments(call, base, ms, None, None, tokenizer)
    if not 0.0 < topk <= 1.0:
        raise call.error(AlgTypeError, f"{call.name}(): topk must lie in (0, 1], got {topk:g}", "topk")
    return _node(call, "sce", base, models, TVParams((1.0,) * len(models), topk=float(topk)))


# ---- lowering ----------------------------------------------------------------------------------


def _delta(low: Lowerer, node: Node, i: int, name: str) -> TExpr:
    return lin([(1.0, low.tensor(node.args[i], name)), (-1.0, low.tensor(node.args[0], name))])


@family.lowering("linear")
def _lower_linear(low: Lowerer, node: Node, name: str) -> TExpr:
    (p,) = node.params
    w = [low.param(x, node, name) for x in p.weights]
    if p.normalize:
        total = weight_sum(w)
        if total is None:
            raise AlgRuntimeError(f"linear(): for tensor '{name}', {OVERFLOW}", node.span)
        if total == 0:
            raise AlgRuntimeError(f"linear(): the weights of tensor '{name}' sum to 0, so they cannot "
                                  "be normalised", node.span)
        w = [x / total for x in w]
    return lin([(x, low.tensor(a, name)) for x, a in zip(w, node.args, strict=True)])


def _top(sel_ranks: list, score: int, k: int, n: int):
    """A (t, J) pair: constant when k is 0 or N, else read from the reduction (registered
    here as a rank of `score`)."""
    if k <= 0:
        return KEEP_NONE
    if k >= n:
        return KEEP_ALL
    sel_ranks[score].append(k)
    return (score, len(sel_ranks[score]) - 1)


def _lower_tv(low: Lowerer, node: Node, name: str) -> TExpr:
    (p,) = node.params
    kind, consensus = METHODS[node.op]
    base = low.tensor(node.args[0], name)
    n_models = len(node.args) - 1
    n = base.numel
    ds = [_delta(low, node, i + 1, name) for i in range(n_models)]
    weights: list[Any] = [low.param(x, node, name) for x in p.weights]
    scale = low.param(p.scale, node, name)
    density = [low.param(x, node, name) for x in p.density] if p.density else [1.0] * n_models
    sparsify: list[Sparsify] = []
    pending: list[tuple[int, list]] = []  # model -> its (t, J) slots: constants or (score, rank)
    scores: list[tuple[str, int]] = []
    ranks: list[list] = []
    for i in range(n_models):
        d = float(density[i])
        if kind == "top":
            k = max(1, math.floor(d * n))
            if k >= n:
                sparsify.append(Sparsify("none"))
                continue
            scores.append(("abs", i))
            ranks.append([])
            pending.append((i, [_top(ranks, len(scores) - 1, k, n)]))
            sparsify.append(Sparsify("top"))
        elif kind == "window":
            g = math.floor(float(low.param(p.gamma, node, name)) * n)
            k = max(1, math.floor(d * n))
            scores.append(("abs", i))
            ranks.append([])
            s = len(scores) - 1
            pending.append((i, [_top(ranks, s, g, n), _top(ranks, s, min(n, g + k), n)]))
            sparsify.append(Sparsify("window"))
        elif kind == "dare":
            sparsify.append(Sparsify("none") if d >= 1.0 else Sparsify("dare", d, key=rng_key(p.seed, name, i)))
        elif kind == "della":
            eps = float(low.param(p.epsilon, node, name))
            sparsify.append(Sparsify("della", d, eps, key=rng_key(p.seed, name, i)))
        else:
            sparsify.append(Sparsify("none"))
    sel = None
    select_var = consensus == "sce" and float(low.param(p.topk, node, name)) < 1.0
    if select_var:
        scores.append(("var", -1))
        ranks.append([OfNonzero(float(low.param(p.topk, node, name)))])
    if any(ranks):
        sel = low.reduction((id(node), name, "select"), lambda: Select(
            tuple(ds), tuple(scores), tuple(tuple(r) for r in ranks), f"{node.op} {name}"))
    if consensus == "none" and all(s.kind == "none" for s in sparsify):
        return lin([(1.0, base)] + [(s_mul(scale, w), d) for w, d in zip(weights, ds, strict=True)])

    def resolve(slot) -> list:
        if isinstance(slot[0], float):
            return list(slot)
        score, rank = slot
        i = sel.index(score, rank)
        return [Pick(sel, i), Pick(sel, i + 1)]

    vals: list[Any] = []
    by_model = dict(pending)
    for i, sp in enumerate(sparsify):
        if sp.kind in ("top", "window"):
            for slot in by_model[i]:
                vals.extend(resolve(slot))
    if select_var:
        vals.extend(resolve((len(scores) - 1, 0)))
    if consensus == "sce":
        sq = low.reduction((id(node), name, "squares"), lambda: MaskedSquares(
            tuple(ds), sel, f"sce weights {name}"))
        weights = [SceWeight(sq, i, n) for i in range(n_models)]
    ms = [low.tensor(node.args[i + 1], name) for i in range(n_models)]
    if not any(isinstance(x, Lin) for x in (base, *ms)) and base not in ms and (isinstance(scale, Sym) or scale != 0):
        # one primitive reads the base and the models once per chunk and forms d_i and
        # base + scale * merged itself, with the Lins' own operations (the same bits)
        spec = Combine(n_models, tuple(sparsify), consensus, bool(p.normalize), row_length(base.spec), select_var,
                       with_base=True)
        return Map("tv_combine", (base, *ms), (spec, scale, *weights, *vals), base.spec)
    spec = Combine(n_models, tuple(sparsify), consensus, bool(p.normalize), row_length(base.spec), select_var)
    merged = Map("tv_combine", tuple(ds), (spec, *weights, *vals), base.spec)
    return lin([(1.0, base), (scale, merged)])


for _op in METHODS:
    family.lowering(_op)(_lower_tv)

__all__ = ["METHODS", "TVParams"]
