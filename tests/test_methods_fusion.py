"""arcee_fusion (mergekit's Arcee Fusion) against an independent reference.

The reference follows mergekit's algorithm on whole tensors: the importance of every
entry, the tensor's importances sorted, the quantiles read at mergekit's indices
floor(q * (N - 1)), the threshold median + 1.5 * IQR. The engine instead selects the three
quantiles with a streamed exact selection (no sort, a few chunks held) and recomputes the
importance row by row when it writes. The output holds either base's or m's value at
each entry, so the comparison is exact: the same entries must be taken.
"""

from __future__ import annotations

import pytest
import torch

from algebra import AlgError, Interpreter, Options
from algebra.errors import AlgShapeError, AlgTypeError

# a matrix, one longer than the window selection's smallest tensor (16 * 2^14 entries:
# its sampled path), a norm vector, and tensors of 1..5 entries (where mergekit's q1,
# median or q3 index is 0: the smallest importance)
SMALL = {"model.layers.0.mlp.up_proj.weight": (40, 16), "model.norm.weight": (16,), "a.one": (1,),
         "a.two": (2,), "a.three": (3,), "a.four": (2, 2), "a.five": (5,)}
BIG = {"model.embed_tokens.weight": (520, 512)}


def _pair(seed: int = 0, dtype=torch.float32, shapes=SMALL) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    m = {}
    for k, b in base.items():
        upd = torch.rand(b.shape, generator=g) < 0.6
        m[k] = b + upd * torch.randn(b.shape, generator=g) * 0.3
    return ({k: v.to(dtype) for k, v in base.items()}, {k: v.to(dtype) for k, v in m.items()})


def ref_arcee_fusion(base: dict, m: dict, dtype=torch.float64) -> dict:
    out = {}
    for k, a in base.items():
        x, y = a.to(dtype), m[k].to(dtype)
        row = x.shape[-1]
        p = torch.softmax(y.reshape(-1, row), -1) + 1e-8
        q = torch.softmax(x.reshape(-1, row), -1) + 1e-8
        kl = (p * torch.log(p / q)).sum(-1)
        imp = ((y - x).abs().reshape(-1, row) * kl[:, None]).reshape(x.shape)
        ordered = imp.flatten().sort().values
        n = ordered.numel()
        q1, med, q3 = (ordered[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
        out[k] = torch.where(imp >= med + 1.5 * (q3 - q1), y, x)
    return out


def _run(base, m, compute="float64", chunk=1 << 20, expr="arcee_fusion(base, m)"):
    opts = Options(device="cpu", compute_dtype=compute, chunk_elems=chunk)
    res = Interpreter(options=opts).eval(expr, base=base, m=m)
    return res.state_dict(dtype="float64" if compute == "float64" else None)


@pytest.mark.parametrize("shapes,chunk", [(SMALL, 1 << 20), (SMALL, 1), (SMALL, 3), (SMALL, 7),
                                          (BIG, 1 << 20), (BIG, 40000)])
@pytest.mark.parametrize("compute", ["float64", "float32"])
def test_matches_reference(compute, shapes, chunk):
    base, m = _pair(shapes=shapes)
    got = _run(base, m, compute, chunk)
    dtype = torch.float64 if compute == "float64" else torch.float32
    want = ref_arcee_fusion(base, m, dtype)
    assert set(got) == set(want)
    for k, w in want.items():
        assert torch.equal(got[k].to(dtype), w), k


def test_takes_some_of_m_and_keeps_some_of_base():
    """The threshold sits inside the distribution: in the matrices some changed entries
    are taken and most are not."""
    base, m = _pair(seed=1, shapes={**SMALL, **BIG})
    got = _run(base, m)
    for k in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        changed = m[k] != base[k]
        taken = (got[k] == m[k].double()) & changed
        assert 0 < int(taken.sum()) < int(changed.sum()) // 2, k


def test_bf16_inputs_are_computed_in_float32():
    base, m = _pair(seed=2, dtype=torch.bfloat16)
    got = _run(base, m, "float32")
    want = ref_arcee_fusion(base, m, torch.float32)
    for k, w in want.items():
        assert torch.equal(got[k], w), k


@pytest.mark.parametrize("chunk", [1 << 20, 5])
def test_importance_below_zero_orders_as_mergekit(chunk):
    """Where m barely differs from base, a row's KL rounds below 0 in float32, and so do
    its importances: they order below 0, as in mergekit's sort, and q1 is negative."""
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(64, 16, generator=g)}
    m = {"w": base["w"] + 1e-4 * torch.randn(64, 16, generator=g)}
    x, y = base["w"], m["w"]
    p, q = torch.softmax(y, -1) + 1e-8, torch.softmax(x, -1) + 1e-8
    imp = ((y - x).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)).flatten().sort().values
    assert imp[int(0.25 * (imp.numel() - 1))] < 0  # the case is exercised
    got = _run(base, m, "float32", chunk)
    assert torch.equal(got["w"], ref_arcee_fusion(base, m, torch.float32)["w"])


def test_identical_models_give_the_base():
    base, _ = _pair()
    got = _run(base, base)
    for k, b in base.items():
        assert torch.equal(got[k], b.double()), k


@pytest.mark.parametrize("expr,cls,caret,words", [
    ("arcee_fusion(base, other)", AlgShapeError, None, "same tensors"),
    ("arcee_fusion(base, [m])", AlgTypeError, "[m]", "Checkpoint"),
    ("arcee_fusion(base)", AlgTypeError, None, "m"),
])
def test_errors_are_positioned(expr, cls, caret, words):
    base, m = _pair()
    other = {k: v for k, v in m.items() if k != "a.one"}
    with pytest.raises(AlgError) as info:
        Interpreter(device="cpu").eval(expr, base=base, m=m, other=other)
    err = info.value
    assert isinstance(err, cls), err.format()
    assert words in str(err), err.format()
    assert err.span is not None
    if caret is not None:
        assert err.span.text() == caret, err.format()


def test_description_in_alg_syntax():
    base, m = _pair()
    node = Interpreter(device="cpu").eval("arcee_fusion(base, m)", base=base, m=m).model.node
    assert node.describe() == 'arcee_fusion(load("base"), load("m"))'
