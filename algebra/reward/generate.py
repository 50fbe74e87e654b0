"""`generate(policy, prompts, ...)`: samples from a causal LM as a responses value.

A `Generated` is lazy until the reward engine resolves it (before any reward model is
loaded, so that the policy and the reward models are never in memory together). Each
prompt is sampled with its own generator, seeded from (seed, prompt), so a prompt's
samples do not depend on which other prompts are asked for or in what order. Samples are
cached on disk, one JSON file per (policy content hash, prompt, options), so a re-run
or a longer prompt list samples only what is new.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..caches import cache_path
from ..graph import Node
from ..progress import Progress
from .data import Prompt, Responses, Row, prompt_text, to_messages


@dataclass(frozen=True)
class GenerateSpec:
    prompts: tuple[Prompt, ...]  # distinct, in first-seen order
    n: int
    temperature: float
    max_new_tokens: int
    seed: int


@dataclass(frozen=True, eq=False)
class Generated:
    node: Node  # the policy checkpoint
    spec: GenerateSpec
    label: str
    model: Any = field(repr=False)  # values.Model
    alg_type = "Responses"

    def __str__(self) -> str:
        return f"generate({self.label}, n={self.spec.n})"


def _sample_key(policy_hash: str, spec: GenerateSpec, prompt: Prompt) -> str:
    blob = json.dumps([policy_hash, prompt, spec.n, spec.temperature, spec.max_new_tokens, spec.seed],
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_path(key: str):
    return cache_path("generations") / key[:2] / f"{key}.json"


def cached_samples(policy_hash: str, spec: GenerateSpec, prompt: Prompt) -> list[str] | None:
    try:
        return json.loads(_cache_path(_sample_key(policy_hash, spec, prompt)).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _store(policy_hash: str, spec: GenerateSpec, prompt: Prompt, samples: list[str]) -> None:
    path = _cache_path(_sample_key(policy_hash, spec, prompt))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}")
        tmp.write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a cache is a convenience


def _seed(spec: GenerateSpec, prompt: Prompt) -> int:
    h = hashlib.sha256(json.dumps([spec.seed, prompt], ensure_ascii=False).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def sample(model: Any, tokenizer: Any, spec: GenerateSpec, prompt: Prompt, device) -> list[str]:
    """n samples for one prompt, decoded without special tokens."""
    import torch

    messages = to_messages(prompt)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt_text(prompt), return_tensors="pt").input_ids
    ids = ids.to(device)
    torch.manual_seed(_seed(spec, prompt))  # generate() draws from the global generator
    do_sample = spec.temperature > 0
    kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": spec.max_new_tokens,
                              "num_return_sequences": spec.n if do_sample else 1,
                              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else tokenizer.eos_token_id}
    if do_sample:
        kwargs.update(temperature=spec.temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts if do_sample else texts * spec.n


_OFF = Progress("off")


def resolve(gen: Generated, policy_hash: str, load_policy, progress: Progress | None = None) -> tuple[Responses, int]:
    """The samples of `gen` as responses, sampling only prompts not in the cache.
    `load_policy()` -> (model, tokenizer, device), called at most once. Returns the data
    and how many prompts were sampled. `progress` (a `progress.Progress`) shows the texts
    sampled."""
    spec = gen.spec
    samples: dict[Prompt, list[str]] = {}
    missing = []
    for p in spec.prompts:
        got = cached_samples(policy_hash, spec, p)
        if got is not None and len(got) == spec.n:
            samples[p] = got
        else:
            missing.append(p)
    if missing:
        model, tokenizer, device = load_policy()
        with (progress or _OFF).bar(len(missing) * spec.n, f"sample {gen.label}", unit="text") as bar:
            for p in missing:
                samples[p] = sample(model, tokenizer, spec, p, device)
                _store(policy_hash, spec, p, samples[p])
                bar.update(spec.n)
    rows = tuple(Row(p, s, {"prompt": p if isinstance(p, str) else to_messages(p),
                            "response": s}, i + 1)
                 for i, (p, s) in enumerate((p, s) for p in spec.prompts for s in samples[p]))
    return Responses(str(gen), rows), len(missing)


__all__ = ["GenerateSpec", "Generated", "cached_samples", "resolve", "sample"]
