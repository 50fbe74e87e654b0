"""Scoring and generation on a Ray cluster: `alg run --ray [CLUSTER]`, `$ALG_RAY`,
`Interpreter(ray=...)`.

The run plans as it does locally (`reward.plan`: distinct texts, cache hits left out,
the rest tokenized, sorted by token length and cut into batches); only the forward
passes move. Each reward model that has texts to score is served by a `Pool` of Ray
actors (`_Worker`), one per GPU of the cluster, or, without a GPU (or with --device
cpu), one per `CPUS_PER_WORKER` CPUs, never more than it has batches. Each actor loads
the model once, through `reward.models.load_model` as a local run does (a merge is
materialised inside the actor by the weight engine from its checked graph), and runs one
named job (`JOBS`) on whole batches: "score" scores length-sorted batches with
`reward.models.score_batch`. The driver hands batches out as
actors finish them (at most `IN_FLIGHT` per actor), so long and short batches balance
across the pool, and stores each batch's scores as it arrives, in the run's table and
the on-disk cache under the keys a local run uses (`reward.cache.score_key`): a
distributed run and a local one share their results, and rows come out in the data's
order because they are read back by key.

What travels to an actor is what rebuilds the model, not the model: the checked value
(`values.Model`: its graph of `Node`s and checkpoint headers, a few kB; a binding's
in-memory tensors travel with it), pickled by `_ModelPickler`, which knows how to
rebuild the two things plain pickle cannot (interned graph nodes and the read-only
mapping of tensor headers); the checkpoint files are read by the actor, so on a
multi-machine cluster they must be on a filesystem every node sees, and alg installed
on every node.

Faults. An actor that dies (a crashed process, a lost node) is restarted by Ray, which
loads the model again and re-runs the batches it held (`max_restarts` and
`max_task_retries`: `RETRIES`). A batch is never stored twice differently: scores are
a function of the batch. If the pool still fails, the run fails with an AlgRuntimeError,
and, as for any failure, no output of the run is moved into place (io/target.py
`Staging`); the scores stored so far stay in the cache, so a re-run scores only the
rest. `FAULT_ENV` is a test hook, documented there.

Generation (`generate`) is the "generate" job on a pool of its own per policy and call
(`sampler`, which `reward.generate.resolve` calls for the prompts not in the generation
cache). The driver plans the batches as a local run does (`reward.generate.plan_batches`
with the policy's tokenizer: rows length-sorted, cut by `batch_size` or `BATCH_TOKENS`,
each sampled row's seed), the actors run them with `generate_batch` (the function a local
run calls per batch; the tokenizer travels pickled, with the spec less its prompts), and
the driver gathers each prompt's samples (`Samples`) and stores them in the generation
cache under a local run's keys as soon as they are complete. The batches and each
sampled row's generator are a local run's, so are the texts, row for row, on the same
kind of device (tests/test_ray.py: greedy and sampled). Faults are handled as for
scoring; a batch re-run draws the same texts.

`kl` and `front` (`reward.engine.RewardRun._kl`, through `RewardRun._each`, which runs
the same `JOBS` entries in the driver when not on Ray) use a pool per model and call, each
closed before the next starts (`run_pool`): "kl_sample" samples one prompt's n rows per
call with the policy (`policy_eval.sample`, seeded by (seed, prompt)) and returns them
(`Sampled`: token ids and lengths) with the policy's log-probs (`policy_eval.logprobs`);
"logprobs" weighs each prompt's `Sampled` under the reference. The driver puts results
back in prompt order; a re-run prompt draws the same rows.

Merges (`save`) run in Ray tasks with this module's connection, pickling, retries and
fault hook: algebra/distributed_merge.py.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from .errors import AlgError, AlgRuntimeError
from .graph import Node
from .options import Options
from .runconfig import RunConfig

INSTALL = "pip install 'algebra[ray]'"
CPUS_PER_WORKER = 1  # CPUs per actor (scoring or generating) on a cluster without GPUs
IN_FLIGHT = 2  # batches handed to an actor before it returns one: it never waits for work
RETRIES = 3  # restarts of a dead actor, and re-runs of the batches it held
# Test hook (tests/test_ray.py, tests/test_ray_merge.py): a path. The first actor call (a
# batch to score or to sample), or the first chunk a merge's shard task writes, to find no
# file there makes it and kills its own process with os._exit, once per path, as a crash
# would; Ray restarts the actor and re-runs its batches, or runs the task again. Read by
# the driver and passed to actors and tasks.
FAULT_ENV = "ALG_RAY_TEST_FAULT"


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise AlgRuntimeError(f"--ray (or $ALG_RAY) needs the ray package, which is not installed: "
                              f"{INSTALL}") from None
    return ray


def connect(cluster: str) -> Any:
    """The `ray` module, connected to `cluster` (options.check_ray's value). A process
    that has already called ray.init (a notebook, a test fixture) keeps its cluster."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    kw: dict[str, Any] = {"address": cluster, "log_to_driver": False, "logging_level": "ERROR"}
    if cluster.startswith("local"):
        kw.update(address="local", include_dashboard=False)
        if ":" in cluster:
            kw["num_cpus"] = int(cluster.split(":", 1)[1])
    if not cluster.startswith("local") and cluster != "auto":
        _reachable(cluster)  # Ray itself retries an unreachable address for minutes
    try:
        ray.init(**kw)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        how = ("start one with `ray start --head`, or use --ray local" if cluster == "auto" else
               "check the address (`ray start --head` prints it)")
        raise AlgRuntimeError(f"--ray {cluster}: could not reach a Ray cluster ({first}); {how}") from None
    return ray


def _reachable(address: str, timeout: float = 10.0) -> None:
    """A usage-level check before ray.init: something listens at host:port."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise AlgRuntimeError(f"--ray {address}: nothing answers at {host}:{port} ({e.strerror or e}); "
                              "is the cluster up? (`ray start --head` prints its address)") from None


# ---- what travels to an actor -------------------------------------------------------------


def _proxy(d: dict) -> MappingProxyType:
    return MappingProxyType(d)


def _node(op: str, args: tuple, params: tuple, span: Any, typ: Any) -> Node:
    node = Node(op, args, params, span)  # interned in the actor's process as in ours
    if node.type is None:
        node.type = typ
    return node


def _unmapped(cls: type, state: dict) -> Any:
    f = cls.__new__(cls)
    f.__dict__.update(state)
    return f


def _safetensors_file(f: Any) -> tuple:
    # its header, without the mapping of a file it has read (the actor maps its own)
    return (_unmapped, (type(f), {**f.__dict__, "_mm": None, "_file": None}))


class _ModelPickler(pickle.Pickler):
    from .io.safetensors import SafetensorsFile

    dispatch_table = copyreg.dispatch_table.copy()
    dispatch_table[MappingProxyType] = lambda m: (_proxy, (dict(m),))
    dispatch_table[Node] = lambda n: (_node, (n.op, n.args, n.params, n.span, n.type))
    dispatch_table[SafetensorsFile] = _safetensors_file


def dumps_model(model: Any) -> bytes:
    """A checked checkpoint value (`values.Model`) as bytes that rebuild it elsewhere."""
    buf = io.BytesIO()
    _ModelPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(model)
    return buf.getvalue()


def actor_options(options: Options, device: str) -> Options:
    """The run's options as an actor uses them: picklable, quiet, on its own device, and
    not distributed again."""
    from .options import picklable_options

    return replace(picklable_options(options), device=device, progress=False, ray="off",
                   out=print, warn=_drop)


def _drop(_d: Any) -> None:
    pass


def assigned_threads() -> int:
    """In a Ray actor or task: the CPUs Ray gave it, as torch's thread count (at least
    one). Neither the driver's --threads nor the node's load is this process's share."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


