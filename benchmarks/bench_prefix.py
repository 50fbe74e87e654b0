"""The shared-prefix key/value cache of `reward.models.score_batch`, with and without.

    python benchmarks/bench_prefix.py RM_FOLDER [TEXTS=24] [ROUNDS=2]

RM_FOLDER: a sequence-classification checkpoint with a chat template (the real tier's
SmolLM2 reward model, ~/.cache/alg/real/smollm2-135m-v1/rm). Synthetic (prompt, response)
texts through its template, sorted and cut by the token budget, scored on one thread with
the cache and without, alternating which goes first; prints the times and the largest
score difference.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from algebra.reward import models
from algebra.reward.batching import sorted_batches

WORDS = "the answer is forty two because twelve plus thirty makes it let us think step by step about a reward model"


def main(folder: str, n: int, rounds: int) -> None:
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rng = random.Random(0)
    w = WORDS.split()
    texts = [tok.apply_chat_template([{"role": "user", "content": " ".join(rng.choices(w, k=rng.randint(4, 10))) + "?"},
                                      {"role": "assistant", "content": " ".join(rng.choices(w, k=rng.randint(5, 20)))}],
                                     tokenize=False) for _ in range(n)]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.config.pad_token_id = pad
    parts = sorted_batches([len(x) for x in ids])
    print(f"{n} texts, mean {sum(map(len, ids)) / n:.1f} tokens, shared prefix {models.shared_prefix(ids)}, "
          f"{len(parts)} batch(es)")

    def run(cached: bool) -> tuple[float, dict]:
        t0, out, held = time.perf_counter(), {}, ({} if cached else None)
        for p in parts:
            for i, v in zip(p, models.score_batch(model, [ids[i] for i in p], pad, torch.device("cpu"), held),
                            strict=True):
                out[i] = v
        return time.perf_counter() - t0, out

    times: dict[bool, list[float]] = {True: [], False: []}
    scores: dict[bool, dict] = {}
    for r in range(rounds):
        for cached in (True, False) if r % 2 == 0 else (False, True):
            dt, scores[cached] = run(cached)
            times[cached].append(dt)
        print(f"round {r + 1}: with the cache {times[True][-1]:.2f} s, without {times[False][-1]:.2f} s", flush=True)
    with_, without = statistics.median(times[True]), statistics.median(times[False])
    diff = max(abs(scores[True][i] - scores[False][i]) for i in scores[True])
    print(f"median with {with_:.2f} s, without {without:.2f} s: {without / with_:.2f}x; largest score difference {diff:.2e}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 24, int(sys.argv[3]) if len(sys.argv) > 3 else 2)
