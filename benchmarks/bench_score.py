"""Scoring throughput: alg against a plain transformers loop, in preference pairs per second.

    python benchmarks/bench_score.py [--pairs 256] [--hidden 256] [--layers 4] [--dir D]

Two Llama sequence-classification reward models (random weights, a BPE tokenizer with a
chat template, `algebra.tiny.build_reward_models`) and a synthetic preference set are
built in the work directory. Both contenders compute, for every pair, chosen and rejected
rewards under

    r = help + harm + logsig(help - refusal(help))     # two models, three terms

  alg        `alg run` of evaluate(r, pairs(...), ...) in a child process, with an empty
             score cache (cold) and then again with the cache it filled (warm)
  baseline   benchmarks/baseline_score.py: both models loaded once, each term scored
             separately, batch by batch (16 pairs), in a child process

Texts stay under the models' 128 positions, so neither side truncates.
Wall time is from process start to exit (imports and model loading included, for both).
Both must agree on the accuracy. Prints a table and writes JSON to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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


def timed(cmd: list[str], work: Path, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{cmd} failed:\n{p.stderr}")
    return dt, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/alg-bench-score")
    args = ap.parse_args()
    work = Path(args.dir)
    build(work, args.pairs, args.hidden, args.layers)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "ALG_CACHE": str(work / "cache")}
    shutil.rmtree(work / "cache", ignore_errors=True)
    alg = [sys.executable, "-m", "algebra", "run", "bench.alg", "--device", "cpu", "--force"]
    cold, out = timed(alg, work, env)
    warm, _ = timed(alg, work, env)
    acc_alg = json.loads((work / "out" / "eval.json").read_text())["accuracy"]
    base_t, base_out = timed([sys.executable, str(HERE / "baseline_score.py"), str(work)], work, env)
    base = json.loads(base_out)
    n = args.pairs
    res = {"pairs": n, "hidden": args.hidden, "layers": args.layers,
           "alg_cold_s": cold, "alg_warm_s": warm, "baseline_s": base_t,
           "alg_cold_pairs_per_s": n / cold, "alg_warm_pairs_per_s": n / warm, "baseline_pairs_per_s": n / base_t,
           "accuracy_alg": acc_alg, "accuracy_baseline": base["accuracy"], "alg_log": out}
    (work / "results.json").write_text(json.dumps(res, indent=2))
    print(f"{n} pairs, two reward models (hidden {args.hidden}, {args.layers} layers), three terms")
    print(f"{'':28}{'wall s':>8}{'pairs/s':>10}")
    print(f"{'alg run (empty cache)':28}{cold:8.2f}{n / cold:10.1f}")
    print(f"{'alg run (cache filled)':28}{warm:8.2f}{n / warm:10.1f}")
    print(f"{'transformers loop':28}{base_t:8.2f}{n / base_t:10.1f}")
    print(f"accuracy: alg {acc_alg:.4f}, loop {base['accuracy']:.4f}")
    if abs(acc_alg - base["accuracy"]) > 1.5 / n:
        raise SystemExit("the two disagree on accuracy")


if __name__ == "__main__":
    main()
