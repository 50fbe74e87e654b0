"""Every pipeline stage, callable on its own (in the spirit of the json module):

    program = api.parse(text)                  # text -> AST
    checked = api.check(program, base_dir=d)   # AST -> sinks and a result, headers only
    graph   = api.build(checked)               # -> networkx DiGraph of model-level nodes
    exprs   = api.lower(model)                 # checkpoint -> {tensor name: expression}
    plan    = api.plan(model)                  # -> ordered steps, predicted peak memory
    tensors = api.execute(plan)                # -> state dict (or api.save(...) -> folder)

`Interpreter` (interpreter.py) chains them; these are for tools, tests and the curious.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import torch

from . import execute as _execute
from . import graph as _graph
from .ast import Program
from .check import Checked, Checker, SaveRequest
from .distributed_merge import shard_writer
from .lower import Lowerer, TExpr
from .options import Options
from .parser import parse as _parse
from .plan import SavePlan, TensorPlan, plan_save, plan_tensors
from .source import Source
from .values import Model


def parse(text: str, name: str = "<string>") -> Program:
    return _parse(Source(text, name))


def check(program: Program, base_dir: str | Path | None = None, options: Options | None = None,
          **bindings: Any) -> Checked:
    checker = Checker(options or Options(), Path(base_dir) if base_dir else None, mode="eval")
    checker.env.values.update(bindings)
    return checker.check(program)


def build(checked: Checked | Model) -> nx.DiGraph:
    """The model-level graph of everything a checked program computes."""
    roots = []
    if isinstance(checked, Model):
        roots.append(checked.node)
    else:
        for sink in checked.sinks:
            value = sink.value.model if isinstance(sink.value, SaveRequest) else sink.value
            if isinstance(value, Model):
                roots.append(value.node)
        if isinstance(checked.result, Model):
            roots.append(checked.result.node)
    return _graph.build(roots)


def lower(model: Model) -> dict[str, TExpr]:
    return Lowerer().lower(model)


def plan(target: Model | SaveRequest, options: Options | None = None) -> TensorPlan | SavePlan:
    options = options or Options()
    if isinstance(target, SaveRequest):
        return plan_save(target, options)
    return plan_tensors(target, options)


def execute(p: TensorPlan, options: Options | None = None) -> dict[str, torch.Tensor]:
    return _execute.materialize(p, options or Options())


def save(p: SavePlan, recipe_text: str = "", options: Options | None = None) -> Path:
    options = options or Options()
    return _execute.save(p, options, recipe_text, shards=shard_writer(options))
