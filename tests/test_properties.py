"""Algebraic properties of the merge functions on small random in-memory state dicts.

Each example binds 2-3 float32 tensors of small random shapes (dict bindings) and runs
alg on them; the expected values are either exact identities or a float64 reference
written here from the formulas (never by calling algebra code).

Float32 tolerances: a linear combination sum(c_i * x_i) computed in float32 is off by a
few float32 ulps (~6e-8) of sum(|c_i| * |x_i|), so the absolute tolerance is 1e-6 times
that bound per tensor; nothing is compared relative to a result that cancellation made
small.
"""

from __future__ import annotations

import math
import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algebra import Interpreter

SETTINGS = settings(max_examples=25, deadline=None)
NAMES = ("model.layers.0.w", "model.layers.1.w", "model.embed.weight")

ELEM = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
T = st.floats(-0.5, 1.5, allow_nan=False, allow_infinity=False)


@st.composite
def models(draw, n: int):
    """n state dicts with the same tensor names and shapes (2-3 tensors)."""
    k = draw(st.integers(2, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))) for _ in range(k)]
    out = []
    for _ in range(n):
        sd = {}
        for name, shape in zip(NAMES, shapes, strict=False):
            vals = draw(st.lists(ELEM, min_size=math.prod(shape), max_size=math.prod(shape)))
            sd[name] = torch.tensor(vals, dtype=torch.float32).reshape(shape)
        out.append(sd)
    return out


def run(src: str, **bindings) -> dict[str, torch.Tensor]:
    sd = Interpreter(device="cpu").eval(src, **bindings).state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())
    return sd


def clone(sd):
    return {n: v.clone() for n, v in sd.items()}


def assert_equal(actual, expected):
    assert set(actual) == set(expected)
    for n in expected:
        assert actual[n].shape == expected[n].shape, n
        torch.testing.assert_close(actual[n], expected[n], rtol=0, atol=0, msg=n)


def assert_lin_close(actual, terms, const: float = 0.0):
    """actual ~ sum(c * model) + const, against float64, with the bound of the docstring."""
    names = terms[0][1].keys()
    assert set(actual) == set(names)
    for n in names:
        ref = sum(c * m[n].double() for c, m in terms) + const
        bound = sum(abs(c) * m[n].double().abs() for c, m in terms) + abs(const)
        atol = 1e-6 * float(bound.max()) + 1e-30
        torch.testing.assert_close(actual[n].double(), ref, rtol=0, atol=atol, msg=n)


def coeffs(xs, ys, t):
    """SLERP's (cx, cy) for one angle over xs / ys, in float64."""
    xs = [x.double().reshape(-1) for x in xs]
    ys = [y.double().reshape(-1) for y in ys]
    xy = sum(float(x @ y) for x, y in zip(xs, ys, strict=True))
    xx = sum(float(x @ x) for x in xs)
    yy = sum(float(y @ y) for y in ys)
    if xx == 0.0 or yy == 0.0:
        return 1 - t, t
    cos = xy / math.sqrt(xx * yy)
    if abs(cos) > 0.9995:
        return 1 - t, t
    om = math.acos(cos)
    return math.sin((1 - t) * om) / math.sin(om), math.sin(t * om) / math.sin(om)


def group(name, per):
    if per == "model":
        return "model"
    m = re.search(r"layers\.(\d+)\.", name)
    return f"layer {m.group(1)}" if per == "layer" and m else name


# ---- lerp --------------------------------------------------------------------------------


@SETTINGS
@given(models(1), T)
def test_lerp_of_a_model_with_itself_is_the_model(ms, t):
    (a,) = ms
    assert_lin_close(run("lerp(a, a, t)", a=a, t=t), [(1.0, a)])
    # and with two equal but distinct bindings
    assert_lin_close(run("lerp(a, b, t)", a=a, b=clone(a), t=t), [(1.0, a)])


@SETTINGS
@given(models(2))
def test_lerp_endpoints(ms):
    a, b = ms
    assert_equal(run("lerp(a, b, 0)", a=a, b=b), a)
    assert_equal(run("lerp(a, b, 1)", a=a, b=b), b)


@SETTINGS
@given(models(2), T)
def test_lerp_is_linear(ms, t):
    a, b = ms
    got = run("lerp(a, b, t)", a=a, b=b, t=t)
    assert_lin_close(got, [(1 - t, a), (t, b)])
    other = run("a + t * (b - a)", a=a, b=b, t=t)
    assert_lin_close(other, [(1 - t, a), (t, b)])
    for n in a:
        bound = float((a[n].double().abs() + abs(t) * (b[n].double() - a[n].double()).abs()).max())
        torch.testing.assert_close(got[n], other[n], rtol=0, atol=2e-6 * bound + 1e-30)


