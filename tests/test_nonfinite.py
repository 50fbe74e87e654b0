"""Inputs that lie: every method refuses an input holding nan or inf, naming the tensor,
the element and the input (issue 9). Each input chunk is checked where it is read
(`Evaluator.eval`), so a sign election, a top-k or a spherical mean cannot absorb it."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import read_folder
from safetensors.torch import save_file

from algebra import api
from algebra.errors import AlgError
from algebra.interpreter import Interpreter
from algebra.options import Options
from algebra.plan import plan_tensors

TENSOR = "model.layers.1.mlp.down_proj.weight"  # 64 x 128
ELEMENT = 3001  # not in the first chunk when chunks are 1000 elements (rounded to rows)


@pytest.fixture(scope="module")
def poisoned(family, tmp_path_factory):
    """Copies of `math` with one element of TENSOR replaced by nan, inf or -inf."""
    root = tmp_path_factory.mktemp("poisoned")
    state = read_folder(family["math"])
    out = {}
    for label, value in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
        folder = root / label
        shutil.copytree(family["math"], folder)
        bad = {k: v.clone() for k, v in state.items()}
        bad[TENSOR].view(-1)[ELEMENT] = value
        save_file(bad, folder / "model.safetensors", metadata={"format": "pt"})
        out[label] = folder
    return out


METHODS = [
    "m1 * 0.5 + m2 * 0.5",
    "linear([m1, m2], [1, 2])",
    "task_arithmetic(b, [m1, m2], [1, 0.5])",
    "ties(b, [m1, m2], 1, 1)",  # density 1: the case that also dropped m2's delta there
    "ties(b, [m1, m2], [1, 0.6], 0.3)",
    "dare_ties(b, [m1, m2], 1, 0.5)",
    "dare_linear(b, [m1, m2], 1, 0.5)",
    "breadcrumbs(b, [m1, m2], 1, 0.5)",
    "breadcrumbs_ties(b, [m1, m2], 1, 0.5)",
    "della(b, [m1, m2], 1, 0.5)",
    "della_linear(b, [m1, m2], 1, 0.5)",
    "sce(b, [m1, m2])",
    "sce(b, [m1, m2], topk=0.3)",
    "model_stock(b, [m1, m2])",
    "model_stock(b, [m1, m2], filter_wise=true)",
    "nuslerp(m1, m2, 0.3)",
    "nuslerp(m1, m2, 0.3, base=b, flatten=false)",
    "multislerp([m1, m2], [1, 1])",
    "multislerp([m1, m2], [1, 2], base=b)",
    "karcher([m1, m2])",
    "karcher([m1, m2], base=b)",
    "nearswap(b, m1, 0.001)",
    "ram(b, [m1, m2])",
    "ramplus_tl(b, [m1, m2])",
    "slerp(m1, m2, 0.3)",
    "slerp([m1, m2], base=b)",
    "ema([m2, m1], 0.5)",
    "ties(m1, [m2, b], 1, 0.5)",  # the bad input as the base
    "layers(m1, 0, 2)",  # a plain copy
    "stack(layers(m1, 1, 2), layers(m2, 0, 2))",  # the input's tensor is layer 0 of the result
]


def _materialize(family, bad, expr: str, chunk: int = 1 << 20):
    binds = f'b = load("{family["base"]}")\nm1 = load("{bad}")\nm2 = load("{family["rl1"]}")\n'
    model = api.check(api.parse(binds + expr)).result
    options = Options(device="cpu", chunk_elems=chunk)
    return api.execute(plan_tensors(model, options), options)


@pytest.mark.parametrize("expr", METHODS)
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_every_method_refuses_a_nonfinite_input(family, poisoned, expr, kind):
    with pytest.raises(AlgError) as e:
        _materialize(family, poisoned[kind], expr)
    msg = str(e.value)
    assert f"tensor '{TENSOR}' of input '{poisoned[kind]}' is not finite at element {ELEMENT}: it holds {kind}" in msg


@pytest.mark.parametrize("expr", ["ties(b, [m1, m2], 1, 0.5)", "model_stock(b, [m1, m2])", "m1 - b"])
def test_the_element_is_exact_across_chunks(family, poisoned, expr):
    """With 1000-element chunks the bad element lies in a later chunk; its index is the
    tensor's, not the chunk's."""
    with pytest.raises(AlgError, match=f"not finite at element {ELEMENT}: it holds -inf"):
        _materialize(family, poisoned["-inf"], expr, chunk=1000)


def test_a_save_is_refused_positioned_and_writes_nothing(family, poisoned, tmp_path):
    recipe = (f'b = load("{family["base"]}")\n'
              f'bad = load("{poisoned["nan"]}")\n'
              f'save(ties(b, [bad, load("{family["rl1"]}")], 1, 1), "out")\n')
    with pytest.raises(AlgError) as e:
        Interpreter(options=Options(device="cpu"), base_dir=tmp_path).eval(recipe)
    err = e.value
    assert err.span is not None and err.span.line == 3  # the save
    # a note points at the load of the input that holds the nan, and at nothing else
    assert [(n.message, n.span.line) for n in err.notes] == [("the input, loaded here", 2)]
    assert "a division" not in str(err)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left


def test_in_memory_inputs_are_checked_too(family):
    """A state dict bound from Python: the same check, the same message."""
    a = {k: v.clone() for k, v in read_folder(family["base"]).items()}
    b = read_folder(family["math"])
    a[TENSOR].view(-1)[5] = float("nan")
    with pytest.raises(AlgError, match=f"tensor '{TENSOR}' of input .* is not finite at element 5: it holds nan"):
        Interpreter(options=Options(device="cpu")).eval("ties(a, [b, a], 1, 0.5)", a=a, b=b).state_dict()


def test_a_value_beyond_the_compute_dtype_is_named(family):
    """A float64 input holding 1e300 is finite as stored but not in float32: the message
    gives the stored value and the way out (--float64); in float64 the merge is computed."""
    a = {k: v.double() for k, v in read_folder(family["base"]).items()}
    b = {k: v.double() for k, v in read_folder(family["math"]).items()}
    a[TENSOR].view(-1)[7] = 1e300
    with pytest.raises(AlgError, match=r"element 7: it holds 1e\+300, beyond float32's range \(--float64"):
        Interpreter(options=Options(device="cpu")).eval("a * 0.5 + b * 0.5", a=a, b=b).state_dict()
    out = Interpreter(options=Options(device="cpu", compute_dtype="float64")).eval(
        "a * 0.5 + b * 0.5", a=a, b=b).state_dict(dtype="float64")
    want = a[TENSOR].view(-1)[7] * 0.5 + b[TENSOR].view(-1)[7] * 0.5
    assert float(out[TENSOR].view(-1)[7]) == float(want)


def test_finite_inputs_are_untouched_by_the_check(family):
    """The check reads; it never changes what is computed (a float64 reference)."""
    a, b = read_folder(family["base"]), read_folder(family["math"])
    out = Interpreter(options=Options(device="cpu")).eval("a * 0.25 + b * 0.75", a=a, b=b).state_dict()
    for k, v in a.items():
        if v.is_floating_point():
            ref = (v.double() * 0.25 + b[k].double() * 0.75).float()
            torch.testing.assert_close(out[k], ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("expr", ["karcher([a, b], 1e308)", "linear([a, b], 1e308)", "multislerp([a, b], 1e308)"])
def test_weights_summing_past_the_largest_float_are_refused_at_check(family, expr):
    with pytest.raises(AlgError) as info:
        Interpreter(options=Options(device="cpu")).eval(expr, a=read_folder(family["base"]), b=read_folder(family["math"]))
    assert info.value.message.endswith("the weights sum beyond the largest float (about 1.8e308), so they "
                                       "cannot be normalised")
    assert info.value.span.text() == "1e308"


@pytest.mark.parametrize("expr", ["lerp(a, b, 1e308)", "task_arithmetic(a, [b, a], 1e308)",
                                  "della(a, [b, b], 1e308, 0.5)"])
def test_a_coefficient_beyond_float32_is_an_error_of_the_run_not_a_traceback(family, expr):
    """torch refuses to convert 1e308 to float32 where it is an add's alpha: said as the
    overflow it is, at the statement (an elementwise product gives inf, refused as such)."""
    interp = Interpreter(options=Options(device="cpu"))
    with pytest.raises(AlgError, match=r"tensor '.*' of the result: a coefficient is beyond the range of "
                                       r"float32, so the result overflows"):
        interp.eval(expr, a=read_folder(family["base"]), b=read_folder(family["math"])).state_dict()
