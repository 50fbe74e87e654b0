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

import json
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AlgError, AlgRuntimeError
from ..options import Options
from ..runconfig import RunConfig
from ..types import human_bytes
from .builtins import EvalRequest, KLRequest, ScoreRequest, WinRequest
from .cache import ScoreCache, model_hash
from .data import Pairs, Responses, show_prompt
from .evaluate import accuracy, format_sweep, format_table, plot_sweep
from .generate import Generated, policy_key, resolve
from .models import _free, load_model, pad_id, scorer
from .plan import Job, Query, RewardPlan, format_reward_plan, plan_rewards
from .pointwise import Points, TreeEval
from .values import ModelReward, Reward


class RewardRun:
    def __init__(self, options: Options, out=None, keep_loaded: bool = False):
        self.options = options
        self.keep_loaded = keep_loaded  # a TRL reward function keeps its models between calls
        self._loaded: dict[Any, Any] = {}
        self.out = out or options.out
        self.device = RunConfig.of(options).resolve_device()  # once per reward run; sets torch's threads
        self.cache = ScoreCache()
        self.scores: dict[str, float] = {}
        self.generated: dict[Generated, Responses] = {}
        self.kl: dict[tuple, KLResult] = {}  # (policy node, ref node, KLSpec) -> samples and log-ratios
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

        from .plan import scoring_dtype

        dtype = scoring_dtype(g.model, self.options, self.device)  # part of the samples' cache key

        def load(g=g, holder=holder):
            from transformers import AutoTokenizer

            from .plan import tokenizer_folder

            holder.append(load_model(g.model, self.options, self.device, dtype, causal=True))
            self.loads += 1
            return holder[0], AutoTokenizer.from_pretrained(tokenizer_folder(g.model), trust_remote_code=False), self.device

        t0 = time.perf_counter()
        part = g if prompts == g.spec.prompts else Generated(g.node, replace(g.spec, prompts=prompts), g.label, g.model)
        sampler, where = None, ""
        if self.options.ray != "off":  # a pool of Ray workers samples the batches (distributed.py)
            from ..distributed import sampler as on_ray

            sampler, where = on_ray(self, g), " on Ray"
        got, sampled = resolve(part, policy_key(model_hash(g.node), dtype), load, self.options.progress, sampler)
        if sampled:
            self.out(f"sampled {g}: {sampled} prompt(s) x {g.spec.n}{where} in {time.perf_counter() - t0:.2f}s")
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

    # ---- policy-level evaluation (kl, front) ------------------------------------------------

    def resolve_kl(self, reqs: list[KLRequest]) -> None:
        """Sample every kl/front policy and weigh its samples under the reference (one
        model in memory at a time); placeholders under alg plan."""
        for req in reqs:
            for pm in req.policies:
                key = (pm.node, req.ref.node, req.spec)
                if key not in self.kl:
                    self.kl[key] = self._kl(pm, req.ref, req.spec) if self._sampling else _kl_placeholders(pm, req.spec)

    def kl_result(self, pm: Any, req: KLRequest) -> KLResult:
        return self.kl[(pm.node, req.ref.node, req.spec)]

    def _kl(self, pm: Any, ref: Any, spec: Any) -> KLResult:
        from dataclasses import replace

        from transformers import AutoTokenizer

        from . import policy_eval as pe
        from .data import Row, to_messages
        from .plan import tokenizer_folder

        t0 = time.perf_counter()
        label, ref_label = pm.node.describe(), ref.node.describe()
        tok = AutoTokenizer.from_pretrained(tokenizer_folder(pm), trust_remote_code=False)
        prompts = list(spec.prompts)
        # the tokenizer travels to Ray workers, and the spec less its prompts (each item is one)
        own = self._each("kl_sample", pm, (tok, replace(spec, prompts=())), prompts, spec.n,
                         f"sample {label}", f"sampling {label}")
        sampled = [s for s, _ in own]
        refs = self._each("logprobs", ref, (), sampled, spec.n, f"weigh under {ref_label}",
                          f"weighing samples under {ref_label}")
        rows: list = []
        ratios: list[float] = []
        for p, (s, a_s), b_s in zip(prompts, own, refs, strict=True):
            for text, a, b in zip(pe.texts(tok, s), a_s, b_s, strict=True):
                raw = {"prompt": p if isinstance(p, str) else to_messages(p), "response": text}
                rows.append(Row(p, text, raw, len(rows) + 1))
                ratios.append(a - b)
        where = " on Ray" if self.options.ray != "off" else ""
        self.out(f"sampled {len(rows)} text(s) from {label} and weighed them under {ref_label}{where} "
                 f"in {time.perf_counter() - t0:.2f}s")
        return KLResult(Responses(f"samples of {label}", tuple(rows)), ratios)

    def _each(self, job: str, model: Any, setup: tuple, items: list, texts_per_item: int, bar_label: str,
              what: str) -> list:
        """`job` (a key of distributed.JOBS, with its fixed arguments `setup`) run on each
        of `items` by the causal LM `model` (a checked value), loaded once: in this
        process, or under --ray by a pool of Ray workers (distributed.run_pool; `what`
        names the work in its errors). The one place kl/front choose; results in items'
        order."""
        from ..distributed import JOBS, Work, run_pool
        from .plan import scoring_dtype

        dtype = scoring_dtype(model, self.options, self.device)
        out: list = [None] * len(items)
        on_ray = self.options.ray != "off"
        with self.options.progress.bar(len(items) * texts_per_item, bar_label + (" (Ray)" if on_ray else ""),
                                       unit="text") as bar:

            def store(i: int, result: Any) -> None:
                out[i] = result
                bar.update(texts_per_item)

            if on_ray:
                run_pool(self.options, Work(job, model, dtype, setup, what), items, store)
                return out
            causal, make = JOBS[job]
            loaded = load_model(model, self.options, self.device, dtype, causal=causal)
            self.loads += 1
            gone = weakref.ref(loaded)
            try:
                fn = make(loaded, self.device, *setup)
                for i, item in enumerate(items):
                    store(i, fn(item))
            finally:
                fn = loaded = None  # the policy and the reference are never in memory together
                _free(gone)
        return out

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

    def _store(self, keys: list[str], values: list[float]) -> None:
        """Scores computed for `keys`: kept for this run and written to the on-disk cache."""
        fresh = list(zip(keys, values, strict=True))
        self.scores.update(fresh)
        self.cache.put_many(fresh)

    def _run_job(self, job: Job) -> None:
        t0 = time.perf_counter()
        if self.options.ray != "off":  # a pool of Ray workers scores the batches (distributed.py)
            from ..distributed import score_job

            n = score_job(self, job)
            self.scored += n
            self.out(f"scored {n} text(s) with {job.label} on Ray in {time.perf_counter() - t0:.2f}s "
                     f"({job.n_texts - n} cached)")
            return
        model = self._loaded.get((job.node, job.dtype))
        if model is None:
            model = load_model(job.model, self.options, self.device, job.dtype)
            self.loads += 1
            if self.keep_loaded:
                self._loaded[(job.node, job.dtype)] = model
        try:
            score = scorer(model, pad_id(job), self.device)
            n = 0
            with self.options.progress.bar(job.n_todo, f"score {job.label}", unit="text") as bar:
                for g in job.groups:
                    for b in g.batches:
                        values = score(b.input_ids, b.shared)
                        self._store(b.keys, values)
                        n += len(values)
                        bar.update(len(values))
            self.scored += n
        finally:
            gone = weakref.ref(model)
            del model
            score = None  # noqa: F841  (its block cache goes with the model)
            if not self.keep_loaded:
                _free(gone)
        self.out(f"scored {n} text(s) with {job.label} in {time.perf_counter() - t0:.2f}s{self._on()} "
                 f"({job.n_texts - n} cached)")

    def _on(self) -> str:
        """Where the scoring ran, for the run's messages: the CPU threads (RunConfig.threads)."""
        if self.device.type != "cpu":
            return ""
        import torch

        n = torch.get_num_threads()
        return f" on {n} CPU thread{'s' if n != 1 else ''}"

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


