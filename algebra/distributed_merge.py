"""Merges on a Ray cluster: `save(...)` under `alg run --ray`, `$ALG_RAY`, `Interpreter(ray=...)`.

A save plans in the driver as it does locally (`plan.plan_save`: the steps, the shards
and their byte layouts) and writes into the same temporary folder beside its target
(`execute.save`), which must be on a filesystem every node of the cluster sees. Only the
computation moves, into Ray tasks (`_task`), which `write_shards` hands out:

  reductions  one task per reduction step the run has not computed yet (`Reduction`:
              SLERP angles, TIES thresholds, Gram matrices), in plan order; a reduction
              that needs others (WARP's chain of Grams) receives their values as Ray
              object references, so Ray runs it once they exist. Each returns its value
              (plain numbers and small arrays), which the driver also keeps in the run's
              evaluator, so a later save of the run reuses it, as locally.
  shards      one task per output shard: it creates the shard file (`ShardWriter`: header,
              final size), computes its tensors chunk by chunk and writes them at their
              planned offsets, given the values of the reductions they read.

What travels to a task is what rebuilds the plan, not the plan: the checked model value
(`distributed.dumps_model`, put once in Ray's object store), the run configuration and the
output dtype. The task lowers and plans it again (`plan.plan_tensors`: deterministic, a
few milliseconds for headers) and runs the steps it was given by index with the local
executor (`execute.run_tensor_plan`), after checking that each such step describes itself
as the driver's does. So the arithmetic, the chunking and the counter-based DARE/DELLA
draws are the local run's, and the bytes are too; the driver then writes the index, the
config, the tokenizer and the card with the local code (`execute.save`), and the folder
is staged (io/target.py `Staging`) only when every task has succeeded.

Threads. A task, reduction or shard, runs on the CPUs Ray gave it
(`distributed.CPUS_PER_WORKER`): shard work is elementwise or row-wise, and reductions
sum with `ops/sums.py`, whose float64 sums round the same on any thread count, so the
bytes do not depend on how many threads a task or the driver has.

Faults. A task whose process dies (a crash, a lost node) is run again by Ray
(`max_retries`: `distributed.RETRIES`); a shard task starts its file again from the
header. Past the retries, or when a task raises (an alg error: a non-finite result; an
OSError: a full disk), the run fails with that error, the tasks still running are
cancelled (their processes killed) before the driver removes the temporary folder, and
nothing is moved into place. `distributed.FAULT_ENV` (the one test hook) kills a shard
task's process after its first chunk.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import AlgError, AlgIOError, AlgRuntimeError
from .options import Options


def shard_writer(options: Options) -> Any:
    """What `execute.save` takes as `shards`: `write_shards` under --ray, else None
    (the shards are written in this process)."""
    return write_shards if options.ray != "off" else None


def write_shards(sp: Any, options: Options, folder: Path, evaluator: Any = None) -> None:
    """Write the shard files of SavePlan `sp` into `folder` (the save's temporary folder)
    with Ray tasks, computing the reductions the run has not computed yet first, as tasks
    too. Returns when every task has succeeded; raises the first failure otherwise, after
    cancelling the rest."""
    from . import distributed
    from .ir import expr_deps

    ray = distributed.connect(options.ray)
    t0 = time.perf_counter()
    tp = sp.tensor_plan
    steps = tp.steps
    index = {id(s.gram): i for i, s in enumerate(steps) if s.kind == "reduce"}
    known = dict(evaluator.results) if evaluator is not None else {}  # before this save
    gpus = int(ray.cluster_resources().get("GPU", 0)) if tp.config.device != "cpu" else 0
    device = "cuda" if tp.config.device.startswith("cuda") else tp.config.device  # the task's GPU is its cuda
    need = {"num_gpus": 1} if gpus else {}
    remote = ray.remote(_task)
    job = {
        "config": replace(tp.config, device=device),
        "out_dtype": tp.out_dtype,
        "options": distributed.actor_options(options, "cpu"),
        "span": sp.span,
        "fault": os.environ.get(distributed.FAULT_ENV) or None,
        "folder": str(Path(folder).resolve()),
    }
    blob = ray.put(distributed.dumps_model(tp.model))

    def closure(reductions) -> list[int]:
        found: set[int] = set()
        stack = list(reductions)
        while stack:
            r = stack.pop()
            i = index[id(r)]
            if i not in found:
                found.add(i)
                stack.extend(r.deps)
        return sorted(found)

    values: dict[int, Any] = {}  # reduce step -> its value or a reference to it
    pending: dict[Any, tuple[str, Any]] = {}  # reference -> (what, payload)

    def submit(work: dict, what: str, payload: Any) -> Any:
        # the steps it runs and reads, as the driver describes them: the task checks its own plan
        work["describe"] = {i: steps[i].describe() for i in work["steps"] + work["deps"]}
        task = remote.options(num_cpus=distributed.CPUS_PER_WORKER, max_retries=distributed.RETRIES, **need)
        ref = task.remote(job, blob, work, *(values[d] for d in work["deps"]))
        pending[ref] = (what, payload)
        return ref

    try:
        for i, step in enumerate(steps):
            if step.kind != "reduce":
                continue
            if step.gram in known:
                values[i] = known[step.gram]
                continue
            values[i] = submit({"steps": [i], "deps": closure(step.gram.deps), "shard": None},
                               f"computing {step.gram.label}", i)
        by_name = {step.out.name: i for i, step in enumerate(steps) if step.kind == "write"}
        for fname, layout, names in sp.shards:
            mine = sorted(by_name[n] for n in names)
            deps = closure(r for i in mine for r in expr_deps(steps[i].out.expr))
            submit({"steps": mine, "deps": deps, "shard": (fname, layout, names)}, f"writing {fname}",
                   (sum(steps[i].out.spec.nbytes for i in mine), len(mine)))
        with options.progress.bar(tp.nbytes, f"save {sp.target.name} (Ray)", unit="B", items=len(tp.tensors),
                                  item_unit="tensors") as bar:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                what, payload = pending[ref]
                value = _get(ray, ref, what)
                del pending[ref]
                if isinstance(payload, int):  # a reduction: the run keeps its value
                    if evaluator is not None:
                        evaluator.results[steps[payload].gram] = value
                else:
                    nbytes, n = payload
                    bar.update(nbytes)
                    for _ in range(n):
                        bar.item_done()
    except BaseException:
        _cancel(ray, list(pending))
        raise
    n_red = sum(1 for s in steps if s.kind == "reduce" and s.gram not in known)
    options.out(f"save {sp.target.name} on Ray: {len(sp.shards)} shard task(s)"
                + (f" after {n_red} reduction task(s)" if n_red else "")
                + f", {time.perf_counter() - t0:.2f}s")


def _get(ray: Any, ref: Any, what: str) -> Any:
    """A task's result; its failure as the user's error (an AlgError, an OSError for
    `execute.save` to describe) or an AlgRuntimeError."""
    from . import distributed

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the task raised (or a task it needed did)
        cause = getattr(e, "cause", None)
        if isinstance(cause, AlgError | OSError):
            raise cause from None
        raise AlgRuntimeError(f"a Ray task {what} failed: "
                              f"{type(cause).__name__ if cause else ''}: {cause or e}") from None
    except ray.exceptions.RayError as e:  # its process died past the retries, its node was lost
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AlgRuntimeError(f"the Ray task {what} died and was run again {distributed.RETRIES} time(s) "
                              f"without finishing: {first}") from None


def _cancel(ray: Any, refs: list) -> None:
    """Stop the tasks still running (their processes killed) and wait until they have,
    so that none writes into the temporary folder the driver then removes."""
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # finished meanwhile, or already cancelled
            pass
    try:
        ray.wait(refs, num_returns=len(refs), timeout=60)
    except Exception:
        pass


# ---- the task ---------------------------------------------------------------------------------


def _task(job: dict, blob: bytes, work: dict, *dep_values: Any) -> Any:
    """One Ray task: plan the model again, then run steps `work["steps"]` of the plan (one
    reduction, or the writes of one shard) with the local executor, given the values of
    the reductions `work["deps"]`. Returns the reduction's value (None for a shard)."""
    import torch

    from . import distributed, execute, registry
    from .lower import Lowerer
    from .plan import plan_tensors

    config = replace(job["config"], threads=distributed.assigned_threads())  # see the module's "Threads"
    assert registry  # imported for the builtin families a lowering reads, in a fresh process
    options = job["options"]
    tp = plan_tensors(pickle.loads(blob), config, job["out_dtype"], Lowerer())
    for i, text in work["describe"].items():
        if i >= len(tp.steps) or tp.steps[i].describe() != text:
            raise AlgRuntimeError(f"internal error: a Ray task planned the save differently from the driver "
                                  f"(step {i + 1}: '{text}'); please report it")
    ev = execute.new_evaluator(config, options.check_finite)
    for i, v in zip(work["deps"], dep_values, strict=True):
        ev.results[tp.steps[i].gram] = v
    sub = replace(tp, steps=[tp.steps[i] for i in work["steps"]])
    writers: dict = {}
    write: Any = None
    if work["shard"] is not None:
        fname = work["shard"][0]
        folder = Path(job["folder"])
        try:
            put = execute.open_shards(folder, [work["shard"]], writers)
        except FileNotFoundError:
            if folder.is_dir():
                raise
            import socket

            raise AlgIOError(f"the Ray task writing {fname} on {socket.gethostname()} does not see the save's "
                             f"temporary folder '{folder}': under --ray the output folder must be on a "
                             "filesystem every node of the cluster sees", job["span"]) from None
        fault = job["fault"]

        def write(name: str, e0: int, data: torch.Tensor) -> None:
            put(name, e0, data)
            if fault:
                from .distributed import _fault_hook

                _fault_hook(fault)  # dies once, mid-shard

    try:
        execute.run_tensor_plan(sub, options, write, job["span"], ev, desc="ray task")
    except AlgError as e:
        if getattr(e, "source", None) is not None:
            e.source = None  # an input's open mapping does not travel back; its message names it
        raise
    finally:
        for w in writers.values():
            w.close()
    return None if work["shard"] is not None else ev.results[sub.steps[0].gram]


__all__ = ["shard_writer", "write_shards"]
