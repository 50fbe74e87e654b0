"""model_stock, nuslerp, multislerp, karcher and nearswap against independent float64
references.

The references below are written from the methods' formulas (the issue's, and mergekit's
algorithms where the issue names no formula) in plain torch float64 on whole tensors:
vectors, norms and angles directly, never the engine's coefficient-space solves. They
include the degenerate-case rules alg documents (zero vectors, (anti)parallel vectors,
cancelling directions), which are exercised on purpose: in the tiny family the layer-norm
weights are not perturbed, so every fine-tune's task vector is zero there.

Tolerances: float64 compute is compared at ~1e-10 relative (the Gram matrices are summed
in a different order); float32 compute as in test_numeric (rtol 1e-5 plus 1e-6 of the
tensor's largest magnitude), since coefficients are solved in float64 either way and only
the final linear pass runs in float32.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from algebra import AlgError, Interpreter, Options
from algebra.check import Checker
from algebra.errors import AlgShapeError, AlgTypeError
from algebra.ops.geometric import grid_pieces
from algebra.parser import parse
from algebra.plan import format_plan, plan_save

GOLDEN = Path(__file__).parent / "golden" / "plans"

# ---- float64 references ----------------------------------------------------------------------


def _norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x.norm(dim=dim)


def ref_model_stock(base, ms, filter_wise=False):
    """t = N c / (1 + (N-1) c), c the mean pairwise cosine of the task vectors (0 with a
    zero vector; t = 0 where 1 + (N-1)c vanishes); t*mean(ms) + (1-t)*base. Per row
    (last dimension) with filter_wise, else per tensor."""
    out = {}
    n = len(ms)
    for name, b in base.items():
        width = b.shape[-1] if (filter_wise and b.dim() > 1) else b.numel()
        rows = [(m[name] - b).reshape(-1, width) for m in ms]
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                ni, nj = _norm(rows[i]), _norm(rows[j])
                dot = (rows[i] * rows[j]).sum(-1)
                ok = (ni > 0) & (nj > 0)
                cos.append(torch.where(ok, dot / torch.where(ok, ni * nj, 1.0), 0.0).clamp(-1, 1))
        c = torch.stack(cos).mean(0)
        denom = 1 + (n - 1) * c
        t = torch.where(denom > 1e-12, n * c / torch.where(denom > 1e-12, denom, 1.0), 0.0)[:, None]
        mean = (sum(m[name] for m in ms) / n).reshape(-1, width)
        out[name] = (t * mean + (1 - t) * b.reshape(-1, width)).reshape(b.shape)
    return out


def _slerp_vectors(v0, v1, t):
    """Rows of v0, v1 (shape (k, d)) slerped: linear where a row is zero or |sin W| < 1e-8."""
    n0, n1 = _norm(v0), _norm(v1)
    zero = (n0 == 0) | (n1 == 0)
    cos = torch.where(zero, 0.0, (v0 * v1).sum(-1) / torch.where(zero, 1.0, n0 * n1)).clamp(-1, 1)
    w = torch.arccos(cos)
    s = torch.sin(w)
    lin = (zero | (s.abs() < 1e-8))[:, None]
    safe = torch.where(lin[:, 0], 1.0, s)[:, None]
    sl = (torch.sin((1 - t) * w)[:, None] * v0 + torch.sin(t * w)[:, None] * v1) / safe
    return torch.where(lin, (1 - t) * v0 + t * v1, sl)


def ref_nuslerp(a, b, t, base=None, flatten=True, row_wise=False):
    """mergekit's nuslerp: flatten -> one vector per tensor; else vectors along the last
    dimension, or (row_wise) along the first (the tensor transposed first <-> last)."""
    out = {}
    for name, x in a.items():
        v0, v1 = x, b[name]
        if base is not None:
            v0, v1 = v0 - base[name], v1 - base[name]
        if flatten or x.dim() <= 1:
            res = _slerp_vectors(v0.reshape(1, -1), v1.reshape(1, -1), t).reshape(x.shape)
        elif not row_wise:
            res = _slerp_vectors(v0.reshape(-1, x.shape[-1]), v1.reshape(-1, x.shape[-1]), t).reshape(x.shape)
        else:
            tr0, tr1 = v0.transpose(0, -1), v1.transpose(0, -1)
            shape = tr0.shape
            res = _slerp_vectors(tr0.reshape(-1, shape[-1]), tr1.reshape(-1, shape[-1]), t)
            res = res.reshape(shape).transpose(0, -1)
        out[name] = res + (base[name] if base is not None else 0)
    return out


def _stack(ms, name, base):
    return torch.stack([(m[name] - (base[name] if base is not None else 0)).reshape(-1) for m in ms])


def ref_multislerp(ms, weights, base=None, normalize=True):
    """mergekit's multislerp on flattened vectors: units u_i (0 for a zero vector),
    m = normalise(sum w_i u_i), tangent T = sum w_i (u_i - <u_i,m> m), result
    (cos|T| m + sin|T|/|T| T) * sum w_i |v_i|; linear sum w_i v_i if |sum w_i u_i| < 1e-6."""
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    out = {}
    for name in ms[0]:
        v = _stack(ms, name, base)
        norms = _norm(v)
        units = torch.where(norms[:, None] > 0, v / torch.where(norms > 0, norms, 1.0)[:, None], 0.0)
        mean = (w[:, None] * units).sum(0)
        mn = mean.norm()
        if mn < 1e-6:
            res = (w[:, None] * v).sum(0)
        else:
            mean = mean / mn
            dots = units @ mean
            tangent = (w[:, None] * (units - dots[:, None] * mean)).sum(0)
            tn = tangent.norm() + 1e-8
            res = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms * w).sum()
        shape = ms[0][name].shape
        out[name] = res.reshape(shape) + (base[name] if base is not None else 0)
    return out


def ref_karcher(ms, weights=None, base=None, max_iter=10, tol=1e-5):
    """mergekit's Karcher mean on flattened vectors (weights normalised; zero vectors
    take no part in the direction; log-map terms within tol of the mean or its antipode
    skipped), rescaled by sum w_i |v_i|."""
    n = len(ms)
    w = torch.tensor(weights if weights is not None else [1.0] * n, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for name in ms[0]:
        v = _stack(ms, name, base)
        shape = ms[0][name].shape
        add = base[name] if base is not None else 0
        norms = _norm(v)
        valid = [i for i in range(n) if norms[i] > 0]
        if not valid or float(w[valid].sum()) <= 0:
            out[name] = torch.zeros(shape, dtype=torch.float64) + add
            continue
        alpha = w[valid] / w[valid].sum()
        units = v[valid] / norms[valid][:, None]
        mean = (alpha[:, None] * units).sum(0)
        mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
        for _ in range(max_iter):
            tangent = torch.zeros_like(mean)
            for a, u in zip(alpha, units, strict=True):
                dot = torch.clamp(mean @ u, -1.0, 1.0)
                theta = torch.arccos(dot)
                if theta < tol or theta > math.pi - tol:
                    continue
                tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
            tn = tangent.norm()
            if tn < tol:
                break
            mean = torch.cos(tn) * mean + torch.sin(tn) * tangent / tn
            if mean.norm() > tol:
                mean = mean / mean.norm()
        out[name] = (mean * (w * norms).sum()).reshape(shape) + add
    return out


def ref_nearswap(base, m, t):
    out = {}
    for name, b in base.items():
        w = torch.nan_to_num(t / (b - m[name]).abs(), nan=1.0, posinf=1.0, neginf=1.0).clamp(0, 1)
        out[name] = w * m[name] + (1 - w) * b
    return out


# ---- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fam(family):
    """The family as float64 state dicts (float tensors only)."""
    return {k: {n: v.double() for n, v in read_folder(p).items() if v.is_floating_point()}
            for k, p in family.items() if k != "rm"}


@pytest.fixture(scope="module")
def correlated(fam):
    """Fine-tunes that share a component, so their cosines are far from 0 (the family's
    independent task vectors are nearly orthogonal): m_i = base + s + e_i, float32."""
    g = torch.Generator().manual_seed(5)
    base = fam["base"]
    shared = {n: torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.02 for n, x in base.items()}
    ms = []
    for i in range(3):
        ms.append({n: (x + shared[n] * (1 + i) / 2 + 0.01 * torch.randn(x.shape, generator=g, dtype=torch.float64))
                   for n, x in base.items()})
    to32 = lambda d: {n: x.float() for n, x in d.items()}  # noqa: E731
    return to32(base), [to32(m) for m in ms]


def _run(expr: str, compute: str = "float64", chunk: int = 1 << 20, **bindings):
    opts = Options(device="cpu", compute_dtype=compute, chunk_elems=chunk)
    res = Interpreter(options=opts).eval(expr, **bindings)
    return res.state_dict(dtype="float64" if compute == "float64" else None)


def _load(family, *names):
    return [f'load("{family[n]}")' for n in names]


def close64(actual, ref, rtol=1e-10):
    assert set(ref) <= set(actual)
    for n, r in ref.items():
        a = actual[n].double()
        scale = r.abs().max().item() if r.numel() else 0.0
        torch.testing.assert_close(a, r, rtol=rtol, atol=rtol * scale, msg=lambda m, n=n: f"{n}: {m}")


def close32(actual, ref):
    close64(actual, ref, rtol=1e-5)


def _f64(d):
    return {n: x.double() for n, x in d.items()}


# ---- each method on the family --------------------------------------------------------------


@pytest.mark.parametrize("compute", ["float64", "float32"])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_family(family, fam, compute, filter_wise):
    b, m1, m2, m3 = _load(family, "base", "math", "rl1", "rl2")
    sd = _run(f"model_stock({b}, [{m1}, {m2}, {m3}], filter_wise={str(filter_wise).lower()})", compute)
    ref = ref_model_stock(fam["base"], [fam["math"], fam["rl1"], fam["rl2"]], filter_wise)
    (close64 if compute == "float64" else close32)(sd, ref)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_correlated(correlated, filter_wise):
    base, ms = correlated
    sd = _run(f"model_stock(base, [m0, m1, m2], filter_wise={str(filter_wise).lower()})", "float32",
              chunk=1000, base=base, m0=ms[0], m1=ms[1], m2=ms[2])
    ref = ref_model_stock(_f64(base), [_f64(m) for m in ms], filter_wise)
    close32(sd, ref)
    # the shared component makes t clearly positive: the result is not the base
    name = "model.layers.0.mlp.up_proj.weight"
    assert (sd[name].double() - _f64(base)[name]).abs().max() > 1e-3


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("compute", ["float64", "float32"])
def test_nuslerp_family(family, fam, flatten, row_wise, with_base, compute):
    b, a, c = _load(family, "base", "math", "rl1")
    extra = (f", base={b}" if with_base else "") + ("" if flatten else ", flatten=false") + (
        ", row_wise=true" if row_wise else "")
    # chunks of 1000 elements end mid-row (rows of 64 and 128 elements)
    sd = _run(f"nuslerp({a}, {c}, 0.3{extra})", compute, chunk=1000)
    ref = ref_nuslerp(fam["math"], fam["rl1"], 0.3, fam["base"] if with_base else None, flatten, row_wise)
    (close64 if compute == "float64" else close32)(sd, ref)


def test_nuslerp_weight_pair_is_normalised(family, fam):
    a, c = _load(family, "math", "rl1")
    sd = _run(f"nuslerp({a}, {c}, [1, 3])")
    close64(sd, ref_nuslerp(fam["math"], fam["rl1"], 0.75))
    sd = _run(f"nuslerp({a}, {c}, [1, -1])")  # sum 0: t = 0.5, as mergekit
    close64(sd, ref_nuslerp(fam["math"], fam["rl1"], 0.5))


def test_nuslerp_three_dimensional_rows_and_columns():
    g = torch.Generator().manual_seed(1)
    a = {"w": torch.randn(3, 4, 5, generator=g, dtype=torch.float64)}
    b = {"w": torch.randn(3, 4, 5, generator=g, dtype=torch.float64)}
    for row_wise in (False, True):
        sd = _run(f"nuslerp(a, b, 0.4, flatten=false, row_wise={str(row_wise).lower()})", chunk=7, a=a, b=b)
        close64(sd, ref_nuslerp(a, b, 0.4, None, False, row_wise))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_family(family, fam, with_base, normalize):
    b, m1, m2, m3 = _load(family, "base", "math", "rl1", "rl2")
    w = [0.2, 0.5, 0.3] if normalize else [0.5, 1.0, 0.7]
    extra = (f", base={b}" if with_base else "") + ("" if normalize else ", normalize=false")
    sd = _run(f"multislerp([{m1}, {m2}, {m3}], {w}{extra})")
    ref = ref_multislerp([fam["math"], fam["rl1"], fam["rl2"]], w, fam["base"] if with_base else None, normalize)
    close64(sd, ref)


def test_multislerp_correlated_float32(correlated):
    base, ms = correlated
    sd = _run("multislerp([m0, m1, m2], [1, 2, 3], base=base)", "float32", base=base, m0=ms[0], m1=ms[1], m2=ms[2])
    close32(sd, ref_multislerp([_f64(m) for m in ms], [1, 2, 3], _f64(base)))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0]])
def test_karcher_family(family, fam, with_base, weights):
    b, m1, m2, m3 = _load(family, "base", "math", "rl1", "rl2")
    extra = (f", base={b}" if with_base else "") + (f", weights={weights}" if weights else "")
    sd = _run(f"karcher([{m1}, {m2}, {m3}]{extra})")
    ref = ref_karcher([fam["math"], fam["rl1"], fam["rl2"]], weights, fam["base"] if with_base else None)
    close64(sd, ref)


def test_karcher_correlated_float32_and_iterations(correlated):
    base, ms = correlated
    bind = dict(base=base, m0=ms[0], m1=ms[1], m2=ms[2])
    fs = [_f64(m) for m in ms]
    sd = _run("karcher([m0, m1, m2], [3, 1, 1], base=base, max_iter=25, tol=1e-9)", "float32", **bind)
    close32(sd, ref_karcher(fs, [3, 1, 1], _f64(base), max_iter=25, tol=1e-9))
    # each fixed-point step counts: 0, 1 and 2 steps give different, matching results
    refs = []
    for steps in (0, 1, 2):
        ref = ref_karcher(fs, [3, 1, 1], _f64(base), max_iter=steps, tol=1e-12)
        close64(_run(f"karcher([m0, m1, m2], [3, 1, 1], base=base, max_iter={steps}, tol=1e-12)", **bind), ref)
        refs.append(ref)
    name = "model.layers.1.mlp.down_proj.weight"
    for r0, r1 in zip(refs, refs[1:], strict=False):
        assert not torch.allclose(r0[name], r1[name], rtol=1e-8, atol=0)


@pytest.mark.parametrize("t", [1e-3, 0.02, 10.0])
@pytest.mark.parametrize("compute", ["float64", "float32"])
def test_nearswap_family(family, fam, t, compute):
    b, m = _load(family, "base", "math")
    sd = _run(f"nearswap({b}, {m}, {t})", compute)
    ref = ref_nearswap(fam["base"], fam["math"], t)
    if compute == "float64":
        close64(sd, ref)
    else:  # elementwise products and quotients: relative error only, plus cancellation in m - base
        close32(sd, ref)


def test_bf16_inputs(family_bf16):
    sd = _run("model_stock(b, [m, r])", "float32", b=family_bf16["base"], m=family_bf16["math"],
              r=family_bf16["rl1"])
    assert all(v.dtype == torch.bfloat16 for k, v in sd.items() if v.is_floating_point())
    f = {k: {n: v.double() for n, v in read_folder(family_bf16[k]).items() if v.is_floating_point()}
         for k in ("base", "math", "rl1")}
    ref = ref_model_stock(f["base"], [f["math"], f["rl1"]])
    for n, r in ref.items():  # one bf16 rounding of a float32-accurate value
        torch.testing.assert_close(sd[n].double(), r, rtol=2 ** -7, atol=2 ** -7 * r.abs().max().item())


def test_same_recipe_is_bit_identical(family):
    b, m1, m2 = _load(family, "base", "math", "rl1")
    expr = f"nuslerp({m1}, {m2}, 0.3, base={b}, flatten=false)"
    one, two = _run(expr, "float32", chunk=1000), _run(expr, "float32", chunk=1000)
    assert all(torch.equal(one[n], two[n]) for n in one)


# ---- properties -------------------------------------------------------------------------------

PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def tensors(draw, n=2):
    """n random float64 state dicts of one matrix and one vector, sometimes with a zero or
    parallel member."""
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append({"w": torch.randn(rows, cols, generator=g, dtype=torch.float64),
                    "v": torch.randn(cols, generator=g, dtype=torch.float64)})
    kind = draw(st.sampled_from(["random", "zero", "parallel", "antiparallel"]))
    if kind == "zero":
        out[0] = {k: torch.zeros_like(x) for k, x in out[0].items()}
    elif kind in ("parallel", "antiparallel") and n > 1:
        out[1] = {k: x * (2.5 if kind == "parallel" else -1.0) for k, x in out[0].items()}
    return out


MODES = [(True, False), (False, False), (False, True)]


@PROPS
@given(tensors(3), st.sampled_from(MODES), st.booleans())
def test_nuslerp_endpoints(ts, mode, with_base):
    a, b, base = ts
    flatten, row_wise = mode
    extra = (", base=base" if with_base else "") + ("" if flatten else ", flatten=false") + (
        ", row_wise=true" if row_wise else "")
    bind = dict(a=a, b=b, base=base) if with_base else dict(a=a, b=b)
    for t, want in ((0, a), (1, b)):
        close64(_run(f"nuslerp(a, b, {t}{extra})", chunk=5, **bind), want, rtol=1e-12)


@PROPS
@given(tensors(2), st.floats(0, 1))
def test_nuslerp_keeps_norm_of_equal_norm_vectors(ts, t):
    a, b = ({k: x / x.norm() if x.norm() > 0 else x for k, x in d.items()} for d in ts)
    sd = _run(f"nuslerp(a, b, {t})", a=a, b=b)
    for k in a:
        if a[k].norm() > 0 and b[k].norm() > 0:
            cos = float((a[k] * b[k]).sum())
            if 0 < 1 - abs(cos) < 1e-9:
                # near the (anti)parallel threshold the method switches to lerp, and the
                # spherical formula is ill-conditioned (errors ~ eps / sin W): which branch
                # a float64 rounding lands on decides, so there is no exact reference
                continue
            ref = ref_nuslerp(a, b, t)[k]
            close64({k: sd[k]}, {k: ref})
            if abs(cos) < 1 - 1e-9:  # spherical branch: on the unit sphere
                assert abs(float(sd[k].norm()) - 1.0) < 1e-9


@PROPS
@given(tensors(3), st.integers(0, 2), st.booleans())
def test_multislerp_one_hot_weights_give_that_model(ts, k, with_base):
    w = [0.0, 0.0, 0.0]
    w[k] = 1.0
    bind = dict(m0=ts[0], m1=ts[1], m2=ts[2])
    if with_base:
        bind["base"] = ts[(k + 1) % 3]
    sd = _run(f"multislerp([m0, m1, m2], {w}{', base=base' if with_base else ''})", **bind)
    close64(sd, ts[k], rtol=1e-12)


@PROPS
@given(tensors(1), st.integers(1, 4), st.lists(st.floats(0.1, 5), min_size=4, max_size=4))
def test_identical_models_give_that_model(ts, n, ws):
    (m,) = ts
    bind = {f"m{i}": m for i in range(n)}
    names = ", ".join(bind)
    w = ws[:n]
    close64(_run(f"multislerp([{names}], {w})", **bind), m, rtol=1e-12)
    close64(_run(f"karcher([{names}], {w})", **bind), m, rtol=1e-12)


@PROPS
@given(tensors(1))
def test_karcher_of_one_model_is_that_model(ts):
    (m,) = ts
    sd = _run("karcher([m])", m=m)
    assert all(torch.equal(sd[k], m[k]) for k in m)


@PROPS
@given(tensors(3), st.lists(st.floats(0.1, 5), min_size=3, max_size=3))
def test_spherical_means_have_the_weighted_mean_norm(ts, w):
    bind = dict(m0=ts[0], m1=ts[1], m2=ts[2])
    wn = np.array(w) / sum(w)
    for method in ("multislerp", "karcher"):
        sd = _run(f"{method}([m0, m1, m2], {w})", **bind)
        for k in ts[0]:
            units = torch.stack([t[k].reshape(-1) / t[k].norm() for t in ts if t[k].norm() > 0])
            if len(units) == 3 and float((units.sum(0) / 3).norm()) > 1e-3:
                want = sum(wi * float(t[k].norm()) for wi, t in zip(wn, ts, strict=True))
                assert abs(float(sd[k].norm()) - want) <= 1e-9 * max(want, 1.0)


@PROPS
@given(tensors(2), st.integers(2, 4), st.booleans())
def test_model_stock_of_identical_fine_tunes_is_the_fine_tune(ts, n, filter_wise):
    base, m = ts
    bind = {f"m{i}": m for i in range(n)}
    sd = _run(f"model_stock(base, [{', '.join(bind)}], filter_wise={str(filter_wise).lower()})", base=base, **bind)
    close64(sd, m, rtol=1e-12)


@PROPS
@given(tensors(2), st.floats(1e-3, 3))
def test_nearswap_moves_at_most_t(ts, t):
    base, m = ts
    sd = _run(f"nearswap(base, m, {t})", base=base, m=m)
    for k in base:
        moved = (sd[k] - base[k]).abs()
        want = torch.minimum((m[k] - base[k]).abs(), torch.tensor(t, dtype=torch.float64))
        torch.testing.assert_close(moved, want, rtol=1e-12, atol=1e-12)


@PROPS
@given(st.integers(0, 500), st.integers(1, 400), st.integers(1, 50))
def test_grid_pieces_tile_the_chunk(at, n, width):
    pieces = grid_pieces(at, n, width)
    assert len(pieces) <= 3
    pos = 0
    for lo, hi, r, c, k, w in pieces:
        assert lo == pos and hi - lo == k * w
        assert divmod(at + lo, width) == (r, c) and c + w <= width
        pos = hi
    assert pos == n


# ---- degenerate cases ---------------------------------------------------------------------------


def _pair():
    g = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(4, 6, generator=g, dtype=torch.float64)}
    return a, {"w": torch.randn(4, 6, generator=g, dtype=torch.float64)}


def test_nuslerp_degenerate_vectors_interpolate_linearly():
    a, b = _pair()
    zero = {"w": torch.zeros(4, 6, dtype=torch.float64)}
    neg = {"w": -a["w"]}
    double = {"w": 2 * a["w"]}
    for other in (zero, neg, double):
        sd = _run("nuslerp(a, b, 0.3)", a=a, b=other)
        torch.testing.assert_close(sd["w"], 0.7 * a["w"] + 0.3 * other["w"], rtol=1e-12, atol=1e-12)
    # one zero row among rows: that row alone is linear
    mixed = {"w": b["w"].clone()}
    mixed["w"][2] = 0
    sd = _run("nuslerp(a, b, 0.3, flatten=false)", a=a, b=mixed)
    torch.testing.assert_close(sd["w"][2], 0.7 * a["w"][2], rtol=1e-12, atol=1e-12)
    close64(sd, ref_nuslerp(a, mixed, 0.3, flatten=False))


def test_multislerp_cancelling_directions_fall_back_to_linear():
    a, b = _pair()
    neg = {"w": -a["w"]}
    sd = _run("multislerp([a, n], [1, 1])", a=a, n=neg)
    assert sd["w"].abs().max() < 1e-12  # (a - a) / 2
    sd = _run("multislerp([a, n, b], [1, 1, 0])", a=a, n=neg, b=b)
    assert sd["w"].abs().max() < 1e-12
    sd = _run("multislerp([a, z], [1, 3])", a=a, z={"w": torch.zeros_like(a["w"])})
    torch.testing.assert_close(sd["w"], 0.25 * a["w"], rtol=1e-12, atol=0)  # direction of a, mean norm


def test_karcher_degenerate_cases():
    a, b = _pair()
    sd = _run("karcher([a, n])", a=a, n={"w": -a["w"]})
    torch.testing.assert_close(sd["w"], a["w"], rtol=1e-12, atol=0)  # antipodal: stays at the first
    zero = {"w": torch.zeros_like(a["w"])}
    sd = _run("karcher([z, b])", z=zero, b=b)
    torch.testing.assert_close(sd["w"], 0.5 * b["w"], rtol=1e-12, atol=0)  # direction of b, mean norm
    sd = _run("karcher([z, z])", z=zero)
    assert torch.equal(sd["w"], zero["w"])
    close64(_run("karcher([a, b, n])", a=a, b=b, n={"w": -a["w"]}), ref_karcher([a, b, {"w": -a["w"]}]))


def test_model_stock_degenerate_cases():
    base, d = _pair()
    up = {"w": base["w"] + d["w"]}
    down = {"w": base["w"] - d["w"]}
    sd = _run("model_stock(base, [u, d])", base=base, u=up, d=down)  # c = -1: t = 0
    torch.testing.assert_close(sd["w"], base["w"], rtol=1e-12, atol=1e-12)
    sd = _run("model_stock(base, [u, b])", base=base, u=up, b=base)  # a zero task vector: c = 0
    torch.testing.assert_close(sd["w"], base["w"], rtol=1e-12, atol=1e-12)
    third = {"w": base["w"] + 0.5 * d["w"]}
    close64(_run("model_stock(base, [u, d, h], filter_wise=true)", base=base, u=up, d=down, h=third),
            ref_model_stock(base, [up, down, third], True))


def test_all_results_finite_on_family_layernorms(family, fam):
    """The family's layer-norm task vectors are all zero: every method stays finite."""
    b, m1, m2 = _load(family, "base", "math", "rl1")
    name = "model.layers.0.input_layernorm.weight"
    assert torch.equal(fam["math"][name], fam["base"][name])
    for expr in (f"model_stock({b}, [{m1}, {m2}])", f"nuslerp({m1}, {m2}, 0.5, base={b})",
                 f"multislerp([{m1}, {m2}], [1, 2], base={b})", f"karcher([{m1}, {m2}], base={b})"):
        sd = _run(expr)
        torch.testing.assert_close(sd[name], fam["base"][name], rtol=0, atol=0)


