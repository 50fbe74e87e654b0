"""Stage 5, plan: tensor expressions -> an ordered list of steps with predicted memory.

Policy. Output tensors are written in the primary input's storage order (sequential
reads, sequential writes). A reduction (`reductions.Reduction`) runs just before the first write that
needs it, after the reductions it needs itself: per-layer SLERP reduces layer N, writes
layer N, then moves on, so the pages it read are still warm. Ties are broken by that
order and then by creation, never by set or hash order, so a plan is reproducible.

Memory. Nothing is held beyond one chunk's working set: every step streams chunks of at
most `chunk_elems` elements. The predicted peak is the largest number of chunk-sized
buffers any step holds at once, by the same rules the executor follows (each
expression kind's `buffers` beside its `eval`, in `ir.py`), times the chunk's bytes. It
depends on the chunk size and the shape of the expressions, never on the model's size.

Decisions. The plan records every decision it makes, and the executor reads them from
it: the run configuration (`runconfig.RunConfig`: device, compute dtype, chunk size)
and, per step, the chunk it streams (`Step.chunk`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io.safetensors import ShardLayout
from .ir import TExpr, buffers, expr_deps, leaves
from .ir import row_length as row_length  # the rows of a row-wise primitive (ir.row_length)
from .lower import Lowerer
from .options import Options
from .reductions import Reduction
from .runconfig import RunConfig
from .types import CheckpointType, TensorSpec, dtype_name, human_bytes, itemsize
from .values import Model

INDEX_NAME = "model.safetensors.index.json"


@dataclass
class OutTensor:
    name: str
    spec: TensorSpec  # output shape and dtype
    expr: TExpr
    shard: int = 0


@dataclass
class Step:
    kind: str  # "reduce" | "write"
    chunks: int
    peak_bytes: int
    chunk: int  # elements per chunk the step streams (a write's whole rows; at most its size)
    gram: Reduction | None = None  # the reduction of a reduce step
    out: OutTensor | None = None

    def describe(self) -> str:
        if self.kind == "reduce":
            assert self.gram is not None
            return f"reduce  {self.gram.describe()}"
        assert self.out is not None
        return f"write   {self.out.name} {self.out.spec} <- {_short(self.out.expr)}"


def _short(e: TExpr) -> str:
    """What a write reads and waits for: 'lin of 3 inputs after slerp layer 0'."""
    n = len(leaves(e))
    text = f"{e.kind} of {n} input{'s' if n != 1 else ''}"
    deps = expr_deps(e)
    if deps:
        text += " after " + ", ".join(g.label for g in deps)
    return text


@dataclass
class TensorPlan:
    """How to compute every tensor of one checkpoint value, in order."""

    model: Model
    out_dtype: str
    tensors: list[OutTensor]
    steps: list[Step]
    peak_bytes: int
    config: RunConfig  # where, in which dtype and in chunks of how many elements it runs

    @property
    def compute_dtype(self) -> str:
        return self.config.compute_dtype

    @property
    def chunk_elems(self) -> int:
        return self.config.chunk_elems

    @property
    def nbytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors)


@dataclass
class SavePlan:
    tensor_plan: TensorPlan
    target: Path
    shards: list[tuple[str, ShardLayout, list[str]]]  # file name, layout, tensor names
    config: dict[str, Any] | None
    span: Any
    overwrite: bool = False
    notes: list[str] = field(default_factory=list)
    guard: Any = None  # io.target.OverwriteGuard: what overwrite may replace
    chat_template: str | None = None  # written over the tokenizer's own (chat.write)

    @property
    def peak_bytes(self) -> int:
        return self.tensor_plan.peak_bytes


# ---- memory rules -----------------------------------------------------------------------


def write_chunk(e: TExpr, chunk_elems: int) -> int:
    """The chunk a write step streams: `chunk_elems`, rounded down to whole rows (at least
    one) when the expression holds a row-wise primitive, so that no row is split."""
    rows = 1
    stack = [e]
    while stack:
        x = stack.pop()
        rows = math.lcm(rows, x.chunk_unit())
        stack.extend(x.children())
    return max(rows, chunk_elems // rows * rows)


# The executor's chunk pool keeps a buffer that was given back for reuse until its step
# ends, so a step holds, for each dtype, the largest number of its buffers in use at once
# (`buffers` counts the compute dtype's), plus the other dtypes' buffers beside them.


def write_buffers(e: TExpr, cs: int, out_size: int) -> float:
    """A write step: the expression's buffers, and the chunk cast to the output dtype
    (the finiteness check sums the cast, so it allocates no chunk)."""
    return buffers(e, cs) + (out_size / cs if out_size != cs else 0.0)


def reduce_buffers(r: Reduction, cs: int) -> float:
    """A reduction step: the reduction's own rule (`Reduction.buffers`) over `buffers`
    (each expression's own, `TExpr.buffers`)."""
    return r.buffers(cs, buffers)


# ---- planning -------------------------------------------------------------------------


def plan_tensors(model: Model, options: Options | RunConfig, out_dtype: str | None = None,
                 lowerer: Lowerer | None = None) -> TensorPlan:
    """The plan of `model`'s tensors under the run configuration of `options`."""
    config = RunConfig.of(options)
    lowerer = lowerer or Lowerer()
    exprs = lowerer.lower(model)
    out_code = out_dtype or model.type.dtype
    outs = []
    for name, spec in model.type.tensors.items():
        outs.append(OutTensor(name, output_spec(spec, out_code), exprs[name]))
    steps, peak = order_steps(outs, config.chunk_elems, config.compute_itemsize)
    return TensorPlan(model, out_code, outs, steps, peak, config)


def output_spec(spec: TensorSpec, out_code: str) -> TensorSpec:
    """A tensor as saved: floats in the output dtype, integer buffers as they are."""
    return TensorSpec(spec.shape, out_code if spec.is_float else spec.dtype)


def output_nbytes(model: Model, out_dtype: str | None = None) -> int:
    """The bytes of weights a save of `model` writes (what `alg check` compares with the
    free space at the target)."""
    code = out_dtype or model.type.dtype
    return sum(output_spec(s, code).nbytes for s in model.type.tensors.values())


def order_steps(outs: list[OutTensor], chunk_elems: int, cs: int) -> tuple[list[Step], int]:
    """Order reductions and writes (see the module's policy) and predict the peak."""
    import networkx as nx  # here, not at module level: `alg check` imports this module

    g = nx.DiGraph()
    rank: dict[Any, tuple] = {}
    grams: dict[int, Reduction] = {}
    for i, out in enumerate(outs):
        wkey = ("w", i)
        g.add_node(wkey)
        rank[wkey] = (i, 1, 0)
        stack = list(expr_deps(out.expr))
        for gram in stack:
            g.add_edge(("g", id(gram)), wkey)
        while stack:
            gram = stack.pop()
            gkey = ("g", id(gram))
            if id(gram) not in grams:
                grams[id(gram)] = gram
                rank[gkey] = (i, 0, len(grams))
                for dep in gram.deps:
                    g.add_edge(("g", id(dep)), gkey)
                    stack.append(dep)
    steps: list[Step] = []
    peak = 0
    for key in nx.lexicographical_topological_sort(g, key=lambda k: rank[k]):
        if key[0] == "w":
            out = outs[key[1]]
            chunk = min(write_chunk(out.expr, chunk_elems), max(1, out.spec.numel))
            units = write_buffers(out.expr, cs, itemsize(out.spec.dtype))
            step = Step("write", math.ceil(out.spec.numel / chunk) if out.spec.numel else 1,
                        int(units * chunk * cs), chunk, out=out)
        else:
            gram = grams[key[1]]
            chunk = min(chunk_elems, max(1, gram.biggest()))
            chunks = gram.chunks(chunk)
            step = Step("reduce", chunks, int(reduce_buffers(gram, cs) * chunk * cs), chunk, gram=gram)
        peak = max(peak, step.peak_bytes)
        steps.append(step)
    return steps, peak


def plan_save(request, options: Options | RunConfig, lowerer: Lowerer | None = None) -> SavePlan:
    model: Model = request.model
    tp = plan_tensors(model, options, request.dtype, lowerer)
    shards = shard(tp.tensors, request.shard_bytes)
    config = output_config(model.type, tp.out_dtype)
    return SavePlan(tp, request.path, shards, config, request.span, request.overwrite,
                    list(model.type.notes), getattr(request, "guard", None), getattr(request, "chat_template", None))


def shard(outs: list[OutTensor], shard_bytes: int) -> list[tuple[str, ShardLayout, list[str]]]:
    """Greedy, in output order: a shard closes when the next tensor would overflow it
    (a tensor larger than the limit gets a shard of its own)."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for out in outs:
        if groups[-1] and size + out.spec.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(out)
        size += out.spec.nbytes
    n = len(groups)
    result = []
    for i, group in enumerate(groups):
        for out in group:
            out.shard = i
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        layout = ShardLayout.build([(o.name, o.spec) for o in group], {"format": "pt"})
        result.append((fname, layout, [o.name for o in group]))
    return result


def output_config(t: CheckpointType, out_dtype: str) -> dict[str, Any] | None:
    if t.config is None:
        return None
    config = dict(t.config)
    name = dtype_name(out_dtype)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = name
    return config


# ---- rendering ------------------------------------------------------------------------


def format_plan(p: TensorPlan | SavePlan, verbose: bool = False, head: int = 16, tail: int = 4) -> str:
    tp = p.tensor_plan if isinstance(p, SavePlan) else p
    lines = []
    if isinstance(p, SavePlan):
        lines.append(f"save {p.target}")
        lines.append(
            f"  {len(tp.tensors)} tensors, {human_bytes(tp.nbytes)} as {dtype_name(tp.out_dtype)} "
            f"in {len(p.shards)} shard(s)"
        )
    else:
        lines.append(f"materialise {len(tp.tensors)} tensors, {human_bytes(tp.nbytes)} as "
                     f"{dtype_name(tp.out_dtype)}")
    inputs = sorted({leaf.source.label for out in tp.tensors for leaf in leaves(out.expr)})
    lines.append(f"  inputs: {', '.join(inputs)}")
    n_red = sum(1 for s in tp.steps if s.kind == "reduce")
    lines.append(
        f"  {len(tp.steps)} steps ({n_red} reductions, {len(tp.steps) - n_red} writes), "
        f"chunks of {tp.chunk_elems} elements in {tp.compute_dtype}"
    )
    n = len(tp.steps)
    hidden = range(head, n - tail) if not verbose and n > head + tail + 1 else range(0)
    for i, s in enumerate(tp.steps):
        if i in hidden:
            if i == hidden.start:
                lines.append(f"  ... {len(hidden)} more steps (alg plan --verbose shows all)")
            continue
        lines.append(f"  {i + 1:>5}  {s.describe()}  [{s.chunks} chunk(s), {human_bytes(s.peak_bytes)}]")
    lines.append(f"  predicted peak working memory: {human_bytes(tp.peak_bytes)}")
    return "\n".join(lines)
