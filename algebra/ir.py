"""The tensor-expression IR: symbolic scalars and elementwise tensor expressions.

Lowering (`lower.py`) turns each output tensor into one expression; planning (`plan.py`)
orders and sizes them; execution (`execute.py`) streams chunks through them. Tensor
expressions are elementwise over a tensor's flattened elements, so any flat range
[e0, e1) of an output can be computed from the same ranges of its inputs (or, for
`Slice` and `Rows`, from ranges fixed at lowering): that is what lets the executor
stream fixed-size chunks. The kinds:

    Leaf(source, name)       a stored tensor, read lazily
    Lin(terms, const)        sum of coef * expr, plus const (all linear ops fold into one)
    Map(op, args, params)    a nonlinear elementwise primitive from ops/
    Slice(expr, start, n)    elements [start, start+n) of an expression
    Cat(parts)               flat concatenation (e.g. merged vocabulary rows + the rest)
    Rows(runs, row_len)      rows gathered and averaged from other tensors' rows (align)
    LowRank(b, a, rank, scale)  scale * (B @ A) of a low-rank pair (a LoRA adapter's)

Each kind is one class holding all of its rules side by side; the planner and the
executor call these rules instead of testing for kinds:

    children()        the subexpressions it evaluates, in evaluation order
    coefs()           its coefficients and parameters that may be symbolic (`Sym`)
    kind              the word `alg plan` shows for a write of it ("lin", "copy", ...)
    chunk_unit()      what a chunk of it must be a multiple of (whole rows, or 1)
    buffers(cs)       the memory rule: peak chunk-sized buffers alive while evaluating it
                      (`cs` is the compute dtype's itemsize), its result included
    eval(ev, e0, e1)  the evaluation rule: elements [e0, e1) on the evaluator `ev`

`buffers` counts exactly what `eval` allocates, so the planner's prediction follows the
executor. Adding a kind is adding one class here with these members. Evaluation
imports torch when it runs; nothing else here needs it (`alg check` and `alg plan`
never evaluate).

A coefficient is a float or a `Sym`: a scalar known only after a streamed reduction
(`reductions.Gram`: dot products and squared norms summed over a group of tensors, as
SLERP's angle needs). Folding linear operations (`lin`) means `ema` of fifty
checkpoints is one pass with one accumulator, and WARP's `init + c1*(m1-init) +
c2*(m2-init)` reads each input once per chunk.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .types import TensorSpec

if TYPE_CHECKING:
    from .reductions import Gram, Reduction

# What evaluation needs, imported on first use (`alg check` and `alg plan` never evaluate)
# and then kept here, so that the per-chunk rules pay no import statement.
_LAZY: dict[str, Any] = {}


def _torch() -> Any:
    t = _LAZY.get("torch")
    if t is None:
        import torch

        t = _LAZY["torch"] = torch
    return t


def _ops() -> dict[str, Any]:
    """The registry of primitives (`ops.OPS`)."""
    ops = _LAZY.get("ops")
    if ops is None:
        from .ops import OPS

        ops = _LAZY["ops"] = OPS
    return ops


def _slerp_coefficients(*args: Any) -> Any:
    fn = _LAZY.get("slerp")
    if fn is None:
        from .ops.slerp import slerp_coefficients

        fn = _LAZY["slerp"] = slerp_coefficients
    return fn(*args)

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
        return _slerp_coefficients(*results[self.gram], self.t)[self.which]

    def __repr__(self) -> str:
        return f"slerp_coef({self.gram.label}, t={self.t:g}, {'xy'[self.which]})"


@dataclass(eq=False)
class SSum(Sym):
    terms: tuple[Coef, ...]

    @property
    def deps(self):
        return sym_deps(self.terms)

    def value(self, results):
        return math.fsum(coef_value(c, results) for c in self.terms)

    def __repr__(self) -> str:
        return "(" + " + ".join(map(repr, self.terms)) + ")"


@dataclass(eq=False)
class SProd(Sym):
    factors: tuple[Coef, ...]

    @property
    def deps(self):
        return sym_deps(self.factors)

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


def sym_deps(items: Iterable[Any]) -> tuple[Reduction, ...]:
    """The reductions the symbolic items among `items` need, each once, in order."""
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
    """A tensor expression (see the module docstring for the members each kind defines)."""

    spec: TensorSpec  # the value's shape; dtype is the stored dtype of leaves, else compute
    kind: str = "expr"

    @property
    def numel(self) -> int:
        return self.spec.numel

    def children(self) -> list[TExpr]:
        return []

    def coefs(self) -> list[Any]:
        return []

    def chunk_unit(self) -> int:
        """What the chunks evaluating it must be whole multiples of (1: any range)."""
        return 1

    def buffers(self, cs: int) -> float:
        raise NotImplementedError

    def eval(self, ev: Any, e0: int, e1: int, guard: bool = True) -> Any:
        """Elements [e0, e1) of the expression, flat, in the compute dtype on the device:
        a pool buffer of `ev` (the caller gives it back) or a view of an input (never
        written). `guard`: see `execute.Evaluator.eval`."""
        raise NotImplementedError


@dataclass(eq=False)
class Leaf(TExpr):
    source: Any  # CheckpointSource | MemorySource
    name: str
    spec: TensorSpec
    kind = "copy"

    def buffers(self, cs: int) -> float:
        return 1.0  # the converted (or device-copied) chunk

    def eval(self, ev, e0, e1, guard=True):
        x = self.source.read(self.name, e0, e1)
        if not x.is_floating_point():
            return x.to(ev.device)  # integer buffers are copied as stored
        if x.dtype != ev.dtype or x.device != ev.device:
            buf = ev.pool.take(e1 - e0, ev.dtype)
            buf.copy_(x)
            x = buf
        if guard and ev.check_inputs:
            ev.check_input(self, x, e0)
        return x

    def __repr__(self) -> str:
        return f"{self.source.label}:{self.name}"


@dataclass(eq=False)
class Lin(TExpr):
    terms: tuple[tuple[Coef, TExpr], ...]
    const: Coef
    spec: TensorSpec
    kind = "lin"

    def children(self) -> list[TExpr]:
        return [t for _, t in self.terms]

    def coefs(self) -> list[Any]:
        return [c for c, _ in self.terms] + [self.const]

    def buffers(self, cs: int) -> float:
        # acc = c0 * x0 allocates while x0 is alive; then each x_i alongside acc
        peak = 0.0
        for i, (_, x) in enumerate(self.terms):
            peak = max(peak, x.buffers(cs) + 1.0 if i == 0 else 1.0 + x.buffers(cs))
        return max(peak, 1.0)

    def eval(self, ev, e0, e1, guard=True):
        torch = _torch()
        acc = ev.pool.take(e1 - e0, ev.dtype)
        if not self.terms:
            return acc.fill_(ev.coef(self.const))
        for i, (c, x) in enumerate(self.terms):
            v = x.eval(ev, e0, e1, guard)
            if i == 0:
                torch.mul(v, ev.coef(c), out=acc)
            else:
                acc.add_(v, alpha=ev.coef(c))
            ev.pool.give(v)
        const = ev.coef(self.const)
        if const != 0.0:
            acc.add_(const)
        return acc

    def __repr__(self) -> str:
        parts = [f"{_fc(c)}*{e!r}" for c, e in self.terms]
        if not (not isinstance(self.const, Sym) and self.const == 0):
            parts.append(_fc(self.const))
        return "lin(" + " + ".join(parts) + ")"


def row_length(spec: TensorSpec) -> int:
    """The row of a row-wise primitive: the last dimension (a 1-D tensor is one row)."""
    return max(1, spec.shape[-1]) if spec.shape else 1


@dataclass(eq=False)
class Map(TExpr):
    op: str
    args: tuple[TExpr, ...]
    params: tuple[Any, ...]
    spec: TensorSpec

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.op

    @property
    def prim(self) -> Any:
        """The primitive (`ops.Primitive`) it applies."""
        return _ops()[self.op]

    def chunk_unit(self) -> int:
        # a row-wise primitive sees whole rows of its result (see `ops`)
        return row_length(self.spec) if self.prim.rowwise_for(self) else 1

    def children(self) -> list[TExpr]:
        return list(self.args)

    def coefs(self) -> list[Any]:
        return list(self.params)

    def buffers(self, cs: int) -> float:
        held, peak = 0.0, 0.0
        for a in self.args:
            peak = max(peak, held + a.buffers(cs))
            held += 1.0
        return max(peak, held + 1.0 + self.prim.scratch_for(self))

    def eval(self, ev, e0, e1, guard=True):
        prim = self.prim
        if prim.rowwise_for(self):
            row = row_length(self.spec)
            r0, r1 = e0 - e0 % row, min(self.numel, -(-e1 // row) * row)
            if (r0, r1) != (e0, e1):  # not aligned to rows (the planner avoids this)
                whole = self.eval(ev, r0, r1)
                out = ev.pool.take(e1 - e0, whole.dtype)
                out.copy_(whole[e0 - r0 : e1 - r0])
                ev.pool.give(whole)
                return out
        # a primitive's arguments are always checked: it may absorb a nan silently
        args = [ev.stored(a, e0, e1) if prim.stored else a.eval(ev, e0, e1) for a in self.args]
        params = [ev.coef(p) if isinstance(p, Sym) else p for p in self.params]
        kw = {"e0": e0} if prim.positional else {}
        if prim.pooled:
            kw["pool"] = ev.pool
        if prim.stored:
            kw["dtype"] = ev.dtype
        out = prim.fn(*args, *params, **kw)
        for a in args:
            ev.pool.give(a)
        return out

    def __repr__(self) -> str:
        return f"{self.op}({', '.join(map(repr, self.args))}{''.join(', ' + repr(p) for p in self.params)})"


@dataclass(eq=False)
class Slice(TExpr):
    expr: TExpr
    start: int
    spec: TensorSpec
    kind = "slice"

    def children(self) -> list[TExpr]:
        return [self.expr]

    def buffers(self, cs: int) -> float:
        return self.expr.buffers(cs)

    def eval(self, ev, e0, e1, guard=True):
        return self.expr.eval(ev, self.start + e0, self.start + e1, guard)

    def __repr__(self) -> str:
        return f"{self.expr!r}[{self.start}:{self.start + self.numel}]"


@dataclass(eq=False)
class Cat(TExpr):
    parts: tuple[TExpr, ...]
    spec: TensorSpec
    kind = "cat"

    def children(self) -> list[TExpr]:
        return list(self.parts)

    def buffers(self, cs: int) -> float:
        # parts are evaluated one after another into pieces that together fill at most
        # one chunk each, then concatenated into another
        return max(p.buffers(cs) for p in self.parts) + len(self.parts) + 1.0

    def eval(self, ev, e0, e1, guard=True):
        torch = _torch()
        pieces, pos = [], 0
        for part in self.parts:
            lo, hi = max(e0, pos), min(e1, pos + part.numel)
            if lo < hi:
                pieces.append(part.eval(ev, lo - pos, hi - pos, guard))
            pos += part.numel
        out = ev.pool.take(e1 - e0, ev.dtype)
        torch.cat(pieces, out=out)
        for piece in pieces:
            ev.pool.give(piece)
        return out

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
    kind = "rows"

    def __post_init__(self) -> None:
        self.starts = tuple(r[0] for r in self.runs)

    def exprs(self) -> list[TExpr]:
        """The source expressions, each once, in first-use order."""
        out: dict[int, TExpr] = {}
        for _, _, terms in self.runs:
            for _, x, _ in terms:
                out.setdefault(id(x), x)
        return list(out.values())

    def children(self) -> list[TExpr]:
        return self.exprs()

    def buffers(self, cs: int) -> float:
        # the output chunk, and one source range at a time accumulated into it
        return 1.0 + max((x.buffers(cs) for x in self.exprs()), default=0.0)

    def eval(self, ev, e0, e1, guard=True):
        """Each run that meets [e0, e1) reads one contiguous range of each of its sources
        and accumulates it into its slice of the output chunk."""
        torch = _torch()
        out = ev.pool.take(e1 - e0, ev.dtype)
        L = self.row_len
        runs = self.runs
        i = max(0, bisect.bisect_right(self.starts, e0 // L) - 1)
        while i < len(runs) and runs[i][0] * L < e1:
            start, count, terms = runs[i]
            lo, hi = max(e0, start * L), min(e1, (start + count) * L)
            i += 1
            if lo >= hi:
                continue
            dst = out[lo - e0 : hi - e0]
            if not terms:
                dst.zero_()
            for k, (c, x, src) in enumerate(terms):
                shift = (src - start) * L
                v = x.eval(ev, lo + shift, hi + shift, guard)
                if k == 0 and c == 1.0:
                    dst.copy_(v)
                elif k == 0:
                    torch.mul(v, c, out=dst)
                else:
                    dst.add_(v, alpha=c)
                ev.pool.give(v)
        return out

    def __repr__(self) -> str:
        return f"rows({', '.join(map(repr, self.exprs()))}; {len(self.runs)} runs)"


LOWRANK_BLOCK = 16  # rows of B @ A per matrix product (see LowRank)


@dataclass(eq=False)
class LowRank(TExpr):
    """scale * (B @ A) as a flat [out, in] tensor, for B [out, rank] and A [rank, in] (a
    LoRA adapter's lora_B and lora_A). The product is taken in blocks of LOWRANK_BLOCK
    rows aligned to the tensor's first row (one batched product; the last block may be
    shorter), so each element's value depends on its block alone, never on the chunks a
    pass reads: a reduction's pass and the write pass see the same bits, whatever their
    chunks. (With torch's CPU BLAS here, blocks of 16 rows give the bits of the whole
    product, which is what peft's merge computes: tests/test_lora.py checks it; single
    rows do not.) The scale multiplies the product before anything is added to it, as
    peft does. Memory: A and B's rows are counted as one chunk, which holds while
    rank * in fits a chunk (adapters' ranks are 4-256)."""

    b: TExpr
    a: TExpr
    rank: int
    scale: float
    spec: TensorSpec
    kind = "lowrank"

    def children(self) -> list[TExpr]:
        return [self.b, self.a]

    def chunk_unit(self) -> int:
        return LOWRANK_BLOCK * row_length(self.spec)

    def buffers(self, cs: int) -> float:
        # the result chunk; A and the rows of B beside it; the covering blocks when a
        # reduction's chunk is not made of whole blocks
        return 3.0

    def eval(self, ev, e0, e1, guard=True):
        torch = _torch()
        n_in, R, k = row_length(self.spec), LOWRANK_BLOCK, self.rank
        rows = self.numel // n_in
        r0 = e0 // n_in // R * R
        last = -(-e1 // n_in)  # one past the last row the range touches
        r1 = min(rows, -(-last // R) * R)
        a = self.a.eval(ev, 0, self.a.numel, guard)
        b = self.b.eval(ev, r0 * k, r1 * k, guard)
        aligned = (r0 * n_in, r1 * n_in) == (e0, e1)
        res = ev.pool.take((r1 - r0) * n_in, ev.dtype)
        whole = (r1 - r0) // R * R
        a2 = a.view(k, n_in)
        if whole:
            torch.matmul(b[: whole * k].view(whole // R, R, k), a2, out=res[: whole * n_in].view(whole // R, R, n_in))
        if whole < r1 - r0:  # the tensor's last, shorter block
            torch.matmul(b[whole * k:].view(-1, k), a2, out=res[whole * n_in:].view(-1, n_in))
        ev.pool.give(a)
        ev.pool.give(b)
        if aligned:
            return res.mul_(self.scale)
        out = ev.pool.take(e1 - e0, ev.dtype)
        torch.mul(res[e0 - r0 * n_in : e1 - r0 * n_in], self.scale, out=out)
        ev.pool.give(res)
        return out

    def __repr__(self) -> str:
        return f"lowrank({self.b!r} @ {self.a!r}, rank {self.rank}, x{self.scale:g})"


def _fc(c: Coef) -> str:
    return f"{c:g}" if not isinstance(c, Sym) else repr(c)


# ---- walks ------------------------------------------------------------------------------


def children(e: TExpr) -> list[TExpr]:
    """The subexpressions `e` evaluates, in evaluation order (`TExpr.children`)."""
    return e.children()


def buffers(e: TExpr, cs: int) -> float:
    """Peak chunk-sized buffers (in compute-dtype units) alive while evaluating `e`, its
    result included (`TExpr.buffers`)."""
    return e.buffers(cs)


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
        for g in sym_deps(x.coefs()):
            out.setdefault(id(g), g)
        stack.extend(x.children())
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
            stack.extend(reversed(x.children()))
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


__all__ = [
    "Cat", "Coef", "Leaf", "Lin", "Map", "Rows", "SPick", "SProd", "SSum", "Slice", "SlerpCoef", "Solve",
    "Sym", "TExpr", "buffers", "children", "coef_value", "expr_deps", "leaves", "lin", "row_length",
    "s_add", "s_mul", "sym_deps",
]