# ---- errors, plans, descriptions -------------------------------------------------------------------


ERRORS = [
    ("model_stock(b, [m])", AlgTypeError, "[m]", "at least 2"),
    ("model_stock(b, [m, rm])", AlgShapeError, None, "same tensors"),
    ("nuslerp(m, r, 0.5, row_wise=true)", AlgTypeError, "true", "flatten=false"),
    ("nuslerp(m, r, [1, 2, 3])", AlgTypeError, "[1, 2, 3]", "pair of weights"),
    ("multislerp([m, r], [1, -1])", AlgTypeError, "[1, -1]", "sum to 0"),
    ("multislerp([m, r], [1, 2, 3])", AlgTypeError, "[1, 2, 3]", "3 values for 2 models"),
    ("multislerp([m, 2], 1)", AlgTypeError, "[m, 2]", "List[Checkpoint]"),
    ("karcher([m, r], [-1, 2])", AlgTypeError, "[-1, 2]", "[0.0, inf]"),
    ("karcher([m, r], max_iter=2.5)", AlgTypeError, "2.5", "whole number"),
    ("karcher([m, r], tol=0)", AlgTypeError, "0", "greater than 0"),
    ("nearswap(b, m, 0)", AlgTypeError, "0", "greater than 0"),
    ("nearswap(b, rm, 0.1)", AlgShapeError, None, "same tensors"),
]


