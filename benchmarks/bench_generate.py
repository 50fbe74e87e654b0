"""Generation throughput: generate's batched sampling against the one-prompt-at-a-time loop.

    python benchmarks/bench_generate.py [--prompts 32] [--max-new-tokens 32] [--rounds 2]
    python benchmarks/bench_generate.py --real [--prompts 12] [--max-new-tokens 64]

Both contenders decode greedily (temperature=0), in this process, with one model loaded
once in float32 (alg's CPU dtype), the chat template applied:

  loop      `algebra.reward.generate.sample`, one prompt per `model.generate` call (unpadded):
            the loop generate used before batching
  batched   `algebra.reward.generate.sample_batch`: rows sorted by length, left-padded,
            `--batch-size` rows per call (default: the BATCH_TOKENS budget)

The model: a tiny Llama causal LM with a BPE tokenizer and a chat template
(`algebra.tiny.build_reward_models`, `--hidden 256 --layers 4`, random weights), or with
`--real` SmolLM2-135M-Instruct from the real-model tier's cache (tests/real/build.py
builds it; $ALG_REAL_CACHE or ~/.cache/alg/real). The prompts are synthetic questions of
3 to 18 words (seeded). Each round times both contenders, alternating which goes first,
so a machine shared with other work loads both alike; the load average is printed before
and after. Every round checks that both produced the same texts (exit status 1 if not).
Prints a table and writes JSON to WORKDIR/results.json (`--dir`, default /tmp/alg-bench-gen).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ("the answer is forty two because twelve plus thirty makes it; let us think step by step about "
         "a reward model that scores a response to a prompt and merging checkpoints is algebra on weights "
         "please write a short poem about the sea and explain why the sky is blue to a child").split()


def prompts(n: int) -> tuple[str, ...]:
    rng = random.Random(0)
    out: dict[str, None] = {}
    while len(out) < n:
        out[" ".join(rng.choices(WORDS, k=rng.randint(3, 18))).capitalize() + "?"] = None
    return tuple(out)


def model_folder(args) -> Path:
    if args.real:
        sys.path.insert(0, str(HERE.parent / "tests" / "real"))
        import build  # the real tier's fixtures: where they are cached

        folder = build.cache_root() / "base"
        if not (build.cache_root() / "done.json").is_file():
            sys.exit(f"no real-model fixtures at {build.cache_root()}: run python tests/real/build.py first")
        return folder
    from algebra.tiny import build_reward_models

    work = Path(args.dir)
    marker = work / "inputs.json"
    spec = {"hidden": args.hidden, "layers": args.layers}
    if not (marker.is_file() and json.loads(marker.read_text()) == spec):
        work.mkdir(parents=True, exist_ok=True)
        build_reward_models(work / "models", hidden=args.hidden, layers=args.layers)
        marker.write_text(json.dumps(spec))
    return work / "models" / "policy"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct from the real tier's cache")
    ap.add_argument("--prompts", type=int, default=None, help="distinct prompts (default 32; 12 with --real)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 32; 64 (generate's default) with --real")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the token budget)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/alg-bench-gen")
    args = ap.parse_args()
    n_prompts = args.prompts or (12 if args.real else 32)
    new_tokens = args.max_new_tokens or (64 if args.real else 32)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from algebra.reward.generate import BATCH_TOKENS, GenerateSpec, encode, sample, sample_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = model_folder(args)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ps = prompts(n_prompts)
    spec = GenerateSpec(ps, 1, 0.0, new_tokens, 0, (), args.batch_size)
    lengths = [len(encode(tok, p)) for p in ps]
    print(f"model {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
          f"{n_prompts} prompts of {min(lengths)}-{max(lengths)} tokens (chat template), "
          f"max_new_tokens={new_tokens}, greedy, batch_size={args.batch_size or f'budget {BATCH_TOKENS} tokens'}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cpus")
    load_before = os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")

    def loop():
        return {p: sample(model, tok, spec, p, "cpu") for p in ps}

    def batched():
        return sample_batch(model, tok, spec, ps, "cpu")

    times: dict[str, list[float]] = {"loop": [], "batched": []}
    identical = True
    for r in range(args.rounds):
        got = {}
        order = [("loop", loop), ("batched", batched)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            got[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1} {name:8s} {times[name][-1]:8.2f} s  {n_prompts / times[name][-1]:8.2f} texts/s",
                  flush=True)
        same = got["loop"] == got["batched"]
        identical &= same
        if not same:
            diff = [p for p in ps if got["loop"][p] != got["batched"][p]]
            print(f"  round {r + 1}: {len(diff)} prompt(s) differ, e.g. {diff[0]!r}:\n"
                  f"    loop    {got['loop'][diff[0]]!r}\n    batched {got['batched'][diff[0]]!r}")
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med["loop"] / med["batched"]
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in load_after)}")
    print(f"\n{'contender':10s} {'median s':>9s} {'texts/s':>9s}")
    for k in ("loop", "batched"):
        print(f"{k:10s} {med[k]:9.2f} {n_prompts / med[k]:9.2f}")
    rounds = [f"{a / b:.2f}x" for a, b in zip(times["loop"], times["batched"], strict=True)]
    print(f"per round: {', '.join(rounds)}")
    print(f"speed-up {speedup:.2f}x (target >= 3x); outputs identical under greedy decoding: "
          f"{'yes' if identical else 'NO'}")
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps({
        "model": str(folder), "prompts": n_prompts, "max_new_tokens": new_tokens, "batch_size": args.batch_size,
        "batch_tokens": BATCH_TOKENS, "threads": torch.get_num_threads(), "times": times, "median": med,
        "speedup": speedup, "identical": identical, "load_before": load_before, "load_after": load_after,
    }, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
