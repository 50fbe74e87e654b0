"""The geometric merge methods: model_stock, nuslerp, multislerp, karcher, nearswap.

Each spherical method is, per tensor: one streamed Gram-matrix reduction over its
vectors (the raw weights, or the task vectors m_i - base when a base is given), a small
float64 solve over that matrix (`ops.geometric`: the rule in coefficient space), then one
linear write pass with the solved coefficients. Memory stays at a few chunks.

Row-wise variants (model_stock filter_wise, nuslerp flatten=false) need one angle per
row or per column: `RowGram` accumulates one small Gram matrix per vector of the tensor
(seen as a row-major grid), the solve is vectorised over them, and the write pass scales
each input by its vector's coefficient with the positional primitive `row_scale`, which
needs no chunk alignment (a chunk is at most three rectangular pieces of the grid).

nearswap is elementwise: the `nearswap` primitive.

Every scalar parameter is read through `Lowerer.param` when a tensor is lowered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import AlgRuntimeError, AlgTypeError
from ..family import Family
from ..graph import Node
from ..lazy import np
from ..lower import GramMatrix, Lowerer, Map, Reduction, Solve, SPick, Sym, TExpr, lin
from ..ops import sums
from ..ops.geometric import (
    grid_pieces,
    karcher_coefficients,
    model_stock_t,
    multislerp_coefficients,
    nuslerp_coefficients,
)
from ..rules import derived, same_tables
from ..signature import Call
from ..values import Model
from .common import (
    TOKENIZER_PARAM,
    check_normalisable,
    model_list,
    per_model,
    same_as_base,
    with_tokenizer,
)

family = Family("geometric")
NONZERO = "give weights with a nonzero sum"
builtin = family.builtin

# ---- row-wise reductions and coefficients --------------------------------------------------


def grid(shape: tuple[int, ...], mode: str) -> tuple[int, int]:
    """(width, vectors) of a tensor seen as a row-major grid: mode "row" makes each vector
    a row along the last dimension; mode "col" each vector along the first dimension (for
    [out, in], a column), i.e. flat elements with the same index modulo prod(shape[1:])."""
    numel = math.prod(shape)
    if mode == "row":
        width = shape[-1] if shape else 1
        return width, numel // max(width, 1)
    width = math.prod(shape[1:]) if len(shape) > 1 else 1
    return width, width


@dataclass(eq=False)
class RowGram(Reduction):
    """One n x n Gram matrix per vector of a tensor (per row or per column, see `grid`),
    accumulated in float64 over the tensor's n expressions: an array (vectors, n, n)."""

    vectors: tuple[TExpr, ...]
    mode: str
    label: str
    deps: tuple[Reduction, ...] = field(default=())

    def __post_init__(self) -> None:
        self.deps = self._find_deps()
        self.width, self.count = grid(self.vectors[0].spec.shape, self.mode)

    def exprs(self) -> list[TExpr]:
        return list(self.vectors)

    def _per_tensor_first(self) -> list[TExpr]:
        return [self.vectors[0]]

    def buffers(self, cs: int, rule) -> float:
        # n widened float64 chunks are held, plus one float64 product
        wide = 1.0 if cs >= 8 else 8 / cs
        return max(rule(x, cs) for x in self.vectors) + (len(self.vectors) + 1) * wide

    def describe(self) -> str:
        n = len(self.vectors)
        return f"{self.label}: {n}x{n} inner products per {self.mode} ({self.count} vectors)"

    def run(self, ev: Any, chunk: int) -> np.ndarray:
        import torch

        n = len(self.vectors)
        total = np.zeros((self.count, n, n))
        numel = self.vectors[0].numel
        axis = 1 if self.mode == "row" else 0
        for e0 in range(0, numel, chunk):
            e1 = min(numel, e0 + chunk)
            vs = [ev.wide(x, e0, e1) for x in self.vectors]
            prod = ev.pool.take(e1 - e0, torch.float64)
            for lo, hi, r, c, k, w in grid_pieces(e0, e1 - e0, self.width):
                where = slice(r, r + k) if self.mode == "row" else slice(c, c + w)
                for i in range(n):
                    for j in range(i, n):
                        p = torch.mul(vs[i][lo:hi].view(k, w), vs[j][lo:hi].view(k, w),
                                      out=prod[lo:hi].view(k, w))
                        total[where, i, j] += sums.sum_axis(p, axis).cpu().numpy()
            ev.pool.give(prod)
            for v in vs:
                ev.pool.give(v)
        iu = np.triu_indices(n, 1)
        total[:, iu[1], iu[0]] = total[:, iu[0], iu[1]]
        return total

    def __repr__(self) -> str:
        return f"RowGram({self.label}, {len(self.vectors)} vectors per {self.mode})"


