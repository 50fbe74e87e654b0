"""The registry (issue 10): families listed in one place, a scoped copy for tests and
extensions, and the "add one" path for a merge method: one family in the test, declared
with decorators, nothing else edited."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import read_folder

from algebra import api
from algebra.errors import AlgNameError
from algebra.family import Family, in_use
from algebra.graph import Node
from algebra.lower import lin
from algebra.options import Options
from algebra.plan import plan_tensors
from algebra.registry import FAMILIES, REGISTRY, Registry, scoped
from algebra.rules import derived, same_tables

# ---- a merge method of the user's own ---------------------------------------------------------
# A "geodesic-free" blend: (1 - t) * a + t * b + s * (b - a) * |t - 0.5|, with t a Param
# (number or per-layer value) and s a Scalar: arithmetic the core builtins do not offer in
# one call, written as one builtin (checks, node) and one lowering (tensor expression).

mine = Family("mine")


@mine.builtin("test_blend(a: Checkpoint, b: Checkpoint, t: Param, s: Scalar = 0.5)",
              "A test method: lerp plus s*|t - 0.5| of the difference.")
def _blend(call, a, b, t, s):
    same_tables(a, b, "test_blend", call.span, call.at("a"), call.at("b"))
    return derived(Node("test_blend", (a.node, b.node), (t, float(s)), span=call.span), a)


@mine.lowering("test_blend")
def _lower_blend(low, node, name):
    t = low.param(node.params[0], node, name)
    s = node.params[1]
    a, b = (low.tensor(x, name) for x in node.args)
    k = s * abs(t - 0.5)
    return lin([(1.0 - t - k, a), (t + k, b)])


@mine.describe("test_blend")
def _show_blend(node, args):
    return f"test_blend({args[0]}, {args[1]}, {node.params[0]:g})"


def _reference(a: dict, b: dict, t: float, s: float) -> dict:
    """The formula in float64, written out independently of the lowering."""
    out = {}
    for k, x in a.items():
        if x.is_floating_point():
            x64, y64 = x.double(), b[k].double()
            out[k] = (1 - t) * x64 + t * y64 + s * (y64 - x64) * abs(t - 0.5)
    return out


def test_a_merge_method_added_through_the_registry_runs_in_a_recipe(family):
    recipe = (f'a = load("{family["base"]}")\nb = load("{family["math"]}")\n'
              "test_blend(a, b, 0.2, s=0.3)")
    with scoped() as registry:
        registry.add(mine)
        model = api.check(api.parse(recipe)).result
        options = Options(device="cpu", compute_dtype="float64")
        assert model.node.describe().startswith("test_blend(load(")  # its rendering (info, cards)
        tp = plan_tensors(model, options, "F64")
        out = api.execute(tp, options)
    ref = _reference(read_folder(family["base"]), read_folder(family["math"]), 0.2, 0.3)
    assert set(ref) <= set(out)
    for k, r in ref.items():
        torch.testing.assert_close(out[k].double(), r, rtol=1e-12, atol=1e-12)


def test_a_scoped_registry_does_not_leak(family):
    recipe = f'a = load("{family["base"]}")\ntest_blend(a, a, 0.5)'
    with pytest.raises(RuntimeError, match="boom"), scoped() as registry:
        registry.add(mine)
        assert "test_blend" in in_use().builtins and in_use() is registry
        raise RuntimeError("boom")
    assert in_use() is REGISTRY and "test_blend" not in REGISTRY.builtins
    assert "test_blend" not in REGISTRY.lowerings and "test_blend" not in REGISTRY.describes
    with pytest.raises(AlgNameError, match="unknown name 'test_blend'"):
        api.check(api.parse(recipe))


def test_the_registry_is_its_families():
    again = Registry.of(FAMILIES)
    assert again.builtins.keys() == REGISTRY.builtins.keys()
    assert again.lowerings.keys() == REGISTRY.lowerings.keys()
    assert {"load", "save", "merge", "slerp", "ties", "model_stock", "align", "ramp", "score"} <= set(REGISTRY.builtins)
    # every op a builtin builds lowers through a family, the core ops included
    assert {"add", "sub", "scale", "shift", "merge", "slerp", "slerp_tv", "align", "ties"} <= set(REGISTRY.lowerings)
    assert set(REGISTRY.value_types) == {"Reward", "Responses", "Pairs"}
    assert {"mul", "div", "close_excess", "rdiv", "nearswap", "row_scale", "tv_combine"} <= set(REGISTRY.primitives)


def test_a_name_declared_twice_is_refused():
    twice = Family("twice")
    twice.builtin("load(path: String)", "Another load.")(lambda call, path: None)
    with scoped() as registry, pytest.raises(ValueError, match="builtin 'load' is declared twice"):
        registry.add(twice)
    again = Family("again")
    again.lowering("merge")(lambda low, node, name: None)
    with scoped() as registry, pytest.raises(ValueError, match="lowering for op 'merge' is declared twice"):
        registry.add(again)
    with pytest.raises(ValueError, match="defined twice"):
        again.lowering("merge")(lambda low, node, name: None)


# ---- the README's function tables agree with the registry -------------------------------------


def _readme_functions() -> dict[str, list[str | None]]:
    """Function name -> the argument lists written for it in the first column of the
    README's `| function | meaning |` tables (None where only the name is written)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    found: dict[str, list[str | None]] = {}
    in_table = False
    for line in text.splitlines():
        if line.startswith("| function | meaning |"):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if in_table and not line.startswith("|---"):
            for span in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
                m = re.fullmatch(r"(\w+)(?:\((.*)\))?", span.strip())
                if m:
                    found.setdefault(m.group(1), []).append(m.group(2))
    return found


