"""The plain-transformers baseline for bench_score.py: each term of

    r = help + harm + logsig(help - refusal(help))

scored separately, batch by batch, as one would write it by hand: both models loaded
once, then for every term and every batch of pairs, the chosen and rejected texts (and
for the third term the refusal texts) formatted with the chat template, padded, scored.

    python benchmarks/baseline_score.py WORKDIR [THREADS]   -> prints pairs/s and accuracy as JSON

THREADS: torch.set_num_threads(THREADS) first (default: torch's own choice).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

REFUSAL = "I'm sorry, but I can't help with that."


def main(work: Path, batch_size: int = 16) -> dict:
    t0 = time.perf_counter()
    pairs = [json.loads(line) for line in (work / "prefs.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(work / "models" / "rm-helpful")
    help_m = AutoModelForSequenceClassification.from_pretrained(work / "models" / "rm-helpful").eval()
    harm_m = AutoModelForSequenceClassification.from_pretrained(work / "models" / "rm-harmless").eval()

    def score(model, prompts, responses):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                         tokenize=False) for p, r in zip(prompts, responses, strict=True)]
        enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(**enc).logits[:, 0].tolist()

    total = {"chosen": [0.0] * len(pairs), "rejected": [0.0] * len(pairs)}
    for term in ("help", "harm", "logsig"):
        for s in range(0, len(pairs), batch_size):
            batch = pairs[s : s + batch_size]
            prompts = [b["prompt"] for b in batch]
            for side in ("chosen", "rejected"):
                resp = [b[side] for b in batch]
                if term == "help":
                    v = score(help_m, prompts, resp)
                elif term == "harm":
                    v = score(harm_m, prompts, resp)
                else:
                    h = score(help_m, prompts, resp)
                    ref = score(help_m, prompts, [REFUSAL] * len(batch))
                    v = [-math.log1p(math.exp(-(a - b))) for a, b in zip(h, ref, strict=True)]
                for i, x in enumerate(v):
                    total[side][s + i] += x
    acc = sum(c > r for c, r in zip(total["chosen"], total["rejected"], strict=True)) / len(pairs)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "pairs_per_s": len(pairs) / dt, "accuracy": acc}


if __name__ == "__main__":
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    print(json.dumps({**main(Path(sys.argv[1])), "threads": torch.get_num_threads()}))