# ---- the actor ------------------------------------------------------------------------------


def _scoring(model: Any, device: Any, pad: int):
    """The "score" job: a reward model's scores of a batch of token ids (and the prefixes
    its rows share; the actor keeps the last block's, as a local run does)."""
    from .reward.models import scorer

    score = scorer(model, pad, device)
    return lambda batch: score(batch[0], batch[1])


def _generation(model: Any, device: Any, tokenizer: Any, spec: Any):
    """The "generate" job: a policy's texts of a batch of rows ((input_ids, seeds) of a
    `reward.generate.RowBatch`)."""
    from .reward.generate import generate_batch

    return lambda batch: generate_batch(model, tokenizer, spec, batch[0], batch[1], device)


def _kl_sampling(model: Any, device: Any, tokenizer: Any, spec: Any):
    """The "kl_sample" job: a policy's `policy_eval.sample` of one prompt (its n rows,
    seeded by (seed, prompt)) and the policy's own `logprobs` of them."""
    from .reward import policy_eval as pe

    def run(prompt: Any) -> tuple:
        s = pe.sample(model, tokenizer, prompt, spec, device)
        return s, pe.logprobs(model, s, device)

    return run


def _weighing(model: Any, device: Any):
    """The "logprobs" job: a model's `policy_eval.logprobs` of one prompt's sampled rows
    (a `policy_eval.Sampled`)."""
    from .reward.policy_eval import logprobs

    return lambda sampled: logprobs(model, sampled, device)


