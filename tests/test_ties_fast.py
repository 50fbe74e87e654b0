"""TIES's compiled write pass (ops.sparse._ties_compiled, ops.kernels.ties_merge): bit
for bit the general tv_combine path, on any number of threads, and the TIES formula
against a float64 reference; the window pass's kernels against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from algebra.ops import sparse as S


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _general(*args, **kw):
    """tv_combine by its general (torch) path."""
    fast = S._ties_fast
    S._ties_fast = lambda *a: False
    try:
        return S.tv_combine(*args, **kw)
    finally:
        S._ties_fast = fast


def _case(g: torch.Generator, n: int, size: int, e0: int, kinds: tuple[str, ...]):
    """Chunk inputs rounded through bf16 (ties at thresholds are common), with bases of
    -0.0, zero task-vector entries, and (t, J) of each model: cut inside the chunk, keep
    all, or keep none."""
    base = (torch.randn(size, generator=g) * 0.1).to(torch.bfloat16).float()
    base[::7] = -0.0
    ms, vals = [], []
    for kind in kinds[:n]:
        m = (base + torch.randn(size, generator=g) * 0.01).to(torch.bfloat16).float()
        m[::5] = base[::5]
        ms.append(m)
        mag = (m - base).abs()
        if kind == "all":
            vals += [-1.0, 0.0]
        elif kind == "none":
            vals += [0.0, -1.0]
        else:
            t = float(mag[int(torch.randint(0, size, (1,), generator=g))])
            vals += [t, float(e0 + int(torch.randint(0, size + 1, (1,), generator=g)))]
    return base, ms, vals


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kinds", [("cut", "cut", "cut"), ("all", "cut", "none"), ("none", "none", "cut")])
def test_compiled_pass_equals_general_path_bit_for_bit(threads, normalize, kinds, monkeypatch, restore_threads):
    monkeypatch.setattr(S, "SPLIT_MIN", 64)  # small chunks split between threads too
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(threads * 7 + normalize)
    taken = []
    compiled = S._ties_compiled
    monkeypatch.setattr(S, "_ties_compiled", lambda *a, **k: taken.append(1) or compiled(*a, **k))
    for n in (1, 2, 3):
        for weights in ([1.0, 0.6, 0.3], [0.7, -0.4, 1.3]):
            size, e0 = int(torch.randint(200, 5000, (1,), generator=g)), int(torch.randint(0, 10**6, (1,), generator=g))
            base, ms, vals = _case(g, n, size, e0, kinds)
            spec = S.Combine(n, (S.Sparsify("top"),) * n, "sum", normalize, 1, with_base=True)
            args = (base, *ms, spec, 0.8, *weights[:n], *vals)
            fast, general = S.tv_combine(*args, e0=e0), _general(*args, e0=e0)
            assert torch.equal(fast.view(torch.int32), general.view(torch.int32)), (n, weights)
    assert len(taken) == 6


def _reference(base, ms, vals, weights, scale, normalize, e0):
    """TIES in float64 from the float32 task vectors: top-k by |d| with ties at t kept
    lowest index first, sign election on the weighted kept entries, the sum of the
    agreeing ones over the sum of their weights."""
    b = base.double().numpy()
    ps = []
    for i, m in enumerate(ms):
        d = (m - base).numpy()  # the task vector as the merge forms it (float32)
        t, cut = vals[2 * i], vals[2 * i + 1]
        idx = np.arange(e0, e0 + d.size)
        keep = (np.abs(d) > t) | ((np.abs(d) == t) & (idx < cut)) if cut >= 0 else np.zeros(d.size, bool)
        ps.append(np.where(keep, d.astype(np.float64) * weights[i], 0.0))
    p = np.stack(ps)
    sign = np.where(p.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(p) == sign) & (p != 0)
    merged = np.where(agree, p, 0.0).sum(0)
    if normalize:
        den = (agree * np.array(weights)[:, None]).sum(0)
        merged = merged / np.where(den == 0, 1.0, den)
    # elements whose sign election is a near tie (the float32 sum may round the other way)
    close = (np.abs(p.sum(0)) <= 1e-6 * np.abs(p).sum(0)) & (np.abs(p).sum(0) > 0)
    return b + scale * merged, close


@pytest.mark.parametrize("normalize", [True, False])
def test_compiled_pass_matches_float64_reference(normalize):
    g = torch.Generator().manual_seed(5)
    e0 = 1000
    base, ms, vals = _case(g, 3, 50_000, e0, ("cut", "cut", "all"))
    weights = [1.0, 0.6, 0.3]
    spec = S.Combine(3, (S.Sparsify("top"),) * 3, "sum", normalize, 1, with_base=True)
    out = S.tv_combine(base, *ms, spec, 0.8, *weights, *vals, e0=e0).double().numpy()
    ref, close = _reference(base, ms, vals, weights, 0.8, normalize, e0)
    assert close.sum() < 100
    assert np.abs(out - ref)[~close].max() <= 1e-6 * np.abs(ref).max()
    assert (out != base.double().numpy()).sum() > 1000  # the merge changed something


def test_non_finite_masked_entry_equals_general_path(monkeypatch):
    """A task vector entry that overflows outside the kept top-k (multiplying it by a
    zero mask would give nan where selecting gives 0), and one that overflows inside it:
    the compiled pass selects as the general path does."""
    base = torch.zeros(1000)
    m1 = torch.linspace(-1, 1, 1000)
    m2 = -m1 * 2
    base[3], m2[3] = -3e38, 3e38  # m2 - base = inf, and m2 keeps none
    base[5], m1[5] = -3e38, 3e38  # m1 - base = inf, kept by m1's top-k
    vals = [0.5, 1000.0, float("inf"), 0.0]
    spec = S.Combine(2, (S.Sparsify("top"),) * 2, "sum", True, 1, with_base=True)
    taken = []
    compiled = S._ties_compiled
    monkeypatch.setattr(S, "_ties_compiled", lambda *a, **k: taken.append(1) or compiled(*a, **k))
    fast = S.tv_combine(base, m1, m2, spec, 1.0, 1.0, 1.0, *vals)
    general = _general(base, m1, m2, spec, 1.0, 1.0, 1.0, *vals)
    assert taken == [1]
    assert torch.equal(fast.view(torch.int32), general.view(torch.int32))
    assert fast[5] == float("inf") and fast[3] == 0  # m1's overflow kept, m2's masked


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stored", ["all", "base", "models", "one model"])
def test_inputs_handed_as_stored_bfloat16_give_the_same_bits(threads, stored, monkeypatch, restore_threads):
    """Inputs handed as stored (bfloat16, `Primitive.stored`) are converted as the kernel
    reads them: the same bits as float32 inputs, on the compiled and the general path
    (DARE takes the general path)."""
    monkeypatch.setattr(S, "SPLIT_MIN", 64)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(11)
    size, e0 = 3000, 123
    base, ms, vals = _case(g, 3, size, e0, ("cut", "all", "cut"))  # values exact in bf16
    as_bf16 = {"all": (0, 1, 2, 3), "base": (0,), "models": (1, 2, 3), "one model": (2,)}[stored]
    tensors = [x.to(torch.bfloat16) if i in as_bf16 else x for i, x in enumerate([base, *ms])]
    for spec, scalars in ((S.Combine(3, (S.Sparsify("top"),) * 3, "sum", True, 1, with_base=True), vals),
                          (S.Combine(3, (S.Sparsify("dare", 0.5, key=(1, 2)),) * 3, "sum", True, 1,
                                     with_base=True), [])):
        args = (spec, 0.8, 1.0, 0.6, -0.3, *scalars)
        want = _general(base, *ms, *args, e0=e0)
        got = S.tv_combine(*tensors, *args, e0=e0, dtype=torch.float32)
        assert got.dtype == torch.float32
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), spec


def test_compiled_pass_only_where_its_last_add_rounds_as_torchs(monkeypatch):
    """The kernel ends with one fused multiply-add, base + scale * merged rounded once, as
    torch's add(alpha=) does here (probed: `kernels.fma_like_torch`); rounding twice would
    differ in some elements. Where the probe fails the general path computes it."""
    from algebra.ops import kernels

    g = np.random.default_rng(3)
    z, x = g.standard_normal(4096).astype(np.float32), (g.standard_normal(4096) * 1e-3).astype(np.float32)
    fused = np.empty_like(z)
    kernels._fma_into(x, np.float32(0.37), z, fused)
    assert (fused != z + np.float32(0.37) * x).any()  # the fusion is real: single rounding differs somewhere
    assert kernels.fma_like_torch()  # and torch's CPU add rounds that way on this machine
    base, ms, vals = _case(torch.Generator().manual_seed(4), 2, 3000, 0, ("cut", "cut"))
    spec = S.Combine(2, (S.Sparsify("top"),) * 2, "sum", True, 1, with_base=True)
    args = (base, *ms, spec, 0.8, 1.0, 0.6, *vals)
    taken = []
    compiled = S._ties_compiled
    monkeypatch.setattr(S, "_ties_compiled", lambda *a, **k: taken.append(1) or compiled(*a, **k))
    monkeypatch.setattr(kernels, "fma_like_torch", lambda: False)
    assert torch.equal(S.tv_combine(*args), _general(*args)) and not taken


def _stored_pair(g: torch.Generator, size: int, bf16: bool):
    """A base and a model, bf16-rounded (many equal keys), as the kernels take them:
    bfloat16 as its uint16 bits, or float32; their keys |m - base| computed by torch."""
    base = (torch.randn(size, generator=g) * 0.1).to(torch.bfloat16)
    m = (base.float() + torch.randn(size, generator=g) * 0.01).to(torch.bfloat16)
    keys = (m.float() - base.float()).abs().view(torch.int32).numpy()
    if bf16:
        return m.view(torch.uint16).numpy(), base.view(torch.uint16).numpy(), keys
    return m.float().numpy(), base.float().numpy(), keys


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("size", [1, 7, 9, 4095, 4096, 4097, 10003])
def test_window_kernels_equal_numpy(size, bf16):
    """ops.kernels' window pass (count above, keys inside in index order, non-finite
    count), sample and tie scan against numpy on the keys torch computes, at block and
    eight-element edges, with windows holding none, some and all of the keys."""
    from algebra.ops import kernels

    g = torch.Generator().manual_seed(size + bf16)
    m, base, keys = _stored_pair(g, size, bf16)
    s = np.sort(keys)
    for lo, hi in ((0, np.iinfo(np.int32).max), (int(s[size // 3]), int(s[(2 * size) // 3])), (-2, -1),
                   (int(s[-1]), int(s[-1]))):
        found = np.full(size, -7, np.int32)
        above, c, bad = kernels.window_count(m, base, lo, hi, found)
        inside = keys[(keys >= lo) & (keys <= hi)]
        assert (above, c, bad) == (int((keys > hi).sum()), inside.size, 0)
        assert np.array_equal(found[:c], inside)
    starts = np.array(sorted({0, size // 2, max(0, size - 3)}), np.int64)
    out = np.empty(starts.size * min(3, size), np.int32)
    kernels.sample_keys(m, base, starts, min(3, size), out)
    assert np.array_equal(out, np.concatenate([keys[a:a + min(3, size)] for a in starts]))
    t = int(s[size // 2])
    at = np.flatnonzero(keys == t)
    for n in (1, at.size):
        assert kernels.nth_key(m, base, t, n) == at[n - 1]
    assert kernels.nth_key(m, base, t, at.size + 1) == -1


def test_window_kernel_counts_nonfinite_bf16():
    from algebra.ops import kernels

    m, base, _ = _stored_pair(torch.Generator().manual_seed(1), 100, True)
    m[[3, 50]] = torch.tensor([float("inf"), float("nan")], dtype=torch.bfloat16).view(torch.uint16).numpy()
    base[99] = torch.tensor([float("-inf")], dtype=torch.bfloat16).view(torch.uint16).numpy()[0]
    assert kernels.window_count(m, base, 0, 1, np.empty(100, np.int32))[2] == 3


def test_kernels_compile_uncached_where_numba_has_no_cache_directory():
    """Where numba finds no writable place for its cache (a read-only installation with no
    writable home), importing the kernels raised numba's RuntimeError: they now compile
    uncached, and one warning says so and how to give them a cache."""
    import subprocess
    import sys

    probe = """
import numba.core.caching as caching
caching.CacheImpl._locator_classes = []  # as numba finds it: no locator can write
import numpy as np
from algebra.ops import kernels
m = np.arange(100, dtype=np.float32)
print(kernels.window_count(m, np.zeros(100, np.float32), 0, 2**31 - 1, np.empty(100, np.int32))[:2],
      len(kernels._UNCACHED))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["(0,", "100)", "5"]
    assert r.stderr.count("alg: warning: numba finds no writable directory for its cache") == 1, r.stderr
    assert "NUMBA_CACHE_DIR" in r.stderr and "Traceback" not in r.stderr
