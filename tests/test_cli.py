"""The command line, run as a subprocess (`python -m algebra` is the `alg` script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from algebra.cli import main
from algebra.resources import examples_dir

ALG = [sys.executable, "-m", "algebra"]


def alg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*ALG, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, family) -> Path:
    """A folder laid out like the demo: recipes beside models/{sft,math,rm,rl1,rl2}."""
    root = tmp_path_factory.mktemp("cli")
    (root / "models").mkdir()
    for ours, theirs in (("sft", "base"), ("math", "math"), ("rm", "rm"), ("rl1", "rl1"), ("rl2", "rl2")):
        (root / "models" / ours).symlink_to(family[theirs])
    for recipe in ("dogerm.alg", "warp.alg"):
        shutil.copyfile(examples_dir() / recipe, root / recipe)
    return root


def test_run_example_with_set(ws, read):
    r = alg("run", "dogerm.alg", "--set", "lam=0.5", "--device", "cpu", cwd=ws)
    assert r.returncode == 0, r.stderr
    out = ws / "out" / "dogerm-0.5"
    assert "wrote out/dogerm-0.5" in r.stdout
    assert "LlamaForSequenceClassification" in r.stdout  # info(rm)
    rm, lm, got = read(ws / "models" / "rm"), read(ws / "models" / "math"), read(out)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[name].double(), 0.5 * rm[name].double() + 0.5 * lm[name].double(),
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(got["score.weight"], rm["score.weight"])


def test_run_warp_example(ws):
    r = alg("run", "warp.alg", cwd=ws)
    assert r.returncode == 0, r.stderr
    for name in ("warp-iter1", "warp-eta0.5", "ema-anchor"):
        assert (ws / "out" / name / "model.safetensors.index.json").is_file()
        assert f"wrote out/{name}" in r.stdout


def test_check_and_plan_read_no_weights(ws, tmp_path):
    """A checkpoint whose every weight is NaN has valid headers: check and plan pass, run
    fails on the first non-finite value. So check and plan never look at a weight."""
    nan = tmp_path / "models" / "nan"
    nan.mkdir(parents=True)
    state = load_file(ws / "models" / "sft" / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, nan / "model.safetensors")
    shutil.copyfile(ws / "models" / "sft" / "config.json", nan / "config.json")
    (tmp_path / "r.alg").write_text('save(lerp(load("models/nan"), load("models/nan"), 0.5), "out")\n')
    r = alg("check", "r.alg", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "r.alg: ok (1 save)", r.stdout + r.stderr
    r = alg("plan", "r.alg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "predicted peak working memory" in r.stdout and "write   model.norm.weight" in r.stdout
    r = alg("run", "r.alg", cwd=tmp_path)
    assert r.returncode == 1
    assert "r.alg:1:1: error: tensor" in r.stderr and "is not finite" in r.stderr
    assert "holds nan" in r.stderr
    assert not (tmp_path / "out").exists()


def test_plan_verbose_lists_every_step(ws):
    short = alg("plan", "warp.alg", cwd=ws)
    full = alg("plan", "warp.alg", "--verbose", cwd=ws)
    assert short.returncode == full.returncode == 0
    assert "more steps (alg plan --verbose shows all)" in short.stdout
    assert "more steps" not in full.stdout
    assert full.stdout.count("reduce  slerp layer") == 2 * 2  # two saves slerp two layers each


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required"),
        (["run"], "the following arguments are required: file"),
        (["run", "missing.alg"], "no such recipe file: 'missing.alg'"),
        (["run", "dogerm.alg", "--set", "lam"], "--set expects name=value"),
        (["run", "dogerm.alg", "--set", "lamda=0.5"], "--set lamda: the recipe has no name 'lamda'"),
        (["run", "dogerm.alg", "--chunk", "0"], "--chunk must be a positive"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(ws, args, message):
    r = alg(*args, cwd=ws)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_unavailable_is_a_user_error(ws):
    r = alg("run", "dogerm.alg", "--device", "cuda", "--set", "lam=0.7", cwd=ws)
    assert r.returncode == 1
    assert "CUDA is not available" in r.stderr
    assert not (ws / "out" / "dogerm-0.7").exists()


def test_set_string_value_and_float64(ws, read):
    recipe = ws / "param.alg"
    recipe.write_text('src = "models/math"\nt = 0.25\nsave(lerp(load("models/sft"), load(src), t), "out/param", overwrite=true)\n')
    r = alg("run", "param.alg", "--set", "src=models/rl1", "--set", "t=0.75", "--float64", cwd=ws)
    assert r.returncode == 0, r.stderr
    a, b, got = read(ws / "models" / "sft"), read(ws / "models" / "rl1"), read(ws / "out" / "param")
    for name in ("model.norm.weight", "lm_head.weight"):
        ref = (0.25 * a[name].double() + 0.75 * b[name].double()).float()
        assert torch.equal(got[name], ref)  # float64 compute, rounded once to float32


def example_commands() -> list[list[str]]:
    """The `alg ...` command lines in the examples' comments, in file order."""
    found = []
    for recipe in sorted(examples_dir().glob("*.alg")):
        for line in recipe.read_text().splitlines():
            words = line.lstrip("#").split("#")[0].split()
            if line.startswith("#") and words[:1] == ["alg"]:
                found.append(words[1:])
    return found


def test_demo_command_and_the_examples_commands(tmp_path, monkeypatch):
    """`alg demo`, then every command the examples' comments show, as typed in the folder
    where the demo ran (the repository root, for a user who follows them)."""
    r = alg("demo", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dogerm-0.3: LlamaForSequenceClassification" in r.stdout
    assert r.stdout.count("loads in transformers") == 4
    demo = tmp_path / "alg-demo"
    config = json.loads((demo / "out" / "warp-iter1" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    # the reward half: the combined reward scored and evaluated, and the DogeRM sweep
    out = demo / "out"
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(row["reward"], float) for row in rows)
    assert "RewardBench score" in r.stdout
    sweep = json.loads((out / "dogerm_sweep.json").read_text())
    assert [row["x"] for row in sweep["results"]] == [round(0.1 * i, 12) for i in range(11)]
    assert (out / "dogerm_sweep.png").read_bytes()[:4] == b"\x89PNG"

    # in this process, to save start-ups; `alg run X` is checked (`alg check X`: every
    # path, type and shape; the demo ran each recipe)
    commands = example_commands()
    assert ["run", "alg-demo/rewards.alg"] in commands and len(commands) >= 8
    shutil.rmtree(out)  # outputs are written afresh
    monkeypatch.chdir(tmp_path)
    for args in commands:
        if args != ["demo"]:
            assert main(["check", *args[1:]] if args[0] == "run" else args) == 0, args
    assert (out / "r.jsonl").is_file()  # alg score ran
