"""Compiled loops (numba) for the two passes of TIES on the CPU, where a chain of numpy or
torch calls would read and write the chunk once per operation.

Each kernel is the same float32 arithmetic, operation for operation and in the same
order, as the torch code it stands for (`ops.sparse.tv_combine`'s general path,
`methods.select`'s keys and window count), so that its results are bit for bit theirs
(tests/test_ties_fast.py). numba compiles without fast-math: no reassociation and no
contraction into fused multiply-adds, every float32 operation rounded as IEEE says; the
one fused multiply-add is explicit (`_fma`), where torch's own add fuses
(`fma_like_torch`).

The work is done in blocks of BLOCK elements: within a block, one simple loop per model
and per step, each with its parameters fixed (loops LLVM vectorises), over temporaries
that stay in the processor's cache; across blocks nothing is held. Kernels let go of the
GIL, so `ops.sparse.split_map` runs them on the run's threads. They are compiled on first
use and cached on disk beside this module (numba's `cache=True`; a user-wide cache where
that is not writable): about 3 s once per installation. Where numba finds neither (a
read-only installation, no writable home, no NUMBA_CACHE_DIR), they are compiled in
each process instead, with one warning saying so (`_kernel`).

This module imports numba; import it only where a kernel runs.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload


def _kernel(fn):
    """`fn` compiled (numba, the GIL let go), cached on disk where numba finds a writable
    place; else uncached, and a warning, once per process, on stderr (numba's own error
    was a traceback at import)."""
    try:
        return njit(nogil=True, cache=True)(fn)
    except RuntimeError as e:
        if "no locator available" not in str(e):
            raise
    if not _UNCACHED:
        import sys

        from ..errors import Diagnostic

        print(Diagnostic("numba finds no writable directory for its cache, so TIES's compiled kernels are "
                         "compiled again in every process (about 3 s); set NUMBA_CACHE_DIR to a writable "
                         "directory").format(), file=sys.stderr)
    _UNCACHED.append(fn.__name__)
    return njit(nogil=True)(fn)


_UNCACHED: list[str] = []  # kernels compiled without a disk cache (see `_kernel`)

BLOCK = 4096  # elements per block: the temporaries of 4 models fit a 128 KiB L2 share

NONE, ALL, TOP = 0, 1, 2  # a model's keep rule in `ties_merge` (see `keep_mode`)


def keep_mode(t: float, cut: float) -> int:
    """The keep rule of a top-k (t, J) (see `ops.sparse`): NONE (J < 0), ALL (t < 0), or
    TOP: |d| > t, or |d| == t below index J."""
    return NONE if cut < 0 else ALL if t < 0 else TOP


def _f32(x):
    """An element as float32: a float32 as it is, a uint16 as the bfloat16 of those bits."""


def _bad(x):
    """1 where an element of a stored bfloat16 (uint16 bits) is inf or nan, else 0; 0 for a
    float32 (evaluated, hence checked already)."""


@overload(_f32, inline="always")
def _f32_impl(x):
    if isinstance(x, types.Float):
        return lambda x: x
    if isinstance(x, types.Integer) and x.bitwidth == 16:
        return lambda x: np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
    return None


@overload(_bad, inline="always")
def _bad_impl(x):
    if isinstance(x, types.Float):
        return lambda x: 0
    if isinstance(x, types.Integer) and x.bitwidth == 16:
        return lambda x: (x & 0x7F80) == 0x7F80
    return None


@njit(inline="always")
def _key(x, b):
    """The key of |x - b|: its float32 bits as int32 (they order as the magnitudes do)."""
    return np.float32(abs(_f32(x) - _f32(b))).view(np.int32)


@njit(inline="always")
def _kept_into(m, base, mode, t, j, w, p):  # m, base: float32, or bfloat16 bits (see _f32)
    """p[:m.size] = w * (d kept ? d : 0) for d = m - base (one block); `j`: the position
    in the block below which |d| == t is kept."""
    zero = np.float32(0.0)
    nb = m.size
    if mode == 0:
        for i in range(nb):
            p[i] = zero * w
        return
    if mode == 1:
        for i in range(nb):
            p[i] = (_f32(m[i]) - _f32(base[i])) * w
        return
    j = min(max(j, 0), nb)
    for i in range(j):
        d = _f32(m[i]) - _f32(base[i])
        p[i] = (d if abs(d) >= t else zero) * w
    for i in range(j, nb):
        d = _f32(m[i]) - _f32(base[i])
        p[i] = (d if abs(d) > t else zero) * w


@_kernel
def ties_merge(base, ms, w, mode, t, j, normalize, scale, out):
    """base + scale * the TIES-merged task vector of models `ms` (a tuple of arrays of one
    type) over `base`, into `out` (float32): per model i, p_i = w_i * (d_i if kept else 0),
    d_i = m_i - base; the sign elected by p_0 + p_1 + ... >= 0; merged = the sum of the
    agreeing p_i (p_i != 0 of the elected sign), divided, if `normalize`, by the sum of
    their weights (1 where none agrees); then one fused multiply-add, as torch's
    add(base, merged, alpha=scale) computes it (`fma_like_torch`). Per model: w
    (float32), mode (`keep_mode`), t (float32) and j (the tie cut J minus the chunk's first
    index). Inputs are float32 or bfloat16 bits (`_f32`)."""
    n = len(ms)
    size = base.size
    zero, one = np.float32(0.0), np.float32(1.0)
    p = np.empty((n, BLOCK), np.float32)
    tot = np.empty(BLOCK, np.float32)
    den = np.empty(BLOCK, np.float32)
    o = np.empty(BLOCK, np.float32)
    for a in range(0, size, BLOCK):
        b = min(size, a + BLOCK)
        nb = b - a
        bb = base[a:b]
        for i in range(n):
            _kept_into(ms[i][a:b], bb, mode[i], t[i], j[i] - a, w[i], p[i])
        p0 = p[0]
        for e in range(nb):
            tot[e] = p0[e]
        for i in range(1, n):
            pi = p[i]
            for e in range(nb):
                tot[e] = tot[e] + pi[e]
        for i in range(n):
            pi, wi = p[i], w[i]
            if i == 0:
                for e in range(nb):
                    q = pi[e]
                    agree = (q > zero) if tot[e] >= zero else (q < zero)
                    o[e] = q if agree else zero
                    den[e] = wi if agree else zero
            else:
                for e in range(nb):
                    q = pi[e]
                    agree = (q > zero) if tot[e] >= zero else (q < zero)
                    o[e] = o[e] + (q if agree else zero)
                    den[e] = den[e] + (one if agree else zero) * wi
        if normalize:
            for e in range(nb):
                d = den[e]
                o[e] = o[e] / (one if d == zero else d)
        ob = out[a:b]
        for e in range(nb):
            ob[e] = _fma(o[e], scale, _f32(bb[e]))


@intrinsic
def _fma(typingctx, x, y, z):
    """x * y + z rounded once (LLVM's fma: the processor's instruction where it has one)."""
    if not all(isinstance(v, types.Float) and v.bitwidth == 32 for v in (x, y, z)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@_kernel
def _fma_into(x, y, z, out):
    for i in range(x.size):
        out[i] = _fma(x[i], y, z[i])


@functools.cache
def fma_like_torch() -> bool:
    """Whether torch's add(z, x, alpha=y) on the CPU rounds x * y + z once, as a fused
    multiply-add (its vectorised kernels do, and its scalar ones where the compiler
    contracts them): probed once on 2^16 + 3 elements, misaligned, so that `ties_merge`
    gives torch's bits or is not used (ops.sparse._ties_fast)."""
    import torch

    g = np.random.default_rng(0)
    z, x = g.standard_normal(65540).astype(np.float32), (g.standard_normal(65540) * 1e-3).astype(np.float32)
    want = torch.add(torch.from_numpy(z[1:]), torch.from_numpy(x[1:]), alpha=0.37).numpy()
    got = np.empty_like(want)
    _fma_into(x[1:], np.float32(0.37), z[1:], got)
    return bool(np.array_equal(got.view(np.int32), want.view(np.int32)))


