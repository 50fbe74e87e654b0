"""check: the language's semantics, folded at check time without reading a weight."""

from __future__ import annotations

from pathlib import Path

import pytest

from algebra.check import Checker
from algebra.errors import AlgError, AlgTypeError
from algebra.options import Options
from algebra.parser import parse
from algebra.source import Source
from algebra.values import Model


def check(text: str, base: Path | None = None, name: str = "t.alg", **opts):
    ck = Checker(Options(device="cpu", **opts), base, mode="eval")
    src = Source(text, name, (base / name) if base else None)
    return ck, ck.check(parse(src))


def value(text: str, base: Path | None = None, **opts):
    return check(text, base, **opts)[1].result


def test_plain_values_fold():
    assert value("1 + 2 * 3 - 4 / 2") == 5.0
    assert value("-(2 - 5)") == 3
    assert value('"a" + "b" + str(1.5)') == "ab1.5"
    assert value("[1, 2] + [3]") == (1, 2, 3)
    assert value("[x * 10 for x in range(1, 4)]") == (10, 20, 30)
    assert value("range(0, 1.01, 0.1)")[-1] == 1.0 and len(value("range(0, 1.01, 0.1)")) == 11
    assert value("range(5, 0, -2)") == (5, 3, 1)
    assert value("len([1, 2, 3])") == 3
    assert value("str(true) + str(none) + str([1, 2.5])") == "truenone[1, 2.5]"


def test_def_defaults_closures_and_lambdas():
    assert value("def f(x, k = 2) = x * k\nf(3)") == 6
    assert value("def f(x, k = 2) = x * k\nf(3, k=5)") == 15
    # a default may use earlier parameters and is evaluated at each call
    assert value("def f(x, y = x + 1) = x * y\nf(3)") == 12
    # lambdas capture their scope
    assert value("def adder(n) = lambda x: x + n\nadd3 = adder(3)\nadd3(4)") == 7
    assert value("fold(lambda acc, x: acc * x, [1, 2, 3, 4])") == 24
    # recursion through a def works (with a base case chosen at check time)
    assert value("def f(xs) = fold(lambda a, b: a + b, xs, 0)\nf([1, 2, 3])") == 6


def test_annotations_are_checked_at_the_argument():
    with pytest.raises(AlgTypeError) as info:
        value("def f(t: Scalar) = t\nf(\"x\")")
    assert info.value.message == "argument 't' of f() must be Scalar, not String"
    assert info.value.span.text() == '"x"'
    with pytest.raises(AlgTypeError, match="unknown type 'Scaler'; did you mean 'Scalar'"):
        value("def f(t: Scaler) = t")
    assert value("def f(xs: List[Scalar] | None = none) = xs\nf([1, 2])") == (1, 2)
    with pytest.raises(AlgTypeError, match="must be List\\[Scalar\\] | None, not List\\[String\\]"):
        value('def f(xs: List[Scalar] | None = none) = xs\nf(["a"])')


def test_import_a_user_library(tmp_path, family):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "helpers.alg").write_text(
        'import "more.alg" as more\n'
        "def halfway(a: Checkpoint, b: Checkpoint) = lerp(a, b, more.HALF)\n"
        "scale = 3\n"
    )
    (lib / "more.alg").write_text("HALF = 0.5\n")  # found relative to helpers.alg, not the recipe
    text = f'import "lib/helpers.alg" as h\nh.halfway(load("{family["base"]}"), load("{family["math"]}"))'
    ck, checked = check(text, tmp_path)
    assert isinstance(checked.result, Model)
    assert value('import "lib/helpers.alg" as h\nh.scale * 2', tmp_path) == 6
    with pytest.raises(AlgError, match="module 'h' has no name 'scael'; did you mean 'scale'"):
        value('import "lib/helpers.alg" as h\nh.scael', tmp_path)
    with pytest.raises(AlgError, match="no such file: 'lib/nope.alg'"):
        value('import "lib/nope.alg" as n', tmp_path)


def test_use_adds_the_library_names():
    ck, checked = check("use warp\nuse dogerm\n[warp, anchor, dogerm, dogerm_sweep]")
    assert [f.name for f in checked.result] == ["warp", "anchor", "dogerm", "dogerm_sweep"]
    with pytest.raises(AlgError, match="unknown name 'warp'"):
        value("warp")  # not without `use`


@pytest.mark.parametrize("name", ["warpp", "x" * 5000])
def test_use_of_no_library_is_a_name_error_whatever_the_name(name):
    """A name no file system could look up (5000 characters) is refused as an unknown
    library, not looked for (the grammar allows only a name after `use`)."""
    with pytest.raises(AlgError, match=f"no library '{name[:20]}") as info:
        check(f"use {name}\n1")
    assert info.value.span is not None


def test_set_overrides_a_top_level_assignment(family, tmp_path):
    text = f'lam = 0.3\nm = merge(load("{family["rm"]}"), load("{family["math"]}"), lam)\nlam'
    ck, checked = check(text, tmp_path, overrides={"lam": 0.8})
    assert checked.result == 0.8
    assert ck.used_overrides == {"lam"}
    # a name assigned inside a function body is not a top-level assignment
    ck, checked = check("def f(lam) = lam\nf(1)", None, overrides={"lam": 0.8})
    assert checked.result == 1 and ck.used_overrides == set()


def test_checkpoint_types_come_from_headers(family):
    ck, checked = check(
        f'rm = load("{family["rm"]}"); lm = load("{family["math"]}")\nmerge(rm, lm, 0.3)'
    )
    t = checked.result.type
    assert t.architecture == "LlamaForSequenceClassification"
    assert "score.weight" in t.tensors and "lm_head.weight" not in t.tensors
    assert len(t.config["id2label"]) == 1  # rm's config: a one-label reward model
    assert any("dropped 1 tensor(s) only in lm" in n for n in t.notes)


def test_sinks_are_collected_in_order_and_a_failed_check_keeps_none(family, tmp_path):
    base = family["base"]
    ck, checked = check(f'a = load("{base}")\nprint(1)\ninfo(a)\nsave(a * 2, "o1")\nprint("x")', tmp_path)
    assert [s.kind for s in checked.sinks] == ["print", "info", "save", "print"]
    with pytest.raises(AlgError):
        ck.check(parse(f'save(load("{base}") * 2, "o2")\nnope'))
    # the failed program's save did not reserve its path
    again = ck.check(parse(f'save(load("{base}") * 2, "o2")'))
    assert [s.kind for s in again.sinks] == ["save"]


def test_a_file_recipe_warns_about_an_unused_expression(tmp_path):
    warnings = []
    ck = Checker(Options(device="cpu", warn=warnings.append), tmp_path, mode="file")
    ck.check(parse(Source("1 + 1\nx = 2", "w.alg")))
    assert len(warnings) == 1 and "value is unused" in warnings[0].message
    assert warnings[0].span.line == 1


def test_list_indexing(family):
    assert value("[10, 20, 30][0] + [10, 20, 30][-1]") == 40
    assert value("xs = [[1, 2], [3]]\nxs[0][1] + xs[1][0]") == 5
    assert value("[i * 2 for i in range(4)][3]") == 6
    # a model picked out of a list is that model (the same graph node)
    b, m = family["base"], family["math"]
    picked, direct = value(f'ms = [load("{b}"), load("{m}")]\n[ms[1], load("{m}")]')
    assert isinstance(picked, Model) and picked.node is direct.node
    with pytest.raises(AlgTypeError, match="out of range for a list of 2"):
        value("[1, 2][-3]")
    with pytest.raises(AlgTypeError, match="whole number"):
        value("[1, 2][true]")
