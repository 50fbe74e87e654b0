"""Hostile checkpoints and hostile options (issue 9): a checkpoint never gets to run its own
Python, and a chunk size too small to be useful is refused with a hint."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from algebra.errors import AlgError
from algebra.interpreter import Session
from algebra.io.remote_code import code_markers
from algebra.options import MIN_CHUNK_ELEMS, Options
from algebra.source import Source

ROOT = Path(__file__).resolve().parent.parent
ALG = [sys.executable, "-m", "algebra"]

# a module that leaves a trace if anything ever imports it
EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n"


def _edit_json(path: Path, **entries) -> None:
    data = json.loads(path.read_text())
    data.update(entries)
    path.write_text(json.dumps(data))


def _with_code(src: Path, dst: Path, where: str) -> Path:
    """A copy of `src` whose `where` ('config' or 'tokenizer') names its own Python."""
    shutil.copytree(src, dst)
    (dst / "modeling_evil.py").write_text(EVIL)
    if where == "config":
        _edit_json(dst / "config.json", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                  "AutoModelForSequenceClassification": "modeling_evil.EvilModel",
                                                  "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    else:
        _edit_json(dst / "tokenizer_config.json", auto_map={"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]})
    return dst


@pytest.fixture(scope="module")
def ws(family, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    for name in ("rm", "base"):
        for where in ("config", "tokenizer"):
            _with_code(family[name], root / f"{name}_{where}", where)
        shutil.copytree(family[name], root / name)
    return root


def _check(ws: Path, text: str):
    session = Session(Options(device="cpu", out=lambda _: None), ws, mode="file")
    return session.check(Source(text, "t.alg"))


def _refusal(ws: Path, text: str) -> AlgError:
    with pytest.raises(AlgError) as e:
        _check(ws, text)
    return e.value


@pytest.mark.parametrize("where, marker", [("config", "config.json: auto_map"),
                                           ("tokenizer", "tokenizer_config.json: auto_map")])
def test_reward_refuses_a_model_with_its_own_code(ws, where, marker):
    text = f'r = reward("rm_{where}")\nscore(r, "d.jsonl", "out.jsonl")\n'
    (ws / "d.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    err = _refusal(ws, text)
    assert "reward() would load this checkpoint with transformers" in err.message
    assert f"asks to run its own Python ({marker})" in err.message
    assert "alg never runs a checkpoint's code" in err.message
    assert (err.span.line, err.span.col) == (1, 12)  # the path argument
    assert not (ws / f"rm_{where}" / "RAN").exists()


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_generate_refuses_a_policy_with_its_own_code(ws, where):
    err = _refusal(ws, f'p = load("base_{where}")\ng = generate(p, ["hi"], n=1)\n')
    assert "generate() would load this checkpoint with transformers" in err.message
    assert (err.span.line, err.span.col) == (2, 14)  # the policy argument


def test_a_custom_generate_folder_is_refused(ws, tmp_path, family):
    policy = shutil.copytree(family["base"], tmp_path / "policy")
    (policy / "custom_generate").mkdir()
    (policy / "custom_generate" / "generate.py").write_text(EVIL)
    err = _refusal(tmp_path, 'g = generate(load("policy"), ["hi"], n=1)\n')
    assert "(custom_generate/)" in err.message


def test_a_merge_is_judged_by_the_folder_transformers_would_read(ws):
    """A merge is loaded with its primary input's config and tokenizer: custom code there is
    refused; in the other input, whose config transformers never reads, it is not."""
    err = _refusal(ws, 'r = reward(merge(load("rm_config"), load("base"), 0.5))\n')
    assert "config.json: auto_map" in err.message
    _check(ws, 'r = reward(merge(load("rm"), load("base_config"), 0.5))\n')
    _check(ws, 'r = reward("rm")\ng = generate(load("base"), ["hi"], n=1)\n')  # clean folders pass


def test_alg_check_refuses_with_a_position_and_exit_1(ws):
    from conftest import alg_main  # in this process: the same output and status, no start-up

    (ws / "r.alg").write_text('r = reward("rm_tokenizer")\n')
    r = alg_main("check", "r.alg", cwd=ws)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("r.alg:1:12: error: reward() would load this checkpoint"), r.stderr
    assert "Traceback" not in r.stderr


def test_save_keeps_the_config_as_data_and_the_card_says_so(ws, tmp_path):
    from conftest import quiet_interpreter

    quiet_interpreter(ws).eval(f'save(load("rm_config") * 1, "{tmp_path / "out"}")')
    out = tmp_path / "out"
    assert "auto_map" in json.loads((out / "config.json").read_text())  # kept, as data
    assert not list(out.glob("*.py"))  # no code file travels with it
    card = (out / "README.md").read_text()
    assert "## Custom code" in card and "`config.json: auto_map` is kept as data only" in card
    assert not (ws / "rm_config" / "RAN").exists()
    quiet_interpreter(ws).eval(f'save(load("rm") * 1, "{tmp_path / "clean"}")')
    assert "Custom code" not in (tmp_path / "clean" / "README.md").read_text()


def test_code_markers_read_the_files_as_data(tmp_path):
    (tmp_path / "config.json").write_text('{"custom_pipelines": {"x": {}}, "auto_map": {}}')
    (tmp_path / "tokenizer_config.json").write_text('["not", "an", "object"]')
    assert code_markers(tmp_path) == ["config.json: custom_pipelines"]  # an empty auto_map names nothing
    (tmp_path / "tokenizer_config.json").write_text('{"auto_map": ["tok.Slow", "tok.Fast"]}')  # legacy form
    assert code_markers(tmp_path) == ["config.json: custom_pipelines", "tokenizer_config.json: auto_map"]


def test_every_transformers_loader_in_alg_refuses_remote_code():
    """Static: each from_pretrained / from_config call in algebra/ passes
    trust_remote_code=False explicitly (a default could change, or prompt on a terminal)."""
    calls, missing = 0, []
    for path in sorted((ROOT / "algebra").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("from_pretrained", "from_config", "pipeline"):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                value = kw.get("trust_remote_code")
                if not (isinstance(value, ast.Constant) and value.value is False):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls >= 10  # the reward engine, the tokenizers, the demo, the tiny builders
    assert missing == []


# ---- the chunk size ------------------------------------------------------------------------


def test_a_tiny_chunk_is_a_usage_error_with_a_hint(tmp_path, monkeypatch):
    from conftest import alg_main

    monkeypatch.setattr(Options, "min_chunk", MIN_CHUNK_ELEMS)  # the floor users get
    (tmp_path / "r.alg").write_text('x = 1\n')
    for n in (1, MIN_CHUNK_ELEMS - 1):
        r = subprocess.run([*ALG, "check", "r.alg", "--chunk", str(n)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)  # as a user gets it: the floor conftest does not lower
        assert r.returncode == 2, r.stderr
        assert f"--chunk must be a positive number of elements, at least {MIN_CHUNK_ELEMS}, not {n}" in r.stderr
        assert "Traceback" not in r.stderr
        in_process = alg_main("check", "r.alg", "--chunk", str(n), cwd=tmp_path)
        assert in_process.returncode == 2 and in_process.stderr.split() == r.stderr.split()  # wrapping aside
    r = alg_main("check", "r.alg", "--chunk", str(MIN_CHUNK_ELEMS), cwd=tmp_path)  # in this process: no start-up
    assert r.returncode == 0, r.stderr


def test_the_python_options_hold_the_same_floor(monkeypatch):
    monkeypatch.setattr(Options, "min_chunk", MIN_CHUNK_ELEMS)  # conftest lowers it for other tests
    with pytest.raises(ValueError, match=f"chunk_elems must be a positive number of elements, at least "
                                         f"{MIN_CHUNK_ELEMS}, not 0"):
        Options(chunk_elems=0)
    with pytest.raises(ValueError, match="smaller chunks only add per-chunk overhead"):
        Options(chunk_elems=MIN_CHUNK_ELEMS - 1)
    assert Options(chunk_elems=MIN_CHUNK_ELEMS).chunk_elems == MIN_CHUNK_ELEMS
