"""Scoring on Ray against scoring in one process, on this machine.

    python benchmarks/bench_ray.py [--texts 512] [--hidden 256] [--layers 4] [--batch 16]
                                   [--workers 2] [--dir D]

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
Merges on Ray are not implemented, so there is no merge figure. Prints a table and the
machine's load average, and writes JSON to WORKDIR/results.json.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/alg-bench-ray")
    args = ap.parse_args()
    work = Path(args.dir)
    build(work, args.texts, args.hidden, args.layers)
    os.environ["ALG_CACHE"] = str(work / "cache")  # planning only reads it; empty: all to do
    shutil.rmtree(work / "cache", ignore_errors=True)

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
        local = {}
        for b in batches:
            local.update(zip(b.keys, engine.score_batch(model, b.input_ids, pad, torch.device("cpu")), strict=True))
        t2 = time.perf_counter()
        del model
        res[name] = {"startup_s": t1 - t0, "score_s": t2 - t1, "threads": threads}
    torch.set_num_threads(default_threads)

    # ---- Ray ----------------------------------------------------------------------------
    import ray

    from algebra.distributed import Pool

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool = Pool(ray, job, options, pad, len(batches))
    ray.get([a.score.remote(batches[0].input_ids[:1]) for a in pool.actors])  # every actor up, model loaded
    t1 = time.perf_counter()
    got: dict = {}
    pool.score(batches, lambda b, v: got.update(zip(b.keys, v, strict=True)))
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
    print(f"{'':8} {'start-up':>10} {'scoring':>10} {'texts/s':>10} {'end to end':>12}")
    for name, r in res.items():
        extra = r.get("init_s", 0.0)
        print(f"{name:8} {r['startup_s']:>9.2f}s {r['score_s']:>9.2f}s {n / r['score_s']:>10.1f} "
              f"{r['startup_s'] + r['score_s'] + extra:>11.2f}s" + (f"  (ray.init {extra:.1f}s of it)" if extra else ""))
    print(f"largest score difference, Ray against local: {worst:.2e}")
    res.update(texts=n, tokens=tokens, batches=len(batches), load_average=load, max_abs_diff=worst)
    (work / "results.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
