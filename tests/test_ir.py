"""The tensor-expression IR (ir.py) and the run configuration a plan records.

- A new expression kind is one class (children, memory rule, evaluation rule side by
  side): planned, described and streamed without editing anything else, and its values
  match a float64 reference.
- Execution reads its decisions from the plan: each step's chunk (`Step.chunk`) and the
  compute dtype (`TensorPlan.config`), not the options it is given.
- The IR, reduction and run-configuration modules import torch and numpy lazily.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from algebra.check import Checker
from algebra.execute import run_tensor_plan
from algebra.ir import Leaf, Lin, TExpr, buffers, children, expr_deps, leaves
from algebra.lower import Lowerer
from algebra.options import Options
from algebra.parser import parse
from algebra.plan import OutTensor, TensorPlan, format_plan, order_steps, plan_tensors
from algebra.runconfig import RunConfig

ROOT = Path(__file__).resolve().parent.parent


@dataclass(eq=False)
class Square(TExpr):
    """x * x: a kind defined only here. It records the dtype it was evaluated in."""

    x: TExpr
    spec: object
    kind = "square"
    seen: tuple = ()

    def children(self) -> list[TExpr]:
        return [self.x]

    def buffers(self, cs: int) -> float:
        return self.x.buffers(cs) + 1.0  # x, and the product beside it

    def eval(self, ev, e0, e1, guard=True):
        v = self.x.eval(ev, e0, e1, guard)
        out = ev.pool.take(e1 - e0, ev.dtype)
        torch.mul(v, v, out=out)
        ev.pool.give(v)
        self.seen += (ev.dtype,)
        return out


def _model(family, text: str):
    ck = Checker(Options(device="cpu"), family["base"].parent, mode="eval")
    return ck.check(parse(text)).result


def _lerp(family):
    return _model(family, f'lerp(load("{family["base"]}"), load("{family["math"]}"), 0.3)')


def _reference(family, read) -> dict[str, torch.Tensor]:
    a, b = (read(family[k]) for k in ("base", "math"))
    return {n: 0.7 * a[n].to(torch.float64) + 0.3 * b[n].to(torch.float64) for n in a}


def _run(tp: TensorPlan, options: Options) -> tuple[dict[str, torch.Tensor], list[tuple[str, int, int]]]:
    out = {t.name: torch.empty(t.spec.numel, dtype=torch.float64) for t in tp.tensors}
    calls: list[tuple[str, int, int]] = []

    def write(name: str, e0: int, data: torch.Tensor) -> None:
        out[name][e0 : e0 + data.numel()] = data.to(torch.float64)
        calls.append((name, e0, data.numel()))

    run_tensor_plan(tp, options, write)
    return out, calls


def test_a_new_kind_is_one_class(family, read):
    m = _lerp(family)
    exprs = Lowerer().lower(m)
    config = RunConfig("cpu", "float64", 4096)
    outs = [OutTensor(n, dataclasses.replace(spec, dtype="F64"), Square(exprs[n], spec))
            for n, spec in m.type.tensors.items() if spec.is_float]
    steps, peak = order_steps(outs, config.chunk_elems, config.compute_itemsize)
    tp = TensorPlan(m, "F64", outs, steps, peak, config)
    # the walks and the planner use its rules
    e = outs[0].expr
    assert children(e) == [exprs[outs[0].name]] and expr_deps(e) == ()
    assert [leaf.name for leaf in leaves(e)] == [outs[0].name] * 2
    assert buffers(e, 8) == buffers(exprs[outs[0].name], 8) + 1.0 == 3.0  # lin of 2 leaves: 2
    assert all(s.peak_bytes == 3 * s.chunk * 8 for s in steps)
    assert "square of 2 inputs" in format_plan(tp, verbose=True)
    # and the executor streams it
    got, _ = _run(tp, Options(device="cpu", compute_dtype="float64"))
    ref = _reference(family, read)
    for t in outs:
        want = (ref[t.name] ** 2).flatten()
        torch.testing.assert_close(got[t.name], want, rtol=1e-12, atol=1e-12)


def test_writes_stream_the_chunk_the_plan_records(family, read):
    """The executor streams each write in its step's chunk; it does not recompute it."""
    tp = plan_tensors(_lerp(family), Options(device="cpu", chunk_elems=4096))
    steps = [dataclasses.replace(s, chunk=1000) if s.kind == "write" and s.out.spec.numel > 1000 else s
             for s in tp.steps]
    changed = {s.out.name for s in steps if s.chunk == 1000}
    assert changed, "the family should have tensors over 1000 elements"
    got, calls = _run(dataclasses.replace(tp, steps=steps), Options(device="cpu"))
    for name, e0, n in calls:
        if name in changed:
            assert e0 % 1000 == 0 and n <= 1000
    ref = _reference(family, read)
    for name, values in got.items():  # computed and written in float32
        torch.testing.assert_close(values, ref[name].flatten(), rtol=1e-6, atol=1e-6)


