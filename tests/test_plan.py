"""plan: deterministic order, reductions placed where the policy says, predicted memory
that does not grow with model size, and a measured peak within the prediction.

    per-layer slerp                         per-model slerp
    reduce layer 0 ─▶ write layer 0 ...     reduce model ─▶ write every tensor
    reduce layer 1 ─▶ write layer 1 ...
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from algebra import memwatch
from algebra.check import Checker
from algebra.lower import group_key
from algebra.options import Options
from algebra.parser import parse
from algebra.plan import format_plan, plan_save, plan_tensors

GOLDEN = Path(__file__).parent / "golden" / "plans"


def _sinks(text: str, base: Path, **opts):
    ck = Checker(Options(device="cpu", **opts), base, mode="eval")
    return ck.check(parse(text)).sinks


def _model(text: str, base: Path):
    ck = Checker(Options(device="cpu"), base, mode="eval")
    return ck.check(parse(text)).result


def test_per_layer_reduces_each_layer_before_its_writes(family):
    m = _model(f'slerp([load("{family["rl1"]}"), load("{family["rl2"]}")], base=load("{family["base"]}"))',
               family["base"].parent)
    tp = plan_tensors(m, Options(device="cpu"))
    seen_reductions: set[str] = set()
    for step in tp.steps:
        if step.kind == "reduce":
            seen_reductions.add(step.gram.label)
        else:
            key = group_key(step.out.name, "layer")
            label = "slerp " + (f"layer {key[1]}" if key[0] == "layer" else key[1])
            assert label in seen_reductions, (step.out.name, label)
    n_layers = 2
    groups = {group_key(n, "layer") for n in m.type.tensors}
    assert sum(1 for s in tp.steps if s.kind == "reduce") == len(groups)
    assert sum(1 for g in groups if g[0] == "layer") == n_layers
    # reductions are interleaved with writes, not all hoisted to the front
    kinds = "".join("r" if s.kind == "reduce" else "w" for s in tp.steps)
    assert kinds.index("w") < kinds.rindex("r")


def test_per_model_is_one_reduction_first(family):
    m = _model(f'slerp([load("{family["rl1"]}"), load("{family["rl2"]}"), load("{family["math"]}")], '
               f'base=load("{family["base"]}"), per="model")', family["base"].parent)
    tp = plan_tensors(m, Options(device="cpu"))
    kinds = [s.kind for s in tp.steps]
    # fold of three models: two model-wide reductions (the second needs the first), then writes
    assert kinds[:2] == ["reduce", "reduce"] and set(kinds[2:]) == {"write"}
    assert tp.steps[1].gram.deps == (tp.steps[0].gram,)


def test_plan_is_deterministic_and_golden(family, tmp_path):
    text = (f'init = load("{family["base"]}")\n'
            f'save(liti(init, slerp([load("{family["rl1"]}"), load("{family["rl2"]}")], base=init), 0.3), "out")')
    plans = []
    for _ in range(2):
        (sink,) = _sinks(text, tmp_path)
        plans.append(format_plan(plan_save(sink.value, Options(device="cpu")), verbose=True))
    assert plans[0] == plans[1]
    got = plans[0].replace(str(family["base"].parent), "<family>").replace(str(tmp_path), "<out>") + "\n"
    golden = GOLDEN / "warp_iteration.plan"
    if os.environ.get("ALG_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got)
    assert got == golden.read_text()


def test_predicted_peak_does_not_grow_with_model_size(family, tmp_path):
    from algebra.tiny import build_family

    big = build_family(tmp_path / "big", hidden=128, layers=4, names=("base", "math"))
    opts = Options(device="cpu", chunk_elems=1024)
    peaks = []
    for fam in (family, big):
        m = _model(f'lerp(load("{fam["base"]}"), load("{fam["math"]}"), 0.3)', tmp_path)
        tp = plan_tensors(m, opts)
        peaks.append(tp.peak_bytes)
        assert tp.peak_bytes < tp.nbytes / 10
    assert peaks[0] == peaks[1]
    # and it scales with the chunk instead
    m = _model(f'lerp(load("{big["base"]}"), load("{big["math"]}"), 0.3)', tmp_path)
    assert plan_tensors(m, Options(device="cpu", chunk_elems=4096)).peak_bytes == 4 * peaks[1]


def _synthetic(folder: Path, n_tensors: int, rows: int, seed: int) -> None:
    """A checkpoint of n_tensors float32 [rows, 1024] tensors, written tensor by tensor."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({f"layers.{i}.w": torch.randn(rows, 1024, generator=g) for i in range(n_tensors)},
              folder / "model.safetensors")


RECIPES = {
    "lerp": 'save(lerp(load("a"), load("b"), 0.3), "out", overwrite=true)\n',
    # exact top-k selection (radix passes over 16 chunks per tensor), then tv_combine
    "ties": 'save(ties(load("c"), [load("a"), load("b")], 0.5, 0.5), "out", overwrite=true)\n',
}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.slow  # measures a subprocess on 256 MB checkpoints: the slow tier
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_measured_peak_within_prediction_and_flat_in_model_size(tmp_path, method):
    """Run `alg run` as a subprocess on a 64 MB and a 256 MB set of checkpoints and sample
    its anonymous RSS (after one unmeasured run: a fresh installation's first TIES run
    also compiles numba's kernels, once, which is not the merge's working memory). Over the baseline of `alg plan` on the same recipe in a process
    that imports what a run imports (nothing computed), the run must stay within the planned working memory plus a small
    allowance for the allocator, and must not grow with the model."""
    chunk = 1 << 18  # 1 MiB chunks in float32
    results = {}
    for label, n, rows in (("small", 4, 4096), ("large", 16, 4096)):
        root = tmp_path / label
        _synthetic(root / "a", n, rows, 1)
        _synthetic(root / "b", n, rows, 2)
        _synthetic(root / "c", n, rows, 3)
        recipe = root / "r.alg"
        recipe.write_text(RECIPES[method])
        cmd = [sys.executable, "-m", "algebra"]
        if label == "small":  # compile (and cache) what the run compiles on first use: numba's kernels
            warm = subprocess.run([*cmd, "run", str(recipe), "--chunk", str(chunk), "--device", "cpu"],
                                  capture_output=True, text=True)
            assert warm.returncode == 0, warm.stderr
        base = memwatch.run(memwatch.with_run_imports(["plan", str(recipe), "--chunk", str(chunk)],
                                                      compiled=method == "ties"))
        assert base.returncode == 0, base.stderr
        run = memwatch.run([*cmd, "run", str(recipe), "--chunk", str(chunk), "--device", "cpu"])
        assert run.returncode == 0, run.stderr
        (sink,) = _sinks(recipe.read_text(), root)
        predicted = plan_save(sink.value, Options(device="cpu", chunk_elems=chunk)).peak_bytes
        results[label] = (run.peak_anon - base.peak_anon, predicted, n * rows * 1024 * 4)
    allowance = 24 << 20
    for label, (growth, predicted, model_bytes) in results.items():
        assert growth <= predicted + allowance, (label, growth, predicted)
        assert growth < model_bytes / 4, (label, growth, model_bytes)
    # four times the model, (almost) the same memory
    assert results["large"][0] - results["small"][0] < 16 << 20, results
