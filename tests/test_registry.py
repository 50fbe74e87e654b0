"""The registry (issue 10): families listed in one place, a scoped copy for tests and
extensions, and the "add one" path for a merge method: one family in the test, declared
with decorators, nothing else edited."""

from __future__ import annotations

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
