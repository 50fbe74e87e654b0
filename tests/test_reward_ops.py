"""The pointwise reward ops (algebra/reward/ops.py): each registered op on arrays and on
numbers against an independent float64 reference written here, extremes included; the
alg functions declared from the registry; and the "add one" path: a reward transform added
in this file through the public registry, scoped, used on numbers and in a scored reward
tree, and gone afterwards."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_reward import Direct, rows, run_rewards

from algebra import AlgError, Interpreter
from algebra.convert.signatures import builtin_signatures, function_names
from algebra.errors import AlgTypeError
from algebra.registry import in_use
from algebra.reward import ops
from algebra.reward.ops import POINTWISE, PointwiseOp

INF, NAN = math.inf, math.nan
SHIPPED = dict(POINTWISE)  # the registry as the package ships it (nothing scoped is live yet)

# ---- independent float64 references (Python's math, case by case) ------------------------------


def r_div(a: float, b: float) -> float:
    if b == 0:  # IEEE: ±inf, or nan for 0/0 and nan/0
        return NAN if a == 0 or math.isnan(a) else math.copysign(INF, a) * math.copysign(1.0, b)
    return a / b


def r_logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def r_sigmoid(x: float) -> float:
    # not the implementation's formula: tanh for x >= 0, e^logsig(x) below
    return 0.5 + 0.5 * math.tanh(x / 2) if x >= 0 else math.exp(r_logsig(x))


def r_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return INF


def r_log(x: float) -> float:
    if math.isnan(x) or x < 0:
        return NAN
    return -INF if x == 0 else math.log(x)


def r_clip(x: float, lo: float, hi: float) -> float:
    return NAN if math.isnan(x) else min(max(x, lo), hi)


def r_sum(*xs: float) -> float:
    acc = xs[0]
    for x in xs[1:]:
        acc = acc + x
    return acc


def r_min(*xs: float) -> float:
    return NAN if any(math.isnan(x) for x in xs) else min(xs)


def r_max(*xs: float) -> float:
    return NAN if any(math.isnan(x) for x in xs) else max(xs)


REFERENCE = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": r_div,
    "neg": lambda a: -a,
    "logsig": r_logsig,
    "sigmoid": r_sigmoid,
    "exp": r_exp,
    "log": r_log,
    "clip": r_clip,
    "sum": r_sum,
    "mean": lambda *xs: r_sum(*xs) / len(xs),
    "min": r_min,
    "max": r_max,
}

# finite numbers, the ones an alg number can be, out to ±1e308 and the subnormals
FINITE = [0.0, -0.0, 5e-324, 1e-300, 0.1, -0.5, 1.0, -1.0, 2.5, -3.0, 20.0, -20.0, 36.7, -36.7,
          700.0, -700.0, 709.9, 710.0, -745.0, -746.0, 1e5, 1e308, -1e308]
EXTREME = [INF, -INF, NAN]  # reward values may be these (a score's exp overflows); numbers not
CLIP_BOUNDS = [(-0.05, 0.05), (0.0, 0.0), (-1e308, 1e308), (1.0, 2.0)]


def cases(op: PointwiseOp, values: list[float]) -> list[tuple]:
    if op.arity == 3:  # clip: x, then bounds lo <= hi (numbers, checked at the call)
        return [(x, lo, hi) for x in values for lo, hi in CLIP_BOUNDS]
    if op.arity is not None:
        return list(itertools.product(values, repeat=op.arity))
    three = values[::4]
    return [(x,) for x in values] + list(itertools.product(values, repeat=2)) + list(itertools.product(three, repeat=3))


def on_arrays(op: PointwiseOp, cs: list[tuple]) -> list[float]:
    """op.fn on float64 columns, one call per argument count; the value of each case."""
    out = [NAN] * len(cs)
    for n in sorted({len(c) for c in cs}):
        at = [i for i, c in enumerate(cs) if len(c) == n]
        columns = [np.array(col, dtype=np.float64) for col in zip(*(cs[i] for i in at), strict=True)]
        with np.errstate(all="ignore"):
            got = np.asarray(op.fn(*columns), dtype=np.float64)
        assert got.shape == (len(at),)
        for i, g in zip(at, got, strict=True):
            out[i] = float(g)
    return out


def same(got: float, want: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    if math.isinf(want) or want == 0:
        return got == want
    return got == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_every_shipped_op_has_a_reference_here():
    """Adding an op without its reference formula fails here."""
    assert set(SHIPPED) == set(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_array_results_match_the_reference(name):
    """On float64 arrays, as reward trees are evaluated: finite values out to ±1e308,
    ±inf and nan, every combination for the arity."""
    op = SHIPPED[name]
    cs = cases(op, FINITE + EXTREME)
    bad = [(c, g, REFERENCE[name](*c)) for c, g in zip(cs, on_arrays(op, cs), strict=True)
           if not same(g, REFERENCE[name](*c))]
    assert not bad, bad[:5]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_scalar_results_match_the_reference_and_the_arrays(name):
    """On numbers (finite, as alg's are): the same definition gives the reference's value
    and exactly the array path's value, element for element."""
    op = SHIPPED[name]
    cs = [c for c in cases(op, FINITE) if not (name == "div" and c[1] == 0)]  # refused at check time
    for c, a in zip(cs, on_arrays(op, cs), strict=True):
        got = op.scalar(*c)
        assert isinstance(got, float), (c, got)
        assert same(got, REFERENCE[name](*c)), (c, got, REFERENCE[name](*c))
        assert got == a or (math.isnan(got) and math.isnan(a)), (c, got, a)


@pytest.mark.parametrize("name", sorted(n for n, op in SHIPPED.items() if op.exact))
def test_exact_ops_keep_whole_numbers_exact(name):
    """Ops that only add and compare use Python's arithmetic on numbers, as alg's `+` does:
    whole numbers past 2**53 stay exact (float64 would round them)."""
    op = SHIPPED[name]
    big = 2**53 + 1
    args = {"neg": (big,), "clip": (big, 0, 2**60)}.get(name, (big, 1) if op.arity in (2, None) else (big,))
    got = op.scalar(*args)
    want = REFERENCE[name](*args)  # Python ints: the exact value
    assert got == want and type(got) is type(want), (args, got, want)


def _alg(args: tuple) -> str:
    return ", ".join(repr(float(a)) if isinstance(a, float) else str(a) for a in args)


@pytest.mark.parametrize("name", sorted(n for n, op in SHIPPED.items() if op.header))
def test_alg_functions_on_numbers(name):
    """The alg function declared from the registry: the scalar value when it is finite, an
    error at the call when it is not (exp(710), log(0), sum(1e308, 1e308), ...)."""
    op = SHIPPED[name]
    interp = Interpreter(device="cpu")
    cs = cases(op, FINITE)[::3] + [(1e308, 1e308), (-1e308, -1e308, 1.0)] if op.arity is None else cases(op, FINITE)
    assert len(cs) > 20
    finite = errors = 0
    for c in cs:
        want = REFERENCE[name](*c)
        text = f"{name}({_alg(c)})"
        if math.isfinite(want):
            got = interp.eval(text)
            assert same(got, want) and got == op.scalar(*c), (text, got, want)
            finite += 1
        else:
            with pytest.raises(AlgTypeError) as e:
                interp.eval(text)
            assert "is not a finite number" in e.value.message, text
            errors += 1
    assert finite and (errors or name in ("sigmoid", "logsig", "clip", "min", "max"))


def test_numbers_through_the_functions_keep_todays_types():
    interp = Interpreter(device="cpu")
    for text, want in [("sum(1, 2, 3)", 6), ("sum([1, 2, 3])", 6), ("max(1, 5, 2)", 5), ("min([4, 3])", 3),
                       ("clip(5, 0, 1)", 1), ("mean(2, 4)", 3.0), ("clip(0.25, 0, 1)", 0.25),
                       ("sum(9007199254740993, 1)", 9007199254740994), ("exp(0)", 1.0)]:
        got = interp.eval(text)
        assert got == want and type(got) is type(want), (text, got)


def test_overflow_is_refused_for_every_op_not_only_the_unary_ones():
    """Regression: sum/mean/min/max on numbers returned inf (only logsig, sigmoid, exp and
    log checked their result), though alg numbers are finite."""
    interp = Interpreter(device="cpu")
    for text in ["sum(1e308, 1e308)", "mean([1e308, 1e308])", "sum(-1e308, -1e308, 1)", "exp(710)", "log(0)"]:
        with pytest.raises(AlgTypeError) as e:
            interp.eval(text)
        assert "is not a finite number" in e.value.message, text
    assert interp.eval("sum(1e308, -1e308)") == 0.0
    assert interp.eval("max(1e308, -1e308)") == 1e308


def test_readme_lists_every_pointwise_function():
    """README's reward table row names each op the registry declares."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if "`logsig`" in line and line.startswith("|"))
    names = row.split("|")[1]  # the first cell
    for op in SHIPPED.values():
        assert (op.symbol in names) if op.symbol else (f"`{op.name}" in names), op.name


def test_the_registry_and_the_converters_names_import_no_numpy():
    """`alg check` and `alg convert` read the op names; that must not import numpy."""
    code = ("import sys; from algebra.reward import ops; from algebra.convert.signatures import "
            "builtin_signatures; s = builtin_signatures(); assert {'logsig', 'sum', 'clip'} <= set(s); "
            "assert [o.header for o in ops.POINTWISE.values()]; "
            "assert 'numpy' not in sys.modules and 'torch' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registration_errors_leave_the_registry_as_it_was():
    before, builtins_before = dict(POINTWISE), dict(in_use().builtins)
    with ops.scoped():
        with pytest.raises(ValueError, match="exists"):
            ops.register(PointwiseOp("logsig", 1, lambda x: x, "again"))
        with pytest.raises(ValueError, match="alg function already"):
            ops.register(PointwiseOp("load", 1, lambda x: x, "clashes with load()"))  # a builtin, not an op
        with pytest.raises(ValueError, match="arity"):
            ops.register(PointwiseOp("nullary", 0, lambda: 0.0, "nothing in"))
        with pytest.raises(ValueError, match="help text"):
            ops.register(PointwiseOp("undocumented", 1, lambda x: x, ""))
    assert POINTWISE == before and in_use().builtins == builtins_before


# ---- adding one: a reward transform defined in this test only ------------------------------------


def softplus(x):
    """The one definition: log(1 + e^x), stably, for arrays and 0-d arrays alike."""
    return np.logaddexp(0.0, x)


SOFTPLUS = PointwiseOp("softplus", 1, softplus, "log(1 + e^x). Pointwise on a reward.")


def r_softplus(x: float) -> float:
    """Independent: x + log1p(e^-x) above 0, log1p(e^x) below."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def test_adding_a_reward_transform_is_one_registration(ws, rms):
    assert "softplus" not in POINTWISE and "softplus" not in in_use().builtins
    with ops.scoped():
        ops.register(SOFTPLUS)
        # an alg function, with its help, and a name the converter will not use for a variable
        assert in_use().builtins["softplus"].doc == SOFTPLUS.doc
        assert "softplus" in function_names() and builtin_signatures()["softplus"].params == ("x",)
        # on numbers, out to the extremes
        interp = Interpreter(device="cpu")
        for x in (0.0, 2.0, -3.5, 30.0, -700.0, 1e308, -1e308):
            assert same(interp.eval(f"softplus({x!r})"), r_softplus(x)), x
        with pytest.raises(AlgTypeError, match="must be Reward | Scalar"):
            interp.eval('softplus("x")')
        # on rewards: a tree scored end to end by the tiny reward models
        run_rewards(ws, """
help = reward("models/rm-helpful")
harm = reward("models/rm-harmless")
soft = softplus(help - harm)
r = soft + softplus(2) * harm - softplus(sum(help, 1))
score(r, "data/prompts_responses.jsonl", "out/s.jsonl")
""")
        H, G = Direct(rms["rm-helpful"]), Direct(rms["rm-harmless"])
        out = rows(ws / "out" / "s.jsonl")
        assert len(out) == 12
        for row in out:
            h, g = H(row["prompt"], row["response"]), G(row["prompt"], row["response"])
            assert row["soft"] == pytest.approx(r_softplus(h - g), abs=1e-4)
            assert row["reward"] == pytest.approx(r_softplus(h - g) + r_softplus(2.0) * g - r_softplus(h + 1), abs=1e-4)
    # nothing leaks: not in the registry, not an alg function, not a converter name
    assert "softplus" not in POINTWISE and "softplus" not in in_use().builtins and "softplus" not in function_names()
    with pytest.raises(AlgError, match="softplus"):
        Interpreter(device="cpu").eval("softplus(1)")


def test_a_scope_is_undone_when_its_block_fails():
    with pytest.raises(RuntimeError), ops.scoped():
        ops.register(SOFTPLUS)
        assert "softplus" in in_use().builtins
        raise RuntimeError
    assert "softplus" not in POINTWISE and "softplus" not in in_use().builtins