@dataclass
class KLResult:
    responses: Responses  # the policy's samples, prompt by prompt
    logratios: list[float] | None  # per sample: log pi(y|x) - log pi_ref(y|x); None under alg plan


def _kl_placeholders(pm: Any, spec: Any) -> KLResult:
    from .data import Row

    rows = tuple(Row(p, f"<sample {i}>", None, k * spec.n + i + 1)
                 for k, p in enumerate(spec.prompts) for i in range(spec.n))
    return KLResult(Responses(f"samples of {pm.node.describe()}", rows), None)


def _placeholders(g: Generated, prompts: tuple) -> Responses:
    """g's samples where cached, else placeholders (alg plan samples nothing, and resolves
    no device: it shows the float32 samples a CPU run caches)."""
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
        elif isinstance(req, WinRequest):
            queries += [(req.reward, run.data(req.samples).points()), (req.reward, run.data(req.base).points())]
        elif isinstance(req, KLRequest) and req.reward is not None:
            queries.extend((req.reward, run.kl_result(pm, req).responses.points()) for pm in req.policies)
    return queries


def _roots(sinks: list) -> list[Any]:
    roots: list[Any] = []
    for sink in sinks:
        req = sink.value
        if isinstance(req, ScoreRequest):
            roots += [req.reward, req.data]
        elif isinstance(req, EvalRequest):
            roots += req.rewards
        elif isinstance(req, WinRequest):
            roots += [req.reward, req.samples, req.base]
        elif req.reward is not None:
            roots.append(req.reward)
    return roots


