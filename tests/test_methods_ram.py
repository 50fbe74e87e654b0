"""ram and ramplus_tl (RAM, arXiv:2601.13572, as mergekit 0.1.5 defines them) against an
independent float64 reference.

The reference is written from the method's description on whole stacked tensors: which
entries each model updated (|d_i| > epsilon), per entry the number c of models that did,
then `where(c == 1, the one update (times lambda_i), the mean of the updates)`; lambda_i
from model i's shared and unique counts over the tensor. The engine instead forms each
model's unique and shared terms chunk by chunk and sums the counts in a reduction.

The fine-tunes below update a random part of each tensor (as RL fine-tunes do, which is
what RAM is for), and leave the rest exactly equal to the base or off by noise well below
epsilon, so that unique, shared and untouched entries all occur, and no |d_i| lies within
rounding of epsilon (float32 and float64 then agree on every mask).
"""

from __future__ import annotations

import pytest
import torch

from algebra import AlgError, Interpreter, Options
from algebra.errors import AlgShapeError, AlgTypeError

SHAPES = {"model.embed_tokens.weight": (64, 16), "model.layers.0.mlp.up_proj.weight": (48, 16),
          "model.layers.0.input_layernorm.weight": (16,), "model.layers.1.mlp.up_proj.weight": (48, 16)}