# job name -> (causal LM?, what "runs" it: (model, device, *setup) -> a function of one
# item: a batch, or for kl/front a prompt or its samples). A local kl run uses the same
# table (`reward.engine.RewardRun._each`), so a job is defined once for both.
JOBS = {"score": (False, _scoring), "generate": (True, _generation),
        "kl_sample": (True, _kl_sampling), "logprobs": (True, _weighing)}


class _Worker:
    """One Ray actor: one model, loaded once, running whole batches of one job (`JOBS`)."""

    def __init__(self, blob: bytes, options: Options, dtype: str, job: str, setup: tuple, fault: str | None):
        import ray
        import torch

        from .reward.models import load_model

        # Ray has set CUDA_VISIBLE_DEVICES to this actor's GPU, if it was given one
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        # on the CPUs Ray gave it, also when loading a merge (whose evaluator applies them)
        options = replace(actor_options(options, self.device.type), threads=assigned_threads())
        RunConfig.of(options).apply_threads()
        from . import registry  # noqa: F401  (the builtin families a lowering reads, in a fresh process)

        causal, make = JOBS[job]
        self.model = load_model(pickle.loads(blob), options, self.device, getattr(torch, dtype), causal=causal)
        self.job = make(self.model, self.device, *setup)
        self.fault = fault

    def run(self, batch: Any) -> list:
        if self.fault:
            _fault_hook(self.fault)
        return self.job(batch)