@dataclass(eq=False)
class SRows(Sym):
    """Column `index` of a Solve whose value is an array (vectors, k): one coefficient
    per row (or column) of a tensor, a parameter of `row_scale`."""

    solve: Solve
    index: int

    @property
    def deps(self):
        return self.solve.deps

    def value(self, results):
        return np.ascontiguousarray(self.solve.value(results)[:, self.index])

    def __repr__(self) -> str:
        return f"{self.solve.label}[:, {self.index}]"


def _row_scaled(x: TExpr, mode: str, width: int, solve: Solve, index: int) -> TExpr:
    return Map("row_scale", (x,), (mode, width, SRows(solve, index)), x.spec)


# ---- shared lowering helpers ------------------------------------------------------------


def _vectors(low: Lowerer, node: Node, name: str, has_base: bool) -> tuple[TExpr | None, list[TExpr]]:
    """(base, vectors): the task vectors m_i - base when there is a base (args[0]), else
    the raw weights."""
    exprs = [low.tensor(a, name) for a in node.args]
    if not has_base:
        return None, exprs
    base = exprs[0]
    return base, [lin([(1.0, m), (-1.0, base)]) for m in exprs[1:]]


def _combine(base: TExpr | None, vectors: list[TExpr], coefs: list[Any]) -> TExpr:
    """base + sum c_i v_i, folded into one linear pass over the stored tensors."""
    terms = [(1.0, base)] if base is not None else []
    return lin(terms + list(zip(coefs, vectors, strict=True)))


def _flat_solve(low: Lowerer, node: Node, name: str, tag: str, vectors: list[TExpr], fn, label: str) -> Solve:
    g = low.reduction((id(node), name, tag), lambda: GramMatrix((tuple(vectors),), f"{tag} {name}"))
    return low.reduction((id(node), name, tag + " solve"), lambda: Solve(fn, (g,), label))


def _weights(low: Lowerer, node: Node, name: str, weights: tuple[Any, ...]) -> np.ndarray:
    return np.array([float(low.param(w, node, name)) for w in weights], dtype=np.float64)


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return f"{x:g}"
    if isinstance(x, tuple):
        return "[" + ", ".join(map(_fmt, x)) + "]"
    return repr(x)


def _number(call: Call, v: Any, param: str, lo: float | None = None, lo_open: bool = False) -> Any:
    if isinstance(v, int | float) and not isinstance(v, bool):
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise call.error(AlgTypeError, f"{call.name}(): {param} must be "
                             f"{'greater than' if lo_open else 'at least'} {lo:g}, got {v:g}", param)
        return float(v)
    return v  # a per-layer value: resolved (and checked) when lowered


# ---- model_stock -----------------------------------------------------------------------------


@builtin(
    "model_stock(base: Checkpoint, ms: List[Checkpoint], filter_wise: Bool = false, "
    f"{TOKENIZER_PARAM})",
    "Model Stock (Jang et al. 2024), per tensor: with task vectors d_i = m_i - base, c the "
    "mean pairwise cosine of the d_i and N = len(ms), t = N*c / (1 + (N-1)*c) and the "
    "result is t*mean(ms) + (1-t)*base. A zero task vector has cosine 0 with every other; "
    "if the directions cancel exactly (1 + (N-1)*c = 0) t is 0. filter_wise=true takes c "
    "and t per row (vector along the last dimension), as mergekit's filter_wise; 1-D "
    "tensors are one row. Needs at least two fine-tunes; base's config.",
)
def _model_stock(call: Call, base: Model, ms: Any, filter_wise: bool, tokenizer: Any) -> Model:
    models = model_list(call, ms, "ms", at_least=2)
    base, models = with_tokenizer(call, tokenizer, base, models)
    same_as_base(call, base, models)
    node = Node("model_stock", (base.node, *(m.node for m in models)), (bool(filter_wise),), span=call.span)
    return derived(node, base)


