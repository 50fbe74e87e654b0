"""Stage 4, lower: model-level nodes -> one tensor expression per output tensor.

Tensor expressions are elementwise over a tensor's flattened elements, so any flat range
[e0, e1) of an output can be computed from the same ranges of its inputs (or, for
`Slice` and `Rows`, from ranges fixed at lowering): that is what lets the executor
stream fixed-size chunks. The node kinds:

    Leaf(source, name)       a stored tensor, read lazily
    Lin(terms, const)        sum of coef * expr, plus const (all linear ops fold into one)
    Map(op, args, params)    a nonlinear elementwise primitive from ops/
    Slice(expr, start, n)    elements [start, start+n) of an expression
    Cat(parts)               flat concatenation (e.g. merged vocabulary rows + the rest)
    Rows(runs, row_len)      rows gathered and averaged from other tensors' rows (align)

A coefficient is a float or a `Sym`: a scalar known only after a streamed reduction
(`Gram`: dot products and squared norms summed over a group of tensors, as SLERP's
angle needs). Folding linear operations means `ema` of fifty checkpoints is one pass
with one accumulator, and WARP's `init + c1*(m1-init) + c2*(m2-init)` reads each input
once per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .arch import Arch, arch_of, layer_index
from .family import in_use
from .graph import Node
from .ops import OPS
from .ops.slerp import slerp_coefficients
from .schedule import resolve_params
from .types import TensorSpec
from .values import Model

# ---- symbolic scalars ---------------------------------------------------------------


class Sym:
    """A scalar computed from reductions; `deps` are the reductions it needs."""

    deps: tuple[Reduction, ...]

    def value(self, results: dict) -> float:
        raise NotImplementedError


Coef = float | Sym


@dataclass(eq=False)
class SlerpCoef(Sym):
    gram: Gram
    t: float
    which: int  # 0: the coefficient of x, 1: of y

    @property
    def deps(self) -> tuple[Reduction, ...]:
        return (self.gram,)

    def value(self, results):
        return slerp_coefficients(*results[self.gram], self.t)[self.which]

    def __repr__(self) -> str:
        return f"slerp_coef({self.gram.label}, t={self.t:g}, {'xy'[self.which]})"


@dataclass(eq=False)
class SSum(Sym):
    terms: tuple[Coef, ...]

    @property
    def deps(self):
        return _deps(self.terms)

    def value(self, results):
        return math.fsum(coef_value(c, results) for c in self.terms)

    def __repr__(self) -> str:
        return "(" + " + ".join(map(repr, self.terms)) + ")"


@dataclass(eq=False)
class SProd(Sym):
    factors: tuple[Coef, ...]

    @property
    def deps(self):
        return _deps(self.factors)

    def value(self, results):
        return math.prod(coef_value(c, results) for c in self.factors)

    def __repr__(self) -> str:
        return "*".join(map(repr, self.factors))


@dataclass(eq=False)
class Solve:
    """A computation over reduction results, done once per run: `fn(*results of deps)`,
    e.g. the coefficients of a spherical mean from a Gram matrix. Its value may be a
    vector; `SPick` reads one entry as a coefficient."""

    fn: Any  # Callable[..., Any]
    deps: tuple[Reduction, ...]
    label: str

    def value(self, results: dict) -> Any:
        if self not in results:
            results[self] = self.fn(*(results[d] for d in self.deps))
        return results[self]

    def __hash__(self) -> int:
        return id(self)


@dataclass(eq=False)
class SPick(Sym):
    solve: Solve
    index: Any  # an int, a tuple, or None for the whole (scalar) value

    @property
    def deps(self):
        return self.solve.deps

    def value(self, results):
        v = self.solve.value(results)
        return float(v if self.index is None else v[self.index])

    def __repr__(self) -> str:
        return f"{self.solve.label}" + ("" if self.index is None else f"[{self.index}]")


def _deps(items: Iterable[Any]) -> tuple[Reduction, ...]:
    out: dict[int, Reduction] = {}
    for c in items:
        if isinstance(c, Sym):
            for g in c.deps:
                out.setdefault(id(g), g)
    return tuple(out.values())


def coef_value(c: Coef, results) -> float:
    return c.value(results) if isinstance(c, Sym) else float(c)


def s_add(a: Coef, b: Coef) -> Coef:
    if not isinstance(a, Sym) and not isinstance(b, Sym):
        return a + b
    if not isinstance(a, Sym) and a == 0:
        return b
    if not isinstance(b, Sym) and b == 0:
        return a
    terms = (a.terms if isinstance(a, SSum) else (a,)) + (b.terms if isinstance(b, SSum) else (b,))
    return SSum(terms)


def s_mul(a: Coef, b: Coef) -> Coef:
    if not isinstance(a, Sym) and not isinstance(b, Sym):
        return a * b
    for x, y in ((a, b), (b, a)):
        if not isinstance(x, Sym):
            if x == 0:
                return 0.0
            if x == 1:
                return y
    return SProd((a.factors if isinstance(a, SProd) else (a,)) + (b.factors if isinstance(b, SProd) else (b,)))


# ---- tensor expressions ---------------------------------------------------------------


class TExpr:
    spec: TensorSpec  # the value's shape; dtype is the stored dtype of leaves, else compute

    @property
    def numel(self) -> int:
        return self.spec.numel


@dataclass(eq=False)
class Leaf(TExpr):
    source: Any  # CheckpointSource | MemorySource
    name: str
    spec: TensorSpec

    def __repr__(self) -> str:
        return f"{self.source.label}:{self.name}"


@dataclass(eq=False)
class Lin(TExpr):
    terms: tuple[tuple[Coef, TExpr], ...]
    const: Coef
    spec: TensorSpec

    def __repr__(self) -> str:
        parts = [f"{_fc(c)}*{e!r}" for c, e in self.terms]
        if not (not isinstance(self.const, Sym) and self.const == 0):
            parts.append(_fc(self.const))
        return "lin(" + " + ".join(parts) + ")"


@dataclass(eq=False)
class Map(TExpr):
    op: str
    args: tuple[TExpr, ...]
    params: tuple[Any, ...]
    spec: TensorSpec

    def __repr__(self) -> str:
        return f"{self.op}({', '.join(map(repr, self.args))}{''.join(', ' + repr(p) for p in self.params)})"


@dataclass(eq=False)
class Slice(TExpr):
    expr: TExpr
    start: int
    spec: TensorSpec

    def __repr__(self) -> str:
        return f"{self.expr!r}[{self.start}:{self.start + self.numel}]"


@dataclass(eq=False)
class Cat(TExpr):
    parts: tuple[TExpr, ...]
    spec: TensorSpec

    def __repr__(self) -> str:
        return f"cat({', '.join(map(repr, self.parts))})"


@dataclass(eq=False)
class Rows(TExpr):
    """A row gather (vocabulary alignment): output rows [start, start+count) of each run
    are sum(coef * rows [src, src+count) of expr) over the run's terms; a run without
    terms is zeros. Runs are sorted, disjoint and cover every row; consecutive rows read
    from consecutive source rows share one run, so a shifted block is one read."""

    runs: tuple[tuple[int, int, tuple[tuple[float, TExpr, int], ...]], ...]
    row_len: int  # elements per row
    spec: TensorSpec
    starts: tuple[int, ...] = field(default=(), repr=False)  # each run's first row, for bisect

    def __post_init__(self) -> None:
        self.starts = tuple(r[0] for r in self.runs)

    def exprs(self) -> list[TExpr]:
        """The source expressions, each once, in first-use order."""
        out: dict[int, TExpr] = {}
        for _, _, terms in self.runs:
            for _, x, _ in terms:
                out.setdefault(id(x), x)
        return list(out.values())

    def __repr__(self) -> str:
        return f"rows({', '.join(map(repr, self.exprs()))}; {len(self.runs)} runs)"


def _fc(c: Coef) -> str:
    return f"{c:g}" if not isinstance(c, Sym) else repr(c)


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
        """Peak chunk-sized buffers (compute-dtype units); `rule` is plan.buffers."""
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
        # dot products, and both float64 copies are held for them
        if cs >= 8:
            return max(max(rule(x, cs), 1.0 + rule(y, cs)) for x, y in self.items)
        return max(max(rule(x, cs), rule(y, cs)) for x, y in self.items) + 2 * (8 / cs)

    def describe(self) -> str:
        return f"{self.label}: dot and norms over {len(self.items)} tensor(s)"

    def run(self, ev: Any, chunk: int) -> tuple[float, float, float]:
        import torch

        xy = xx = yy = 0.0
        for x, y in self.items:
            for e0 in range(0, x.numel, chunk):
                e1 = min(x.numel, e0 + chunk)
                a, b = _widened(ev, (x, y), e0, e1)
                xy += float(torch.dot(a, b))
                xx += float(torch.dot(a, a))
                yy += float(torch.dot(b, b))
                ev.pool.give(a)
                ev.pool.give(b)
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
        # each expression is evaluated then widened; all n float64 copies are held
        wide = 1.0 if cs >= 8 else 8 / cs
        return max(max(rule(x, cs) for x in row) for row in self.items) + len(self.items[0]) * wide

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
                stacked = torch.stack(vs)
                total += (stacked @ stacked.T).cpu().numpy()
                del stacked
                for v in vs:
                    ev.pool.give(v)
        return total

    def __repr__(self) -> str:
        return f"GramMatrix({self.label}, {self.n} vectors, {len(self.items)} tensors)"


def children(e: TExpr) -> list[TExpr]:
    """The subexpressions `e` evaluates, in evaluation order (every traversal of tensor
    expressions walks through here, so a new node kind is added in one place)."""
    if isinstance(e, Lin):
        return [t for _, t in e.terms]
    if isinstance(e, Map):
        return list(e.args)
    if isinstance(e, Slice):
        return [e.expr]
    if isinstance(e, Cat):
        return list(e.parts)
    if isinstance(e, Rows):
        return e.exprs()
    return []


def expr_deps(e: TExpr) -> tuple[Reduction, ...]:
    """The reductions whose results an expression's coefficients (and its primitives'
    symbolic parameters) need."""
    out: dict[int, Reduction] = {}
    stack = [e]
    seen: set[int] = set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, Lin):
            coefs = [c for c, _ in x.terms] + [x.const]
        elif isinstance(x, Map):
            coefs = list(x.params)
        else:
            coefs = []
        for g in _deps(coefs):
            out.setdefault(id(g), g)
        stack.extend(children(x))
    return tuple(out.values())


def leaves(e: TExpr) -> list[Leaf]:
    """The stored tensors an expression reads, each once, in evaluation order."""
    out: dict[int, Leaf] = {}
    stack = [e]
    while stack:
        x = stack.pop()
        if isinstance(x, Leaf):
            out.setdefault(id(x), x)
        else:
            stack.extend(reversed(children(x)))
    return list(out.values())


def lin(terms: Iterable[tuple[Coef, TExpr]], const: Coef = 0.0) -> TExpr:
    """A folded linear combination: nested Lins are flattened, repeated expressions
    merged (first appearance keeps its place), zero coefficients dropped."""
    acc: dict[int, list] = {}
    const_total: Coef = const
    spec = None

    def add(c: Coef, e: TExpr) -> None:
        nonlocal const_total, spec
        if isinstance(e, Lin):
            for c2, e2 in e.terms:
                add(s_mul(c, c2), e2)
            const_total = s_add(const_total, s_mul(c, e.const))
            return
        spec = spec or e.spec
        if id(e) in acc:
            acc[id(e)][0] = s_add(acc[id(e)][0], c)
        else:
            acc[id(e)] = [c, e]

    for c, e in terms:
        add(c, e)
        spec = spec or e.spec
    kept = tuple((c, e) for c, e in acc.values() if isinstance(c, Sym) or c != 0)
    if len(kept) == 1 and not isinstance(kept[0][0], Sym) and kept[0][0] == 1 and (
        not isinstance(const_total, Sym) and const_total == 0
    ):
        return kept[0][1]
    assert spec is not None
    return Lin(kept, const_total, spec)


# ---- lowering -------------------------------------------------------------------------

def group_key(name: str, per: str, arch: Arch | None = None) -> tuple:
    """Which tensors share one SLERP angle: per tensor, per transformer layer (the
    checkpoint's layer stack as `arch` finds it: `model.layers.N.`, `transformer.h.N.`,
    `encoder.layer.N.`, ...; every other tensor alone), or the whole model. Without an
    `arch`, a name's first numbered module counts as its layer."""
    if per == "model":
        return ("model",)
    if per == "layer":
        i = arch.layer(name) if arch is not None else layer_index(name)
        if i is not None:
            return ("layer", i)
    return ("tensor", name)


