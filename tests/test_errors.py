"""Every user mistake: a golden message, exit status 1, and no output left behind.

Each tests/golden/errors/NAME.alg runs through `alg run` (in process, through
`cli.main`) in a workspace whose models/ folder links to the fixture checkpoints plus a
few broken ones; stderr must equal NAME.err with the workspace path written as <ws>.
Set ALG_UPDATE_GOLDEN=1 to rewrite the .err files, then review the diff.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from algebra.cli import main

GOLDEN = Path(__file__).parent / "golden" / "errors"
CASES = sorted(GOLDEN.glob("*.alg"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, family, family_vocab) -> Path:
    ws = tmp_path_factory.mktemp("ws")
    models = ws / "models"
    models.mkdir()
    for name in ("base", "math", "rm", "rl1"):
        (models / name).symlink_to(family[name])
    (models / "rm-wide-vocab").symlink_to(family_vocab["rm"])
    state = load_file(family["base"] / "model.safetensors")
    raw = (family["base"] / "model.safetensors").read_bytes()
    (models / "truncated").mkdir()
    (models / "truncated" / "model.safetensors").write_bytes(raw[:-1000])
    (models / "corrupt").mkdir()
    (models / "corrupt" / "model.safetensors").write_bytes(raw[:8] + b"{not json" + raw[17:])
    (models / "pickled").mkdir()
    torch.save({"w": torch.zeros(2)}, models / "pickled" / "pytorch_model.bin")
    (models / "odd").mkdir()
    odd = {k: v for k, v in state.items() if k != "lm_head.weight"}
    odd["model.norm.weight"] = torch.ones(odd["model.norm.weight"].shape[0] + 1)
    save_file(odd, models / "odd" / "model.safetensors")
    (ws / "lib.alg").write_text("def twice(x) = 2 * x\nprint(twice(1))\n")
    return ws


def _run(ws: Path, recipe: Path, capsys) -> tuple[int, str]:
    target = ws / recipe.name
    shutil.copyfile(recipe, target)
    shutil.rmtree(ws / "out", ignore_errors=True)
    if recipe.stem == "output_exists":
        (ws / "out" / "x").mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        code = main(["run", recipe.name, "--device", "cpu"])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    return code, err.replace(str(ws), "<ws>")


@pytest.mark.parametrize("recipe", CASES, ids=[p.stem for p in CASES])
def test_error_golden(workspace, recipe, capsys):
    code, err = _run(workspace, recipe, capsys)
    expected = recipe.with_suffix(".err")
    if os.environ.get("ALG_UPDATE_GOLDEN"):
        expected.write_text(err)
    assert code == 1
    assert err == expected.read_text()
    assert "Traceback" not in err
    # nothing written: no output, no temporary folder
    leftovers = [p.name for p in workspace.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    if recipe.stem != "output_exists":
        assert not (workspace / "out" / "x").exists()


def test_every_error_case_has_a_position(workspace, capsys):
    """The first line of every message is file:line:col: error: ..., then the source line
    and a caret under the span; an error inside a library names the recipe line too."""
    for recipe in CASES:
        _, err = _run(workspace, recipe, capsys)
        lines = err.splitlines()
        assert re.match(r"^[^:\s]+\.alg:\d+:\d+: error: ", lines[0]), (recipe.name, lines[0])
        assert lines[2].strip() and set(lines[2].strip()) == {"^"}, (recipe.name, lines[2])
        assert f"{recipe.name}:" in err, recipe.name
