"""Stage 6, execute: run a plan, streaming fixed-size chunks through the expressions.

Per write step, for each chunk [e0, e1) of an output tensor: read the same range of
every input it needs (a zero-copy view of the mmap'd file), convert to the compute dtype
on the compute device, evaluate, cast to the output dtype, check finiteness, and write
the bytes straight to the tensor's place in its shard (offsets fixed by the plan).
Nothing outlives its chunk but reduction results (three floats per group). The next
step's inputs are announced to the kernel (`madvise(WILLNEED)`) so reading overlaps
computing; a tensor's pages are dropped from the mapping once it is done.

A save writes into a temporary folder beside its target and renames it into place only
when complete; on any failure, interruption included, the temporary folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import AlgIOError, AlgRuntimeError
from .io import card as card_io
from .io.safetensors import ShardWriter
from .ir import Leaf, TExpr, coef_value, leaves
from .options import Options
from .plan import INDEX_NAME, SavePlan, Step, TensorPlan
from .progress import NULL_BAR
from .reductions import Reduction
from .runconfig import RunConfig
from .runconfig import resolve_device as resolve_device  # where it was: execute.resolve_device
from .types import code_of, dtype_name, torch_dtype


class ChunkPool:
    """Chunk buffers handed out and taken back, reused from chunk to chunk within a step:
    a step touches the same few pages over and over instead of faulting in fresh memory
    for every chunk. Buffers live for one step (`trim` ends it), so what is held at any
    moment is that step's working set, as the plan predicts it."""

    def __init__(self, device: torch.device):
        self.device = device
        self._free: dict[torch.dtype, list[torch.Tensor]] = {}
        self._out: dict[int, torch.Tensor] = {}  # handed out, by id

    def take(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        free = self._free.setdefault(dtype, [])
        for i, buf in enumerate(free):
            if buf.numel() >= n:
                free.pop(i)
                break
        else:
            if free:
                free.pop()  # too small for this step's chunks: replaced, not kept beside
            buf = torch.empty(n, dtype=dtype, device=self.device)
        self._out[id(buf)] = buf
        return buf[:n]

    def owns(self, t: torch.Tensor) -> bool:
        """Whether `t` is (a view of) a buffer handed out by `take` and not yet given
        back, which its holder may write (an input's view never is)."""
        base = t._base if t._base is not None else t
        return id(base) in self._out

    def give(self, t: torch.Tensor) -> None:
        """Take back a buffer from `take`; anything else (an input's view) is ignored."""
        base = t._base if t._base is not None else t
        buf = self._out.pop(id(base), None)
        if buf is not None:
            self._free[buf.dtype].append(buf)

    def trim(self) -> None:
        """End of a step: let go of the free buffers."""
        self._free.clear()


class Evaluator:
    """Evaluates tensor expressions chunk by chunk on one device, in pooled buffers."""

    def __init__(self, device: torch.device, compute_dtype: torch.dtype, check_inputs: bool = True):
        self.device = device
        self.dtype = compute_dtype
        self.check_inputs = check_inputs  # refuse an input chunk holding inf or nan (Options.check_finite)
        self.pool = ChunkPool(device)
        self.host = self.pool if device.type == "cpu" else ChunkPool(torch.device("cpu"))
        self.results: dict[Any, Any] = {}  # reduction (or Solve) -> its value
        # input chunks found finite since the last write step: a reduction's pass (TIES's
        # thresholds) reads the chunks its write step reads again (`check_input`)
        self.checked: set[tuple[int, str, int, int]] = set()

    def coef(self, c) -> float:
        return coef_value(c, self.results)

    def eval(self, e: TExpr, e0: int, e1: int, guard: bool = True) -> torch.Tensor:
        """Elements [e0, e1) of `e`, flat, in the compute dtype on the device, by its
        kind's evaluation rule (`TExpr.eval`, ir.py). The result is a pool buffer (the
        caller gives it back) or a view of an input (never written).

        Every input chunk is checked finite where it is read (`check_inputs`): a sign
        election, a top-k or a mask would absorb a nan silently. With guard=False the
        caller checks the result itself, so inputs that reach it only through linear
        nodes (Lin, Slice, Cat, Rows: an inf or nan there always makes the result
        non-finite) are not summed twice; a Map's arguments are always checked."""
        return e.eval(self, e0, e1, guard)

    def check_input(self, leaf: Leaf, x: torch.Tensor, e0: int) -> None:
        """Refuse an input chunk `x` (elements e0.. of `leaf`, in the compute dtype) that
        holds inf or nan: a sum first, exact only if that is not finite (or overflows,
        which the exact check clears), as for outputs: one cheap pass in the common case.
        A chunk already found finite since the last write step is not summed again."""
        if _chunk(leaf, e0, e0 + x.numel()) in self.checked:
            return
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise _nonfinite_input(leaf, x, e0)
        self.mark_checked(leaf, e0, e0 + x.numel())

    def as_stored(self, e: TExpr, e0: int, e1: int) -> torch.Tensor | None:
        """Elements [e0, e1) of `e` as the checkpoint stores them, unconverted and
        unchecked, for a compiled loop that converts bfloat16 as it reads: where `e` is a
        Leaf stored in bfloat16 on the CPU and this run computes in float32 on the CPU;
        else None."""
        if isinstance(e, Leaf) and self.dtype == torch.float32 and self.device.type == "cpu":
            x = e.source.read(e.name, e0, e1)
            if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous():
                return x
        return None

    def stored(self, e: TExpr, e0: int, e1: int) -> torch.Tensor:
        """Elements [e0, e1) of `e` for a primitive that takes inputs as stored
        (`Primitive.stored`): `as_stored`, where the chunk was found finite in this step (a
        reduction's pass read it: TIES's thresholds); else `eval`."""
        x = self.as_stored(e, e0, e1) if isinstance(e, Leaf) and _chunk(e, e0, e1) in self.checked else None
        return x if x is not None else self.eval(e, e0, e1)

    def mark_checked(self, leaf: Leaf, e0: int, e1: int) -> None:
        """Elements [e0, e1) of `leaf` are finite (checked here, or by a compiled pass that
        read them as stored): `check_input` passes that chunk until the next write step."""
        self.checked.add(_chunk(leaf, e0, e1))

    def wide(self, e: TExpr, e0: int, e1: int) -> torch.Tensor:
        """Elements of `e` in float64, for reductions (a pool buffer)."""
        v = self.eval(e, e0, e1)
        if v.dtype == torch.float64:
            return v
        w = self.pool.take(e1 - e0, torch.float64)
        w.copy_(v)
        self.pool.give(v)
        return w

    def reduce(self, r: Reduction, chunk: int) -> None:
        """Run a streamed reduction (`Reduction.run`) and keep its value for the run."""
        value = r.run(self, chunk)
        if not _all_finite(value):
            raise AlgRuntimeError(f"the {r.label} reduction is not finite: it overflows or divides by zero")
        self.results[r] = value


def _chunk(leaf: Leaf, e0: int, e1: int) -> tuple[int, str, int, int]:
    """A chunk of an input, as `Evaluator.checked` records it."""
    return (id(leaf.source), leaf.name, e0, e1)


def _all_finite(value: Any) -> bool:
    """Whether a reduction's value (numbers, tuples of them, arrays) holds no inf/nan."""
    if isinstance(value, float | int):
        return _finite(float(value))
    if isinstance(value, tuple | list):
        return all(_all_finite(v) for v in value)
    try:
        return bool(np.isfinite(np.asarray(value, dtype=np.float64)).all())
    except (TypeError, ValueError):
        return True  # not numeric data: nothing to check


def _finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


class _Prefetcher:
    """Announces the inputs of upcoming steps to the kernel, one step ahead."""

    def __init__(self, steps: list[Step]):
        self.steps = steps

    def ahead(self, i: int) -> None:
        if i + 1 >= len(self.steps):
            return
        for leaf in _inputs(self.steps[i + 1]).values():
            leaf.source.prefetch(leaf.name)


def _inputs(step: Step) -> dict[tuple[int, str], Leaf]:
    """The stored tensors a step reads, by (source, name)."""
    exprs = [step.out.expr] if step.out else step.gram.exprs()
    return {(id(leaf.source), leaf.name): leaf for e in exprs for leaf in leaves(e)}


def _release(step: Step, nxt: Step | None) -> None:
    """Drop the pages of the tensors `step` read from this process's mapping, except
    those the next step reads too (a reduction's inputs, read again by the write step
    after it): mapped again, they would fault in page by page a second time."""
    keep = _inputs(nxt) if nxt is not None else {}
    for key, leaf in _inputs(step).items():
        if key not in keep:
            leaf.source.release(leaf.name)


def run_tensor_plan(
    tp: TensorPlan,
    options: Options,
    write: Callable[[str, int, torch.Tensor], None],
    span: Any = None,
    evaluator: Evaluator | None = None,
    on_host: bool = True,
    desc: str = "compute",
) -> None:
    """Run every step of a plan; `write(name, e0, chunk)` receives output chunks in the
    output dtype, on the host (for files) or on the compute device. A chunk is only
    valid during the call: copy what must outlive it. Progress (`options.progress`):
    bytes and tensors written, under `desc`, and the step when the plan has reductions."""
    with options.progress.bar(tp.nbytes, desc, unit="B", items=len(tp.tensors), item_unit="tensors") as bar:
        _run_steps(tp, options, write, span, evaluator, on_host, bar)


def _run_steps(tp: TensorPlan, options: Options, write, span: Any, evaluator: Evaluator | None, on_host: bool,
               bar: Any) -> None:
    ev = evaluator or new_evaluator(tp.config, options.check_finite)
    ev.checked.clear()  # a session's evaluator: nothing carried over from another plan
    pre = _Prefetcher(tp.steps)
    show_steps = bar.live and any(step.kind == "reduce" for step in tp.steps)
    for i, step in enumerate(tp.steps):
        pre.ahead(i)
        if show_steps:
            bar.note(f"step {i + 1}/{len(tp.steps)}" + (" reduce" if step.kind == "reduce" else ""))
        try:
            if step.kind == "reduce":
                if step.gram not in ev.results:
                    ev.reduce(step.gram, step.chunk)
            else:
                _write_step(ev, step, options, write, on_host, bar)
                ev.checked.clear()
                bar.item_done()
        except RuntimeError as exc:  # torch's own: a coefficient the compute dtype cannot hold
            if "without overflow" not in str(exc):
                raise
            what = f"tensor '{step.out.name}' of the result" if step.kind == "write" else step.gram.describe()
            raise AlgRuntimeError(f"{what}: a coefficient is beyond the range of {tp.compute_dtype}, so the "
                                  "result overflows", span) from None
        except AlgRuntimeError as err:
            err.at(span)
            for node in tp.model.node.walk():
                if isinstance(err, NonFiniteInput):
                    if node.op == "load" and node.params[0] is err.source and node.span is not None:
                        err.with_note("the input, loaded here", node.span)
                elif node.op in ("div", "rdiv") and node.span is not None:
                    err.with_note("a division that can produce inf or nan", node.span)
            raise err from None
        finally:
            ev.pool.trim()
            ev.host.trim()
        _release(step, tp.steps[i + 1] if i + 1 < len(tp.steps) else None)


def _write_step(ev: Evaluator, step: Step, options: Options, write, on_host: bool,
                bar: Any = NULL_BAR) -> None:
    """Compute one output tensor chunk by chunk (the step's chunk, as planned), cast each
    chunk into a buffer on the sink's side (the host for files), check it, and hand it
    to `write`."""
    out = step.out
    code = out.spec.dtype
    n = out.spec.numel
    chunk = step.chunk
    target = torch_dtype(code)
    pool = ev.host if on_host else ev.pool
    width = target.itemsize  # bytes per element written, for progress
    for e0 in range(0, n, chunk):
        e1 = min(n, e0 + chunk)
        value = ev.eval(out.expr, e0, e1, guard=not options.check_finite)
        if value.dtype == target and value.device == pool.device:
            data = value
        else:
            data = pool.take(e1 - e0, target)
            data.copy_(value)
            ev.pool.give(value)
        # the sum is not finite exactly when some element is not (or the sum overflows,
        # which the exact check then clears): one cheap pass in the common case
        if options.check_finite and data.is_floating_point() and not bool(torch.isfinite(data.sum())):
            if not bool(torch.isfinite(data).all()):
                ev.eval(out.expr, e0, e1)  # every input checked: raises if one holds the inf or nan
                raise _nonfinite(out.name, data, e0, code)
        write(out.name, e0, data)
        bar.update((e1 - e0) * width)
        pool.give(data)


class NonFiniteInput(AlgRuntimeError):
    """An input holds inf or nan: alg refuses it, whatever the recipe computes from it."""


def _nonfinite_input(leaf: Leaf, x: torch.Tensor, e0: int) -> NonFiniteInput:
    """The error for an input chunk `x` (elements e0.. of `leaf`, in the compute dtype)
    that is not finite: the tensor, the input, the first bad element and its stored value."""
    i = int((~torch.isfinite(x)).nonzero()[0])
    stored = float(leaf.source.read(leaf.name, e0 + i, e0 + i + 1).to(torch.float64)[0])
    why = f"it holds {stored}" if not _finite(stored) else (
        f"it holds {stored:g}, beyond {dtype_name(code_of(x.dtype))}'s range (--float64 computes in float64)")
    err = NonFiniteInput(f"tensor '{leaf.name}' of input '{leaf.source.label}' is not finite at element "
                         f"{e0 + i}: {why}; alg refuses non-finite inputs")
    err.source = leaf.source
    return err


def _nonfinite(name: str, data: torch.Tensor, e0: int, code: str) -> AlgRuntimeError:
    # every input of the chunk has been checked (Evaluator.check_input): the result itself overflowed
    bad = int((~torch.isfinite(data)).nonzero()[0]) + e0
    return AlgRuntimeError(f"tensor '{name}' of the result is not finite at element {bad}: "
                           f"the result overflows {dtype_name(code)} or divides by zero")


# ---- sinks ------------------------------------------------------------------------------


def assert_close(sink: Any, options: Options, lowerer: Any, evaluator: Evaluator) -> None:
    """Run an assert_close sink: numbers directly; checkpoints streamed like a save, the
    per-element excess |x - y| - (atol + rtol*|y|) checked chunk by chunk."""
    from .plan import plan_tensors
    from .values import Model

    rtol, atol = sink.options["rtol"], sink.options["atol"]
    if not isinstance(sink.value, Model):
        for i, (x, y) in enumerate(zip(*sink.value, strict=True)):
            if not abs(x - y) <= atol + rtol * abs(y):
                where = f" (item {i})" if len(sink.value[0]) > 1 else ""
                raise AlgRuntimeError(f"assert_close failed{where}: {x!r} and {y!r} differ by "
                                      f"{abs(x - y):.6g}, more than {atol + rtol * abs(y):.6g}", sink.span)
        return
    config = RunConfig.of(options)
    tp = plan_tensors(sink.value, config, config.compute_code, lowerer)
    exprs = {t.name: t.expr for t in tp.tensors}
    failures: list[tuple[str, int]] = []

    def check(name: str, e0: int, excess: torch.Tensor) -> None:
        if excess.numel() and float(excess.max()) > 0:
            failures.append((name, e0 + int(excess.argmax())))

    run_tensor_plan(tp, options, check, sink.span, evaluator, desc="assert_close")
    if failures:
        name, i = failures[0]
        x, y = (float(evaluator.eval(arg, i, i + 1)[0]) for arg in exprs[name].args)
        distinct = len(dict.fromkeys(n for n, _ in failures))
        raise AlgRuntimeError(
            f"assert_close failed: {distinct} of {len(exprs)} tensors differ; first '{name}' at "
            f"element {i}: {x:.6g} vs {y:.6g}, beyond atol={atol:g} + rtol={rtol:g}*|y|",
            sink.span,
        )


def materialize(tp: TensorPlan, options: Options, device: torch.device | None = None,
                desc: str = "compute") -> dict[str, torch.Tensor]:
    """Compute a checkpoint into a state dict on `device` (default: the compute device);
    progress is shown under `desc`."""
    ev = new_evaluator(tp.config, options.check_finite)
    dev = device or ev.device
    out = {t.name: torch.empty(t.spec.shape, dtype=torch_dtype(t.spec.dtype), device=dev) for t in tp.tensors}
    flat = {name: t.view(-1) for name, t in out.items()}

    def write(name: str, e0: int, data: torch.Tensor) -> None:
        flat[name][e0 : e0 + data.numel()].copy_(data)

    run_tensor_plan(tp, options, write, evaluator=ev, on_host=dev.type == "cpu", desc=desc)
    return out


def new_evaluator(options: Options | RunConfig, check_finite: bool | None = None) -> Evaluator:
    """One per run: reductions that several sinks share are computed once. The device is
    resolved here, once per run; `check_finite` defaults to the options' own."""
    config = RunConfig.of(options)
    if check_finite is None:
        check_finite = getattr(options, "check_finite", True)
    return Evaluator(config.resolve_device(), config.torch_dtype(), check_finite)


def open_shards(folder: Path, shards, writers: dict[str, ShardWriter]) -> Callable[[str, int, torch.Tensor], None]:
    """Create the shard files `shards` ((file name, layout, tensor names), as in
    `SavePlan.shards`) in `folder`, adding each writer to `writers` (the caller closes
    them), and return the `write` for `run_tensor_plan` that puts each host chunk at its
    tensor's offset in its file."""
    by_name: dict[str, ShardWriter] = {}
    for fname, layout, names in shards:
        w = ShardWriter(folder / fname, layout)
        writers[fname] = w
        for n in names:
            by_name[n] = w

    def write(name: str, e0: int, data: torch.Tensor) -> None:
        by_name[name].write(name, e0 * data.element_size(), data)

    return write


def save(sp: SavePlan, options: Options, recipe_text: str, input_hashes: Callable[[], list] | None = None,
         evaluator: Evaluator | None = None, base_dir: Path | None = None, staging: Any = None,
         shards: Callable[..., None] | None = None) -> Path:
    """Write a SavePlan to a temporary folder and stage it: with a run's `staging`
    (io/target.py `Staging`), the folder is renamed into place when the whole run has
    succeeded; without one, at once. `input_hashes` gives the card's inputs
    (card.describe_inputs); `base_dir` is the recipe's folder. `shards(sp, options, folder,
    evaluator)`, when given, writes the shard files in place of this process (under --ray:
    `distributed_merge.shard_writer`); the rest of the folder is written here either way.
    On any failure (a signal, a full disk, a read-only folder) the temporary folder and the
    parent folders this save created are removed; an OSError becomes an AlgIOError."""
    from .io import target as tio

    own = staging is None
    if own:
        staging = tio.Staging()

    target = sp.target
    tmp = tio.temp_name(target)
    created: list[Path] = []
    writers: dict[str, ShardWriter] = {}
    hashes: list = []
    hasher = None
    try:
        created = tio.make_parents(target.parent)
        tio.remove_stale_temps(target.parent)  # left by runs killed with SIGKILL
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if input_hashes is not None:
            # hashing the inputs for the model card overlaps the computation
            def hash_inputs() -> None:
                try:  # on Linux this lowers this thread only: the computation keeps the cores
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
                except (AttributeError, OSError):
                    pass
                hashes.extend(input_hashes())

            hasher = threading.Thread(target=hash_inputs, daemon=True)
            hasher.start()
        if shards is not None:
            shards(sp, options, tmp, evaluator)
        else:
            write = open_shards(tmp, sp.shards, writers)
            run_tensor_plan(sp.tensor_plan, options, write, sp.span, evaluator, desc=f"save {target.name}")
            for w in writers.values():
                w.close()
        _write_metadata(sp, tmp)
        if hasher is not None:
            hasher.join()
        card_io.write_card(tmp / "README.md", sp, recipe_text, hashes, base_dir)
        staging.add(tmp, target, lambda t: _may_replace(t, sp))
        staging.made(created)
        created = []
        if own:
            staging.commit()
    except BaseException as exc:
        with tio.signals_held():
            for w in writers.values():
                w.close()
            shutil.rmtree(tmp, ignore_errors=True)
            tio.remove_created(created)
        if isinstance(exc, OSError):
            msg = tio.describe_os_error(exc, target, sp.tensor_plan.nbytes)
            raise AlgIOError(f"{msg}; nothing was left behind", sp.span) from None
        raise
    return target


def _write_metadata(sp: SavePlan, folder: Path) -> None:
    weight_map = {n: fname for fname, _, names in sp.shards for n in names}
    index = {"metadata": {"total_size": sp.tensor_plan.nbytes}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if sp.config is not None:
        (folder / "config.json").write_text(json.dumps(sp.config, indent=2, sort_keys=True) + "\n")
    t = sp.tensor_plan.model.type
    skip: set[str] = set()
    if t.tokenizer is not None:  # aligned: the output vocabulary's tokenizer, not the primary's
        from .vocab import write_tokenizer

        skip = write_tokenizer(t.tokenizer, folder)
    for f in getattr(t.primary, "extra_files", []):
        if f.name not in skip:
            shutil.copy2(f, folder / f.name)
    if sp.chat_template is not None:
        from . import chat

        chat.write(folder, sp.chat_template)


def _may_replace(target: Path, sp: SavePlan) -> None:
    """Judge an existing target again right before it is replaced (the disk may have
    changed since the check): only what overwrite may replace is replaced, and a symlink
    target is replaced itself, never the folder it points to."""
    if not os.path.lexists(target):
        return
    if not sp.overwrite:
        raise AlgIOError(f"'{target}' appeared while alg was writing it; not overwritten", sp.span)
    reason = sp.guard.refusal(target) if sp.guard is not None else None
    if reason is not None:
        raise AlgIOError(f"refusing to replace '{target}': {reason}", sp.span)
