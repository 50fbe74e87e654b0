"""The embeddable interpreter: source text in, effects and values out.

    interp = Interpreter(device="cpu")
    interp.eval('save(lerp(a, b, 0.3), "out/m")', a="models/a", b="models/b")
    avg = interp.eval("ema([avg, cur], 0.01)", avg=avg_sd, cur=model).state_dict()

`eval` parses, checks the whole text (nothing runs if any of it is wrong), then runs its
sinks in order and returns the value of its last expression. A checkpoint comes back as
a lazy `Result` that can be saved or materialised as a state dict on the bindings'
device, without a round trip through disk. The CLI and the REPL are thin shells over
`Session`, which this module also provides.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import graph
from .check import Checked, Checker, SaveRequest, bind_source
from .distributed_merge import shard_writer
from .errors import AlgError, AlgIOError, AlgTypeError
from .io.checkpoint import CheckpointSource, MemorySource
from .lazy import torch
from .lower import Lowerer
from .options import Options
from .parser import parse
from .plan import format_plan, plan_save, plan_tensors
from .signature import show
from .source import Source
from .types import dtype_name, human_bytes, human_count, parse_size
from .values import Model, Sink


class Session:
    """One checker (its environment persists) plus the machinery to run sinks."""

    def __init__(self, options: Options | None = None, base_dir: Path | None = None, mode: str = "file"):
        self.options = options or Options()
        self.checker = Checker(self.options, base_dir, mode)

    def check(self, source: Source) -> Checked:
        return self.checker.check(parse(source))

    def run(self, source: Source) -> Checked:
        checked = self.check(source)
        self.run_sinks(checked.sinks)
        return checked

    def run_sinks(self, sinks: list[Sink]) -> None:
        """Run the sinks in order. The run is all or nothing: every output (saves, score
        and evaluate files, plots) is staged under a temporary name and moved into place
        when all sinks have succeeded; on any failure, a signal included, none is, and an
        output they would have replaced is kept (io/target.py `Staging`)."""
        from .io.target import Staging

        staging = Staging()
        try:
            self._run_sinks(sinks, staging)
            staging.commit()
        except BaseException as exc:
            staged = staging.added
            staging.rollback()
            if staged and isinstance(exc, AlgError):
                exc.with_note(f"a run is all or nothing: the {staged} output(s) written before this "
                              "error were discarded, and nothing was replaced")
            raise

    def _run_sinks(self, sinks: list[Sink], staging: Any) -> None:
        # shared by every sink of the run: a subexpression is lowered once and a reduction
        # (a SLERP angle) computed once, however many saves use it
        lowerer = Lowerer()
        computes = any(s.kind in ("save", "assert_close") for s in sinks)
        if computes:
            from . import execute  # only a run that computes a tensor imports torch
        evaluator = execute.new_evaluator(self.options) if computes else None
        rewards_done = False
        for sink in sinks:
            if sink.kind in REWARD_SINKS:
                # every score/evaluate of the run at once: each reward model loaded once
                if not rewards_done:
                    from .reward.engine import run_sinks as run_reward_sinks

                    run_reward_sinks([s for s in sinks if s.kind in REWARD_SINKS], self.options, staging)
                    rewards_done = True
                continue
            if sink.kind == "save":
                req: SaveRequest = sink.value
                sp = plan_save(req, self.options, lowerer)
                t0 = time.perf_counter()
                execute.save(sp, self.options, sink.span.source.text, _hasher(req.model, self.checker.base_dir),
                             evaluator, self.checker.base_dir, staging, shard_writer(self.options))
                dt = time.perf_counter() - t0
                self.options.out(
                    f"wrote {_rel(req.path)}: {len(sp.tensor_plan.tensors)} tensors, "
                    f"{human_bytes(sp.tensor_plan.nbytes)} {dtype_name(sp.tensor_plan.out_dtype)} "
                    f"in {len(sp.shards)} shard(s), {dt:.2f}s"
                )
            elif sink.kind == "print":
                self.options.out(show(sink.value, quote=False))
            elif sink.kind == "info":
                self.options.out(format_info(sink.value))
            elif sink.kind == "show":
                self.options.out(show(sink.value))
            elif sink.kind == "assert_close":
                execute.assert_close(sink, self.options, lowerer, evaluator)
            else:
                raise AssertionError(sink.kind)

    def plan_text(self, sinks: list[Sink], verbose: bool = False) -> str:
        lowerer = Lowerer()
        parts = []
        peak = 0
        for sink in sinks:
            if sink.kind == "save":
                sp = plan_save(sink.value, self.options, lowerer)
                parts.append(format_plan(sp, verbose))
                peak = max(peak, sp.peak_bytes)
            elif sink.kind in REWARD_SINKS:
                parts.append(f"{sink.kind} {_describe_reward_sink(sink)}")
            else:  # print, info, show: from headers and folded values; nothing to compute
                parts.append(f"{sink.kind} {show(sink.value)}")
        reward_sinks = [s for s in sinks if s.kind in REWARD_SINKS]
        if reward_sinks:
            from .reward.engine import plan_text as reward_plan_text

            parts.append(reward_plan_text(reward_sinks, self.options))
        parts.append(f"predicted peak working memory of the run: {human_bytes(peak)}"
                     + (" (weights; scoring above)" if reward_sinks else ""))
        return "\n".join(parts)


REWARD_SINKS = ("score", "evaluate", "kl", "winrate", "front")


def _describe_reward_sink(sink: Sink) -> str:
    req = sink.value
    if sink.kind == "score":
        return f"{req.reward} on {req.data} -> {_rel(req.out)}"
    if sink.kind in ("kl", "winrate", "front"):
        return req.describe() + (f" -> {_rel(req.out)}" if req.out is not None else "")
    what = str(req.rewards[0]) if len(req.rewards) == 1 else f"{len(req.rewards)} rewards"
    return f"{what} on {req.pairs} -> {_rel(req.out)}"


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _hasher(model: Model, base_dir: Path | None):
    """A function describing a model's on-disk inputs for its card, their files hashed
    (run beside the save)."""
    g = graph.build([model.node])
    sources = [n.params[0] for n in graph.inputs(g) if isinstance(n.params[0], CheckpointSource)]

    def run() -> list:
        from .io.card import describe_inputs

        return describe_inputs(sources, base_dir)

    return run


def format_info(m: Model) -> str:
    t = m.type
    lines = [f"{m.node.describe()}"]
    lines.append(f"  architecture: {t.architecture}")
    lines.append(f"  tensors:      {len(t.tensors)}")
    lines.append(f"  parameters:   {human_count(t.n_params)} ({t.n_params})")
    lines.append(f"  dtype:        {dtype_name(t.dtype)}")
    if m.node.op == "load":
        lines.append(f"  size on disk: {human_bytes(t.primary.nbytes_on_disk)}")
    else:
        lines.append(f"  size when saved: {human_bytes(t.nbytes)}")
    if t.config:
        keys = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size") if k in t.config]
        if keys:
            lines.append("  config:       " + ", ".join(f"{k}={t.config[k]}" for k in keys))
    for note in t.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


class Result:
    """A lazy checkpoint returned by `Interpreter.eval`."""

    def __init__(self, interp: Interpreter, model: Model, source_text: str):
        self._interp = interp
        self.model = model
        self._source_text = source_text

    def __repr__(self) -> str:
        return f"<alg.Result {self.model.type.describe()}>"

    @property
    def tensors(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Names to (shape, dtype) of the result, known without computing it."""
        return {n: (s.shape, dtype_name(s.dtype)) for n, s in self.model.type.tensors.items()}

    def _device(self) -> torch.device:
        for node in self.model.node.walk():
            if node.op == "load" and isinstance(node.params[0], MemorySource):
                return node.params[0].device
        from . import execute

        return execute.resolve_device(self._interp.options.device)

    def plan(self) -> str:
        return format_plan(plan_tensors(self.model, self._interp.options))

    def state_dict(self, device: str | torch.device | None = None, dtype: str | None = None) -> dict[str, torch.Tensor]:
        """Compute every tensor into memory, on the bindings' device by default."""
        from . import execute
        from .types import DTYPE_ALIASES

        code = DTYPE_ALIASES[dtype.lower()] if dtype else None
        opts = self._interp.options
        # a device the machine lacks is an AlgError, as for --device
        dev = execute.resolve_device(str(device)) if device is not None else self._device()
        if opts.device == "auto":
            opts = _with_device(opts, str(dev))
        tp = plan_tensors(self.model, opts, code)

        return execute.materialize(tp, opts, dev)

    def save(self, path: str | Path, dtype: str | None = None, shard_size: str | int = "5GB",
             overwrite: bool = False, chat_template: str | None = None) -> Path:
        from . import chat
        from .io import target as tio
        from .types import DTYPE_ALIASES

        template = None
        if chat_template is not None:
            try:
                template = chat.choose(chat_template, chat.input_folders(self.model))
            except ValueError as e:
                raise AlgTypeError(str(e)) from None

        target = tio.target_path(str(path), Path.cwd())  # a bad path: an AlgIOError
        force = overwrite or self._interp.options.force
        inputs = [n.params[0].path.resolve() for n in self.model.node.walk()
                  if n.op == "load" and hasattr(n.params[0], "path")]
        guard = tio.OverwriteGuard(str(path), Path.cwd().resolve(), inputs, [])
        if os.path.lexists(target):
            if not force:
                raise AlgIOError(f"'{path}' already exists; pass overwrite=True")
            reason = guard.refusal(target)
            if reason is not None:
                raise AlgIOError(f"refusing to replace '{path}': {reason}")
        req = SaveRequest(self.model, target, DTYPE_ALIASES[dtype.lower()] if dtype else None,
                          parse_size(shard_size), force, None, guard, template)
        sp = plan_save(req, self._interp.options)
        base_dir = self._interp.session.checker.base_dir
        from . import execute

        return execute.save(sp, self._interp.options, self._source_text, _hasher(self.model, base_dir),
                            base_dir=base_dir, shards=shard_writer(self._interp.options))


