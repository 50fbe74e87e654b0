"""Scoring, generation and merges on Ray against one process, on this machine.

    python benchmarks/bench_ray.py [--texts 512] [--hidden 256] [--layers 4] [--batch 16]
                                   [--workers 2] [--dir D] [--part all|score|generate|merge]
                                   [--gen-prompts 256] [--gen-tokens 32] [--gen-batch 8]
                                   [--merge-layers 2] [--shard-size 100MB] [--merge-dir M]

Scoring (--part score):

One Llama sequence-classification reward model (random weights, a BPE tokenizer with a
chat template: `algebra.tiny.build_reward_models`) and `--texts` synthetic
(prompt, response) rows are built in the work directory. The run is planned once
(`reward.plan.plan_rewards`: tokenized, length-sorted batches of `--batch`), then the
same batches are scored

  local   in this process: `engine.load_model` once, `engine.score_batch` per batch,
          with torch's default thread count, and again with one thread (local-1t)
  ray     on a local Ray cluster of `--workers` CPUs (`ray.init(num_cpus=...)`, timed
          apart): `distributed.Pool`, one actor per CPU, each loading the model once and
          taking batches as it finishes them

and the scores are compared (they must agree to 1e-5). Each side reports its start-up
(loading the model; for Ray, starting the actors' processes and loading it in each) and
its steady throughput (texts per second over the batches alone), then end to end.

Generation (--part generate): the causal LM `policy` built with the reward model (same
widths, the same tokenizer) samples one text of at most `--gen-tokens` tokens (temperature
0.9, seeded per row) for each of `--gen-prompts` synthetic prompts. The batches are
planned once (`reward.generate.plan_batches`: length-sorted, `--gen-batch` rows each) and
run locally with one thread (`generate_batch` per batch, the model loaded once; then with
torch's default threads), and on the Ray cluster (`distributed.Pool` with the "generate"
job: one actor per CPU, each loading the policy once). The texts must be identical.

Merges (--part merge): two synthetic bf16 Llama checkpoints with TinyLlama's widths and
`--merge-layers` decoder layers (bench_lerp.py's generator: 0.22B parameters, 0.44 GB
each at 2 layers) are built in `--merge-dir` (default /tmp/alg-bench-ray-merge), and each recipe (`lerp(a, b, 0.3)`;
`slerp(a, b, 0.5)`, whose per-tensor angles are reductions) is saved with
`shard_size=--shard-size` (so that there are several shards to hand out) by `alg run`'s
own path (`Session.run`) in this process, with torch's default thread count and with one
thread (local-1t, as each Ray task has), then with `ray="local:N"` on a local Ray
cluster of `--workers` CPUs (`ray.init` timed apart; `distributed_merge.write_shards`:
one task per reduction, then one per shard), twice: the first Ray run starts the
workers' processes (Python, torch, alg), the second finds them up. Every output file is
compared byte for byte with the first local run's. Wall time is the save's, as `alg run`
reports it.

Prints tables and the machine's load average, and writes JSON to WORKDIR/results.json
(scoring), WORKDIR/results-generate.json (generation) and MERGEDIR/results.json (merges).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # bench_lerp: the synthetic checkpoints
WORDS = ("the answer is forty two because twelve plus thirty makes it; let us think step by step about "
         "a reward model that scores a response to a prompt and merging checkpoints is algebra on weights "
         "please write a short poem about the sea").split()


def build(work: Path, n: int, hidden: int, layers: int) -> None:
    from algebra.tiny import build_reward_models

    marker = work / "inputs.json"
    spec = {"texts": n, "hidden": hidden, "layers": layers}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build_reward_models(work / "models", hidden=hidden, layers=layers)
    rng = random.Random(0)
    with open(work / "rows.jsonl", "w") as f:
        for i in range(n):
            p = " ".join(rng.choices(WORDS, k=rng.randint(4, 8))) + "?"
            r = " ".join(rng.choices(WORDS, k=rng.randint(3, 40)))
            f.write(json.dumps({"id": i, "prompt": p, "response": r}) + "\n")
    marker.write_text(json.dumps(spec))


def generation_bench(work: Path, prompts: int, tokens: int, batch: int, workers: int) -> dict:
    """Generation throughput, local (one thread) against Ray (see the module docstring)."""
    from dataclasses import replace

    import ray
    import torch
    from transformers import AutoTokenizer

    from algebra import Interpreter, Options
    from algebra.distributed import Pool, Work
    from algebra.reward.generate import generate_batch, plan_batches
    from algebra.reward.models import load_model
    from algebra.reward.plan import scoring_dtype

    rng = random.Random(1)
    asked = [" ".join(rng.choices(WORDS, k=rng.randint(4, 24))) + "?" for _ in range(prompts)]
    g = Interpreter(device="cpu", base_dir=work, out=lambda _: None).eval(
        f'generate("models/policy", {json.dumps(asked)}, n=1, temperature=0.9, max_new_tokens={tokens}, '
        f'seed=0, batch_size={batch})')
    options = Options(device="cpu", out=lambda _: None)
    cpu = torch.device("cpu")
    tok = AutoTokenizer.from_pretrained(work / "models" / "policy")
    batches = plan_batches(tok, g.spec, g.spec.prompts)
    dtype = scoring_dtype(g.model, options, cpu)
    n = sum(len(b.rows) for b in batches)
    res: dict = {"texts": n, "batches": len(batches), "max_new_tokens": tokens}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray actor has
    t0 = time.perf_counter()
    model = load_model(g.model, options, cpu, dtype, causal=True)
    t1 = time.perf_counter()
    local = [generate_batch(model, tok, g.spec, b.input_ids, b.seeds, cpu) for b in batches]
    t2 = time.perf_counter()
    del model
    torch.set_num_threads(threads)
    res["local-1t"] = {"startup_s": t1 - t0, "gen_s": t2 - t1}

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t_init = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        work_ = Work("generate", g.model, dtype, (tok, replace(g.spec, prompts=())), "generating with policy")
        pool = Pool(ray, work_, options, len(batches))
        last = batches[-1]  # every actor up, the policy loaded: one short row each
        ray.get([a.run.remote((last.input_ids[:1], last.seeds[:1])) for a in pool.actors])
        t1 = time.perf_counter()
        got: list = [None] * len(batches)
        pool.run([(b.input_ids, b.seeds) for b in batches], lambda i, texts: got.__setitem__(i, texts))
        t2 = time.perf_counter()
        pool.close()
    finally:
        ray.shutdown()
    res["ray"] = {"init_s": t_init, "startup_s": t1 - t0, "gen_s": t2 - t1, "workers": workers}
    res["identical"] = got == local
    assert got == local, "texts sampled on Ray differ from the local ones"
    return res


MERGES = {"lerp": "lerp(a, b, 0.3)", "slerp": "slerp(a, b, 0.5)"}


def merge_bench(work: Path, layers: int, shard_size: str, workers: int) -> dict:
    """Merge wall times, local against Ray (see the module docstring)."""
    import hashlib

    import bench_lerp
    import ray

    from algebra import Options
    from algebra.interpreter import Session
    from algebra.source import Source

    work.mkdir(parents=True, exist_ok=True)
    bench_lerp.ensure_inputs(work, layers)
    os.environ["ALG_CACHE"] = str(work / "cache")  # input hashes for the card: computed once
    res: dict = {}

    def run(name: str, expr: str, ray_opt: str) -> tuple[float, str, dict]:
        out = work / f"out-{name}"
        text = f'a = load("a")\nb = load("b")\nsave({expr}, "{out.name}", shard_size="{shard_size}", overwrite=true)\n'
        lines: list[str] = []
        t0 = time.perf_counter()
        Session(Options(device="cpu", ray=ray_opt, out=lines.append), work, mode="file").run(Source(text, "b.alg"))
        dt = time.perf_counter() - t0
        digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
        return dt, " / ".join(lines), digests

    import torch

    local: dict = {}
    threads = torch.get_num_threads()
    for name, expr in MERGES.items():
        run(name, expr, "off")  # untimed: the inputs into the page cache, their hashes into ALG_CACHE
        for label, n in ((f"{name} local", threads), (f"{name} local-1t", 1)):
            torch.set_num_threads(n)
            dt, line, got = run(name, expr, "off")
            local.setdefault(name, got)
            res[label] = {"wall_s": dt, "log": line, "threads": n, "identical": got == local[name]}
    torch.set_num_threads(threads)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    res["ray.init_s"] = time.perf_counter() - t0
    try:
        for attempt in ("first", "again"):
            for name, expr in MERGES.items():
                dt, line, got = run(name, expr, f"local:{workers}")
                res[f"{name} Ray ({attempt})"] = {"wall_s": dt, "log": line, "identical": got == local[name]}
    finally:
        ray.shutdown()
    res["shards"] = sum(f.endswith(".safetensors") for f in local["lerp"])
    res["bytes"] = sum((work / "out-lerp" / f).stat().st_size for f in local["lerp"] if f.endswith(".safetensors"))
    return res


def print_rates(rows: dict, texts: int, work: str, label: str) -> None:
    """One line per contender: start-up, the work's seconds (`rows[name][work]`), texts per
    second over the work alone, and end to end (ray.init included where timed)."""
    print(f"{'':8} {'start-up':>10} {label:>10} {'texts/s':>10} {'end to end':>12}")
    for name, r in rows.items():
        extra = r.get("init_s", 0.0)
        print(f"{name:8} {r['startup_s']:>9.2f}s {r[work]:>9.2f}s {texts / r[work]:>10.1f} "
              f"{r['startup_s'] + r[work] + extra:>11.2f}s" + (f"  (ray.init {extra:.1f}s of it)" if extra else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("all", "score", "generate", "merge"), default="all")
    ap.add_argument("--gen-prompts", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--merge-layers", type=int, default=2)
    ap.add_argument("--shard-size", default="100MB")
    ap.add_argument("--merge-dir", default="/tmp/alg-bench-ray-merge")
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/alg-bench-ray")
    args = ap.parse_args()
    work = Path(args.dir)
    if args.part in ("all", "merge"):
        merged = merge_bench(Path(args.merge_dir), args.merge_layers, args.shard_size, args.workers)
        load = os.getloadavg()
        print(f"merges: {args.merge_layers}-layer synthetic bf16 Llamas, {merged['bytes'] / 1e9:.2f} GB out in "
              f"{merged['shards']} shards of <= {args.shard_size}; {os.cpu_count()} CPUs; "
              f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; ray.init {merged['ray.init_s']:.1f}s")
        print(f"{'':22} {'wall':>8}  identical to local")
        for k, v in merged.items():
            if isinstance(v, dict):
                print(f"{k:22} {v['wall_s']:>7.2f}s  {v.get('identical', '')}")
        (Path(args.merge_dir) / "results.json").write_text(json.dumps({**merged, "load_average": load}, indent=2))
        if args.part == "merge":
            return
    build(work, args.texts, args.hidden, args.layers)
    os.environ["ALG_CACHE"] = str(work / "cache")  # planning only reads it; empty: all to do
    shutil.rmtree(work / "cache", ignore_errors=True)
    if args.part in ("all", "generate"):
        gen = generation_bench(work, args.gen_prompts, args.gen_tokens, args.gen_batch, args.workers)
        load = os.getloadavg()
        print(f"generation: {gen['texts']} texts of <= {args.gen_tokens} new tokens (temperature 0.9) in "
              f"{gen['batches']} batches of <= {args.gen_batch}; policy hidden {args.hidden}, {args.layers} layers; "
              f"{os.cpu_count()} CPUs; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        print_rates({name: gen[name] for name in ("local-1t", "ray")}, gen["texts"], "gen_s", "sampling")
        print(f"texts identical, Ray against local: {gen['identical']}")
        (work / "results-generate.json").write_text(json.dumps({**gen, "load_average": load}, indent=2))
        if args.part == "generate":
            return

    import torch

    from algebra import Options
    from algebra.interpreter import Session
    from algebra.reward import engine
    from algebra.reward.plan import plan_rewards
    from algebra.source import Source

    options = Options(device="cpu", out=lambda _: None)
    session = Session(options, work, mode="file")
    checked = session.check(Source(
        f'score(reward("models/rm-helpful", batch_size={args.batch}), "rows.jsonl", "out/s.jsonl", '
        'overwrite=true)', "bench.alg"))
    req = checked.sinks[0].value
    [job] = plan_rewards([(req.reward, req.data.points())], options, lambda d: d).jobs
    batches = [b for g in job.groups for b in g.batches]
    pad = engine.pad_id(job)
    n = sum(len(b.input_ids) for b in batches)
    tokens = sum(len(x) for b in batches for x in b.input_ids)

    # ---- local: torch's default threads, then one thread (as each Ray actor has) -------------
    res: dict = {}
    default_threads = torch.get_num_threads()
    for name, threads in (("local", default_threads), ("local-1t", 1)):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        model = engine.load_model(job.model, options, torch.device("cpu"), job.dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad
        t1 = time.perf_counter()
        local, held = {}, {}
        for b in batches:
            local.update(zip(b.keys, engine.score_batch(model, b.input_ids, pad, torch.device("cpu"), b.shared, held),
                             strict=True))
        t2 = time.perf_counter()
        del model
        res[name] = {"startup_s": t1 - t0, "score_s": t2 - t1, "threads": threads}
    torch.set_num_threads(default_threads)

    # ---- Ray ----------------------------------------------------------------------------
    import ray

    from algebra.distributed import Pool, scoring

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool = Pool(ray, scoring(job), options, len(batches))
    ray.get([a.run.remote(batches[0].input_ids[:1]) for a in pool.actors])  # every actor up, model loaded
    t1 = time.perf_counter()
    got: dict = {}
    pool.run([(b.input_ids, b.shared) for b in batches], lambda i, v: got.update(zip(batches[i].keys, v, strict=True)))
    t2 = time.perf_counter()
    pool.close()
    ray.shutdown()
    res["ray"] = {"init_s": t_init, "startup_s": t1 - t0, "score_s": t2 - t1, "workers": len(pool.actors) or args.workers}

    worst = max(abs(local[k] - got[k]) for k in local)
    assert got.keys() == local.keys() and worst < 1e-5, worst
    load = os.getloadavg()
    print(f"{n} texts ({tokens} tokens) in {len(batches)} batches of <= {args.batch}; "
          f"model hidden {args.hidden}, {args.layers} layers; {os.cpu_count()} CPUs; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print_rates(res, n, "score_s", "scoring")
    print(f"largest score difference, Ray against local: {worst:.2e}")
    res.update(texts=n, tokens=tokens, batches=len(batches), load_average=load, max_abs_diff=worst)
    (work / "results.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
