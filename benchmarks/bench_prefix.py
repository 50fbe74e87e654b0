"""Shared prefixes in scoring (`batching.prefix_batches`, `models.score_batch`), with and
without.

    python benchmarks/bench_prefix.py RM_FOLDER [PROMPTS=12] [ANSWERS=4] [ROUNDS=2]

RM_FOLDER: a sequence-classification checkpoint with a chat template (the real tier's
SmolLM2 reward model, ~/.cache/alg/real/smollm2-135m-v1/rm, or bench_score.py's
models/rm-helpful). PROMPTS synthetic prompts with ANSWERS answers each, through its
template, scored on one thread:

  with      rows grouped by shared prefix, each block's prefixes computed once
  without   the same rows sorted by length and cut by the same token budget

alternating which goes first. Prints the positions each computes, the times (process
CPU and wall) and the largest score difference.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from algebra.reward import models
from algebra.reward.batching import prefix_batches, sorted_batches
from algebra.reward.plan import _last_scored, pad_of

WORDS = "the answer is forty two because twelve plus thirty makes it let us think step by step about a reward model"


def main(folder: str, prompts: int = 12, answers: int = 4, rounds: int = 2) -> None:
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()  # as alg scores on a CPU
    rng = random.Random(0)
    w = WORDS.split()
    ids = []
    for _ in range(prompts):
        q = " ".join(rng.choices(w, k=rng.randint(4, 10))) + "?"
        for _ in range(answers):
            a = " ".join(rng.choices(w, k=rng.randint(5, 20)))
            text = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                           tokenize=False)
            ids.append(tok(text, add_special_tokens=False).input_ids)
    pad = pad_of(tok)
    model.config.pad_token_id = pad
    cpu = torch.device("cpu")
    grouped = prefix_batches(ids, [_last_scored(x, pad) for x in ids])
    plain = [(p, None, None) for p in sorted_batches([len(x) for x in ids])]
    blocks = {id(pre): pre for _, pre, _ in grouped if pre is not None}
    own = sum(len(ids[i]) - (len(pre.ids[k]) if pre else 0) for part, pre, of in grouped
              for i, k in zip(part, of or [0] * len(part), strict=True))
    print(f"{len(ids)} texts, {sum(map(len, ids))} tokens; grouped: {sum(len(p) for b in blocks.values() for p in b.ids)} "
          f"prefix tokens in {len(blocks)} block(s) + {own} own tokens, {len(grouped)} batch(es) "
          f"(without: {len(plain)})")

    def run(batches) -> tuple[float, float, dict]:
        c0, t0, out, held = time.process_time(), time.perf_counter(), {}, {}
        for part, pre, of in batches:
            got = models.score_batch(model, [ids[i] for i in part], pad, cpu, None if pre is None else (pre, of), held)
            out.update(zip(part, got, strict=True))
        return time.process_time() - c0, time.perf_counter() - t0, out

    times: dict[str, list[tuple[float, float]]] = {"with": [], "without": []}
    scores: dict[str, dict] = {}
    for r in range(rounds):
        for name in ("with", "without") if r % 2 == 0 else ("without", "with"):
            cpu_s, wall, scores[name] = run(grouped if name == "with" else plain)
            times[name].append((cpu_s, wall))
        print(f"round {r + 1}: with {times['with'][-1][0]:.2f} s CPU ({times['with'][-1][1]:.2f} wall), "
              f"without {times['without'][-1][0]:.2f} s CPU ({times['without'][-1][1]:.2f} wall)", flush=True)
    med = {k: statistics.median(c for c, _ in v) for k, v in times.items()}
    diff = max(abs(scores["with"][i] - scores["without"][i]) for i in scores["with"])
    print(f"median CPU with {med['with']:.2f} s, without {med['without']:.2f} s: {med['without'] / med['with']:.2f}x; "
          f"largest score difference {diff:.2e}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], *(int(x) for x in a[1:4]))