def _family(n_models: int, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    ms = []
    for i in range(n_models):
        m = {}
        for k, b in base.items():
            upd = torch.rand(b.shape, generator=g) < 0.2 + 0.15 * i
            noise = torch.rand(b.shape, generator=g) < 0.3
            step = torch.randn(b.shape, generator=g) * 0.05
            step = step.sign() * step.abs().clamp(min=1e-3)
            m[k] = torch.where(upd, b + step, torch.where(noise, b + 1e-7, b))
        ms.append(m)
    return base, ms


def ref_ram(base: dict, ms: list[dict], epsilon: float, plus: tuple[float, float] | None = None) -> dict:
    out = {}
    for k, b in base.items():
        b = b.double()
        d = torch.stack([m[k].double() - b for m in ms]).reshape(len(ms), -1)
        upd = d.abs() > epsilon
        c = upd.sum(0)
        lam = torch.ones(len(ms), dtype=torch.float64)
        if plus is not None:
            r, alpha = plus
            shared = (upd & (c > 1)).sum(1).double()
            unique = (upd & (c == 1)).sum(1).double()
            lam = 1 + r * (shared / unique.clamp(min=epsilon)).clamp(0, alpha)
        z = d * upd
        merged = torch.where(c == 1, (z * lam[:, None]).sum(0), z.sum(0) / c.clamp(min=1))
        out[k] = b + merged.reshape(b.shape)
    return out


def _run(expr: str, base, ms, compute="float64", chunk=1 << 20):
    opts = Options(device="cpu", compute_dtype=compute, chunk_elems=chunk)
    binds = {"base": base, **{f"m{i}": m for i, m in enumerate(ms)}}
    res = Interpreter(options=opts).eval(expr, **binds)
    return res.state_dict(dtype="float64" if compute == "float64" else None)


def _close(actual: dict, ref: dict, rtol: float) -> None:
    assert set(actual) == set(ref)
    for k, r in ref.items():
        torch.testing.assert_close(actual[k].double(), r, rtol=rtol, atol=rtol * r.abs().max().item(),
                                   msg=lambda m, k=k: f"{k}: {m}")


CASES = [
    ("ram(base, {ms})", None, 1e-5),
    ("ram(base, {ms}, epsilon=0.01)", None, 0.01),
    ("ramplus_tl(base, {ms})", (0.1, 0.2), 1e-5),
    ("ramplus_tl(base, {ms}, r=0.5, alpha=2, epsilon=0.002)", (0.5, 2.0), 0.002),
    ("ramplus_tl(base, {ms}, r=-0.5, alpha=1)", (-0.5, 1.0), 1e-5),
]


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("expr,plus,eps", CASES)
@pytest.mark.parametrize("compute", ["float64", "float32"])
def test_matches_reference(n, expr, plus, eps, compute):
    base, ms = _family(n)
    names = "[" + ", ".join(f"m{i}" for i in range(n)) + "]"
    got = _run(expr.format(ms=names), base, ms, compute)
    _close(got, ref_ram(base, ms, eps, plus), 1e-12 if compute == "float64" else 1e-6)


def test_entries_by_kind():
    """Unique entries move by the one update, shared ones by the mean, others not at all;
    and with RAM+ the unique entries of the model with many shared ones move further."""
    base, ms = _family(2, seed=3)
    got = _run("ram(base, [m0, m1])", base, ms)
    k = "model.layers.0.mlp.up_proj.weight"
    d = [m[k].double() - base[k].double() for m in ms]
    u0, u1 = d[0].abs() > 1e-5, d[1].abs() > 1e-5
    out = got[k] - base[k].double()
    assert torch.equal(out[u0 & ~u1], d[0][u0 & ~u1])
    assert torch.allclose(out[u0 & u1], (d[0] + d[1])[u0 & u1] / 2, rtol=1e-15, atol=0)
    assert torch.equal(out[~u0 & ~u1], torch.zeros_like(out[~u0 & ~u1]))
    assert (u0 & ~u1).any() and (u0 & u1).any() and (~u0 & ~u1).any()
    plus = _run("ramplus_tl(base, [m0, m1], r=1, alpha=10)", base, ms)
    shared, unique = int((u0 & u1).sum()), int((u0 & ~u1).sum())
    lam = 1 + min(shared / unique, 10)
    torch.testing.assert_close(plus[k][u0 & ~u1] - base[k].double()[u0 & ~u1], lam * d[0][u0 & ~u1],
                               rtol=1e-12, atol=0)


def test_chunking_does_not_change_bits():
    """The counts are summed over chunks and the write is elementwise: any chunk size,
    the same bits."""
    base, ms = _family(3, seed=1)
    for expr in ("ram(base, [m0, m1, m2])", "ramplus_tl(base, [m0, m1, m2], r=0.3, alpha=0.5)"):
        whole = _run(expr, base, ms, "float32")
        for chunk in (7, 100):
            part = _run(expr, base, ms, "float32", chunk=chunk)
            for k in whole:
                assert torch.equal(whole[k], part[k]), (expr, chunk, k)


def test_per_layer_epsilon():
    """epsilon takes per-tensor values like any merge parameter."""
    base, ms = _family(2, seed=2)
    got = _run('ram(base, [m0, m1], epsilon=where("embed", 0.03, 1e-5))', base, ms)
    emb, rest = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"
    _close({emb: got[emb]}, {emb: ref_ram(base, ms, 0.03)[emb]}, 1e-12)
    _close({rest: got[rest]}, {rest: ref_ram(base, ms, 1e-5)[rest]}, 1e-12)


@pytest.mark.parametrize("expr,cls,caret,words", [
    ("ram(base, [m0], epsilon=-1)", AlgTypeError, "-1", "at least 0"),
    ("ramplus_tl(base, [m0], alpha=-0.5)", AlgTypeError, "-0.5", "at least 0"),
    ("ram(base, [m0, 2])", AlgTypeError, "[m0, 2]", "List[Checkpoint]"),
    ("ram(base, [])", AlgTypeError, "[]", "at least 1"),
    ("ram(base, [other])", AlgShapeError, None, "same tensors"),
])
def test_errors_are_positioned(expr, cls, caret, words):
    base, ms = _family(1)
    other = {k: v for k, v in base.items() if "embed" not in k}
    with pytest.raises(AlgError) as info:
        Interpreter(device="cpu").eval(expr, base=base, m0=ms[0], other=other)
    err = info.value
    assert isinstance(err, cls), err.format()
    assert words in str(err), err.format()
    if caret is not None:
        assert err.span is not None and err.span.text() == caret, err.format()


def test_descriptions_in_alg_syntax():
    base, ms = _family(2)
    interp = Interpreter(device="cpu")
    cases = {"ram(base, [m0, m1])": 'ram(load("base"), [load("m0"), load("m1")])',
             "ramplus_tl(base, [m0, m1], r=0.3)": 'ramplus_tl(load("base"), [load("m0"), load("m1")], r=0.3)',
             "ram(base, [m0], epsilon=0.001)": 'ram(load("base"), [load("m0")], epsilon=0.001)'}
    for expr, want in cases.items():
        assert interp.eval(expr, base=base, m0=ms[0], m1=ms[1]).model.node.describe() == want
