"""Scoring throughput: alg against a plain transformers loop, in preference pairs per second.

    python benchmarks/bench_score.py [--pairs 256] [--hidden 256] [--layers 4] [--rounds 2]
                                     [--threads N] [--dir D]

Two Llama sequence-classification reward models (random weights, a BPE tokenizer with a
chat template, `algebra.tiny.build_reward_models`) and a synthetic preference set are
built in the work directory. Both contenders compute, for every pair, chosen and rejected
rewards under

    r = help + harm + logsig(help - refusal(help))     # two models, three terms

  alg        `alg run` of evaluate(r, pairs(...), ...) in a child process, with an empty
             score cache (cold) and then again with the cache it filled (warm)
  baseline   benchmarks/baseline_score.py: both models loaded once, each term scored
             separately, batch by batch (16 pairs), in a child process

  imports   a python process that imports what both need before scoring anything
             (torch, transformers' tokenizer and Llama classes) and exits: the floor
             under both wall times

Each round runs both, alternating which goes first, and records the one-minute load
average before each. --threads N gives both the same thread count (alg's --threads, the
loop's torch.set_num_threads); without it each uses its own default (alg: auto, the loop:
torch's).
Texts stay under the models' 128 positions, so neither side truncates.
Wall time is from process start to exit (imports and model loading included, for both);
CPU time is the child's user + system time (getrusage), steadier than wall on a shared
machine.
Both run with Python's bytecode cache, as installed packages do (pip compiles them):
alg's package is compiled first and PYTHONDONTWRITEBYTECODE is dropped from the children's
environment (a source tree run without it recompiles alg's modules in every process).
Both must agree on the accuracy. Prints a table (medians over rounds), the ratio of the
wall times and that of the times above the import floor, and writes JSON to
WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ("the answer is forty two because twelve plus thirty makes it; let us think step by step about "
         "a reward model that scores a response to a prompt and merging checkpoints is algebra on weights "
         "please write a short poem about the sea").split()


def build(work: Path, n_pairs: int, hidden: int, layers: int) -> None:
    from algebra.tiny import build_reward_models

    marker = work / "inputs.json"
    spec = {"pairs": n_pairs, "hidden": hidden, "layers": layers, "texts": 3}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build_reward_models(work / "models", hidden=hidden, layers=layers)
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(4, 8))) + "?" for _ in range(n_pairs // 4)]
    with open(work / "prefs.jsonl", "w") as f:
        for i in range(n_pairs):
            p = prompts[i % len(prompts)]
            c, r = (" ".join(rng.choices(WORDS, k=rng.randint(3, 18))) for _ in range(2))
            f.write(json.dumps({"id": i, "prompt": p, "chosen": c, "rejected": r}) + "\n")
    (work / "bench.alg").write_text(
        'help = reward("models/rm-helpful")\nharm = reward("models/rm-harmless")\n'
        'r = help + harm + logsig(help - refusal(help))\n'
        'evaluate(r, pairs("prefs.jsonl"), "out/eval.json")\n')
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "models" / "rm-helpful")
    longest = max(len(tok(tok.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[side]}], tokenize=False),
        add_special_tokens=False).input_ids) for r in map(json.loads, open(work / "prefs.jsonl")) for side in
        ("chosen", "rejected"))
    assert longest <= 128, f"a text has {longest} tokens; alg would truncate it and the loop would not"
    marker.write_text(json.dumps(spec))


def timed(cmd: list[str], work: Path, env: dict) -> tuple[float, float, str]:
    """Run cmd: its wall time, its CPU time (user + system) and its stdout."""
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise SystemExit(f"{cmd} failed:\n{p.stderr}")
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="both contenders' torch threads")
    ap.add_argument("--dir", default="/tmp/alg-bench-score")
    args = ap.parse_args()
    work = Path(args.dir)
    build(work, args.pairs, args.hidden, args.layers)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "ALG_CACHE": str(work / "cache")}
    env.pop("ALG_THREADS", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    import algebra

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(algebra.__file__).parent)], check=True)
    alg = [sys.executable, "-m", "algebra", "run", "bench.alg", "--device", "cpu", "--force"]
    loop = [sys.executable, str(HERE / "baseline_score.py"), str(work)]
    imports = [sys.executable, "-c", "import torch\nfrom transformers import AutoTokenizer, "
               "AutoModelForSequenceClassification, LlamaForSequenceClassification"]
    if args.threads:
        alg += ["--threads", str(args.threads)]
        loop.append(str(args.threads))
    n = args.pairs
    rounds = []
    for k in range(args.rounds):
        got: dict = {}

        def run_alg(got=got) -> None:
            shutil.rmtree(work / "cache", ignore_errors=True)
            got["load_alg"] = os.getloadavg()[0]
            got["alg_cold_s"], got["alg_cold_cpu_s"], got["alg_log"] = timed(alg, work, env)
            got["alg_warm_s"], got["alg_warm_cpu_s"], _ = timed(alg, work, env)
            got["accuracy_alg"] = json.loads((work / "out" / "eval.json").read_text())["accuracy"]

        def run_loop(got=got) -> None:
            got["load_loop"] = os.getloadavg()[0]
            got["baseline_s"], got["baseline_cpu_s"], out = timed(loop, work, env)
            base = json.loads(out)
            got["accuracy_baseline"], got["loop_threads"] = base["accuracy"], base["threads"]

        order = (run_alg, run_loop) if k % 2 == 0 else (run_loop, run_alg)
        for f in order:
            f()
        got["imports_s"], got["imports_cpu_s"], _ = timed(imports, work, env)
        got["first"] = "alg" if k % 2 == 0 else "loop"
        got["speedup"] = got["baseline_s"] / got["alg_cold_s"]
        rounds.append(got)
        print(f"round {k + 1} ({got['first']} first): alg {got['alg_cold_s']:.2f} s, CPU {got['alg_cold_cpu_s']:.2f} s "
              f"(load {got['load_alg']:.1f}), loop {got['baseline_s']:.2f} s, CPU {got['baseline_cpu_s']:.2f} s "
              f"(load {got['load_loop']:.1f}): {got['speedup']:.2f}x", flush=True)
    med = {key: statistics.median(r[key] for r in rounds)
           for key in ("alg_cold_s", "alg_warm_s", "baseline_s", "alg_cold_cpu_s", "alg_warm_cpu_s", "baseline_cpu_s",
                       "imports_s", "imports_cpu_s")}
    above = statistics.median((r["baseline_s"] - r["imports_s"]) / (r["alg_cold_s"] - r["imports_s"]) for r in rounds)
    res = {"pairs": n, "hidden": args.hidden, "layers": args.layers, "threads": args.threads, "rounds": rounds,
           "median": med, "speedup_of_medians": med["baseline_s"] / med["alg_cold_s"],
           "speedup_above_imports": above}
    (work / "results.json").write_text(json.dumps(res, indent=2))
    alg_threads = args.threads or "auto"
    print(f"{n} pairs, two reward models (hidden {args.hidden}, {args.layers} layers), three terms; "
          f"medians of {args.rounds} round(s); alg threads {alg_threads}, loop threads {rounds[0]['loop_threads']}")
    print(f"{'':28}{'wall s':>8}{'pairs/s':>10}{'CPU s':>8}")
    for label, key in (("alg run (empty cache)", "alg_cold"), ("alg run (cache filled)", "alg_warm"),
                       ("transformers loop", "baseline"), ("imports only (both)", "imports")):
        rate = f"{n / med[key + '_s']:10.1f}" if key != "imports" else f"{'-':>10}"
        print(f"{label:28}{med[key + '_s']:8.2f}{rate}{med[key + '_cpu_s']:8.2f}")
    per = ", ".join(f"{r['speedup']:.2f}x" for r in rounds)
    loads = ", ".join(f"{r['load_alg']:.1f}/{r['load_loop']:.1f}" for r in rounds)
    print(f"alg / loop pairs per second: {res['speedup_of_medians']:.2f}x (per round: {per}); "
          f"by CPU time {med['baseline_cpu_s'] / med['alg_cold_cpu_s']:.2f}x")
    print(f"above the import floor (each round's wall time less its imports): {above:.2f}x")
    print(f"load average (1 min) before each, alg/loop: {loads}")
    print(f"accuracy: alg {rounds[0]['accuracy_alg']:.4f}, loop {rounds[0]['accuracy_baseline']:.4f}")
    for r in rounds:
        if abs(r["accuracy_alg"] - r["accuracy_baseline"]) > 1.5 / n:
            raise SystemExit("the two disagree on accuracy")


if __name__ == "__main__":
    main()