@family.lowering("model_stock")
def _lower_model_stock(low: Lowerer, node: Node, name: str) -> TExpr:
    (filter_wise,) = node.params
    base, deltas = _vectors(low, node, name, True)
    assert base is not None
    n = len(deltas)
    shape = base.spec.shape
    if not filter_wise or len(shape) <= 1:
        def solve(g: np.ndarray) -> np.ndarray:
            t = float(model_stock_t(g))
            return np.array([1.0 - t, t / n])

        s = _flat_solve(low, node, name, "model_stock", deltas, solve, f"model_stock_t({name})")
        models = [low.tensor(a, name) for a in node.args[1:]]
        return lin([(SPick(s, 0), base)] + [(SPick(s, 1), m) for m in models])
    rg = low.reduction((id(node), name, "model_stock rows"),
                       lambda: RowGram(tuple(deltas), "row", f"model_stock {name}"))
    s = low.reduction((id(node), name, "model_stock rows solve"),
                      lambda: Solve(lambda g: model_stock_t(g)[:, None], (rg,), f"model_stock_t({name})"))
    mean_delta = lin([(1.0 / n, d) for d in deltas])
    return lin([(1.0, base), (1.0, _row_scaled(mean_delta, "row", rg.width, s, 0))])


family.describes["model_stock"] = lambda node, a: (
    f"model_stock({a[0]}, [{', '.join(a[1:])}]" + (", filter_wise=true)" if node.params[0] else ")"))


# ---- nuslerp -------------------------------------------------------------------------------


@builtin(
    "nuslerp(a: Checkpoint, b: Checkpoint, t: Param | List[Param], base: Checkpoint | None = none, "
    "flatten: Bool = true, row_wise: Bool = false, "
    f"{TOKENIZER_PARAM})",
    "NuSLERP (mergekit): spherical interpolation from a (t=0) to b (t=1), "
    "sin((1-t)W)/sin(W)*a + sin(tW)/sin(W)*b with W the angle between them; with base, of "
    "the task vectors a-base and b-base, added to base. t may be mergekit's pair of weights "
    "[wa, wb]: t = wb/(wa+wb) (0.5 if wa+wb is 0). One angle per tensor (flatten=true); "
    "flatten=false gives each row (vector along the last dimension) its own angle, and "
    "with row_wise=true each vector along the first dimension (a column of a matrix), as "
    "mergekit's nuslerp_row_wise. Linear (1-t, t) where a vector is zero or the two are "
    "within 1e-8 of (anti)parallel. The result has base's config, else a's.",
)
def _nuslerp(call: Call, a: Model, b: Model, t: Any, base: Model | None, flatten: bool, row_wise: bool,
             tokenizer: Any) -> Model:
    base, (a, b) = with_tokenizer(call, tokenizer, base, (a, b))
    if isinstance(t, tuple):
        if len(t) != 2:
            raise call.error(AlgTypeError, f"nuslerp(): t is a number, or the pair of weights [wa, wb]; "
                             f"got {len(t)} values", "t")
        t_param: Any = tuple(_number(call, w, "t") for w in t)
    else:
        t_param = _number(call, t, "t")
    if flatten and row_wise:
        raise call.error(AlgTypeError, "nuslerp(): row_wise=true needs flatten=false (with flatten=true "
                         "the whole tensor is one vector)", "row_wise")
    same_tables(a, b, "nuslerp()", call.span, call.at("a"), call.at("b"))
    if base is not None:
        same_as_base(call, base, (a, b), "base", "a")
        args = (base.node, a.node, b.node)
    else:
        args = (a.node, b.node)
    node = Node("nuslerp", args, (t_param, bool(flatten), bool(row_wise), base is not None), span=call.span)
    return derived(node, base if base is not None else a)


def _nuslerp_t(low: Lowerer, node: Node, name: str, t: Any) -> float:
    if isinstance(t, tuple):
        wa, wb = (float(low.param(w, node, name)) for w in t)
        return 0.5 if abs(wa + wb) < 1e-6 else wb / (wa + wb)
    return float(low.param(t, node, name))


