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
that is not writable): about 3 s once per installation.

This module imports numba; import it only where a kernel runs.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

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


@njit(nogil=True, cache=True)
def _kept_into(m, base, a, b, mode, t, j, w, p):  # m, base: float32, or bfloat16 bits (see _f32)
    """p[:b - a] = w * (d kept ? d : 0) for d = m - base over [a, b); `j`: chunk position
    below which |d| == t is kept."""
    zero = np.float32(0.0)
    if mode == 0:
        for i in range(a, b):
            p[i - a] = zero * w
        return
    if mode == 1:
        for i in range(a, b):
            p[i - a] = (_f32(m[i]) - _f32(base[i])) * w
        return
    j = min(max(j, a), b)
    for i in range(a, j):
        d = _f32(m[i]) - _f32(base[i])
        p[i - a] = (d if abs(d) >= t else zero) * w
    for i in range(j, b):
        d = _f32(m[i]) - _f32(base[i])
        p[i - a] = (d if abs(d) > t else zero) * w


@njit(nogil=True, cache=True)
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
        for i in range(n):
            _kept_into(ms[i], base, a, b, mode[i], t[i], j[i], w[i], p[i])
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
        for e in range(nb):
            out[a + e] = _fma(o[e], scale, _f32(base[a + e]))


@intrinsic
def _fma(typingctx, x, y, z):
    """x * y + z rounded once (LLVM's fma: the processor's instruction where it has one)."""
    if not all(isinstance(v, types.Float) and v.bitwidth == 32 for v in (x, y, z)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(nogil=True, cache=True)
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


@njit(nogil=True, cache=True)
def window_count(m, base, lo, hi, found):
    """For the keys of |m - base| (float32 bits as int32: they order as the magnitudes
    do): how many are above `hi`, how many lie in [lo, hi] (written in index order to the
    front of `found`, at least as long as m), and how many elements of m and base are not
    finite. m and base are float32, or stored bfloat16 as uint16 (converted here, as
    torch converts them: the bits shifted up); only those are checked."""
    above = 0
    c = 0
    bad = 0
    for i in range(m.size):
        x, b = m[i], base[i]
        key = np.float32(abs(_f32(x) - _f32(b))).view(np.int32)
        above += key > hi
        found[c] = key  # kept only if inside: no branch
        c += (key >= lo) & (key <= hi)
        bad += _bad(x) + _bad(b)
    return above, c, bad


__all__ = ["BLOCK", "fma_like_torch", "keep_mode", "ties_merge", "window_count"]
