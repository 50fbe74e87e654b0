"""The windowed selection (methods/select.py `_window_select`): a sample brackets each
rank-k key, one pass counts above the window and records its distinct keys per chunk.
On the tiny test checkpoints it is forced by lowering the sample thresholds; its (t, J)
must equal the float64 stable-sort reference exactly (bf16 data: many ties), and when
the window misses (a zero-width window) or overflows its budget, the radix passes must
give the same answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_folder
from test_methods_sparse import (  # noqa: F401
    F64,
    _close,
    _run,
    check_ranks,
    crumbs,
    f64,
    top,
    top_k_mask,
    tv_reference,
)

from algebra import api
from algebra.execute import new_evaluator
from algebra.lower import Lowerer, lin
from algebra.methods import select
from algebra.methods.select import OfNonzero, Select
from algebra.ops.sparse import top_mask
from algebra.options import Options
from algebra.plan import plan_tensors


@pytest.fixture
def windowed(monkeypatch):
    """Every streamed tensor of 16+ elements takes the window; counts its outcomes."""
    monkeypatch.setattr(select, "SAMPLE_MIN", 4)
    monkeypatch.setattr(select, "SAMPLE_SHARE", 4)
    monkeypatch.setattr(select, "WINDOW_SIGMAS", 2.0)  # narrower: tiny chunks, tiny budgets
    seen = {"window": 0, "resolved": 0, "radix": 0}
    real_window, real_collect = select._window_select, select._collect

    def window(sel, ev, spans, ranks, *a):
        seen["window"] += 1
        real_window(sel, ev, spans, ranks, *a)
        seen["resolved"] += sum(r.result is not None for r in ranks)

    monkeypatch.setattr(select, "_window_select", window)
    monkeypatch.setattr(select, "_collect", lambda *a: seen.__setitem__("radix", seen["radix"] + 1) or real_collect(*a))
    return seen


def _check_ranks(family_bf16, chunk: int, ks_of) -> tuple[int, int]:
    return check_ranks(family_bf16, chunk, ks_of, min_numel=16)


@pytest.mark.parametrize("chunk", [333, 2000])
def test_window_keeps_exactly_k_lowest_index_first(family_bf16, windowed, chunk):
    streamed, tied = _check_ranks(family_bf16, chunk, lambda n: (1, n // 3, n // 2, n - 1))
    assert streamed and windowed["window"] == streamed
    assert windowed["resolved"] > 0  # found there (tiny tensors overflow the budget of a tiny chunk more often)
    assert tied > 0  # the data really had ties at the thresholds


@pytest.mark.parametrize("threads", [2, 3])
def test_window_split_between_threads_keeps_exactly_k(family_bf16, windowed, monkeypatch, threads):
    """The window pass's compiled count over a chunk split between threads
    (ops.sparse.SPLIT_MIN lowered so that test chunks split): the same exact (t, J)."""
    from algebra import runconfig
    from algebra.ops import kernels, sparse

    monkeypatch.setattr(sparse, "SPLIT_MIN", 8)
    compiled = []  # the float32 CPU run counts |m - base| in ops.kernels.window_count
    count = kernels.window_count
    monkeypatch.setattr(kernels, "window_count", lambda *a: compiled.append(1) or count(*a))
    n = torch.get_num_threads()
    resolved = []
    try:
        for t in (1, threads):  # and the window finds as many there as on one thread
            monkeypatch.setattr(runconfig, "auto_threads", lambda t=t: t)  # what the evaluator sets
            windowed["resolved"] = 0
            streamed, tied = _check_ranks(family_bf16, 2000, lambda n: (1, n // 3, n // 2, n - 1))
            resolved.append(windowed["resolved"])
    finally:
        torch.set_num_threads(n)
    assert streamed and resolved[0] > 0 and tied > 0 and compiled
    assert resolved[1] == resolved[0]


def test_window_samples_and_cuts_bf16_inputs_as_stored(family_bf16, windowed, monkeypatch):
    """With bfloat16 inputs the sample is read from the stored tensors and the tie cuts
    are found by a scan that stops at the cut (ops.kernels.sample_keys, nth_key): the
    same exact (t, J), and no input chunk evaluated for either."""
    from algebra.ops import kernels

    used = {"sample_keys": 0, "nth_key": 0}
    for name in used:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, name=name, real=real: used.__setitem__(name, used[name] + 1)
                            or real(*a))
    inside, evaluated = [False], []  # _keys (which evaluates the inputs) called inside the window pass

    def window(*a, real=select._window_select):
        inside[0] = True
        try:
            real(*a)
        finally:
            inside[0] = False

    monkeypatch.setattr(select, "_window_select", window)
    monkeypatch.setattr(select, "_keys", lambda *a, real=select._keys: evaluated.append(inside[0]) or real(*a))
    streamed, tied = _check_ranks(family_bf16, 333, lambda n: (1, n // 3, n // 2, n - 1))
    assert streamed and windowed["resolved"] > 0 and tied > 0
    assert used["sample_keys"] > 0 and used["nth_key"] > 0
    assert not any(evaluated)


def test_window_misses_fall_back_to_the_radix_passes(family_bf16, windowed, monkeypatch):
    monkeypatch.setattr(select, "WINDOW_SIGMAS", -1.0)  # an empty-ish window: most ranks miss
    streamed, _ = _check_ranks(family_bf16, 333, lambda n: (n // 3, n // 2))
    assert windowed["resolved"] < 2 * streamed and windowed["radix"] > 0


def test_window_over_budget_falls_back(family_bf16, windowed, monkeypatch):
    monkeypatch.setattr(select, "WINDOW_SIGMAS", 1e9)  # every key in the window: over a chunk's worth
    streamed, _ = _check_ranks(family_bf16, 333, lambda n: (n // 2,))
    assert windowed["resolved"] == 0 and streamed > 0


@pytest.mark.parametrize("chunk", [2000, 1000])
def test_merges_through_the_window_match_the_references(family, f64, windowed, chunk):  # noqa: F811
    out = _run(family, "ties(b, [m1, m2], [1, 0.6], [0.3, 0.5])", chunk_elems=chunk, **F64)
    sps = [top(0.3), top(0.5)]
    _close(out, tv_reference(f64, lambda n, i, d, s: sps[i](n, i, d, s), [1, 0.6], "sum", True))
    out = _run(family, "breadcrumbs_ties(b, [m1, m2], 1, 0.4, gamma=0.1)", chunk_elems=chunk, **F64)
    _close(out, tv_reference(f64, crumbs(0.4, 0.1), [1, 1], "sum", True))
    assert windowed["window"] > 0 and windowed["resolved"] > 0


def test_sce_variance_rank_through_the_window(family, windowed):
    """SCE's rank is a fraction of the nonzero variances, known only after the pass."""
    from algebra.methods.select import _radix_select

    models = api.check(api.parse("\n".join(f'load("{family[n]}")' for n in ("base", "math", "rl1"))
                                 .replace("\n", ", ").join("[]"))).result
    low = Lowerer()
    ev = new_evaluator(Options(device="cpu", compute_dtype="float64"))
    t = {n: read_folder(family[n]) for n in ("base", "math", "rl1")}
    name = max((k for k, s in models[0].type.tensors.items() if s.is_float), key=lambda k: models[0].type.tensors[k].numel)
    ds = tuple(lin([(1.0, low.tensor(m.node, name)), (-1.0, low.tensor(models[0].node, name))]) for m in models[1:])
    sel = Select(ds, (("var", -1),), ((OfNonzero(0.4),),), name)
    t_, cut = _radix_select(sel, ev, 500)
    b = t["base"][name].double().flatten()
    x = [t[m][name].double().flatten() - b for m in ("math", "rl1")]
    mean = (x[0] + x[1]) / 2
    var = ((x[0] - mean) ** 2 + (x[1] - mean) ** 2) / 2
    k = int(int((var != 0).sum()) * 0.4)
    keep = top_mask(var, t_, cut, 0)
    assert np.array_equal(keep.numpy(), top_k_mask(var.numpy(), k))
    assert windowed["window"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["top", "window", "dare", "none"])