def run_sinks(sinks: list, options: Options, staging: Any = None) -> RewardRun:
    """Run every score/evaluate sink of a run, sharing one scoring plan; their files are
    staged with the run's other outputs (`staging`), or moved into place at once."""
    run = RewardRun(options)
    try:
        run.resolve_generations(_roots(sinks))
        run.resolve_kl(_kl_requests(sinks))
        try:
            plan = run.plan(_queries(run, sinks))
        except AlgError as err:
            raise err.at(sinks[0].span) from None
        run.execute(plan)
        for sink in sinks:
            try:
                globals()[_WRITERS[type(sink.value)]](run, sink.value, staging)
            except AlgError as err:
                raise err.at(sink.span) from None
    finally:
        run.close()
    return run


def plan_text(sinks: list, options: Options) -> str:
    run = RewardRun(options)
    try:
        run.resolve_generations(_roots(sinks), sample=False)
        run.resolve_kl(_kl_requests(sinks))
        try:
            lines = [f"kl: sample {len(r.spec.prompts) * r.spec.n} text(s) from each of {r.describe()}, "
                     "one model in memory at a time" for r in _kl_requests(sinks)]
            return "\n".join([*lines, format_reward_plan(run.plan(_queries(run, sinks)))])
        except AlgError as err:
            raise err.at(sinks[0].span) from None
    finally:
        run.close()


def score_command(session: Any, name: str, data: Path, out: Path, *, fields: dict[str, str] | None = None,
                  split: str | None = None) -> None:
    """`alg score RECIPE NAME --data PATH --out FILE`: NAME's rewards for PATH's rows, with
    its named sub-terms, as score() would write them. PATH is read as responses() reads it
    (any format of reward/formats.py; `fields` and `split` as its prompt=, response= and
    split=). Paths are relative to the cwd."""
    from ..errors import AlgIOError, AlgNameError, AlgTypeError
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
    force = session.options.force  # --force: an existing --out is replaced
    if os.path.lexists(out) and not force:
        raise AlgIOError(f"'{out}' already exists; pass --force to alg score to replace it")
    try:
        rows = read_responses(absolute(data, Path.cwd()), str(data), fields=fields, split=split)
    except AlgIOError as e:  # the reader names the file and row; say which option gave them
        given = "".join(f" --field {k}={v}" for k, v in (fields or {}).items())
        given += f" --split {split}" if split is not None else ""
        raise e.with_note(f"reading --data {data}{given}") from None
    req = ScoreRequest(r, rows, out.resolve(), names, force)
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
        plot_sweep(buf, req.xlabel, results, f"preference accuracy on {req.pairs.label}", req.by)
        _atomic_write(req.plot, "", buf.getvalue(), staging=staging, overwrite=req.overwrite)
        run.out(f"wrote {_rel(req.plot)}")


def _kl_requests(sinks: list) -> list[KLRequest]:
    return [s.value for s in sinks if isinstance(s.value, KLRequest)]


