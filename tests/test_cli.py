"""The command line. Each command runs at least once as a subprocess (`python -m algebra`
is the `alg` script: `alg`); the other cases call `algebra.cli.main` in this process
(`alg_main`, tests/conftest.py), which checks the same output and exit status without a
start-up each."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import alg_main
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
    r = alg_main("run", "warp.alg", cwd=ws)
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
    r = alg_main("check", "r.alg", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "r.alg: ok (1 save)", r.stdout + r.stderr
    r = alg_main("plan", "r.alg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "predicted peak working memory" in r.stdout and "write   model.norm.weight" in r.stdout
    r = alg_main("run", "r.alg", cwd=tmp_path)
    assert r.returncode == 1
    assert "r.alg:1:1: error: tensor" in r.stderr and "is not finite" in r.stderr
    assert "holds nan" in r.stderr
    assert not (tmp_path / "out").exists()


def test_plan_verbose_lists_every_step(ws):
    short = alg("plan", "warp.alg", cwd=ws)
    full = alg_main("plan", "warp.alg", "--verbose", cwd=ws)
    assert short.returncode == full.returncode == 0
    assert "more steps (alg plan --verbose shows all)" in short.stdout
    assert "more steps" not in full.stdout
    assert full.stdout.count("reduce  slerp layer") == 2 * 2  # two saves slerp two layers each


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required"),
        (["run"], "the following arguments are required: FILE"),
        (["run", "missing.alg"], "no such recipe file: 'missing.alg'"),
        (["run", "dogerm.alg", "--set", "lam"], "--set expects name=value"),
        (["run", "dogerm.alg", "--set", "lamda=0.5"], "--set lamda: the recipe has no name 'lamda'"),
        (["run", "dogerm.alg", "--chunk", "0"], "positive number of elements"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(ws, args, message):
    r = alg_main(*args, cwd=ws)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr


LAM_LINE = (examples_dir() / "dogerm.alg").read_text().splitlines().index("lam  = 0.3") + 1
CHOICES = "the choices are cpu, cuda, cuda:N (N = 0, 1, ...) or auto"


@pytest.mark.parametrize(
    "args, lines",
    [
        # a device that is none: the choices, before anything is read
        (["run", "dogerm.alg", "--device", "tpu"], [f"alg run: error: argument --device: 'tpu' is not a device; {CHOICES}"]),
        (["plan", "dogerm.alg", "--device", "cuda:x"], [f"alg plan: error: argument --device: 'cuda:x' is not a device; {CHOICES}"]),
        (["repl", "--device", "gpu"], [f"alg repl: error: argument --device: 'gpu' is not a device; {CHOICES}"]),
        # --set: a name the recipe lacks gets the nearest one it has
        (["run", "dogerm.alg", "--set", "lamm=0.5"],
         ["alg run: error: --set lamm: the recipe has no name 'lamm'; did you mean 'lam'?"]),
        # --set: a value that is no number where the recipe's is one, said at --set
        (["check", "dogerm.alg", "--set", "lam=abc"],
         ["alg check: error: --set lam=abc: the value given with --set is not a number; the recipe's "
          "lam is a number, like --set lam=0.3", f"dogerm.alg:{LAM_LINE}:8: note: the recipe's lam", "    lam  = 0.3"]),
        (["run", "dogerm.alg", "--set", "lam=0.5.1"], ["alg run: error: --set lam=0.5.1: the value given with --set is not a number"]),
        # a folder where a file belongs
        (["run", "."], ["alg run: error: '.' is a directory, not a recipe file; it holds dogerm.alg, param.alg, warp.alg"]),
        (["convert", "mergekit", "models"], ["alg convert: error: 'models' is a directory, not a config file"]),
        # --data takes a dataset folder (tests/test_data_formats.py), but not a missing path
        (["score", "dogerm.alg", "r", "--data", "nothing-here", "--out", "o.jsonl"],
         ["alg score: error: no such data file or folder: 'nothing-here'"]),
        # options where they mean nothing
        (["repl", "--set", "x=1"], ["alg repl: error: --set: not an option of alg repl (alg run, alg check, alg plan and alg score take it)"]),
        (["demo", "--set", "lam=1"], ["alg demo: error: --set: not an option of alg demo"]),
        (["score", "dogerm.alg", "r", "--data", "d", "--out", "o", "--verbose"],
         ["alg score: error: --verbose: not an option of alg score (alg plan takes it)"]),
        (["repl", "--force"], ["alg repl: error: --force: not an option of alg repl (alg run, alg check, alg plan and alg score take it)"]),
        (["run", "dogerm.alg", "--verbose"], ["alg run: error: --verbose: not an option of alg run (alg plan takes it)"]),
        (["cache", "clear", "nope"], ["alg cache clear: error: no cache named 'nope'; the caches are hashes, scores, generations and parser"]),
    ],
)
def test_usage_errors_name_the_fix_after_their_commands_usage(ws, args, lines):
    (ws / "param.alg").touch()  # whatever test_set_string_value wrote, this folder holds it
    r = alg_main(*args, cwd=ws)
    assert r.returncode == 2, (r.returncode, r.stderr)
    command = " ".join(a for a in args[:2] if a in ("run", "check", "plan", "score", "repl", "demo", "convert", "cache", "clear"))
    assert r.stderr.startswith(f"usage: alg {command} "), r.stderr
    for line in lines:
        assert line in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_usage_errors_of_the_real_entry_point(ws):
    """The cases above run in this process; through `python -m algebra`, a usage error of
    the parser and one of alg's own reach the same exit status 2 and stderr."""
    def words(text):  # the usage is wrapped to the terminal's width, which may differ here
        return text.split()

    for args in ([], ["run", "dogerm.alg", "--device", "tpu"]):
        r = alg(*args, cwd=ws)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert words(r.stderr) == words(alg_main(*args, cwd=ws).stderr), r.stderr
    assert "'tpu' is not a device" in r.stderr and r.stderr.startswith("usage: alg run ")


