"""examples/warp_loop.py at toy size: M=2 GRPO runs of one step each, I=2, on the tiny
policy and reward model; alg's EMA anchor, WARP merge and front checked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("warp_loop", ROOT / "examples" / "warp_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # about 90 s: four GRPO steps, two merges and a front (CI runs the slow tier)
def test_warp_loop_runs_end_to_end(rms, tmp_path, read):
    pytest.importorskip("trl")
    out = tmp_path / "warp"
    s = _module().main(["--sft", str(rms["policy"]), "--rm", str(rms["rm-helpful"]), "--out", str(out),
                        "--m", "2", "--iterations", "2", "--steps", "1", "--completion-length", "4",
                        "--lr", "1e-3", "--front", "0,1", "--front-samples", "2"])
    assert len(s["iterations"]) == 2
    for it in s["iterations"]:
        assert [r["anchor_updates"] for r in it["runs"]] == [1, 1]  # alg's EMA ran after each step
    # each iteration's init is alg's WARP merge of its runs: LITI toward their SLERP; with
    # eta = 0.3 it lies strictly between the old init and the runs' merge, tensor by tensor
    it = s["iterations"][0]
    init, nxt = read(Path(it["init"])), read(Path(it["next_init"]))
    runs = [read(Path(r["policy"])) for r in it["runs"]]
    name = "model.layers.0.mlp.down_proj.weight"
    moved = (nxt[name].double() - init[name].double()).norm()
    full = max((r[name].double() - init[name].double()).norm() for r in runs)
    assert 0 < moved < full
    assert s["iterations"][1]["init"] == it["next_init"]
    front = json.loads((out / "front.json").read_text())
    assert [r["x"] for r in front["results"]] == [0.0, 1.0] and front["xlabel"] == "eta"
    assert all(r["kl"] == r["kl"] and r["reward"] == r["reward"] for r in front["results"])  # not nan
    assert not list(out.glob("iter*/.trl-*"))  # the trainers' scratch folders are removed
    assert (out / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert torch.isfinite(nxt[name]).all()