@pytest.mark.parametrize("expr,cls,caret,words", ERRORS)
def test_positioned_errors(family, expr, cls, caret, words):
    prelude = "".join(f'{k} = load("{family[p]}")\n' for k, p in
                      (("b", "base"), ("m", "math"), ("r", "rl1"), ("rm", "rm")))
    with pytest.raises(AlgError) as info:
        Interpreter(device="cpu").eval(prelude + expr)
    err = info.value
    assert isinstance(err, cls), err.format()
    assert words in str(err), err.format()
    assert err.span is not None and err.span.line == 5
    if caret is not None:
        assert err.span.text() == caret, err.format()


def test_plan_reduces_then_writes_golden(family, tmp_path):
    text = (f'base = load("{family["base"]}")\n'
            f'save(model_stock(base, [load("{family["math"]}"), load("{family["rl1"]}")], filter_wise=true), "out")')
    ck = Checker(Options(device="cpu"), tmp_path, mode="eval")
    (sink,) = ck.check(parse(text)).sinks
    plan = format_plan(plan_save(sink.value, Options(device="cpu")), verbose=True)
    got = plan.replace(str(family["base"].parent), "<family>").replace(str(tmp_path), "<out>") + "\n"
    kinds = [line.split()[1] for line in got.splitlines() if re.match(r"\s+\d+\s+(reduce|write)\b", line)]
    # each tensor: its reduction, then its write (the layer norms too: one row each)
    assert kinds[:4] == ["reduce", "write", "reduce", "write"]
    assert kinds.count("reduce") == kinds.count("write") == 21
    golden = GOLDEN / "model_stock.plan"
    if os.environ.get("ALG_UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()


def test_descriptions_in_alg_syntax(family):
    interp = Interpreter(device="cpu")
    b, m, r = _load(family, "base", "math", "rl1")
    cases = {
        f"nuslerp({m}, {r}, [1, 3], base={b}, flatten=false, row_wise=true)":
            "nuslerp(load(<math>), load(<rl1>), [1, 3], base=load(<base>), flatten=false, row_wise=true)",
        f"multislerp([{m}, {r}], [1, 2])": "multislerp([load(<math>), load(<rl1>)], [1, 2])",
        f"karcher([{m}, {r}], base={b})":
            "karcher([load(<math>), load(<rl1>)], weights=[1, 1], max_iter=10, tol=1e-05, base=load(<base>))",
        f"model_stock({b}, [{m}, {r}], filter_wise=true)":
            "model_stock(load(<base>), [load(<math>), load(<rl1>)], filter_wise=true)",
        f"nearswap({b}, {m}, 0.5)": "nearswap(load(<base>), load(<math>), 0.5)",
    }
    for expr, want in cases.items():
        text = interp.eval(expr).model.node.describe()
        for k in ("base", "math", "rl1"):
            text = text.replace(f'"{family[k]}"', f"<{k}>")
        assert text == want


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.slow  # measures a subprocess on 256 MB checkpoints: the slow tier
def test_row_wise_run_stays_within_planned_memory(tmp_path):
    """`alg run` of a row-wise Model Stock (RowGram reductions, row_scale writes) on three
    32 MB checkpoints, as a subprocess: its anonymous memory over `alg check`'s baseline
    stays within the plan's prediction plus the allocator allowance of test_plan."""
    import sys

    from safetensors.torch import save_file

    from algebra import memwatch

    for k, seed in (("a", 1), ("b", 2), ("c", 3)):
        (tmp_path / k).mkdir()
        g = torch.Generator().manual_seed(seed)
        save_file({f"layers.{i}.w": torch.randn(2048, 1024, generator=g) for i in range(4)},
                  tmp_path / k / "model.safetensors")
    recipe = tmp_path / "r.alg"
    text = 'save(model_stock(load("a"), [load("b"), load("c")], filter_wise=true), "out")\n'
    recipe.write_text(text)
    chunk = 1 << 18
    ck = Checker(Options(device="cpu"), tmp_path, mode="eval")
    (sink,) = ck.check(parse(text)).sinks
    predicted = plan_save(sink.value, Options(device="cpu", chunk_elems=chunk)).peak_bytes
    cmd = [sys.executable, "-m", "algebra"]
    base = memwatch.run(memwatch.with_run_imports(["plan", str(recipe), "--chunk", str(chunk)]))
    assert base.returncode == 0, base.stderr
    run = memwatch.run([*cmd, "run", str(recipe), "--chunk", str(chunk), "--device", "cpu"])
    assert run.returncode == 0, run.stderr
    growth = run.peak_anon - base.peak_anon
    assert growth <= predicted + (24 << 20), (growth, predicted)
    assert growth < 3 * 32 * 2 ** 20 / 4, growth


def test_per_layer_weights_reach_the_spherical_methods(family, read):
    """Weights given as ramp(...) resolve per tensor: one-hot at the first layer returns
    the first model exactly, at the last layer the second (the tiny family has 2 layers)."""
    from algebra import Interpreter, Options

    a, b = family["math"], family["rl1"]
    interp = Interpreter(options=Options(device="cpu", compute_dtype="float64"))
    ta, tb = read(a), read(b)
    for expr in (f'multislerp([load("{a}"), load("{b}")], [ramp(1, 0), ramp(0, 1)])',
                 f'karcher([load("{a}"), load("{b}")], [ramp(1, 0), ramp(0, 1)])',
                 f'nuslerp(load("{a}"), load("{b}"), ramp(0, 1))'):
        out = interp.eval(expr).state_dict()
        for n in ta:
            if ".layers.0." in n:
                torch.testing.assert_close(out[n].double(), ta[n].double(), rtol=1e-12, atol=1e-12, msg=expr)
            elif ".layers.1." in n:
                torch.testing.assert_close(out[n].double(), tb[n].double(), rtol=1e-12, atol=1e-12, msg=expr)