# ---- slerp of raw weights ----------------------------------------------------------------


@SETTINGS
@given(models(2))
def test_slerp_endpoints(ms):
    a, b = ms
    assert_lin_close(run("slerp(a, b, 0)", a=a, b=b), [(1.0, a)])
    assert_lin_close(run("slerp(a, b, 1)", a=a, b=b), [(1.0, b)])


@SETTINGS
@given(models(2), st.floats(0.0, 1.0))
def test_slerp_matches_reference(ms, t):
    a, b = ms
    got = run("slerp(a, b, t)", a=a, b=b, t=t)
    for n in a:
        cx, cy = coeffs([a[n]], [b[n]], t)
        assert_lin_close({n: got[n]}, [(cx, {n: a[n]}), (cy, {n: b[n]})])


# ---- liti, ema, task vectors -------------------------------------------------------------


@SETTINGS
@given(models(2))
def test_liti_at_one_is_the_model(ms):
    init, m = ms
    assert_equal(run("liti(init, m, 1)", init=init, m=m), m)


@SETTINGS
@given(models(2), st.floats(0.0, 3.0))
def test_liti_matches_reference(ms, eta):
    init, m = ms
    got = run("liti(init, m, eta)", init=init, m=m, eta=eta)
    assert_lin_close(got, [(1 - eta, init), (eta, m)])


@SETTINGS
@given(models(1), st.floats(0.0, 1.0), st.integers(2, 4))
def test_ema_of_identical_models_is_the_model(ms, mu, k):
    (a,) = ms
    binds = {f"m{i}": clone(a) for i in range(k)}
    got = run(f"ema([{', '.join(binds)}], mu)", mu=mu, **binds)
    assert_lin_close(got, [(1.0, a)])


@SETTINGS
@given(models(3), st.floats(0.0, 1.0))
def test_ema_matches_reference(ms, mu):
    m0, m1, m2 = ms
    got = run("ema([m0, m1, m2], mu)", m0=m0, m1=m1, m2=m2, mu=mu)
    assert_lin_close(got, [((1 - mu) ** 2, m0), ((1 - mu) * mu, m1), (mu, m2)])


@SETTINGS
@given(models(1))
def test_task_vector_of_a_model_over_itself_is_zero(ms):
    (m,) = ms
    zero = {n: torch.zeros_like(v) for n, v in m.items()}
    assert_equal(run("task_vector(m, m)", m=m), zero)
    assert_equal(run("task_vector(m, base)", m=m, base=clone(m)), zero)


# ---- WARP --------------------------------------------------------------------------------


def warp_ref_terms(init, a, b, per):
    """WARP with M = 2 as init*(1 - cx - cy) + cx*a + cy*b per tensor."""
    da = {n: a[n].double() - init[n].double() for n in init}
    db = {n: b[n].double() - init[n].double() for n in init}
    out = {}
    for n in init:
        members = [k for k in init if group(k, per) == group(n, per)]
        cx, cy = coeffs([da[k] for k in members], [db[k] for k in members], 0.5)
        out[n] = (cx, cy)
    return out


@SETTINGS
@given(models(3), st.sampled_from(["tensor", "layer", "model"]))
def test_warp_two_models_is_symmetric_and_matches_reference(ms, per):
    init, a, b = ms
    src = f'slerp([x, y], base=init, per="{per}")'
    ab = run(src, x=a, y=b, init=init)
    ba = run(src, x=b, y=a, init=init)
    for n, (cx, cy) in warp_ref_terms(init, a, b, per).items():
        # t = 1/2: both coefficients are equal, so swapping the models changes nothing
        assert math.isclose(cx, cy, rel_tol=1e-12)
        # the task vectors themselves carry float32 rounding of init, a and b
        bound = float((init[n].abs() + cx * (a[n].abs() + init[n].abs())
                       + cy * (b[n].abs() + init[n].abs())).double().max())
        for got in (ab, ba):
            ref = init[n].double() + cx * (a[n].double() - init[n].double()) \
                + cy * (b[n].double() - init[n].double())
            torch.testing.assert_close(got[n].double(), ref, rtol=0, atol=2e-6 * bound + 1e-30)
        torch.testing.assert_close(ab[n], ba[n], rtol=0, atol=4e-6 * bound + 1e-30)