def _with_device(opts: Options, device: str) -> Options:
    return replace(opts, device=device)


def replay_recipe(recipe: Any) -> Any:
    """The reward a `reward.trl.Recipe` gives, rebuilt in this process: its evals replayed
    by checking alone, so no sink of an earlier eval runs again."""
    from .reward.trl import ResultRef, assigned_reward
    from .reward.values import Reward

    # checked, never run: the outputs the evals wrote exist now and are no error
    interp = Interpreter(options=replace(recipe.options, force=True), base_dir=recipe.base_dir)
    checked = None
    for text, bindings in recipe.history:
        env = interp.session.checker.env
        for name, value in bindings.items():
            if isinstance(value, ResultRef):
                value = interp.session.check(Source(value.text, "<eval>")).result
            else:
                value = interp._bind(name, value)
            env.values[name] = value
        checked = interp.session.check(Source(text, "<eval>"))
    value = checked.result if checked is not None and checked.has_result else \
        assigned_reward(interp.session.checker.env.values, recipe.history[-1][0]) if recipe.history else None
    for i in recipe.index:
        value = value[i] if isinstance(value, tuple) and i < len(value) else None
    if not isinstance(value, Reward):
        raise AlgTypeError("the recipe of this reward function no longer gives a reward")
    return value


class Interpreter:
    """The embeddable surface. Options are those of the CLI (`Options`)."""

    def __init__(self, device: str = "auto", *, base_dir: str | Path | None = None,
                 options: Options | None = None, **kwargs: Any):
        self.options = options or Options(device=device, **kwargs)
        self.session = Session(self.options, Path(base_dir) if base_dir else None, mode="eval")
        self._history: list[tuple[str, dict[str, Any]]] = []  # (source, bindings) of each eval

    def eval(self, source: str, **bindings: Any) -> Any:
        """Check and run `source` with `bindings` as names; return its last expression's
        value (a `Result` for a checkpoint, a Python value otherwise)."""
        env = self.session.checker.env
        for name, value in bindings.items():
            env.values[name] = self._bind(name, value)
        src = Source(source, "<eval>")
        checked = self.session.run(src)
        self._history.append((source, dict(bindings)))  # replayed by a pickled reward function
        if not checked.has_result:
            from .reward.trl import assigned_reward

            r = assigned_reward(env.values, source)  # `r = <reward>` gives the reward function r
            return None if r is None else self._wrap(r, source)
        return self._wrap(checked.result, source)

    def _wrap(self, value: Any, text: str, index: tuple[int, ...] = ()) -> Any:
        from .reward.values import Reward

        if isinstance(value, Model):
            return Result(self, value, text)
        if isinstance(value, Reward):  # a TRL reward function, named after its binding
            from .reward.trl import (
                Recipe,
                ResultRef,
                RewardFunction,
                picklable_options,
                reward_name,
            )

            history = tuple((t, {k: ResultRef(v._source_text) if isinstance(v, Result) else v for k, v in b.items()})
                            for t, b in self._history)
            recipe = Recipe(picklable_options(self.options), str(self.session.checker.base_dir), history, index,
                            replay=replay_recipe)
            return RewardFunction(value, self.options, reward_name(self.session.checker.env.values, value, text),
                                  recipe)
        if isinstance(value, tuple):
            return [self._wrap(v, text, index + (i,)) for i, v in enumerate(value)]
        return value

    def _bind(self, name: str, value: Any) -> Any:
        if isinstance(value, Result):
            return value.model
        if isinstance(value, str | Path):
            return self.session.checker.load(str(value), None)
        if isinstance(value, torch.nn.Module):
            config = getattr(value, "config", None)
            cfg = config.to_dict() if hasattr(config, "to_dict") else None
            if cfg is not None and hasattr(config, "architectures") and not cfg.get("architectures"):
                cfg["architectures"] = [type(value).__name__]
            return bind_source(MemorySource(value.state_dict(), cfg, label=name), None)
        if isinstance(value, dict):
            return bind_source(MemorySource(value, None, label=name), None)
        if isinstance(value, bool | int | float) or value is None:
            return value
        if isinstance(value, list | tuple):
            return tuple(self._bind(name, v) for v in value)
        raise AlgTypeError(
            f"binding '{name}': cannot use a {type(value).__name__}; pass a path, a state dict "
            "(dict of tensors), a torch.nn.Module, a number, or a list of these"
        )