def _fault_hook(path: str) -> None:
    """The test hook of FAULT_ENV: die once, as a crashed worker would."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)


# ---- the driver's side -------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """What a pool serves: `model` (a checked `values.Model`) loaded in `dtype` by each
    actor, which then runs `job` (a key of `JOBS`) on batches; `setup` is the job's fixed
    arguments (picklable); `what` names the work in errors ("scoring rm")."""
    job: str
    model: Any
    dtype: Any  # a torch.dtype
    setup: tuple
    what: str


class Pool:
    """The actors serving one model for one job (`Work`): scoring a reward model's
    batches, or sampling a policy's."""

    def __init__(self, ray: Any, work: Work, options: Options, n_batches: int | None = None):
        self.ray = ray
        self.what = work.what
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0)) if options.device != "cpu" else 0
        if gpus:
            n, need = gpus, {"num_gpus": 1, "num_cpus": 1}
        else:
            n, need = max(1, int(res.get("CPU", 1)) // CPUS_PER_WORKER), {"num_cpus": CPUS_PER_WORKER}
        n = max(1, min(n, n_batches or n))  # no idle actor: at most one per batch
        actor = ray.remote(_Worker).options(max_restarts=RETRIES, max_task_retries=RETRIES, **need)
        # passed by value (a few kB; a binding's tensors more): Ray keeps it for restarts
        blob = dumps_model(work.model)
        dtype = str(work.dtype).removeprefix("torch.")
        fault = os.environ.get(FAULT_ENV) or None
        opts = actor_options(options, "cpu")  # the actor sets its own device
        self.actors = [actor.remote(blob, opts, dtype, work.job, work.setup, fault) for _ in range(n)]

    def run(self, batches: list[Any], store) -> None:
        """Run the job on each of `batches` (what the job takes) across the pool;
        `store(i, result)` is called in the driver as batch i's result arrives, in any order."""
        ray = self.ray
        queue = list(range(len(batches)))
        queue.reverse()
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (actor, batch)

        def submit(a: int) -> None:
            if queue:
                i = queue.pop()
                pending[self.actors[a].run.remote(batches[i])] = (a, i)

        for _ in range(IN_FLIGHT):
            for a in range(len(self.actors)):
                submit(a)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            a, i = pending.pop(ref)
            store(i, self._get(ref))
            submit(a)

    def _get(self, ref: Any) -> list:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the actor raised: an AlgError is the user's
            cause = getattr(e, "cause", None)
            if isinstance(cause, AlgError):
                raise cause from None
            raise AlgRuntimeError(f"a Ray worker {self.what} failed: "
                                  f"{type(cause).__name__ if cause else ''}: {cause or e}") from None
        except ray.exceptions.RayActorError as e:  # died more than RETRIES times, or its load failed
            cause = getattr(e, "cause", None)
            inner = getattr(cause, "cause", None)
            if isinstance(inner, AlgError):
                raise inner from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AlgRuntimeError(f"the Ray workers {self.what} died and were restarted "
                                  f"{RETRIES} times without finishing: {first}") from None

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


def scoring(job: Any) -> Work:
    """The work of scoring a `reward.plan.Job`'s batches."""
    from .reward.models import pad_id

    return Work("score", job.model, job.dtype, (pad_id(job),), f"scoring {job.label}")


def score_job(run: Any, job: Any) -> int:
    """Score a job's texts to do on Ray for a `reward.engine.RewardRun`: into its score
    table and cache (`run._store`). The pool stays up between calls for a run that keeps
    its models loaded (a TRL reward function). Returns the texts scored."""
    ray = connect(run.options.ray)
    batches = [b for g in job.groups for b in g.batches]
    key = ("ray", job.node, job.dtype)
    pool = run._loaded.get(key)
    if pool is None:
        # a pool kept for later calls (a TRL reward function) is sized by the cluster alone
        pool = Pool(ray, scoring(job), run.options, None if run.keep_loaded else len(batches))
        if run.keep_loaded:
            run._loaded[key] = pool
    try:
        with run.options.progress.bar(job.n_todo, f"score {job.label} (Ray)", unit="text") as bar:
            n = 0

            def store(i: int, values: list[float]) -> None:
                nonlocal n
                run._store(batches[i].keys, values)
                n += len(values)
                bar.update(len(values))

            pool.run([(b.input_ids, b.shared) for b in batches], store)
            return n
    finally:
        if not run.keep_loaded:
            pool.close()


def sampler(run: Any, gen: Any):
    """The `sampler` of `reward.generate.resolve` that samples `gen` (a `Generated`) on
    Ray for a `reward.engine.RewardRun`: the driver plans the batches as a local run does
    (`plan_batches`, with the policy's tokenizer), a pool of actors runs them
    (`generate_batch`), and each prompt's samples go to `done` (the run's table and the
    generation cache) as soon as they are complete. One pool per call, closed after it."""
    from .reward.generate import Samples, plan_batches
    from .reward.plan import scoring_dtype, tokenizer_folder

    def sample(spec: Any, prompts: tuple, done) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(gen.model), trust_remote_code=False)
        batches = plan_batches(tokenizer, spec, prompts)
        # the tokenizer travels (not its folder, which may be this process's temporary one);
        # the spec without its prompts, which the batches carry
        work = Work("generate", gen.model, scoring_dtype(gen.model, run.options, run.device),
                    (tokenizer, replace(spec, prompts=())), f"generating with {gen.label}")
        got = Samples(spec, prompts, done)
        run_pool(run.options, work, [(b.input_ids, b.seeds) for b in batches],
                 lambda i, texts: got.add(batches[i], texts))

    return sample


def run_pool(options: Options, work: Work, items: list, store) -> None:
    """Run `work` on each of `items` on a pool of its own (at most one actor per item),
    closed after it: `store(i, result)` is called in the driver as item i's result
    arrives, in any order."""
    pool = Pool(connect(options.ray), work, options, len(items))
    try:
        pool.run(items, store)
    finally:
        pool.close()


__all__ = ["CPUS_PER_WORKER", "FAULT_ENV", "INSTALL", "JOBS", "Pool", "Work", "connect", "dumps_model", "run_pool",
           "sampler", "score_job", "scoring"]
