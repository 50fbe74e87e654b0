"""Numerics of the task-vector merges (TIES, DARE, breadcrumbs, DELLA, SCE): the
counter-based generator, the keep rules, and the one combining primitive.

Every rule here is a function of an element's value and its index in the tensor, never
of the chunk it arrives in, so that output is bit-identical whatever the chunk size,
the schedule, the thread count or the device.

The generator (DARE, DELLA). An element's draw is a 24-bit integer
    v(seed, name, i, e) = fmix32(fmix32((e mod 2^32) xor k0) xor (e div 2^32) xor k1) >> 8
for element index e of model i's task vector of tensor `name`, where (k0, k1) are the
low and high 32 bits of the first 8 bytes (little endian) of
sha256("<seed>:<i>:<name>"), and fmix32 is MurmurHash3's 32-bit finaliser. An element
with keep probability p survives iff v < ceil(p * 2^24), i.e. iff v / 2^24 < p. All of it
is integer arithmetic on 32-bit values held in int64 (multiplications split in 16-bit
halves so that nothing overflows), identical on every device.

The magnitude rules (TIES, breadcrumbs, SCE). A streamed reduction (`methods.select`)
finds, for rank k, the value t of the k-th largest score and a cut index J: an element
is among the top k iff score > t, or score == t and its index < J (ties at the threshold
are kept lowest index first, so exactly k are kept). (t, J) = (-1, 0) keeps everything;
J < 0 keeps nothing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from ..family import Family
from ..lazy import torch

family = Family("ops.sparse")
primitive = family.primitive

M32 = 0xFFFFFFFF
DRAW_BITS = 24


# ---- the counter-based generator ---------------------------------------------------------


def rng_key(seed: int, name: str, model: int) -> tuple[int, int]:
    """(k0, k1): the two 32-bit halves of the stream key of model `model`'s tensor `name`."""
    digest = hashlib.sha256(f"{seed}:{model}:{name}".encode()).digest()
    key = int.from_bytes(digest[:8], "little")
    return key & M32, key >> 32


def _mul32(h: torch.Tensor, c: int, tmp: torch.Tensor) -> torch.Tensor:
    """h = (h * c) mod 2^32 in place, for h in [0, 2^32) held in int64, without int64
    overflow (`tmp`: a scratch buffer of h's size)."""
    torch.mul(h, c >> 16, out=tmp).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return h.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(M32)


