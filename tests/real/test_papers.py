"""The papers' examples (examples/papers/, docs/papers.md) at a reduced size on the real
tier: each driver runs its recipe(s) end to end, and the outputs are checked for form and
against what can be recomputed independently (the base RM's accuracy at lam = 0; the
raw-sum best-of-n choice; the AND judge's counts)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
PAPERS = REPO / "examples" / "papers"
PNG = b"\x89PNG\r\n\x1a\n"


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_recipes_check(real, tmp_path):
    _run(PAPERS / "dogerm" / "run.py", "--verb", "check", "--out", str(tmp_path / "d"))
    _run(PAPERS / "transform" / "run.py", "--check", "--out", str(tmp_path / "t"))


def test_dogerm_sweep_reduced(real, real_tok, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    rows = _rows(PAPERS / "dogerm" / "pairs.jsonl")
    small = [r for r in rows if r["subset"] == "math"][:2] + [r for r in rows if r["subset"] == "general"][:2]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in small))
    out = tmp_path / "out"
    _run(PAPERS / "dogerm" / "run.py", "--step", "1", "--data", str(data), "--out", str(out), "--", "--quiet")
    assert (out / "sweep.png").read_bytes().startswith(PNG) and (out / "margin.png").read_bytes().startswith(PNG)
    sweep = json.loads((out / "sweep.json").read_text())
    text = json.dumps(sweep)
    assert '"math"' in text and '"general"' in text
    # results to commit name the tier's models without this machine's paths
    assert str(real["rm"].parent) not in text and "<real-tier>/rm" in text and "<real-tier>/ft1" in text

    # lam = 0 is the reward model itself: its accuracy, recomputed here with transformers
    # (chat template, no special tokens added, the logit at the last token), must be the
    # sweep's first point
    rm = AutoModelForSequenceClassification.from_pretrained(real["rm"], dtype=torch.float32).eval()

    def score(prompt: str, answer: str) -> float:
        t = real_tok.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": answer}], tokenize=False)
        ids = real_tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return float(rm(input_ids=ids).logits[0, 0])

    correct = [score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in small]
    points = sweep["results"]
    assert [p["x"] for p in points] == [0, 1] and sweep["xlabel"] == "lam"
    assert set(points[0]["subsets"]) == {"math", "general"}
    assert math.isclose(points[0]["accuracy"], sum(correct) / len(correct))
    for p in points:
        assert 0.0 <= p["accuracy"] <= 1.0


def test_transform_best_of_n_reduced(real, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(_rows_text(PAPERS / "transform" / "prompts.jsonl")[:3]))
    out = tmp_path / "out"
    _run(PAPERS / "transform" / "run.py", "--n", "2", "--n-refs", "2", "--tokens", "16",
         "--prompts", str(prompts), "--out", str(out), "--", "--quiet")
    cands = _rows(out / "candidates.jsonl")
    base = {r["prompt"]: r for r in _rows(out / "base_sample.jsonl")}
    assert len(cands) == 6 and len(base) == 3
    for r in cands:
        assert {"prompt", "response", "reward", "help", "brev"} <= set(r)
        # the LSC sum of two log-sigmoids is negative
        assert r["reward"] < 0 and math.isfinite(r["help"]) and math.isfinite(r["brev"])
    by: dict[str, list[dict]] = {}
    for r in cands:
        by.setdefault(r["prompt"], []).append(r)
    raw = _rows(out / "select_raw.jsonl")
    lsc = _rows(out / "select_lsc.jsonl")
    assert [r["prompt"] for r in raw] == list(by) == [r["prompt"] for r in lsc]
    for sel_raw, sel_lsc, (_p, rows) in zip(raw, lsc, by.items(), strict=True):
        assert sel_raw["response"] == max(rows, key=lambda r: r["help"] + r["brev"])["response"]
        assert sel_lsc["response"] == max(rows, key=lambda r: r["reward"])["response"]
    summary = json.loads((out / "summary.json").read_text())
    for f in out.glob("*.json"):
        assert str(real["rm"].parent) not in f.read_text(), f
    assert "<real-tier>/rm" in (out / "winrate_raw_help.json").read_text()
    assert (out / "winrate.png").read_bytes().startswith(PNG)
    for s, sel in (("raw", raw), ("lsc", lsc)):
        e = summary["selections"][s]
        for j in ("help", "brev", "and"):
            assert e[j]["prompts"] == 3 and e[j]["wins"] + e[j]["ties"] + e[j]["losses"] == 3
            lo, hi = e[j]["ci95"]  # Wilson: at 0 or 1 the bound equals the rate up to rounding
            assert 0.0 <= lo <= e[j]["winrate"] + 1e-12 and e[j]["winrate"] - 1e-12 <= hi <= 1.0
        # the AND judge, recounted from the scores: a win when both rewards are strictly better
        chosen = {r["prompt"]: next(c for c in by[r["prompt"]] if c["response"] == r["response"]) for r in sel}
        wins = sum(all(c[j] > base[p][j] for j in ("help", "brev")) for p, c in chosen.items())
        assert e["and"]["wins"] == wins and e["and"]["winrate"] == wins / 3


def _rows_text(path: Path) -> list[str]:
    return [line + "\n" for line in path.read_text().splitlines() if line.strip()]
