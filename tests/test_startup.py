"""Fast start (issue 11): commands that compute no tensor import no torch, numpy or
transformers. Each case runs the CLI's `main` in a fresh Python process and then lists
which heavy libraries ended up in `sys.modules`; a recipe that computes (`alg run`) is the
control that shows the check can see an import. Timing is `benchmarks/bench_startup.py`'s
business, not the suite's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "numpy", "transformers")
MERGEKIT = Path(__file__).resolve().parent / "mergekit"

PROBE = """
import sys
from algebra.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules))
sys.exit(code)
"""


def heavy_after(args: list[str], cwd: Path, stdin: str | None = None) -> tuple[list[str], str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=cwd, env=env, input=stdin,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    line = [x for x in r.stdout.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m], r.stdout


RECIPES = {
    "plain.alg": "x = [t * 2 for t in range(3) if t > 0]\nprint(x)\n",
    "lerp.alg": 'a = load("{base}")\nb = load("{math}")\nsave(lerp(a, b, 0.3), "out")\n',
    # every kind of lowering: the core ops, a reduction, a geometric and a sparse method,
    # DogeRM's merge and a sequence-classification model
    "methods.alg": (
        'a = load("{base}")\nb = load("{math}")\nrm = load("{rm}")\n'
        'save(0.5 * (a + b) - a / 2, "o1")\n'
        'save(slerp(a, b, 0.4), "o2")\n'
        'save(ties(a, [a, b], 1.0, density=0.5), "o3")\n'
        'save(model_stock(a, [a, b]), "o4")\n'
        'save(merge(rm, b, 0.3), "o5")\n'
        'save(slerp([a, b], base=a), "o6")\n'
        'info(a)\n'
    ),
}


@pytest.fixture(scope="module")
def recipes(family, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("startup")
    for name, text in RECIPES.items():
        (folder / name).write_text(text.format(**{k: str(v) for k, v in family.items()}))
    return folder


@pytest.mark.parametrize("command", ["check", "plan"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_check_and_plan_import_no_tensor_library(recipes, command, recipe):
    heavy, out = heavy_after([command, recipe], recipes)
    assert heavy == [], f"alg {command} {recipe} imported {heavy}"
    assert ("ok (" in out) if command == "check" else ("predicted peak working memory of the run" in out)


def test_convert_repl_and_cache_import_no_tensor_library(tmp_path):
    heavy, out = heavy_after(["convert", "mergekit", str(MERGEKIT / "linear.yml")], tmp_path)
    assert heavy == [] and "save(" in out
    heavy, out = heavy_after(["repl"], tmp_path, stdin='x = 1 + 2\nstr(x) + "!"\n:help\n')
    assert heavy == [] and '"3!"' in out
    heavy, out = heavy_after(["cache"], tmp_path)
    assert heavy == [] and "total" in out


def test_a_run_that_computes_imports_torch(recipes):
    """The control: the probe sees torch once a value needs it."""
    heavy, _ = heavy_after(["run", "lerp.alg", "--force"], recipes)
    assert "torch" in heavy


def test_the_process_entry_freezes_the_collector_after_main_and_returns_its_status(monkeypatch):
    """`alg` (the console script, `python -m algebra`) is `cli.entry`: main's exit status,
    and only after main has returned, the objects frozen out of the final collections
    (`gc.freeze`); main called in process never freezes."""
    import gc

    from algebra import cli

    order: list[str] = []
    monkeypatch.setattr(cli, "main", lambda argv=None: order.append("main") or 3)
    monkeypatch.setattr(gc, "freeze", lambda: order.append("freeze"))
    assert cli.entry() == 3 and order == ["main", "freeze"]
    assert "algebra.cli:entry" in (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    main_py = Path(cli.__file__).with_name("__main__.py").read_text()
    assert "sys.exit(entry())" in main_py


def test_python_m_algebra_exits_with_mains_status_and_its_outputs_whole(tmp_path):
    """Through the real entry: an error's status is 1, a run's output is complete."""
    env = {**os.environ, "ALG_CACHE": str(tmp_path / "cache")}
    (tmp_path / "bad.alg").write_text("x = 1 +\n")
    p = subprocess.run([sys.executable, "-m", "algebra", "run", "bad.alg"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 1 and "error" in p.stderr
    (tmp_path / "ok.alg").write_text('print("done")\n')
    p = subprocess.run([sys.executable, "-m", "algebra", "run", "ok.alg"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip().endswith("done")