def _keywords(args: str) -> list[str]:
    """The `name=` keywords of a written argument list, at its top level."""
    import re

    parts, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        depth += 1 if ch in "([" else -1 if ch in ")]" else 0
        if ch == "," and depth == 0:
            parts.append(args[start:i])
            start = i + 1
    parts.append(args[start:])
    return [m.group(1) for p in parts if (m := re.match(r"\s*(\w+)\s*=(?!=)", p))]


def _disagreements(documented: dict[str, list[str | None]]) -> list[str]:
    """How README.md's function tables (`documented`) and the registry disagree: builtins
    missing there, functions there alg does not have (neither a builtin nor a standard
    library def), keywords there that are no parameter of their function."""
    import re

    from algebra.resources import stdlib_dir

    library: dict[str, list[str]] = {}
    for path in stdlib_dir().glob("*.alg"):
        for name, params in re.findall(r"^def (\w+)\((.*?)\) =", path.read_text(), re.M):
            library[name] = re.findall(r"(\w+)\s*:", params)
    out = [f"builtin {n} is missing" for n in sorted(set(REGISTRY.builtins) - set(documented))]
    out += [f"{n} is no function of alg" for n in sorted(set(documented) - set(REGISTRY.builtins) - set(library))]
    for name, arglists in documented.items():
        if name not in REGISTRY.builtins and name not in library:
            continue
        params = [p.name for p in REGISTRY.builtins[name].params] if name in REGISTRY.builtins else library[name]
        for args in filter(None, arglists):
            out += [f"{name}({args}): {name} has no parameter '{kw}'" for kw in _keywords(args) if kw not in params]
    return out


def test_the_readme_function_tables_agree_with_the_registry():
    assert _disagreements(_readme_functions()) == []


def test_the_readme_check_sees_a_difference():
    assert _keywords('m, path, dtype=none, shard_size="5GB", f(a=1), [x, y]') == ["dtype", "shard_size"]
    documented = _readme_functions()
    assert _disagreements({**documented, "lerp": ["a, b, weight=0.5"]}) == [
        "lerp(a, b, weight=0.5): lerp has no parameter 'weight'"]
    assert _disagreements({k: v for k, v in documented.items() if k != "ties"}) == ["builtin ties is missing"]
    assert _disagreements({**documented, "soup": [None]}) == ["soup is no function of alg"]


def test_a_header_and_its_function_must_agree():
    """The alg header is the signature; the Python function takes exactly its parameters."""
    odd = Family("odd")
    odd.builtin("test_odd(a: Checkpoint, t: Param)", "Parameters that disagree.")(lambda call, a, weight: a)
    with scoped() as registry, pytest.raises(ValueError, match=r"declares \(a, t\) but .* takes \(a, weight\)"):
        registry.add(odd)

    def generic(b) -> bool:  # fn(call, **kw) serves any header: the reward ops' one declaration
        return [p.kind for p in list(inspect.signature(b.impl).parameters.values())[1:]] == [
            inspect.Parameter.VAR_KEYWORD]

    from algebra.reward.ops import POINTWISE

    assert {n for n, b in REGISTRY.builtins.items() if generic(b)} == {
        n for n, op in POINTWISE.items() if op.header is not None}
    assert all(list(inspect.signature(b.impl).parameters)[1:] == [p.name for p in b.params]
               for b in REGISTRY.builtins.values() if not generic(b))