def test_every_step_records_its_chunk(family):
    m = _model(family, f'slerp([load("{family["rl1"]}"), load("{family["rl2"]}")], base=load("{family["base"]}"))')
    tp = plan_tensors(m, Options(device="cpu", chunk_elems=4096))
    assert {s.kind for s in tp.steps} == {"reduce", "write"}
    for s in tp.steps:
        numel = s.out.spec.numel if s.kind == "write" else s.gram.biggest()
        assert s.chunk == min(4096, max(1, numel))
        if s.kind == "write":
            assert s.chunks == -(-numel // s.chunk)


def test_execution_reads_the_compute_dtype_from_the_plan(family):
    m = _lerp(family)
    exprs = Lowerer().lower(m)
    for planned, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        outs = [OutTensor(n, spec, Square(exprs[n], spec)) for n, spec in m.type.tensors.items() if spec.is_float]
        tp = plan_tensors(m, Options(device="cpu", compute_dtype=planned))
        tp = dataclasses.replace(tp, tensors=outs, steps=order_steps(outs, tp.chunk_elems, 8)[0])
        other = "float32" if planned == "float64" else "float64"
        _run(tp, Options(device="cpu", compute_dtype=other))  # the plan decides, not these options
        assert {d for t in outs for d in t.expr.seen} == {dtype}


def test_run_config():
    c = RunConfig.of(Options(device="cpu", compute_dtype="float64", chunk_elems=8192))
    assert (c.device, c.compute_dtype, c.chunk_elems) == ("cpu", "float64", 8192)
    assert (c.compute_code, c.compute_itemsize, c.torch_dtype()) == ("F64", 8, torch.float64)
    assert RunConfig.of(c) is c
    f32 = RunConfig.of(Options(device="cpu"))
    assert (f32.compute_code, f32.compute_itemsize, f32.torch_dtype()) == ("F32", 4, torch.float32)
    assert f32.resolve_device() == torch.device("cpu")


@pytest.mark.parametrize("module", ["ir.py", "reductions.py", "runconfig.py"])
def test_torch_and_numpy_are_imported_lazily(module):
    """These modules are on `alg check`/`alg plan`'s import path: only evaluation code
    imports torch or numpy, inside the function that runs."""
    tree = ast.parse((ROOT / "algebra" / module).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top.add((node.module or "").split(".")[0])
    assert not top & {"torch", "numpy"}


def test_lin_folds_and_leaves_are_kinds(family):
    """`lin` still folds nested combinations into one `Lin` over leaves."""
    exprs = Lowerer().lower(_lerp(family))
    e = next(iter(exprs.values()))
    assert isinstance(e, Lin) and all(isinstance(x, Leaf) for x in children(e))
    assert [c for c, _ in e.terms] == pytest.approx([0.7, 0.3])
