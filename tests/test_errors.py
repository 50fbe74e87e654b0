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


# ---- hostile recipes at check time (issue 9): positioned errors, bounded work ---------------

BIG = "9" * 400
HOSTILE = {
    # numbers out of range, wherever they are used
    "range_inf": ("print(range(1e999))", "1e999"),
    "range_big": (f"print(range({BIG}))", BIG),
    "layers": ("save(layers(a, 0, 1e999), 'out/x')", "1e999"),
    "shard_size": ("save(a, 'out/x', shard_size=1e999)", "1e999"),
    "shard_size_text": ("save(a, 'out/x', shard_size='1e999GB')", "'1e999GB'"),
    "batch_size": (f"r = reward('models/rm', batch_size={BIG})", BIG),
    "seed": (f"save(dare_ties(a, [b], 1, 0.5, seed={BIG}), 'out/x')", BIG),
    "seed_past_int64": ("save(dare_ties(a, [b], 1, 0.5, seed=9223372036854775808), 'out/x')",
                        "9223372036854775808"),
    "ramp": ("save(lerp(a, b, ramp(0, 1e999)), 'out/x')", "1e999"),
    "where": ("save(lerp(a, b, where('x', 1e999, 0)), 'out/x')", "1e999"),
    "max_iter": ("save(karcher([a, b], max_iter=1e999), 'out/x')", "1e999"),
    "nuslerp": (f"save(nuslerp(a, b, {BIG}), 'out/x')", BIG),
    "digits": ("print(" + "9" * 5000 + ")", "9" * 5000),
    "product": ("print(1e308 * 10)", "1e308 * 10"),
    "quotient": ("print(1e308 / 1e-10)", "1e308 / 1e-10"),
    "range_span": ("print(range(-1e308, 1e308, 1e-300))", "1e308"),
    # recursion
    "str_nesting": ("print(" + "str(" * 245 + "1" + ")" * 245 + ")", None),
    "unary_nesting": ("print(" + "-" * 489 + "1)", None),
    "list_nesting": ("print(" + "[" * 331 + "1" + "]" * 331 + ")", None),
    "recursive_list": ("def f(n) = [f(n - 1)]\nprint(f(1))", "f(n - 1)"),
    "recursive_default": ("def f(x = f()) = x\nprint(f())", "f()"),
    "value_nesting": ("print(fold(lambda acc, y: [acc], range(1000), []))", "[acc]"),
    "model_chain": ("save(fold(lambda acc, y: acc + a, range(300), a), 'out/x')", "acc + a"),
    # unbounded work
    "fold": ("print(len(fold(lambda acc, y: acc + [y], range(100000), [])))", "acc + [y]"),
    "comprehension": ("print(len([[y for y in range(1000000)] for x in range(1000000)]))", None),
    "loads": ("print(len([load('models/base') for i in range(100000)]))", None),
    "doubling": ("print(len(fold(lambda s, y: s + s, range(100), 'ab')))", "s + s"),
    "shared_lists": ("print(fold(lambda acc, y: [acc, acc], range(60), []))", None),
}


@pytest.fixture
def check_in(workspace, monkeypatch):
    # a smaller step budget than the default: the same errors, sooner
    monkeypatch.setenv("ALG_MAX_STEPS", "200000")
    from algebra.interpreter import Session
    from algebra.options import Options
    from algebra.source import Source

    def check(text: str):
        session = Session(Options(device="cpu", warn=lambda d: None, out=lambda s: None), workspace)
        prelude = 'a = load("models/base"); b = load("models/math")\n'
        return session.check(Source(prelude + text, "hostile.alg"))

    return check


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_recipe_is_a_positioned_error(check_in, name):
    """Each was an internal error (OverflowError, RecursionError, ValueError) or a hang;
    now a user error at the part of the recipe at fault."""
    from algebra.errors import AlgError

    text, at = HOSTILE[name]
    with pytest.raises(AlgError) as e:
        check_in(text)
    assert e.value.span is not None and e.value.span.source.name == "hostile.alg"
    if at is not None:
        assert at in e.value.span.text(), (e.value.span.text()[:80], e.value.message)


def test_long_operator_chains_need_no_recursion(check_in):
    """A chain of 5000 terms is one nesting level: parsed and folded without recursion."""
    checked = check_in("x = " + " + ".join(["1"] * 5000) + " - 1 * 2\nprint(x)")
    assert checked.sinks[0].value == 4998


def test_nesting_within_the_limit_checks(check_in):
    from algebra.parser import MAX_NESTING

    n = MAX_NESTING // 2 - 1  # str(...) is a call plus its argument list's expression
    checked = check_in("print(" + "str(" * n + "1" + ")" * n + ")")
    assert checked.sinks[0].value == "1"


def test_long_literal_lists_parse_to_the_same_ast():
    """The fast path for long literal lists gives exactly the AST that lark gives."""
    import algebra.parser as parser
    from algebra.ast import dump

    items = ["1", "-2.5", '"a,b]"', "true", "none", "- 3e2", "'x'", "0.25"] * 10
    text = "x = [" + ",\n  ".join(items) + ",]\ny = z[" + ", ".join(items) + "]\n# [" + ", ".join(items) + "]\n"
    fast, literals = parser._literal_lists(parser.Source(text))
    assert len(literals) == 1  # the index and the comment are left to lark
    plain = parser._ToAst(parser.Source(text)).transform(parser._lark().parse(text.replace("y = z[", "y = [")))
    got = parser.parse(text.replace("y = z[", "y = ["))
    assert dump(got) == dump(plain)


def test_int_parameters_bind_whole_numbers(check_in):
    """Int takes 3.0 as 3; a fraction, or a number past a signed 64-bit integer, is refused
    at the argument."""
    from algebra.errors import AlgTypeError

    checked = check_in("def f(n: Int) = str(n)\nprint(f(3.0))")
    assert checked.sinks[0].value == "3"
    with pytest.raises(AlgTypeError, match="not a whole number") as e:
        check_in("save(layers(a, 0.5), 'out/x')")
    assert e.value.span.text() == "0.5"


def test_budgets_can_be_raised(check_in, monkeypatch):
    from algebra.errors import AlgLimitError

    text = "print(len([x for x in range(600)]))"
    monkeypatch.setenv("ALG_MAX_STEPS", "1000")
    with pytest.raises(AlgLimitError, match="ALG_MAX_STEPS") as e:
        check_in(text)
    assert e.value.span is not None
    monkeypatch.setenv("ALG_MAX_STEPS", "10000")
    assert check_in(text).sinks[0].value == 600
    monkeypatch.setenv("ALG_MAX_SIZE", "10")
    with pytest.raises(AlgLimitError, match="ALG_MAX_SIZE") as e:
        check_in("print(range(11))")
    assert e.value.span.text() == "11"
    assert check_in("print(range(10))").sinks


def test_sizes_must_be_finite():
    from algebra.types import parse_size

    for bad in ("1e999GB", "infGB", "nanMB", 0, -1.0):
        with pytest.raises(ValueError, match="positive, finite"):
            parse_size(bad)
    assert parse_size("1.5KB") == 1500


def test_a_per_layer_value_that_overflows_is_not_a_division(check_in):
    from algebra.errors import AlgTypeError

    with pytest.raises(AlgTypeError, match="is not finite for tensor") as e:
        check_in("save(ramp(1e308, 1) * 10 * a, 'out/x')")
    assert "ramp(1e+308, 1)" in e.value.message and e.value.span is not None
