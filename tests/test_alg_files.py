"""Tests written in alg: every tests/alg/*.alg runs as a recipe and must pass its
assert_close checks. The models/ folder beside them links to the fixture checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from algebra import AlgError, Options
from algebra.interpreter import Session
from algebra.source import Source

HERE = Path(__file__).parent / "alg"
FILES = sorted(HERE.glob("*.alg"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, family) -> Path:
    root = tmp_path_factory.mktemp("alg-tests")
    (root / "models").mkdir()
    for name, path in family.items():
        (root / "models" / name).symlink_to(path)
    return root


def run(ws: Path, text: str, name: str) -> list[str]:
    printed: list[str] = []
    session = Session(Options(device="cpu", out=printed.append), ws, mode="file")
    session.run(Source(text, name))
    return printed


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_alg_file(ws, path):
    shutil.copyfile(path, ws / path.name)
    run(ws, path.read_text(), path.name)


def test_alg_files_exist_and_assert():
    assert {p.stem for p in FILES} >= {"prelude", "warp", "dogerm"}
    for p in FILES:
        assert p.read_text().count("assert_close(") >= 5, p.name


@pytest.mark.parametrize(
    "line, message",
    [
        ('assert_close(lerp(load("models/base"), load("models/math"), 0.01), load("models/base"))',
         "assert_close failed: "),
        ("assert_close(0.1 + 0.2, 0.31)", "0.30000000000000004 and 0.31 differ"),
        ("assert_close([1, 2], [1, 2.5])", "(item 1)"),
    ],
)
def test_a_false_assertion_fails_the_run(ws, line, message):
    with pytest.raises(AlgError) as info:
        run(ws, line, "f.alg")
    assert message in info.value.message
    assert info.value.span.source.name == "f.alg"