@family.lowering("nuslerp")
def _lower_nuslerp(low: Lowerer, node: Node, name: str) -> TExpr:
    t_param, flatten, row_wise, has_base = node.params
    t = _nuslerp_t(low, node, name, t_param)
    base, vs = _vectors(low, node, name, has_base)
    shape = vs[0].spec.shape
    if flatten or len(shape) <= 1:
        s = _flat_solve(low, node, name, "nuslerp", vs, lambda g: nuslerp_coefficients(g, t),
                        f"nuslerp_coef({name}, t={t:g})")
        return _combine(base, vs, [SPick(s, 0), SPick(s, 1)])
    mode = "col" if row_wise else "row"
    rg = low.reduction((id(node), name, "nuslerp rows"), lambda: RowGram(tuple(vs), mode, f"nuslerp {name}"))
    s = low.reduction((id(node), name, "nuslerp rows solve"),
                      lambda: Solve(lambda g: nuslerp_coefficients(g, t), (rg,), f"nuslerp_coef({name}, t={t:g})"))
    return _combine(base, [_row_scaled(v, mode, rg.width, s, i) for i, v in enumerate(vs)], [1.0, 1.0])


def _describe_nuslerp(node: Node, a: list[str]) -> str:
    t, flatten, row_wise, has_base = node.params
    ab = a[1:] if has_base else a
    text = f"nuslerp({ab[0]}, {ab[1]}, {_fmt(t)}"
    if has_base:
        text += f", base={a[0]}"
    if not flatten:
        text += ", flatten=false" + (", row_wise=true" if row_wise else "")
    return text + ")"


family.describes["nuslerp"] = _describe_nuslerp


# ---- multislerp and karcher -------------------------------------------------------------------


def _list_method(call: Call, ms: Any, base: Model | None, weights: Any, lo: float | None,
                 tokenizer: Any = None) -> tuple:
    models = model_list(call, ms, "ms", at_least=1)
    base, models = with_tokenizer(call, tokenizer, base, models)
    if base is not None:
        same_as_base(call, base, models)
    else:
        for m in models[1:]:
            same_tables(models[0], m, f"{call.name}()", call.span, call.at("ms"), call.at("ms"))
    ws = per_model(call, weights, len(models), "weights", lo=lo) if weights is not None else None
    args = ((base.node,) if base is not None else ()) + tuple(m.node for m in models)
    return models, ws, args


@builtin(
    "multislerp(ms: List[Checkpoint], weights: Param | List[Param], base: Checkpoint | None = none, "
    "normalize: Bool = true, "
    f"{TOKENIZER_PARAM})",
    "Multi-SLERP (mergekit), per tensor: the weighted barycentre of the models' unit "
    "directions on the sphere, rescaled by the weighted mean norm sum w_i*|m_i|; with base, "
    "of the task vectors m_i - base, added to base. As mergekit computes it: the normalised "
    "weighted mean of the directions, moved along the weighted tangent vectors by the "
    "exponential map (a zero step when the weights are normalised, so the result is "
    "normalise(sum w_i u_i) * sum w_i |m_i|). normalize=true divides the weights by their "
    "sum. A zero vector has no direction; where the weighted directions cancel (their "
    "mean is shorter than 1e-6) the result is the linear sum w_i*m_i. The result has "
    "base's config, else the first model's.",
)
def _multislerp(call: Call, ms: Any, weights: Any, base: Model | None, normalize: bool, tokenizer: Any) -> Model:
    models, ws, args = _list_method(call, ms, base, weights, None, tokenizer)
    if normalize:
        check_normalisable(call, ws, NONZERO)
    node = Node("multislerp", args, (ws, bool(normalize), base is not None), span=call.span)
    return derived(node, base if base is not None else models[0])


@family.lowering("multislerp")
def _lower_multislerp(low: Lowerer, node: Node, name: str) -> TExpr:
    ws, normalize, has_base = node.params
    if len(node.args) == 1 + has_base:
        return low.tensor(node.args[-1], name)  # one model: itself
    w = _weights(low, node, name, ws)
    if normalize and w.sum() == 0:
        raise AlgRuntimeError(f"multislerp(): the weights for '{name}' sum to 0 and cannot be normalised",
                              node.span)
    base, vs = _vectors(low, node, name, has_base)
    s = _flat_solve(low, node, name, "multislerp", vs, lambda g: multislerp_coefficients(g, w, normalize),
                    f"multislerp_coef({name})")
    return _combine(base, vs, [SPick(s, i) for i in range(len(vs))])