@pytest.mark.parametrize("consensus", ["sum", "none", "sce"])
def test_tv_combine_from_the_models_equals_the_lin_form_bit_for_bit(kind, consensus, dtype):
    """`with_base`: tv_combine reads the base and the models and forms d_i and
    base + scale * merged itself; it must give the bits of the Lin form (d_i from
    1.0 * m_i + (-1.0) * base, then 1.0 * base + scale * tv_combine(d_i)), -0.0 included."""
    from algebra.ops.sparse import Combine, Sparsify, tv_combine

    g = torch.Generator().manual_seed(3)
    n, e0 = 4096, 1000
    base = torch.randn(n, generator=g, dtype=dtype)
    base[:64] = -0.0  # signed zeros in the base: the result's zero signs must agree too
    ms = [(base + torch.randn(n, generator=g, dtype=dtype) * 0.01).to(torch.bfloat16).to(dtype) for _ in range(2)]
    ms[0][:32] = base[:32]  # zero task-vector entries
    mags = [(m - base).abs() for m in ms]
    vals: list = []
    sps = []
    for mag in mags:
        t = float(mag.kthvalue(n // 2).values)
        if kind == "top":
            vals += [t, float(e0 + n // 3)]  # ties at t cut a third of the way in
        elif kind == "window":
            vals += [float(mag.kthvalue(n - 40).values), float(e0 + n), t, float(e0 + n)]
        sps.append(Sparsify(kind, 0.4, key=(7, 9)) if kind == "dare" else Sparsify(kind))
    weights = [0.7, -0.3] if consensus != "sce" else [0.6, 0.4]
    spec = dict(n=2, sparsify=tuple(sps), consensus=consensus, normalize=True, row=64)
    scale = 0.9

    def lin_delta(m):
        acc = torch.mul(m, 1.0)
        return acc.add_(base, alpha=-1.0)

    merged = tv_combine(*[lin_delta(m) for m in ms], Combine(**spec), *weights, *vals, e0=e0)
    expected = torch.mul(base, 1.0).add_(merged, alpha=scale)
    got = tv_combine(base, *ms, Combine(**spec, with_base=True), scale, *weights, *vals, e0=e0)
    assert torch.equal(got.view(torch.int64 if dtype == torch.float64 else torch.int32),
                       expected.view(torch.int64 if dtype == torch.float64 else torch.int32))


def _tv_combine_before(ds, spec, weights, vals, e0):
    """tv_combine as it was before the pooled rewrite (commit 61ca607), for top, window,
    dare and none sparsifiers: fresh tensors, sums from zero. The pooled one must give
    the same bits."""
    from algebra.ops.sparse import draws, keep_threshold, population_var

    parts, pos = [], 0
    for i, (d, sp) in enumerate(zip(ds, spec.sparsify, strict=True)):
        mine = vals[pos : pos + sp.nvals]
        pos += sp.nvals
        if sp.kind == "none":
            x = d.clone()
        elif sp.kind in ("top", "window"):
            mag = d.abs()
            keep = top_mask(mag, mine[-2], mine[-1], e0)
            if sp.kind == "window":
                drop = top_mask(mag, mine[0], mine[1], e0)
                if drop is not None:
                    keep = ~drop if keep is None else keep.logical_and_(~drop)
            x = d.clone() if keep is None else torch.where(keep, d, 0.0)
        else:
            x = torch.where(draws(e0, d.numel(), sp.key, d.device) < keep_threshold(sp.density), d, 0.0).div_(sp.density)
        parts.append(x)
        if spec.consensus != "sce":
            parts[i].mul_(weights[i])
    if spec.select_var:
        keep = top_mask(population_var(parts), vals[pos], vals[pos + 1], e0)
        if keep is not None:
            for p in parts:
                p.masked_fill_(~keep, 0.0)
    if spec.consensus == "none":
        out = parts[0]
        for p in parts[1:]:
            out.add_(p)
        return out
    total = torch.zeros_like(parts[0])
    for p in parts:
        total.add_(p)
    positive = total >= 0
    out, den = torch.zeros_like(parts[0]), torch.zeros_like(parts[0])
    for i, p in enumerate(parts):
        agree = torch.where(positive, p > 0, p < 0)
        if spec.consensus == "sce":
            p.mul_(weights[i])
        out.add_(p.masked_fill_(~agree, 0.0))
        if spec.consensus == "sce" or spec.normalize:
            den.add_(agree.to(den.dtype), alpha=weights[i])
    if spec.consensus == "sce":
        return out.div_(den.clamp_(min=1e-6))
    if spec.normalize:
        den.masked_fill_(den == 0, 1.0)
        out.div_(den)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["top", "window", "dare", "none"])
@pytest.mark.parametrize(("consensus", "normalize", "select_var"),
                         [("sum", True, False), ("sum", False, False), ("none", False, False),
                          ("sce", False, False), ("sce", False, True)])
def test_pooled_tv_combine_equals_the_previous_one_bit_for_bit(kind, consensus, normalize, select_var, dtype):
    from algebra.execute import ChunkPool
    from algebra.ops.sparse import Combine, Sparsify, tv_combine

    g = torch.Generator().manual_seed(5)
    n, e0 = 3000, 700
    ds = [(torch.randn(n, generator=g, dtype=dtype) * 0.01).to(torch.bfloat16).to(dtype) for _ in range(3)]
    ds[1][:50] = 0.0
    ds[2][50:80] = -ds[0][50:80]  # opposite entries: totals of exactly zero
    vals: list = []
    sps = []
    for d in ds:
        mag = d.abs()
        t = float(mag.kthvalue(n // 2).values)
        if kind == "top":
            vals += [t, float(e0 + n // 3)]
        elif kind == "window":
            vals += [float(mag.kthvalue(n - 30).values), float(e0 + n // 2), t, float(e0 + n)]
        sps.append(Sparsify(kind, 0.6, key=(3, 4)) if kind == "dare" else Sparsify(kind))
    if select_var:
        var = sum((d - sum(ds) / 3) ** 2 for d in ds) / 3
        vals += [float(var.kthvalue(n // 3).values), float(e0 + n)]
    weights = [0.5, -0.25, 0.75]
    spec = Combine(3, tuple(sps), consensus, normalize, 64, select_var)
    pool = ChunkPool(torch.device("cpu"))
    got = tv_combine(*ds, spec, *weights, *vals, e0=e0, pool=pool)
    want = _tv_combine_before([d.clone() for d in ds], spec, weights, vals, e0)
    itype = torch.int64 if dtype == torch.float64 else torch.int32
    assert torch.equal(got.view(itype), want.view(itype))


def test_write_pass_does_not_sum_chunks_the_threshold_pass_checked(family, windowed, monkeypatch):  # noqa: F811
    """Every input chunk is checked finite once: the write pass reads again the chunks
    TIES's threshold pass read and checked, and does not sum them again; the merge is the
    same as with every chunk checked twice."""
    from algebra.execute import Evaluator

    summed, reads = [], []
    real = Evaluator.check_input

    def spy(self, leaf, x, e0):
        reads.append(1)
        before = len(self.checked)
        real(self, leaf, x, e0)
        if len(self.checked) > before:  # summed, found finite
            summed.append((id(leaf.source), leaf.name, e0, x.numel()))

    monkeypatch.setattr(Evaluator, "check_input", spy)
    once = _run(family, "ties(b, [m1, m2], [1, 0.6], 0.4)", chunk_elems=1000)
    assert summed and len(summed) == len(set(summed))
    assert len(reads) > len(summed)  # chunks read twice, summed once
    monkeypatch.setattr(Evaluator, "check_input", lambda self, leaf, x, e0: self.checked.clear() or real(self, leaf, x, e0))
    twice = _run(family, "ties(b, [m1, m2], [1, 0.6], 0.4)", chunk_elems=1000)
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)


@pytest.mark.parametrize("kind", ["nan", "-inf"])
def test_compiled_window_refuses_a_nonfinite_bf16_input_positioned(family_bf16, windowed, tmp_path, monkeypatch,
                                                                  kind):
    """The window pass reads bfloat16 inputs as stored and checks them itself: an inf or
    nan there is refused with the evaluator's own message (tensor, element, input)."""
    import shutil

    from safetensors.torch import save_file

    from algebra.errors import AlgError
    from algebra.ops import kernels

    name, element = "model.layers.1.mlp.down_proj.weight", 3001
    folder = tmp_path / "bad"
    shutil.copytree(family_bf16["math"], folder)
    state = read_folder(family_bf16["math"])
    state[name].view(-1)[element] = float(kind)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    stored, seen_bad = [], []
    count = kernels.window_count

    def spy(*a):
        got = count(*a)
        stored.append(a[0].dtype == np.uint16)
        seen_bad.append(got[2])
        return got

    monkeypatch.setattr(kernels, "window_count", spy)
    binds = f'b = load("{family_bf16["base"]}")\nm1 = load("{folder}")\nm2 = load("{family_bf16["math"]}")\n'
    model = api.check(api.parse(binds + "ties(b, [m1, m2], 1, 0.5)")).result
    options = Options(device="cpu", chunk_elems=1000)
    with pytest.raises(AlgError, match=f"tensor '{name}' of input '{folder}' is not finite at element {element}: "
                                       f"it holds {kind}"):
        api.execute(plan_tensors(model, options), options)
    assert stored and all(stored) and seen_bad[-1] == 1  # the kernel found it


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 16])
def test_nth_true_finds_the_jth_true_across_blocks(monkeypatch, block):
    """The tie cut of a one-chunk selection: the j-th True of a mask, found block by
    block, equals torch's nonzero()[j - 1] for every j, at block edges and past them."""
    from algebra.methods import select

    monkeypatch.setattr(select, "NTH_BLOCK", block)
    g = torch.Generator().manual_seed(block)
    for n in (1, 63, 64, 65, 1000):
        for p in (0.05, 0.5, 1.0):
            mask = torch.rand(n, generator=g) < p
            where = mask.nonzero().flatten().tolist()
            for j in range(1, len(where) + 1):
                assert select._nth_true(mask, j) == where[j - 1], (n, p, j)


@pytest.mark.parametrize("path", ["one chunk", "window", "radix"])
def test_order_statistics_without_cuts_equal_the_thresholds_with_them(family_bf16, windowed, monkeypatch, path):
    """`Select(cuts=False)` (arcee_fusion's quantiles) returns the same t of every score and
    rank as the full selection, in one chunk, through the window and through the radix
    passes, and looks for no tie cut (bf16 task vectors: the thresholds sit among ties)."""
    from algebra.methods.select import _radix_select

    if path == "radix":
        monkeypatch.setattr(select, "SAMPLE_MIN", 1 << 40)
    names = ("base", "math", "rl1")
    models = api.check(api.parse(", ".join(f'load("{family_bf16[n]}")' for n in names).join("[]"))).result
    low = Lowerer()
    ev = new_evaluator(Options(device="cpu", compute_dtype="float32"))
    name = max((k for k, s in models[0].type.tensors.items() if s.is_float), key=lambda k: models[0].type.tensors[k].numel)
    n = models[0].type.tensors[name].numel
    ds = tuple(lin([(1.0, low.tensor(m.node, name)), (-1.0, low.tensor(models[0].node, name))]) for m in models[1:])
    scores = (("abs", 0), ("pos", 1), ("neg", 1))
    ranks = ((1, n // 3, n // 2), (n // 4, n - 3), (2, n // 5))
    chunk = n if path == "one chunk" else 500
    calls = []  # chunk reads and tie-cut scans
    for f in ("_keys", "_nth_true", "_cut_compiled"):
        real = getattr(select, f)
        monkeypatch.setattr(select, f, lambda *a, real=real: calls.append(1) or real(*a))
    full = _radix_select(Select(ds, scores, ranks, name), ev, chunk)
    assert any(0 < j < n for j in full[1::2])  # some ties at a threshold are cut
    with_cuts = len(calls)
    calls.clear()
    only = Select(ds, scores, ranks, name, cuts=False)
    got = _radix_select(only, ev, chunk)
    assert got == full[::2] and len(got) == sum(map(len, ranks))
    assert [got[only.index(s, i)] for s, rs in enumerate(ranks) for i in range(len(rs))] == list(full[::2])
    assert len(calls) < with_cuts  # no tie cut is looked for
    assert windowed["window"] == (2 if path == "window" else 0)
