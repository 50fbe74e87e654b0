"""Float64 sums that give the same bits on any number of torch threads (ops/sums.py).

`--threads auto` makes a run's thread count depend on the machine's load, so every
reduction a merge reads (SLERP's dot products, Gram matrices, SCE's squared norms) must
round the same way on 1 thread as on 4: torch.dot and `@` do not (their partial sums
are split among the threads). Checked here on the primitives against math.fsum, and on
the reductions themselves, whose values (not only the rounded outputs) must be equal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algebra import api
from algebra.execute import new_evaluator
from algebra.lower import Lowerer, lin
from algebra.methods.geometric import RowGram
from algebra.methods.select import MaskedSquares
from algebra.ops import sums
from algebra.options import Options
from algebra.reductions import Gram, GramMatrix

THREADS = (1, 2, 3, 4)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _each_thread_count(fn):
    out = []
    for t in THREADS:
        torch.set_num_threads(t)
        out.append(fn())
    return out


@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 65539, (1 << 20) + 7])
def test_dot_is_exact_enough_and_the_same_on_any_thread_count(n, restore_threads):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, dtype=torch.float64, generator=g)
    b = torch.randn(n, dtype=torch.float64, generator=g)
    got = _each_thread_count(lambda: sums.dot(a, b))
    assert len(set(got)) == 1, got
    exact = math.fsum((a * b).tolist())  # products are exact enough; fsum adds them exactly
    assert abs(got[0] - exact) <= 1e-12 * math.fsum((a * b).abs().tolist())


def test_sum_axis_rows_and_columns(restore_threads):
    g = torch.Generator().manual_seed(3)
    for shape in ((1, 300_001), (300_001, 1), (2, 200_000), (50_000, 3), (257, 513)):
        x = torch.randn(shape, dtype=torch.float64, generator=g)
        for axis in (0, 1):
            got = _each_thread_count(lambda x=x, axis=axis: tuple(sums.sum_axis(x, axis).tolist()))
            assert len(set(got)) == 1, (shape, axis)
            ref = [math.fsum(v) for v in (x.T if axis == 0 else x).tolist()]
            np.testing.assert_allclose(got[0], ref, rtol=1e-12, atol=1e-9)


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """Tensors above torch's parallel grain (32768 elements), where threads split sums."""
    from algebra.tiny import build_family

    return build_family(tmp_path_factory.mktemp("wide"), hidden=256, layers=1, names=("base", "math", "rl1"))


def test_reductions_give_the_same_values_on_any_thread_count(wide_family, restore_threads):
    models = api.check(api.parse("[" + ", ".join(f'load("{p}")' for p in wide_family.values() if p.name != "rm")
                                 + "]")).result
    low = Lowerer()
    names = [n for n, s in models[0].type.tensors.items() if s.is_float and math.prod(s.shape) > 40_000]
    assert names
    # scaled task vectors in float64 (what a SLERP of task vectors sums): products of
    # widened float32 weights alone are exact in float64, which would hide rounding
    base = [low.tensor(models[0].node, n) for n in names]
    per = [[lin([(0.3, low.tensor(m.node, n)), (-0.3, b)]) for m in models[1:]] + [b]
           for n, b in zip(names, base, strict=True)]
    deltas = tuple(per[0][:2])
    reductions = {
        "gram": lambda: Gram(tuple((xs[0], xs[1]) for xs in per), "t"),
        "gram matrix": lambda: GramMatrix(tuple(tuple(xs) for xs in per), "t"),
        "row gram": lambda: RowGram(tuple(per[0]), "row", "t"),
        "column gram": lambda: RowGram(tuple(per[0]), "col", "t"),
        "squares": lambda: MaskedSquares(deltas, None, "t"),
    }
    for what, make in reductions.items():
        got = set()
        for t in THREADS:
            r = make()
            ev = new_evaluator(Options(device="cpu", compute_dtype="float64", threads=t))  # sets torch's
            ev.reduce(r, 1 << 20)
            assert torch.get_num_threads() == t
            got.add(np.asarray(ev.results[r], dtype=np.float64).tobytes())
        assert len(got) == 1, what