@njit(inline="always")
def _keys_into(m, base, lo, hi, keys, inside):
    """One block: keys[e] = the key of |m - base|, inside[e] = whether it lies in [lo, hi];
    (how many keys are above hi, how many elements of m and base are not finite)."""
    above = 0
    bad = 0
    for e in range(m.size):
        k = _key(m[e], base[e])
        keys[e] = k
        above += k > hi
        inside[e] = (k >= lo) & (k <= hi)
        bad += _bad(m[e]) + _bad(base[e])
    return above, bad


@_kernel
def window_count(m, base, lo, hi, found):
    """For the keys of |m - base| (`_key`): how many are above `hi`, how many lie in
    [lo, hi] (written in index order to the front of `found`, at least as long as m),
    and how many elements of m and base are not finite. m and base are float32, or
    stored bfloat16 as uint16 (converted here, as torch converts them: the bits shifted
    up); only those are checked.

    In blocks: one loop computes the keys and marks the ones inside (a loop LLVM
    vectorises), then the marks are read eight at a time as one 64-bit word, and only
    the eights holding a key inside are compacted (one key in tens lies inside)."""
    keys = np.empty(BLOCK, np.int32)
    inside = np.zeros(BLOCK, np.uint8)
    eights = inside.view(np.uint64)
    above = 0
    c = 0
    bad = 0
    for a in range(0, m.size, BLOCK):
        b = min(m.size, a + BLOCK)
        nb = b - a
        n_above, n_bad = _keys_into(m[a:b], base[a:b], lo, hi, keys, inside)
        above += n_above
        bad += n_bad
        inside[nb:] = 0
        for g in range((nb + 7) >> 3):
            if eights[g]:
                for e in range(8 * g, min(8 * g + 8, nb)):
                    found[c] = keys[e]  # kept only if inside: no branch
                    c += inside[e]
    return above, c, bad


@_kernel
def sample_keys(m, base, starts, size, out):
    """The keys of |m - base| (as `window_count` computes them) over the blocks
    [starts[j], starts[j] + size) of whole tensors m and base, into out (int32), block
    after block. Nothing is checked: the window pass that follows checks every element."""
    for j in range(starts.size):
        a = starts[j]
        for t in range(size):
            out[j * size + t] = _key(m[a + t], base[a + t])


@_kernel
def nth_key(m, base, key, n):
    """The index of the n-th (from 1) element whose key of |m - base| equals `key`, or -1
    where fewer do: the scan stops there."""
    for i in range(m.size):
        if _key(m[i], base[i]) == key:
            n -= 1
            if n == 0:
                return i
    return -1


__all__ = ["BLOCK", "fma_like_torch", "keep_mode", "nth_key", "sample_keys", "ties_merge", "window_count"]