@builtin(
    "karcher(ms: List[Checkpoint], weights: Param | List[Param] | None = none, "
    "base: Checkpoint | None = none, max_iter: Int = 10, tol: Scalar = 1e-5, "
    f"{TOKENIZER_PARAM})",
    "Karcher mean (mergekit), per tensor: the weighted geodesic (Riemannian) mean of the "
    "models' unit directions on the sphere, found by at most max_iter fixed-point steps "
    "(stopping when a step is shorter than tol), rescaled by the weighted mean norm "
    "sum w_i*|m_i|. Weights (default equal) are normalised to sum 1 and must not be "
    "negative. With base, of the task vectors m_i - base, added to base. A zero vector "
    "takes part in the norm only; exactly antipodal directions stay at the first one. "
    "The result has base's config, else the first model's.",
)
def _karcher(call: Call, ms: Any, weights: Any, base: Model | None, max_iter: Any, tol: Any,
             tokenizer: Any) -> Model:
    models, ws, args = _list_method(call, ms, base, weights, 0.0, tokenizer)
    if ws is None:
        ws = (1.0,) * len(models)
    check_normalisable(call, ws, NONZERO, positive=True)
    if not float(max_iter).is_integer() or max_iter < 0:
        raise call.error(AlgTypeError, f"karcher(): max_iter must be a whole number >= 0, got {max_iter}",
                         "max_iter")
    if not tol > 0:
        raise call.error(AlgTypeError, f"karcher(): tol must be greater than 0, got {tol}", "tol")
    node = Node("karcher", args, (ws, int(max_iter), float(tol), base is not None), span=call.span)
    return derived(node, base if base is not None else models[0])


@family.lowering("karcher")
def _lower_karcher(low: Lowerer, node: Node, name: str) -> TExpr:
    ws, max_iter, tol, has_base = node.params
    if len(node.args) == 1 + has_base:
        return low.tensor(node.args[-1], name)
    w = _weights(low, node, name, ws)
    if (w < 0).any() or w.sum() <= 0:
        raise AlgRuntimeError(f"karcher(): the weights for '{name}' must be >= 0 with a positive sum",
                              node.span)
    base, vs = _vectors(low, node, name, has_base)
    s = _flat_solve(low, node, name, "karcher", vs, lambda g: karcher_coefficients(g, w, max_iter, tol),
                    f"karcher_coef({name})")
    return _combine(base, vs, [SPick(s, i) for i in range(len(vs))])


def _describe_list(op: str, extra):
    def describe(node: Node, a: list[str]) -> str:
        has_base = node.params[-1]
        ms = a[1:] if has_base else a
        parts = [f"[{', '.join(ms)}]", *extra(node)]
        if has_base:
            parts.append(f"base={a[0]}")
        return f"{op}({', '.join(parts)})"

    return describe


family.describes["multislerp"] = _describe_list(
    "multislerp", lambda n: [_fmt(n.params[0])] + ([] if n.params[1] else ["normalize=false"]))
family.describes["karcher"] = _describe_list(
    "karcher", lambda n: [f"weights={_fmt(n.params[0])}", f"max_iter={n.params[1]}", f"tol={n.params[2]:g}"])


# ---- nearswap --------------------------------------------------------------------------------


@builtin(
    "nearswap(base: Checkpoint, m: Checkpoint, t: Param, "
    f"{TOKENIZER_PARAM})",
    "NearSwap (mergekit), elementwise: base + w*(m - base) with w = clamp(t/|base - m|, 0, 1) "
    "(w = 1 where they are equal): elements of m within t of base are taken whole, distant "
    "ones move toward m by t/|base - m|. t must be greater than 0. base's config.",
)
def _nearswap(call: Call, base: Model, m: Model, t: Any, tokenizer: Any) -> Model:
    base, (m,) = with_tokenizer(call, tokenizer, base, (m,))
    t = _number(call, t, "t", lo=0.0, lo_open=True)
    same_tables(base, m, "nearswap()", call.span, call.at("base"), call.at("m"))
    return derived(Node("nearswap", (base.node, m.node), (t,), span=call.span), base)


@family.lowering("nearswap")
def _lower_nearswap(low: Lowerer, node: Node, name: str) -> TExpr:
    t = float(low.param(node.params[0], node, name))
    if not t > 0:
        raise AlgRuntimeError(f"nearswap(): t must be greater than 0, got {t:g} for '{name}'", node.span)
    base, m = (low.tensor(a, name) for a in node.args)
    return Map("nearswap", (base, m), (t,), base.spec)


family.describes["nearswap"] = lambda node, a: f"nearswap({a[0]}, {a[1]}, {_fmt(node.params[0])})"
