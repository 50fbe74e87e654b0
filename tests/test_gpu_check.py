"""benchmarks/gpu_check.py on this machine, at toy size, and a device this machine lacks.

On a machine without CUDA the script must skip its GPU parts with one clear line, still
run its CPU-side comparisons (merges at two chunk sizes, lerp against float64, the draws
against the documented formula, alg's scores against a plain transformers pass), and
exit 0. Asking for CUDA where there is none is an AlgError, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algebra import AlgError, Interpreter, Options

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
MERGES = ("lerp", "linear", "task_arithmetic", "ties", "dare_ties", "della")
NO_CUDA = not torch.cuda.is_available()


def test_gpu_check_runs_its_cpu_parts(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--dir", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    res = json.loads(out.read_text())
    checks = {c["check"]: c for c in res["checks"]}
    if NO_CUDA:
        assert res["gpu"] is False and res["skipped"].startswith("SKIP GPU:")
        assert p.stdout.count("SKIP GPU:") >= 1 and res["skipped"] in p.stdout
        assert res["timings"] == []
        assert not any("cuda" in name for name in checks)
    else:
        assert res["gpu"] is True and res["skipped"] is None and res["timings"]
    # the CPU-side comparisons ran, over every element, and passed (the chunk-size
    # comparison stands in for the GPU one where there is no GPU)
    n = res["inputs"]["params"]
    for m in MERGES:
        row = checks[f"{m}: cpu vs cpu chunk=4096" if NO_CUDA else f"{m}: {res['device'].split(': ')[0]} vs cpu"]
        assert row["ok"] and row["elements"] == n and row["differing"] == 0
        assert row["tensors"] == 21  # 2 layers x 9 + embedding, norm, head
        assert ("at_base_differing" in row) == (m in ("ties", "dare_ties", "della"))
    lerp = checks["lerp: cpu vs float64 reference"]
    assert lerp["ok"] and 0 < lerp["max_rel_err"] <= 4 * torch.finfo(torch.float32).eps
    draws = checks["draws: cpu vs documented formula"]
    assert draws["ok"] and draws["elements"] == 8192 and draws["differing"] == 0
    scores = checks["scores: alg cpu float32 vs transformers float32"]
    assert scores["ok"] and scores["texts"] == 12 and scores["max_abs_diff"] <= 1e-4
    assert res["ok"] is True


def _tiny(folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({"w": torch.ones(4, 4)}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_a_missing_cuda_device_is_an_alg_error(tmp_path):
    _tiny(tmp_path / "a")
    # the API: a run on cuda, and a Result computed onto a device by name
    with pytest.raises(AlgError, match="CUDA is not available"):
        Interpreter(options=Options(device="cuda"), base_dir=tmp_path).eval('save(load("a"), "o")')
    r = Interpreter(options=Options(device="cpu"), base_dir=tmp_path).eval('load("a") * 2')
    for dev in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(AlgError, match="CUDA is not available"):
            r.state_dict(device=dev)
    with pytest.raises(AlgError, match="'gpu' is not a device"):
        r.state_dict(device="gpu")
    assert torch.equal(r.state_dict(device="cpu")["w"], torch.full((4, 4), 2.0))
    # the CLI: a message and exit status 1, no traceback
    (tmp_path / "r.alg").write_text('save(load("a"), "o")\n')
    p = subprocess.run([sys.executable, "-m", "algebra", "run", "r.alg", "--device", "cuda"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "CUDA is not available" in p.stderr and "Traceback" not in p.stderr
