"""Run the reward side of a recipe: sample, score, evaluate, write.

`RewardRun` holds what a run (or a TRL reward function, across calls) knows: resolved
`generate` samples, the scores computed so far (keyed like the on-disk cache), and the
`TreeEval` whose baselines and normalisation statistics are fixed once computed.

Order of work for `run_sinks`: resolve every `generate` (policies loaded one at a time),
plan every sink's queries together (`reward.plan`), then load each reward model once,
score its batches, store the scores in the cache and free it, and only then evaluate
the trees in float64 and write the outputs. A computed checkpoint (a merge) is
materialised in memory by the weight engine (`plan_tensors` + `materialize`) and loaded
into a model built without initialising weights, so nothing goes through disk.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AlgError, AlgRuntimeError
from ..options import Options
from ..runconfig import RunConfig
from ..types import human_bytes
from .builtins import EvalRequest, ScoreRequest
from .cache import ScoreCache, model_hash
from .data import Pairs, Responses, show_prompt
from .evaluate import accuracy, format_sweep, format_table, plot_sweep
from .generate import Generated, resolve
from .plan import Job, Query, RewardPlan, format_reward_plan, plan_rewards, tokenizer_for
from .pointwise import Points, TreeEval
from .values import ModelReward, Reward


def load_model(model: Any, options: Options, device: torch.device, dtype: torch.dtype, causal: bool = False):
    """A transformers model of a checked checkpoint value, on device, in eval mode. A
    loaded folder is read by transformers; a computed value (a merge, `layers`, `stack`,
    `align`) is built from its own checked config (layer count, vocabulary size: what its
    saved folder's config.json would say) and given its materialised tensors."""
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from ..plan import output_config

    hf_logging.disable_progress_bar()
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    primary = model.type.primary
    if model.node.op == "load" and getattr(primary, "folder", None) is not None:
        m = auto.from_pretrained(primary.folder, dtype=dtype, trust_remote_code=False)
    else:
        from transformers.initialization import no_init_weights

        from ..execute import materialize
        from ..plan import plan_tensors

        cfg = output_config(model.type, model.type.dtype)
        if cfg is None:
            raise AlgRuntimeError(f"{model.node.describe()} has no config.json to build a model from")
        with tempfile.TemporaryDirectory(prefix="alg-config-") as tmp:  # as its saved folder has it
            (Path(tmp) / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
            config = AutoConfig.from_pretrained(tmp, trust_remote_code=False)
        state = materialize(plan_tensors(model, options), options, torch.device("cpu"),
                            desc=f"compute {model.node.describe()}")
        with no_init_weights():  # parameters are replaced below; skip their random init
            m = auto.from_config(config, dtype=dtype, trust_remote_code=False)
        try:
            m.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                              assign=True, strict=True)
        except RuntimeError as e:  # its tensors do not fit its config: a bug of check, said plainly
            raise AlgRuntimeError(f"{model.node.describe()}: its tensors do not fit a {type(m).__name__} built "
                                  f"from its config: {str(e).splitlines()[0]}") from None
        del state
        if getattr(m.config, "tie_word_embeddings", False):
            m.tie_weights()
    return m.to(device).eval()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class RewardRun:
    def __init__(self, options: Options, out=None, keep_loaded: bool = False):
        self.options = options
        self.keep_loaded = keep_loaded  # a TRL reward function keeps its models between calls
        self._loaded: dict[Any, Any] = {}
        self.out = out or options.out
        self.device = RunConfig.of(options).resolve_device()  # once per reward run
        self.cache = ScoreCache()
        self.scores: dict[str, float] = {}
        self.generated: dict[Generated, Responses] = {}
        self.fallback: dict[tuple, list[str]] = {}  # (Generated, prompt) -> references sampled for missing=
        self._sampling = True
        self.tree = TreeEval(self._lookup, self.data, sample=self.sample_missing)
        self.keys: dict[tuple, str] = {}  # (scoring key, point) -> cache key, for lookup
        self.scored = 0  # texts scored by a model (not from a cache), for reports and tests
        self.loads = 0

    # ---- data ---------------------------------------------------------------------------

    def data(self, d: Any) -> Responses | Pairs:
        if isinstance(d, Generated):
            if d not in self.generated:
                raise AssertionError("generate() value used before it was resolved")
            return self.generated[d]
        return d

    def resolve_generations(self, roots: list[Any], sample: bool = True) -> None:
        """Sample every `generate` that the queries use (not yet cached): one policy at a
        time. With sample=False (alg plan), unsampled prompts get placeholders."""
        self._sampling = sample
        for g in _generated(roots):
            if g in self.generated:
                continue
            if not sample:
                self.generated[g] = _placeholders(g, g.spec.prompts)
                continue
            self.generated[g] = self._sample(g, g.spec.prompts)

    def _sample(self, g: Generated, prompts: tuple) -> Responses:
        """g's samples for `prompts` (the cached ones read, the others sampled)."""
        from dataclasses import replace

        holder: list = []

        def load(g=g, holder=holder):
            from transformers import AutoTokenizer

            from .plan import scoring_dtype, tokenizer_folder

            dtype = scoring_dtype(g.model, self.options, self.device)
            holder.append(load_model(g.model, self.options, self.device, dtype, causal=True))
            self.loads += 1
            return holder[0], AutoTokenizer.from_pretrained(tokenizer_folder(g.model), trust_remote_code=False), self.device

        t0 = time.perf_counter()
        part = g if prompts == g.spec.prompts else Generated(g.node, replace(g.spec, prompts=prompts), g.label, g.model)
        got, sampled = resolve(part, model_hash(g.node), load, self.options.progress)
        if sampled:
            self.out(f"sampled {g}: {sampled} prompt(s) x {g.spec.n} in {time.perf_counter() - t0:.2f}s")
        holder.clear()
        _free()
        return got

    def sample_missing(self, g: Generated, prompts: list) -> dict:
        """References for prompts a baseline's refs lack (missing=generate(...)): sampled
        from g's policy with g's options, once per run and cached on disk."""
        todo = tuple(p for p in dict.fromkeys(prompts) if (g, p) not in self.fallback)
        if todo:
            got = self._sample(g, todo) if self._sampling else _placeholders(g, todo)
            for p, samples in got.by_prompt().items():
                self.fallback[(g, p)] = samples
        return {p: self.fallback[(g, p)] for p in prompts}

    # ---- scoring --------------------------------------------------------------------------

    def plan(self, queries: list[Query]) -> RewardPlan:
        plan = plan_rewards(queries, self.options, self.data, self.scores, self.cache, self.device,
                            self.sample_missing)
        for job in plan.jobs:
            for g in job.groups:
                for p, k in zip(g.points, g.keys, strict=True):
                    self.keys[(g.leaf.scoring_key, p)] = k
        return plan

    def execute(self, plan: RewardPlan) -> None:
        for job in plan.jobs:
            if job.n_todo:
                self._run_job(job)
            else:
                self.out(f"{job.label}: all {job.n_texts} text(s) cached")

    def _run_job(self, job: Job) -> None:
        t0 = time.perf_counter()
        model = self._loaded.get((job.node, job.dtype))
        if model is None:
            model = load_model(job.model, self.options, self.device, job.dtype)
            self.loads += 1
            if self.keep_loaded:
                self._loaded[(job.node, job.dtype)] = model
        try:
            tok = tokenizer_for(job.groups[0].leaf)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            if model.config.pad_token_id is None:
                model.config.pad_token_id = pad
            n = 0
            with self.options.progress.bar(job.n_todo, f"score {job.label}", unit="text") as bar:
                for g in job.groups:
                    for b in g.batches:
                        width = max(len(x) for x in b.input_ids)
                        ids = torch.full((len(b.input_ids), width), pad, dtype=torch.long)
                        mask = torch.zeros((len(b.input_ids), width), dtype=torch.long)
                        for i, x in enumerate(b.input_ids):  # right padding: real tokens first
                            ids[i, : len(x)] = torch.tensor(x)
                            mask[i, : len(x)] = 1
                        with torch.no_grad():
                            logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                        values = logits[:, 0].double().cpu().tolist()
                        fresh = list(zip(b.keys, values, strict=True))
                        self.scores.update(fresh)
                        self.cache.put_many(fresh)
                        n += len(values)
                        bar.update(len(values))
            self.scored += n
        finally:
            del model
            _free()
        self.out(f"scored {n} text(s) with {job.label} in {time.perf_counter() - t0:.2f}s "
                 f"({job.n_texts - n} cached)")

    def _lookup(self, leaf: ModelReward, points: Points) -> np.ndarray:
        sk = leaf.scoring_key
        return np.array([self.scores[self.keys[(sk, p)]] for p in points], dtype=np.float64)

    def values(self, r: Reward, points: Points) -> np.ndarray:
        return self.tree.value(r, points)

    def ensure(self, queries: list[Query]) -> RewardPlan:
        """Sample, plan and score whatever the queries need."""
        self.resolve_generations([r for r, _ in queries])
        plan = self.plan(queries)
        self.execute(plan)
        return plan

    def close(self) -> None:
        self.cache.close()
        self._loaded.clear()


def _placeholders(g: Generated, prompts: tuple) -> Responses:
    """g's samples where cached, else placeholders (alg plan samples nothing)."""
    from .data import Row
    from .generate import cached_samples

    policy_hash = model_hash(g.node)
    rows: list = []
    for p in prompts:
        got = cached_samples(policy_hash, g.spec, p) or [f"<sample {i}>" for i in range(g.spec.n)]
        rows.extend(Row(p, s, None, len(rows) + 1) for s in got)
    return Responses(str(g), tuple(rows))


def _generated(roots: list[Any]) -> list[Generated]:
    out: dict[Generated, None] = {}
    for r in roots:
        if isinstance(r, Generated):
            out.setdefault(r, None)
        if not isinstance(r, Reward):
            continue
        for t in r.walk():
            for d in (getattr(t, "refs", None), getattr(t, "data", None)):
                if isinstance(d, Generated):
                    out.setdefault(d, None)
    return list(out)


# ---- sinks -------------------------------------------------------------------------------


def _queries(run: RewardRun, sinks: list) -> list[Query]:
    queries: list[Query] = []
    for sink in sinks:
        req = sink.value
        if isinstance(req, ScoreRequest):
            queries.append((req.reward, run.data(req.data).points()))
        elif isinstance(req, EvalRequest):
            pts = req.pairs.points()
            queries.extend((r, pts) for r in req.rewards)
    return queries


def _roots(sinks: list) -> list[Any]:
    roots: list[Any] = []
    for sink in sinks:
        req = sink.value
        if isinstance(req, ScoreRequest):
            roots += [req.reward, req.data]
        else:
            roots += req.rewards
    return roots


def run_sinks(sinks: list, options: Options, staging: Any = None) -> RewardRun:
    """Run every score/evaluate sink of a run, sharing one scoring plan; their files are
    staged with the run's other outputs (`staging`), or moved into place at once."""
    run = RewardRun(options)
    try:
        run.resolve_generations(_roots(sinks))
        try:
            plan = run.plan(_queries(run, sinks))
        except AlgError as err:
            raise err.at(sinks[0].span) from None
        run.execute(plan)
        for sink in sinks:
            try:
                if isinstance(sink.value, ScoreRequest):
                    _write_scores(run, sink.value, staging)
                else:
                    _write_eval(run, sink.value, staging)
            except AlgError as err:
                raise err.at(sink.span) from None
    finally:
        run.close()
    return run


def plan_text(sinks: list, options: Options) -> str:
    run = RewardRun(options)
    try:
        run.resolve_generations(_roots(sinks), sample=False)
        try:
            return format_reward_plan(run.plan(_queries(run, sinks)))
        except AlgError as err:
            raise err.at(sinks[0].span) from None
    finally:
        run.close()


def score_command(session: Any, name: str, data: Path, out: Path) -> None:
    """`alg score RECIPE NAME --data FILE --out FILE`: NAME's rewards for FILE's rows, with
    its named sub-terms, as score() would write them. Paths are relative to the cwd."""
    from ..errors import AlgNameError, AlgTypeError
    from ..io.files import absolute
    from ..values import Sink
    from .data import read_responses

    env = session.checker.env.values
    if name not in env:
        from ..errors import did_you_mean

        raise AlgNameError(f"the recipe defines no name '{name}'{did_you_mean(name, env)}")
    r = env[name]
    if not isinstance(r, Reward):
        from ..types import type_name

        raise AlgTypeError(f"'{name}' is a {type_name(r)}, not a Reward")
    terms = set(r.walk())
    names = [(n, v) for n, v in env.items() if isinstance(v, Reward) and v in terms and v != r]
    # the command line names --out itself: it is replaced, as an -o FILE is
    req = ScoreRequest(r, read_responses(absolute(data, Path.cwd()), str(data)), out.resolve(), names, True)
    run_sinks([Sink("score", None, req)], session.options)


def _finite(values: np.ndarray, what: str, points: Points, lines: list[int] | None = None) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        i = int(bad[0])
        where = f"row {lines[i]}" if lines else f"item {i + 1}"
        raise AlgRuntimeError(f"{what} is {values[i]} at {where} (prompt {show_prompt(points[i][0])}); "
                              f"{len(bad)} value(s) are not finite")


def _atomic_write(path: Path, text: str, binary: bytes | None = None, staging: Any = None,
                  overwrite: bool = True) -> None:
    """Write to a temporary name and stage it (io/target.py `Staging`): renamed into place
    with the rest of the run's outputs, or at once without a `staging`. On failure (a
    signal, a full disk) nothing is left, parent folders it made included, and an OSError
    is an AlgIOError. Without `overwrite`, a file that appeared since the check is kept."""
    from ..errors import AlgIOError
    from ..io import target as tio

    own = staging is None
    if own:
        staging = tio.Staging()
    tmp = tio.temp_name(path)
    created: list[Path] = []
    try:
        created = tio.make_parents(path.parent)
        tio.remove_stale_temps(path.parent)
        if binary is not None:
            tmp.write_bytes(binary)
        else:
            tmp.write_text(text, encoding="utf-8")
        staging.add(tmp, path, None if overwrite else _not_appeared)
        staging.made(created)
        created = []
        if own:
            staging.commit()
    except BaseException as exc:
        with tio.signals_held():
            tmp.unlink(missing_ok=True)
            tio.remove_created(created)
        if isinstance(exc, OSError):
            raise AlgIOError(f"{tio.describe_os_error(exc, path)}; nothing was left behind") from None
        raise


def _not_appeared(path: Path) -> None:
    from ..errors import AlgIOError

    if os.path.lexists(path):
        raise AlgIOError(f"'{path}' appeared while alg was writing it; not overwritten")


def _write_scores(run: RewardRun, req: ScoreRequest, staging: Any) -> None:
    data = run.data(req.data)
    points = data.points()
    lines = [r.line for r in data.rows]
    total = run.values(req.reward, points)
    _finite(total, "the reward", points, lines)
    named = [(name, run.values(r, points)) for name, r in req.names]
    out = []
    for i, row in enumerate(data.rows):
        raw = dict(row.raw) if isinstance(row.raw, dict) else {"prompt": row.prompt, "response": row.response}
        raw["reward"] = float(total[i])
        for name, v in named:
            raw[name] = float(v[i])
        out.append(json.dumps(raw, ensure_ascii=False))
    _atomic_write(req.out, "\n".join(out) + "\n", staging=staging, overwrite=req.overwrite)
    run.out(f"wrote {_rel(req.out)}: {len(out)} rows, mean reward {float(np.mean(total)):.4f}")


def _write_eval(run: RewardRun, req: EvalRequest, staging: Any) -> None:
    rows = req.pairs.rows
    chosen_pts = [(r.prompt, r.chosen) for r in rows]
    rejected_pts = [(r.prompt, r.rejected) for r in rows]
    subsets = [r.subset for r in rows]
    results = []
    for j, reward in enumerate(req.rewards):
        c, rj = run.values(reward, chosen_pts), run.values(reward, rejected_pts)
        _finite(c, "the reward of a chosen response", chosen_pts, [r.line for r in rows])
        _finite(rj, "the reward of a rejected response", rejected_pts, [r.line for r in rows])
        res = {"reward": str(reward), **accuracy(c, rj, subsets)}
        if len(req.rewards) > 1 or req.xs is not None or req.plot is not None:
            res = {"x": req.xs[j] if req.xs is not None else j, **res}
        results.append(res)
    if "x" not in results[0]:
        doc: dict[str, Any] = {"pairs": str(req.pairs), **results[0]}
        table = format_table(results[0])
    else:
        doc = {"pairs": str(req.pairs), "xlabel": req.xlabel, "results": results}
        table = format_sweep(req.xlabel, results)
    _atomic_write(req.out, json.dumps(doc, indent=2, ensure_ascii=False) + "\n", staging=staging,
                  overwrite=req.overwrite)
    run.out(table)
    run.out(f"wrote {_rel(req.out)}")
    if req.plot is not None:
        import io

        buf = io.BytesIO()
        plot_sweep(buf, req.xlabel, results, f"preference accuracy on {req.pairs.label}")
        _atomic_write(req.plot, "", buf.getvalue(), staging=staging, overwrite=req.overwrite)
        run.out(f"wrote {_rel(req.plot)}")


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


__all__ = ["RewardRun", "human_bytes", "load_model", "plan_text", "run_sinks"]
