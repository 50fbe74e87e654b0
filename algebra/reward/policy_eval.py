"""Policy-level evaluation: `kl`, `winrate` and `front` (WARP's KL-reward front).

KL(π‖π_ref) on a set of prompts is estimated by Monte Carlo from the policy's own
samples: for each prompt x, n responses y ~ π(·|x) are drawn at temperature 1 (the
policy's own distribution: no top-k, top-p or temperature), and each contributes the sum
of its per-token log-ratios log π(y_t|x, y<t) − log π_ref(y_t|x, y<t), end-of-sequence
token included. The estimate is the mean over all samples; its standard error is the
samples' standard deviation over √N (i.i.d. formula over all N samples; with every prompt
asked n times this slightly over-states the error, as it counts the spread between
prompts too). A response ends at the policy's end-of-sequence token or after
`max_new_tokens` tokens; a truncated response is scored as far as it goes, as RL trainers
do. Both log-probabilities come from one teacher-forced forward pass each, in float64
after the models' logits; the policy and the reference are never in memory together.

`winrate(r, samples, base_samples)`: on each prompt present in both, the policy wins when
r's mean over its samples is above the base's mean (a tie counts half). The interval is
Wilson's 95% score interval for the win fraction over the prompts.

The numbers here are pure functions of arrays (`kl_estimate`, `win_rate`, `wilson`); the
sampling (`sample_logratios`) needs torch and the models, and is imported lazily by the
reward engine.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from .data import Prompt

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class KLSpec:
    prompts: tuple[Prompt, ...]  # distinct, in first-seen order
    n: int
    max_new_tokens: int
    seed: int


@dataclass(frozen=True)
class Estimate:
    mean: float
    se: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "se": self.se, "n": self.n}


def kl_estimate(logratios: list[float]) -> Estimate:
    """Mean and standard error of per-sample sequence log-ratios."""
    n = len(logratios)
    mean = math.fsum(logratios) / n
    if n < 2:
        return Estimate(mean, math.nan, n)
    var = math.fsum((x - mean) ** 2 for x in logratios) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a fraction p observed over n trials."""
    if n == 0:
        return (math.nan, math.nan)
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # clamped, and holding p itself: at p = 0 or 1 a bound equals p, not p minus a rounding
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def win_rate(policy: list[float], base: list[float]) -> dict[str, Any]:
    """Win fraction of policy over base, prompt by prompt (ties count half), with Wilson's
    95% interval."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy, base, strict=True)]
    n = len(outcomes)
    p = math.fsum(outcomes) / n
    lo, hi = wilson(p, n)
    return {"winrate": p, "ci95": [lo, hi], "prompts": n, "wins": outcomes.count(1.0),
            "ties": outcomes.count(0.5), "losses": outcomes.count(0.0)}


# ---- sampling (torch) -----------------------------------------------------------------------


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """A prompt's token ids as the policy sees it: the same as `generate`'s."""
    from .generate import encode

    return encode(tokenizer, prompt)


def seed_for(seed: int, prompt: Prompt) -> int:
    h = hashlib.sha256(json.dumps(["kl", seed, prompt], ensure_ascii=False).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a response: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    cfg = getattr(model, "generation_config", None)
    e = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    for v in (e if isinstance(e, list | tuple) else [e]):
        if v is not None:
            ids.add(int(v))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@dataclass
class Sampled:
    """n sampled continuations of one prompt: token ids (prompt first) and their lengths."""
    prompt_len: int
    ids: Any  # LongTensor [n, prompt_len + max_new_tokens], padded after each response
    lengths: list[int]  # response tokens of each row


def sample(model: Any, tokenizer: Any, prompt: Prompt, spec: KLSpec, device: Any) -> Sampled:
    """n responses to one prompt drawn from the model's own distribution (temperature 1),
    seeded by (seed, prompt)."""
    import torch

    ids = prompt_ids(tokenizer, prompt)
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop, default=0)
    gen = torch.Generator().manual_seed(seed_for(spec.seed, prompt))
    n, t_max, p = spec.n, spec.max_new_tokens, len(ids)
    seqs = torch.full((n, p + t_max), pad, dtype=torch.long)
    seqs[:, :p] = torch.tensor(ids)
    lengths = [0] * n
    alive = torch.ones(n, dtype=torch.bool)
    stops = torch.tensor(sorted(stop), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=seqs[:, :p].to(device), use_cache=True)
        for t in range(t_max):
            probs = torch.softmax(out.logits[:, -1, :].double().cpu(), dim=-1)
            tok = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            tok = torch.where(alive, tok, torch.full_like(tok, pad))
            seqs[:, p + t] = tok
            for i in torch.nonzero(alive).flatten().tolist():
                lengths[i] += 1
            alive &= ~torch.isin(tok, stops)
            if not bool(alive.any()) or t == t_max - 1:
                break
            out = _step(model, tok[:, None].to(device), out)
    return Sampled(p, seqs, lengths)


def _step(model: Any, ids: Any, out: Any) -> Any:
    """One decoding step from the previous output's key-value cache (transformers 5.x calls
    it `cache`, earlier versions `past_key_values`)."""
    cache = getattr(out, "cache", None)
    if cache is not None:
        return model(input_ids=ids, cache=cache, use_cache=True)
    return model(input_ids=ids, past_key_values=out.past_key_values, use_cache=True)


def logprobs(model: Any, s: Sampled, device: Any) -> list[float]:
    """Each row's response log-probability under `model`, by one teacher-forced pass
    (log-softmax in float64)."""
    import torch

    width = s.prompt_len + max(s.lengths)
    ids = s.ids[:, :width]
    mask = torch.zeros_like(ids)
    for i, n in enumerate(s.lengths):
        mask[i, : s.prompt_len + n] = 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    lp = torch.log_softmax(logits.double().cpu(), dim=-1)
    out = []
    for i, n in enumerate(s.lengths):
        pos = torch.arange(s.prompt_len - 1, s.prompt_len - 1 + n)
        out.append(float(lp[i, pos, ids[i, pos + 1]].sum()))
    return out


def texts(tokenizer: Any, s: Sampled) -> list[str]:
    return [tokenizer.decode(s.ids[i, s.prompt_len: s.prompt_len + n], skip_special_tokens=True)
            for i, n in enumerate(s.lengths)]


__all__ = ["Estimate", "KLSpec", "Sampled", "eos_ids", "kl_estimate", "logprobs", "prompt_ids", "sample",
           "seed_for", "texts", "win_rate", "wilson"]