def _fmix32(h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser, in place."""
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))
    _mul32(h, 0x85EBCA6B, tmp)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 13, out=tmp))
    _mul32(h, 0xC2B2AE35, tmp)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))
    return h


def draws(e0: int, n: int, key: tuple[int, int], device: torch.device, pool=None) -> torch.Tensor:
    """The 24-bit draws v of elements e0 .. e0+n-1 (int64; a buffer of `pool`, the
    executor's chunk pool, when given: the caller gives it back)."""
    def take() -> torch.Tensor:
        return pool.take(n, torch.int64) if pool is not None else torch.empty(n, dtype=torch.int64, device=device)

    h, hi, tmp = take(), take(), take()
    torch.arange(e0, e0 + n, dtype=torch.int64, device=device, out=h)
    torch.bitwise_right_shift(h, 32, out=hi)
    _fmix32(h.bitwise_and_(M32).bitwise_xor_(key[0]), tmp)
    _fmix32(h.bitwise_xor_(hi).bitwise_xor_(key[1]), tmp)
    if pool is not None:
        pool.give(hi)
        pool.give(tmp)
    return h.bitwise_right_shift_(32 - DRAW_BITS)


def keep_threshold(p: float) -> int:
    """Draws v < this survive with probability p: ceil(p * 2^24)."""
    return math.ceil(p * (1 << DRAW_BITS))


# ---- keep rules ------------------------------------------------------------------------------


def top_mask(score: torch.Tensor, t: float, cut: float, e0: int, pool=None) -> torch.Tensor | None:
    """Which elements of a chunk (a flat tensor) starting at e0 are among the top k, from
    (t, J) (see the module docstring); None means all of them. The mask is a buffer of
    `pool` (the executor's chunk pool; the caller gives it back), or a fresh tensor."""
    pool = pool if pool is not None else _Fresh(score.device)
    n = score.numel()
    keep = pool.take(n, torch.bool)
    if cut < 0:
        return keep.zero_()
    if t < 0:
        pool.give(keep)
        return None
    torch.gt(score, t, out=keep)
    j = min(int(cut) - e0, n)  # ties at t are kept for chunk positions < j
    if j > 0:
        eq = torch.eq(score[:j], t, out=pool.take(j, torch.bool))
        keep[:j].logical_or_(eq)
        pool.give(eq)
    return keep


def _rows_ranks(mag: torch.Tensor, row: int) -> torch.Tensor:
    """Rank of each element within its row by magnitude, 0 = smallest; among equal
    magnitudes the lower index ranks higher (as in the top-k rules). int64."""
    rows = mag.view(-1, row)
    order = torch.argsort(rows, dim=1, descending=True, stable=True)  # position 0 = largest
    ranks = torch.empty_like(order)
    pos = torch.arange(row - 1, -1, -1, dtype=torch.int64, device=mag.device).expand_as(order)
    ranks.scatter_(1, order, pos)
    return ranks.view(-1)


def della_probability(ranks: torch.Tensor, row: int, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability from rank r in a row of R: (d - eps) + r * (2 eps / (R - 1)), in
    float64; a row of one element keeps with probability d."""
    if row == 1:
        return torch.full(ranks.shape, density, dtype=torch.float64, device=ranks.device)
    return ranks.to(torch.float64).mul_(2.0 * epsilon / (row - 1)).add_(density - epsilon)


# ---- the combining primitive ---------------------------------------------------------------


@dataclass(frozen=True)
class Sparsify:
    """How one model's task vector is sparsified before combining.

    kind: "none"; "top" (params: t, J); "window" (t, J of the ranks to drop, then t, J of
    the ranks kept up to; breadcrumbs); "dare" (density, key); "della" (density,
    epsilon, key). `nvals` is how many symbolic scalars it reads."""

    kind: str
    density: float = 1.0
    epsilon: float = 0.0
    key: tuple[int, int] = (0, 0)

    @property
    def nvals(self) -> int:
        return {"top": 2, "window": 4}.get(self.kind, 0)


@dataclass(frozen=True)
class Combine:
    """The static part of a `tv_combine` call. Its scalar parameters follow it: the n
    weights, then each model's sparsifier values, then (sce) the (t, J) of the variance
    selection."""

    n: int
    sparsify: tuple[Sparsify, ...]
    consensus: str  # "none" | "sum" (TIES: elect on w_i d_i) | "sce" (elect on d_i)
    normalize: bool
    row: int  # the tensor's row length (DELLA ranks rows)
    select_var: bool = False
    # the tensors are (base, m_1 .. m_n), not (d_1 .. d_n), and the scale leads the
    # scalars: the result is base + scale * merged (each input chunk read once)
    with_base: bool = False

    def __repr__(self) -> str:
        kinds = ",".join(sorted({s.kind for s in self.sparsify}))
        return f"<{self.n} models, {kinds}, {self.consensus}{', normalized' if self.normalize else ''}>"


def _split(items: tuple) -> tuple[list[torch.Tensor], Combine, list]:
    for i, x in enumerate(items):
        if isinstance(x, Combine):
            return list(items[:i]), x, list(items[i + 1:])
    raise AssertionError("tv_combine without its Combine parameter")


def _sparsified(d: torch.Tensor, sp: Sparsify, vals: list, row: int, e0: int, pool) -> torch.Tensor:
    """d' for one model: a pool buffer (d itself is never written)."""
    size = d.numel()
    out = pool.take(size, d.dtype)
    if sp.kind == "none":
        return out.copy_(d)
    if sp.kind in ("top", "window"):
        mag = torch.abs(d, out=out)
        keep = top_mask(mag, vals[-2], vals[-1], e0, pool)
        if sp.kind == "window":
            drop = top_mask(mag, vals[0], vals[1], e0, pool)
            if drop is not None:
                if keep is None:
                    keep = drop.logical_not_()
                else:
                    keep.logical_and_(drop.logical_not_())
                    pool.give(drop)
        if keep is None:
            return out.copy_(d)
        torch.where(keep, d, d.new_zeros(()), out=out)
        pool.give(keep)
        return out
    if sp.kind == "dare":
        v = draws(e0, size, sp.key, d.device, pool)
        keep = torch.lt(v, keep_threshold(sp.density), out=pool.take(size, torch.bool))
        pool.give(v)
        torch.where(keep, d, d.new_zeros(()), out=out).div_(sp.density)
        pool.give(keep)
        return out
    if sp.kind == "della":
        ranks = _rows_ranks(d.abs(), row)
        p = della_probability(ranks, row, sp.density, sp.epsilon)
        del ranks
        limit = p.mul(1 << DRAW_BITS).ceil_()
        keep = draws(e0, size, sp.key, d.device).to(torch.float64) < limit
        del limit
        return torch.where(keep, d / p.to(d.dtype), d.new_zeros(()), out=out)
    raise AssertionError(f"unknown sparsifier {sp.kind!r}")


def _var_mask(ds: list[torch.Tensor], t: float, cut: float, e0: int, pool) -> torch.Tensor | None:
    var = population_var(ds, pool)
    keep = top_mask(var, t, cut, e0, pool)
    pool.give(var)
    return keep


def population_var(ds: list[torch.Tensor], pool=None) -> torch.Tensor:
    """Σ (d_i - mean)^2 / n elementwise: SCE's selection score. With the executor's chunk
    pool (`pool`), the result and temporaries are pool buffers (the caller gives the
    result back)."""
    n = len(ds)
    size, dtype = ds[0].numel(), ds[0].dtype

    def take() -> torch.Tensor:
        return pool.take(size, dtype) if pool is not None else torch.empty_like(ds[0])

    mean = take().zero_()
    for d in ds:
        mean.add_(d)
    mean.div_(n)
    var, tmp = take().zero_(), take()
    for d in ds:
        var.add_(torch.sub(d, mean, out=tmp).square_())
    if pool is not None:
        pool.give(mean)
        pool.give(tmp)
    return var.div_(n)


def _combine_scratch(e) -> float:
    spec = next(p for p in e.params if isinstance(p, Combine))
    n = spec.n
    kinds = {s.kind for s in spec.sparsify}
    # the n sparsified (weighted) deltas are held together, plus the running sums
    # (elected sign, denominator) and one sparsifier's temporaries
    temps = 1.5
    if "dare" in kinds:
        temps = 6.5  # three int64 draw buffers (2 units each in float32) and the keep mask
    if "della" in kinds:
        temps = 9.0  # magnitudes, int64 order and ranks, float64 probabilities and limits
    if spec.select_var:
        temps = max(temps, 3.0)
    return n + 2.0 + temps + (1.0 if spec.with_base else 0.0)  # (a task vector formed from its model)


def _needs_rows(e) -> bool:
    spec = next(p for p in e.params if isinstance(p, Combine))
    return any(s.kind == "della" for s in spec.sparsify)


@primitive("tv_combine", arity=-1, scratch=_combine_scratch, positional=True, rowwise=_needs_rows, pooled=True,
           stored=True)
def tv_combine(*items, e0: int = 0, pool=None, dtype=None) -> torch.Tensor:
    """The merged task vector of n task vectors d_i: sparsify each (see `Sparsify`),
    optionally elect a sign per element and keep only agreeing entries, then sum with
    weights (and divide by the kept weights when normalising), in `dtype` (default: the
    first tensor's; a tensor handed as stored is converted to it). Temporaries and the
    result are buffers of the executor's chunk pool (`pool`; without one, fresh tensors)."""
    ds, spec, vals = _split(items)
    pool = pool if pool is not None else _Fresh(ds[0].device)
    size, dtype = ds[0].numel(), dtype or ds[0].dtype
    if _ties_fast(spec, ds, dtype):
        base, ms = ds[0], ds[1:]
        return _ties_compiled(base, ms, spec, float(vals[0]), [float(w) for w in vals[1:spec.n + 1]],
                              vals[spec.n + 1:], e0, pool)
    stored = [i for i, d in enumerate(ds) if d.dtype != dtype]
    for i in stored:
        ds[i] = pool.take(size, dtype).copy_(ds[i])
    try:
        return _tv_combine(ds, spec, vals, e0, pool, size, dtype)
    finally:
        for i in stored:
            pool.give(ds[i])


def _tv_combine(ds: list[torch.Tensor], spec: Combine, vals: list, e0: int, pool, size: int,
                dtype: torch.dtype) -> torch.Tensor:
    """tv_combine's general path (torch, any device and dtype): ds in `dtype`."""
    base = None
    if spec.with_base:
        base, ds, scale, vals = ds[0], ds[1:], float(vals[0]), vals[1:]
    weights = [float(w) for w in vals[: spec.n]]
    pos = spec.n
    parts: list[torch.Tensor] = []
    for i, (d, sp) in enumerate(zip(ds, spec.sparsify, strict=True)):
        mine = vals[pos : pos + sp.nvals]
        pos += sp.nvals
        if base is not None:  # d = m - base, as the Lin 1.0 * m + (-1.0) * base computes it, bit for bit
            d = torch.sub(d, base, out=pool.take(size, dtype))
        parts.append(_sparsified(d, sp, mine, spec.row, e0, pool))
        if base is not None:
            pool.give(d)
        if spec.consensus != "sce":
            parts[i].mul_(weights[i])
    merged = _combined(parts, spec, weights, vals[pos:], e0, size, dtype, pool)
    if base is None:
        return merged
    # base + scale * merged: the Lin 1.0 * base + scale * merged's own add (1.0 * base is base)
    out = torch.add(base, merged, alpha=scale, out=pool.take(size, dtype))
    pool.give(merged)
    return out


# ---- TIES on the CPU in float32, compiled ---------------------------------------------------
#
# The same operations as tv_combine's general path on the same float32 values, as one
# compiled kernel (`ops.kernels.ties_merge`) instead of some 25 torch calls each reading
# and writing the chunk: torch's where and masked_fill take 10-30x a subtraction's time on
# a random mask. The chunk is split between the run's threads (every rule is elementwise
# or by index): the bytes do not depend on the split.

def _ties_fast(spec: Combine, ds: list[torch.Tensor], dtype: torch.dtype) -> bool:
    """Whether the compiled kernel computes this call: TIES's top-k and sign election on
    (base, m_1 .. m_n), in float32 on the CPU, each input in float32 or as stored in
    bfloat16."""
    if not (spec.with_base and spec.consensus == "sum" and not spec.select_var and dtype == torch.float32
            and all(sp.kind == "top" for sp in spec.sparsify)
            and all(d.device.type == "cpu" and d.dtype in (torch.float32, torch.bfloat16) for d in ds)):
        return False
    from . import kernels

    return kernels.fma_like_torch()  # its last step is torch's add, bit for bit


_POOL: list = []  # ((threads, pid), ThreadPoolExecutor)


def _workers(n: int):
    """A pool of n threads for the compiled and numpy passes (made again after a fork: a
    forked child inherits the pool but not its threads)."""
    import os

    if not _POOL or _POOL[0][0] != (n, os.getpid()):
        from concurrent.futures import ThreadPoolExecutor

        if _POOL:
            (_, pid), old = _POOL.pop()
            if pid == os.getpid():
                old.shutdown(wait=False)
        _POOL.append(((n, os.getpid()), ThreadPoolExecutor(n, thread_name_prefix="alg-ties")))
    return _POOL[0][1]


SPLIT_MIN = 1 << 16  # a chunk under twice this many elements is not split between threads


def split_map(size: int, part) -> list:
    """part(a, b) over consecutive pieces [a, b) of range(size), one per torch thread
    (numpy and the compiled kernels let go of the GIL), run on `_workers`; the results in
    the pieces' order. One piece (this thread) on one thread or under 2 x SPLIT_MIN
    elements."""
    threads = max(1, torch.get_num_threads())
    if threads == 1 or size < 2 * SPLIT_MIN:
        return [part(0, size)]
    bounds = [size * k // threads for k in range(threads + 1)]
    return list(_workers(threads).map(lambda k: part(bounds[k], bounds[k + 1]), range(threads)))


def _ties_compiled(base, ms, spec: Combine, scale: float, weights: list[float], tj: list, e0: int, pool):
    """base + scale * TIES-merged task vectors of (base, ms) for one chunk, bit for bit as
    the general path computes it."""
    import numpy as np

    from . import kernels

    size, n = base.numel(), spec.n
    held = []
    if len({m.dtype for m in ms}) > 1:  # one tuple type for the kernel: float32 throughout
        ms = [m if m.dtype == torch.float32 else held.append(pool.take(size, torch.float32).copy_(m)) or held[-1]
              for m in ms]
    result = pool.take(size, torch.float32)
    bn, mn, out = kernel_array(base), tuple(kernel_array(m) for m in ms), result.numpy()
    w = np.array(weights, dtype=np.float32)
    cuts = [(float(tj[2 * i]), float(tj[2 * i + 1])) for i in range(n)]
    mode = np.array([kernels.keep_mode(t, cut) for t, cut in cuts], dtype=np.int64)
    t = np.array([max(t, 0.0) for t, _ in cuts], dtype=np.float32)
    cut = np.array([int(c) if c >= 0 else 0 for _, c in cuts], dtype=np.int64)

    def part(a: int, b: int) -> None:
        kernels.ties_merge(bn[a:b], tuple(x[a:b] for x in mn), w, mode, t, cut - (e0 + a), spec.normalize,
                           np.float32(scale), out[a:b])

    split_map(size, part)
    for buf in held:
        pool.give(buf)
    return result


def kernel_array(x: torch.Tensor):
    """A CPU tensor as a numpy array for the kernels: float32 as it is, bfloat16 as its
    bits (uint16)."""
    import numpy as np

    return x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()


def _combined(parts: list[torch.Tensor], spec: Combine, weights: list[float], vals: list, e0: int, size: int,
              dtype: torch.dtype, pool) -> torch.Tensor:
    """The merged task vector from the sparsified (weighted) parts; `vals` holds what
    follows the sparsifiers' scalars (SCE's variance selection)."""
    pos = 0
    if spec.select_var:
        keep = _var_mask(parts, vals[pos], vals[pos + 1], e0, pool)
        if keep is not None:
            keep.logical_not_()
            for p in parts:
                p.masked_fill_(keep, 0.0)
            pool.give(keep)
    if spec.consensus == "none":
        out = parts[0]
        for p in parts[1:]:
            out.add_(p)
            pool.give(p)
        return out
    # Sums start from their first term, not from 0 (0 + x == x for every x but -0.0),
    # and no result can tell: the total is only compared with 0, a kept entry is
    # nonzero and any other +0.0, and a zero denominator is replaced whatever its sign.
    total = torch.add(parts[0], parts[1], out=pool.take(size, dtype)) if len(parts) > 1 else parts[0]
    for p in parts[2:]:
        total.add_(p)
    positive = torch.ge(total, 0, out=pool.take(size, torch.bool))  # the elected sign; zero counts as +
    if len(parts) > 1:
        pool.give(total)
    out = den = None
    weighted = spec.consensus == "sce" or spec.normalize
    agree, below = pool.take(size, torch.bool), pool.take(size, torch.bool)
    zero = parts[0].new_zeros(())
    for i, p in enumerate(parts):
        # a zero entry never agrees
        torch.where(positive, torch.gt(p, 0, out=agree), torch.lt(p, 0, out=below), out=agree)
        if spec.consensus == "sce":
            p.mul_(weights[i])
        # the denominator: w_i where agreeing, as (0 or 1) * w_i computes it (the weight
        # rounded to the dtype; a bool operand of add_ is 0 or 1 in the dtype)
        if weighted and den is None:
            den = torch.where(agree, parts[0].new_full((), weights[i]), zero, out=pool.take(size, dtype))
        elif weighted:
            den.add_(agree, alpha=weights[i])
        torch.where(agree, p, zero, out=p)
        if out is None:
            out = p
        else:
            out.add_(p)
            pool.give(p)
    for buf in (positive, agree, below):
        pool.give(buf)
    if spec.consensus == "sce":
        out.div_(den.clamp_(min=1e-6))
    elif spec.normalize:
        zero = torch.eq(den, 0, out=pool.take(size, torch.bool))
        den.masked_fill_(zero, 1.0)
        pool.give(zero)
        out.div_(den)
    if den is not None:
        pool.give(den)
    return out


class _Fresh:
    """A stand-in for the chunk pool outside the executor: fresh tensors on `device`,
    nothing kept."""

    def __init__(self, device: torch.device):
        self.device = device

    def take(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(n, dtype=dtype, device=self.device)

    def give(self, t: torch.Tensor) -> None:
        pass


__all__ = ["Combine", "Sparsify", "della_probability", "draws", "keep_threshold", "kernel_array", "population_var",
           "rng_key", "top_mask", "tv_combine"]