@pytest.mark.parametrize(("caller", "spin"), [({}, "10000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                             ({"OMP_WAIT_POLICY": "ACTIVE"}, "None")])
def test_alg_process_shortens_openmp_spinning_before_torch_loads(caller, spin):
    """The `alg` process sets GOMP_SPINCOUNT before torch is imported (OpenMP reads it
    once, when it loads), unless the caller set it or a wait policy."""
    import os

    probe = ("import os, sys\nfrom algebra import cli\n"
             "cli.main = lambda: print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules) or 0\n"
             "sys.exit(cli.entry())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**env, **caller})
    assert (r.returncode, r.stdout.split()) == (0, [spin, "False"]), r.stderr


def test_set_value_taken_as_a_string_is_blamed_on_set(ws):
    """Where the recipe's value is computed, the type error at its use names --set."""
    (ws / "computed.alg").write_text('lam = 0.1 + 0.2\nsave(merge(load("models/rm"), load("models/math"), lam), "out/c")\n')
    r = alg_main("check", "computed.alg", "--set", "lam=abc", cwd=ws)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("usage: alg check ")
    assert ('alg check: error: --set lam=abc: the value given with --set is not a number, true/false, '
            'none or a list, so lam is the string "abc", which the recipe cannot use here') in r.stderr
    assert "computed.alg:2:52: note: argument 'lam' of merge() must be Param, not String" in r.stderr
    # a string where the recipe has a string is fine
    r = alg_main("check", "computed.alg", "--set", "lam=0.4", cwd=ws)
    assert r.returncode == 0, r.stderr


def test_check_force(ws):
    (ws / "exists.alg").write_text('save(load("models/sft"), "out/exists")\n')
    (ws / "out" / "exists").mkdir(parents=True, exist_ok=True)
    r = alg("check", "exists.alg", cwd=ws)
    assert r.returncode == 1 and "'out/exists' already exists" in r.stderr
    r = alg_main("check", "exists.alg", "--force", cwd=ws)
    assert r.returncode == 0 and r.stdout == "exists.alg: ok (1 save)\n", r.stderr


def test_help_describes_merges_rewards_and_caches(tmp_path):
    r = alg_main("--help", cwd=tmp_path)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "merge checkpoints" in text and "compose reward models" in text
    assert "$ALG_CACHE, else $XDG_CACHE_HOME/alg, else ~/.cache/alg" in text
    for command in ("run", "check", "plan", "score", "repl", "demo", "convert", "cache"):
        assert f"\n    {command} " in r.stdout


def test_options_are_those_the_command_uses():
    from algebra.cli import build_parser

    takes = {name: {o for a in p._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
             for name, p in next(a for a in build_parser()._actions if a.choices).choices.items()}
    run = {"--force", "--set", "--device", "--float64", "--chunk", "--threads"}
    bars = {"--progress", "--quiet"}  # only where there is long work to show: run and score
    assert run | bars <= takes["run"] and bars <= takes["score"]
    assert [name for name in takes if bars & takes[name]] == ["run", "score"]
    assert takes["check"] == takes["run"] - bars and takes["plan"] == takes["run"] - bars | {"--verbose"}
    assert {"--data", "--out", "--force", "--set", "--device", "--float64", "--chunk", "--threads"} <= takes["score"]
    for name in ("repl", "demo"):  # they define no recipe names and write no named output
        assert {"--device", "--float64", "--chunk", "--threads"} <= takes[name] and not {"--set", "--force"} & takes[name]
    assert [name for name in takes if "--set" in takes[name]] == ["run", "check", "plan", "score"]
    assert [name for name in takes if "--verbose" in takes[name]] == ["plan"]


def test_device_errors_from_python():
    """The same device rules reach the Python API: a bad name lists the choices."""
    from algebra.errors import AlgUsageError
    from algebra.execute import resolve_device

    with pytest.raises(AlgUsageError, match=r"'tpu' is not a device; the choices are cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(AlgUsageError, match=r"'cuda:x' is not a device"):
        resolve_device("cuda:x")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_index_past_the_devices(monkeypatch):
    """A CUDA index past the machine's devices says how many there are (no traceback)."""
    from algebra.errors import AlgIOError
    from algebra.execute import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(AlgIOError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_unavailable_is_a_user_error(ws):
    r = alg_main("run", "dogerm.alg", "--device", "cuda", "--set", "lam=0.7", cwd=ws)
    assert r.returncode == 1
    assert "CUDA is not available" in r.stderr
    assert not (ws / "out" / "dogerm-0.7").exists()


def test_set_string_value_and_float64(ws, read):
    recipe = ws / "param.alg"
    recipe.write_text('src = "models/math"\nt = 0.25\nsave(lerp(load("models/sft"), load(src), t), "out/param", overwrite=true)\n')
    r = alg_main("run", "param.alg", "--set", "src=models/rl1", "--set", "t=0.75", "--float64", cwd=ws)
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


# ---- caches ------------------------------------------------------------------------------


def test_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
    from algebra.caches import cache_dir, cache_path

    monkeypatch.setenv("ALG_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a" and cache_path("scores") == tmp_path / "a" / "rewards.sqlite"
    monkeypatch.delenv("ALG_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "alg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "alg"


def test_every_cache_user_writes_where_caches_says(monkeypatch, tmp_path):
    from algebra.caches import cache_path
    from algebra.io.checkpoint import file_sha256
    from algebra.reward.cache import ScoreCache
    from algebra.reward.generate import _cache_path

    monkeypatch.setenv("ALG_CACHE", str(tmp_path / "c"))
    (tmp_path / "f").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert [p.read_text() for p in cache_path("hashes").iterdir()] == [file_sha256(tmp_path / "f")]
    scores = ScoreCache()
    assert scores.path == cache_path("scores") and scores.path.is_file()
    scores.close()
    assert _cache_path("ab12").parent.parent == cache_path("generations")


def test_alg_cache_shows_and_clears(tmp_path, monkeypatch, capsys):
    import os

    root = tmp_path / "cache"
    (root / "sha256").mkdir(parents=True)
    (root / "sha256" / "k1").write_bytes(b"x" * 64)
    (root / "sha256" / "k2").write_bytes(b"x" * 64)
    (root / "rewards.sqlite").write_bytes(b"s" * 3000)
    (root / "rewards.sqlite-journal").write_bytes(b"j" * 100)  # sqlite's sidecar
    (root / "generations" / "ab").mkdir(parents=True)
    (root / "generations" / "ab" / "ab.json").write_bytes(b"[]")
    (root / "mine.txt").write_text("not a cache of ours")
    env = {**os.environ, "ALG_CACHE": str(root)}
    r = subprocess.run([*ALG, "cache"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("ALG_CACHE", str(root))

    def cache(*args):  # in this process, to save start-ups
        assert main(["cache", *args]) == 0
        return [line.split() for line in capsys.readouterr().out.splitlines()]

    shown = cache()
    assert shown == [line.split() for line in r.stdout.splitlines()]
    assert shown[0] == ["caches", "in", str(root)]
    rows = {row[0]: row[1:5] for row in shown[1:]}
    assert rows["hashes"] == ["128", "B", "2", "file(s)"]
    assert rows["scores"] == ["3.0", "KiB", "2", "file(s)"]  # 3100 bytes
    assert rows["generations"] == ["2", "B", "1", "file(s)"]
    assert rows["total"][:2] == ["3.2", "KiB"]  # 3230 bytes
    assert cache("clear", "scores")[0] == ["cleared", "scores", "(3.0", "KiB)"]
    assert sorted(p.name for p in root.iterdir()) == ["generations", "mine.txt", "sha256"]
    cache("clear")
    assert [p.name for p in root.iterdir()] == ["mine.txt"]  # only the caches alg writes
    assert {row[0]: row[1] for row in cache()[1:]}["total"] == "0"