def _label(key: tuple) -> str:
    if key[0] == "model":
        return "model"
    if key[0] == "layer":
        return f"layer {key[1]}"
    return key[1]


class Lowerer:
    """Lowers model-level nodes tensor by tensor, memoised so that a shared node (and the
    reductions it needs) is lowered once. `load` and `rename` are structure; every other
    op lowers as its family declares (`family.lowering`, looked up in the registry in
    use), or, for an elementwise primitive of `ops/`, to a `Map`."""

    def __init__(self) -> None:
        self._memo: dict[tuple[int, str], TExpr] = {}
        self._grams: dict[tuple, Any] = {}
        self._rename_tables: dict[int, dict[str, tuple[int, str]]] = {}
        self._groups: dict[tuple[int, str], dict[tuple, list[str]]] = {}
        self._keep: list[Node] = []  # holds nodes so memo ids stay unique

    def lower(self, model: Model) -> dict[str, TExpr]:
        """One expression per tensor of the model, in its tensor table's order."""
        return {name: self.tensor(model.node, name) for name in model.type.tensors}

    def tensor(self, node: Node, name: str) -> TExpr:
        key = (id(node), name)
        expr = self._memo.get(key)
        if expr is None:
            expr = self._lower(node, name)
            self._memo[key] = expr
            self._keep.append(node)
        return expr

    @staticmethod
    def _spec(node: Node, name: str) -> TensorSpec:
        return node.type.tensors[name]

    def _lower(self, node: Node, name: str) -> TExpr:
        op, args, params = node.op, node.args, node.params
        if op == "load":
            source = params[0]
            return Leaf(source, name, source.tensors[name])
        if op == "rename":  # layer surgery, tied heads (surgery.py): another node's tensor
            i, src = self._renames(node)[name]
            return self.tensor(args[i], src)
        spec = self._spec(node, name)
        if not spec.is_float:
            # integer buffers (position ids, masks) are carried from the primary input
            return self.tensor(args[0], name)
        lower = in_use().lowerings.get(op)
        if lower is not None:  # the core ops (builtins.py) and every family's ops
            return lower(self, node, name)
        if op in OPS:  # a registered elementwise primitive: tensor args, then scalar params
            # per-layer and per-tensor values (ramp, where) become this tensor's numbers
            params = resolve_params(params, name, node.type)
            return Map(op, tuple(self.tensor(a, name) for a in args), params, self.tensor(args[0], name).spec)
        raise AssertionError(f"no lowering for op {op!r}")

    def _renames(self, node: Node) -> dict[str, tuple[int, str]]:
        table = self._rename_tables.get(id(node))
        if table is None:
            table = self._rename_tables[id(node)] = {out: (i, src) for out, i, src in node.params[2]}
        return table

    def _group(self, node: Node, name: str, per: str) -> tuple[tuple, list[str]]:
        groups = self._groups.get((id(node), per))
        if groups is None:  # every group of the node at once: one pass over its tensors
            arch = arch_of(node.type)
            groups = {}
            for n, spec in node.type.tensors.items():
                if spec.is_float:
                    groups.setdefault(group_key(n, per, arch), []).append(n)
            self._groups[(id(node), per)] = groups
        key = group_key(name, per, arch_of(node.type))
        return key, groups[key]

    def param(self, value: Any, node: Node, name: str) -> Any:
        """A scalar parameter of `node` as it applies to tensor `name`. Every family's
        lowering (the core ops' in builtins.py included) reads its scalar parameters
        through here, and a primitive's are resolved by the same `resolve_params`, so
        that per-layer and per-tensor values resolve in one place (numbers pass through;
        tuples are resolved item by item)."""
        return resolve_params((value,), name, node.type)[0]

    def reduction(self, key: tuple, make) -> Any:
        """The reduction (or Solve) registered under `key`, made by `make()` the first
        time: tensors of one group share one reduction, so it runs once per run."""
        r = self._grams.get(key)
        if r is None:
            r = self._grams[key] = make()
        return r

    def group(self, node: Node, name: str, per: str) -> tuple[tuple, list[str]]:
        """The group key of tensor `name` and the float tensors of `node` sharing it."""
        return self._group(node, name, per)

    def gram(self, node: Node, name: str, per: str, pair, tag: str, step: int = 0) -> Gram:
        """The Gram reduction (dot products and norms of `pair(n)` for every tensor n of
        the group of `name`) that SLERP-like ops share within a group, made once."""
        key, names = self._group(node, name, per)
        gkey = (id(node), key, step)
        g = self._grams.get(gkey)
        if g is None:
            label = f"{tag} {_label(key)}" + (f" step {step}" if step else "")
            g = Gram(tuple(pair(n) for n in names), label)
            self._grams[gkey] = g
        return g

    def slerp_tv_vector(self, node: Node, name: str, k: int) -> TExpr:
        """The task vector s_k of WARP's SLERP over the first k models: s_1 = d_1,
        s_k = slerp(s_{k-1}, d_k, 1/k), with d_i = m_i - init."""
        key = (id(node), name, f"tv{k}")
        if key in self._memo:
            return self._memo[key]
        (per,) = node.params
        delta = lambda i, n: lin([(1.0, self.tensor(node.args[i], n)), (-1.0, self.tensor(node.args[0], n))])  # noqa: E731
        if k == 1:
            expr = delta(1, name)
        else:
            g = self.gram(
                node, name, per,
                lambda n: (self.slerp_tv_vector(node, n, k - 1), delta(k, n)),
                "slerp", step=k - 1 if len(node.args) > 3 else 0,
            )
            t = 1.0 / k
            expr = lin([(SlerpCoef(g, t, 0), self.slerp_tv_vector(node, name, k - 1)), (SlerpCoef(g, t, 1), delta(k, name))])
        self._memo[key] = expr
        return expr


__all__ = [
    "Cat", "Coef", "Gram", "GramMatrix", "Leaf", "Lin", "Lowerer", "Map", "Reduction",
    "Rows", "SPick", "Slice", "SlerpCoef", "Solve", "Sym", "TExpr", "children", "coef_value", "expr_deps",
    "group_key", "leaves", "lin", "slerp_coefficients",
]