def _json_out(path: Path | None, doc: dict, staging: Any, overwrite: bool, run: RewardRun) -> None:
    if path is not None:
        _atomic_write(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n", staging=staging, overwrite=overwrite)
        run.out(f"wrote {_rel(path)}")


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    return float(np.mean(values)), (float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else float("nan"))


def _write_kl(run: RewardRun, req: KLRequest, staging: Any) -> None:
    from .policy_eval import kl_estimate

    spec = req.spec
    head = {"ref": req.ref.node.describe(), "prompts": len(spec.prompts), "n": spec.n,
            "max_new_tokens": spec.max_new_tokens, "seed": spec.seed}
    results = []
    for j, pm in enumerate(req.policies):
        got = run.kl_result(pm, req)
        est = kl_estimate(got.logratios)
        res: dict[str, Any] = {"policy": pm.node.describe(), "kl": est.mean, "kl_se": est.se, "samples": est.n}
        if req.reward is not None:
            pts = got.responses.points()
            values = run.values(req.reward, pts)
            _finite(values, "the reward", pts)
            res["reward"], res["reward_se"] = _mean_se(values)
            res = {"x": req.xs[j] if req.xs is not None else j, **res}
        results.append(res)
    if req.reward is None:
        r = results[0]
        run.out(f"kl({r['policy']} || {head['ref']}) = {r['kl']:.6g} +- {r['kl_se']:.2g} nats "
                f"({r['samples']} samples, {head['prompts']} prompt(s), max_new_tokens={spec.max_new_tokens})")
        _json_out(req.out, {**head, **r}, staging, req.overwrite, run)
        return
    head = {**head, "reward": str(req.reward), "xlabel": req.xlabel}
    run.out(_front_table(req.xlabel, results))
    _json_out(req.out, {**head, "results": results}, staging, req.overwrite, run)
    if req.plot is not None:
        import io

        from .evaluate import plot_front

        buf = io.BytesIO()
        plot_front(buf, req.xlabel, results, f"KL-reward front over {req.xlabel} (n={spec.n} per prompt)")
        _atomic_write(req.plot, "", buf.getvalue(), staging=staging, overwrite=req.overwrite)
        run.out(f"wrote {_rel(req.plot)}")


def _front_table(xlabel: str, results: list[dict]) -> str:
    from .evaluate import _fmt_x, _grid

    return _grid((xlabel, "KL (nats)", "reward"),
                 [(_fmt_x(r["x"]), f"{r['kl']:.4g} +- {r['kl_se']:.2g}", f"{r['reward']:.4g} +- {r['reward_se']:.2g}")
                  for r in results])


def _write_winrate(run: RewardRun, req: WinRequest, staging: Any) -> None:
    from .policy_eval import win_rate

    def means(d: Responses) -> dict:
        pts = d.points()
        values = run.values(req.reward, pts)
        _finite(values, "the reward", pts, [r.line for r in d.rows])
        by: dict = {}
        for (p, _), v in zip(pts, values, strict=True):
            by.setdefault(p, []).append(float(v))
        return {p: float(np.mean(v)) for p, v in by.items()}

    pol, base = means(run.data(req.samples)), means(run.data(req.base))
    lacking = [p for p in pol if p not in base]
    if lacking:
        raise AlgRuntimeError(f"{len(lacking)} prompt(s) of the samples have no base sample, e.g. "
                              f"{show_prompt(lacking[0])}; winrate compares prompt by prompt")
    res = win_rate([pol[p] for p in pol], [base[p] for p in pol])
    lo, hi = res["ci95"]
    run.out(f"winrate of {req.samples} over {req.base} by {req.reward}: {res['winrate']:.4f} "
            f"(95% CI {lo:.4f}-{hi:.4f}; {res['wins']} won, {res['ties']} tied, {res['losses']} lost "
            f"of {res['prompts']} prompts)")
    _json_out(req.out, {"reward": str(req.reward), "samples": str(req.samples), "base_samples": str(req.base),
                        **res}, staging, req.overwrite, run)


# each sink's writer, by name: looked up when it runs (tests replace one to make it fail)
_WRITERS = {ScoreRequest: "_write_scores", EvalRequest: "_write_eval", KLRequest: "_write_kl",
            WinRequest: "_write_winrate"}


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


__all__ = ["RewardRun", "human_bytes", "load_model", "plan_text", "run_sinks"]
