"""`generate(policy, prompts, ...)`: samples from a causal LM as a responses value.

A `Generated` is lazy until the reward engine resolves it (before any reward model is
loaded, so that the policy and the reward models are never in memory together).

Batching. The texts to sample are rows: one per prompt under greedy decoding (its n
samples are copies), one per (prompt, sample index) when sampling. Each prompt is encoded
alone (its chat template when the tokenizer has one, as `sample` does), the rows are
sorted by length (longest first) and cut into batches of `batch_size` rows, by default as
many as fit `BATCH_TOKENS` tokens (rows x (longest prompt + max_new_tokens)). A batch is
left-padded (the tokenizer's pad token, else its EOS) with an attention mask, from which
transformers' `generate` derives the position ids, so a row sees what it sees alone.
Planning (`plan_batches`) and running a batch (`generate_batch`) are apart: on Ray
(distributed.py) the driver plans the same batches and workers run them.

Seeding. Greedy rows are deterministic. A sampled row draws every token from its own
`torch.Generator`, seeded from (seed, prompt, sample index): a sample does not depend on
which other prompts are asked for, in what order, on `n` or on the batch size.
Sampling is plain temperature sampling (no top-k or top-p, as before batching). The
floating-point rounding of a padded batch can differ from a row alone; it changes a token
only where two candidates' logits lie within rounding of each other (tests check greedy
batches against the one-prompt loop `sample`, on a tiny Llama and on SmolLM2).

Stop strings. A row ends at the first occurrence of any `stop` string in its decoded text
(special tokens skipped, so a stop spanning several tokens is found), and the text is cut
there: the stop string is not part of the sample (vLLM's and TRL's convention). The EOS
token still ends a row.

Cache. Samples are cached on disk, one JSON file per (policy content hash, prompt,
options), so a re-run or a longer prompt list samples only what is new. The key of a
greedy request without stop strings is the one used before batching (its outputs are the
same); stop strings, and the per-sample generators of sampling (which draw differently
from the earlier shared generator), are added to the key explicitly (`_sample_key`).
`batch_size` is not part of the key: it does not change what is sampled. The dtype the
policy samples in is (`policy_key`): a GPU run in bf16 and a CPU run in float32 draw
different texts from one policy, so they do not share samples.
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
from .batching import BATCH_TOKENS, pad_of, sorted_batches
from .data import Prompt, Responses, Row, prompt_text, to_messages


@dataclass(frozen=True)
class GenerateSpec:
    prompts: tuple[Prompt, ...]  # distinct, in first-seen order
    n: int
    temperature: float
    max_new_tokens: int
    seed: int
    stop: tuple[str, ...] = ()  # non-empty strings; a row's text is cut at the first one
    batch_size: int | None = field(default=None, compare=False)  # rows per batch; None: BATCH_TOKENS


@dataclass(frozen=True, eq=False)
class Generated:
    node: Node  # the policy checkpoint
    spec: GenerateSpec
    label: str
    model: Any = field(repr=False)  # values.Model
    alg_type = "Responses"

    def __str__(self) -> str:
        return f"generate({self.label}, n={self.spec.n})"


# BATCH_TOKENS (batching.py): rows x (longest prompt + max_new_tokens) per batch, when
# generate() is not given batch_size; scoring batches by the same budget

# the sampling scheme of temperature > 0, part of its cache key: "row-generators" is one
# generator per (prompt, sample index); the key without it was the shared generator's
SAMPLER = "row-generators"


def policy_key(policy_hash: str, dtype: Any) -> str:
    """The cache's name for a policy sampled in `dtype` (a torch dtype): its content hash,
    with the dtype appended unless it is float32, whose keys are those written before the
    dtype was part of them."""
    name = str(dtype).removeprefix("torch.")
    return policy_hash if name == "float32" else f"{policy_hash}:{name}"


def _sample_key(policy_hash: str, spec: GenerateSpec, prompt: Prompt) -> str:
    key: list = [policy_hash, prompt, spec.n, spec.temperature, spec.max_new_tokens, spec.seed]
    extra: dict[str, Any] = {}
    if spec.stop:
        extra["stop"] = list(spec.stop)
    if spec.temperature > 0:
        extra["sampler"] = SAMPLER
    if extra:  # greedy without stop strings keeps the key it had before batching
        key.append(extra)
    blob = json.dumps(key, ensure_ascii=False)
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


def _row_seed(spec: GenerateSpec, prompt: Prompt, j: int) -> int:
    """The seed of sample j of prompt (sampling draws each row from its own generator)."""
    h = hashlib.sha256(json.dumps([spec.seed, prompt, j], ensure_ascii=False).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _legacy_seed(spec: GenerateSpec, prompt: Prompt) -> int:
    h = hashlib.sha256(json.dumps([spec.seed, prompt], ensure_ascii=False).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def encode(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The token ids a prompt is generated from: its chat template with the generation
    prompt when the tokenizer has one, else its text with the tokenizer's special tokens."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(to_messages(prompt), tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(prompt_text(prompt)).input_ids)


def cut(text: str, stop: tuple[str, ...]) -> str:
    """text up to the first occurrence of any stop string (which is left out)."""
    at = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return text if at < 0 else text[:at]


def sample(model: Any, tokenizer: Any, spec: GenerateSpec, prompt: Prompt, device) -> list[str]:
    """n samples for one prompt, decoded without special tokens, one unpadded forward pass
    per step: the loop generate ran before batching, kept as the reference that the tests
    and benchmarks/bench_generate.py compare `sample_batch` with. Under greedy decoding the
    two agree; this one samples from the global generator (seeded per prompt), so its
    sampled texts are not `sample_batch`'s. Stop strings cut the finished text."""
    import torch

    ids = torch.tensor([encode(tokenizer, prompt)], device=device)
    torch.manual_seed(_legacy_seed(spec, prompt))  # generate() draws from the global generator
    do_sample = spec.temperature > 0
    kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": spec.max_new_tokens,
                              "num_return_sequences": spec.n if do_sample else 1,
                              "pad_token_id": pad_of(tokenizer)}
    if do_sample:
        kwargs.update(temperature=spec.temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    texts = [cut(t, spec.stop) for t in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
    return texts if do_sample else texts * spec.n


def _hooks(tokenizer: Any, start: int, stop: tuple[str, ...], seeds: list[int] | None, temperature: float):
    """transformers' logits processors and stopping criteria for one batch: sampling from
    per-row generators (greedy decoding then picks the drawn token), and stop strings."""
    import torch
    from transformers import (
        LogitsProcessor,
        LogitsProcessorList,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    class RowSampler(LogitsProcessor):
        def __init__(self):
            self.gens: list | None = None

        def __call__(self, input_ids, scores):
            if self.gens is None:
                self.gens = [torch.Generator(device=scores.device).manual_seed(s) for s in seeds]
            probs = torch.softmax(scores.float() / temperature, dim=-1)
            drawn = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.gens)])
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, drawn[:, None], 0.0)

    class StopStrings(StoppingCriteria):
        def __init__(self):
            self.done: list[bool] | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.done is None:
                self.done = [False] * input_ids.shape[0]
            live = [i for i, d in enumerate(self.done) if not d]
            texts = tokenizer.batch_decode(input_ids[live, start:], skip_special_tokens=True)
            for i, t in zip(live, texts, strict=True):
                self.done[i] = any(s in t for s in stop)
            return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    procs = LogitsProcessorList([RowSampler()] if seeds is not None else [])
    crit = StoppingCriteriaList([StopStrings()] if stop else [])
    return procs, crit


@dataclass(frozen=True)
class RowBatch:
    """One batch of rows to sample, as `plan_batches` cuts it: its rows (prompt, sample
    index), longest first, their prompts' token ids, and (sampling) each row's seed."""
    rows: tuple[tuple[Prompt, int], ...]
    input_ids: tuple[tuple[int, ...], ...]
    seeds: tuple[int, ...] | None


def plan_batches(tokenizer: Any, spec: GenerateSpec, prompts: tuple[Prompt, ...]) -> list[RowBatch]:
    """The batches that sample spec.n texts for each prompt (see the module's notes): the
    same for a local run and a Ray run (distributed.py), which runs them on its workers."""
    do_sample = spec.temperature > 0
    ids = {p: tuple(encode(tokenizer, p)) for p in prompts}
    rows = [(p, j) for p in prompts for j in range(spec.n if do_sample else 1)]
    out = []
    # longest first (ties keep the prompts' order), cut by rows x (longest + max_new_tokens)
    for part in sorted_batches([len(ids[p]) for p, _ in rows], spec.batch_size, extra=spec.max_new_tokens,
                               longest_first=True):
        chunk = tuple(rows[i] for i in part)
        seeds = tuple(_row_seed(spec, p, j) for p, j in chunk) if do_sample else None
        out.append(RowBatch(chunk, tuple(ids[p] for p, _ in chunk), seeds))
    return out


def generate_batch(model: Any, tokenizer: Any, spec: GenerateSpec, input_ids: tuple[tuple[int, ...], ...],
                   seeds: tuple[int, ...] | None, device) -> list[str]:
    """The texts of one batch (a `RowBatch`'s input_ids and seeds), left-padded into one
    `generate` call, decoded without special tokens and cut at the stop strings. Reads
    spec's options, not its prompts."""
    import torch

    pad = pad_of(tokenizer)
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, x in enumerate(input_ids):
        ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    procs, crit = _hooks(tokenizer, width, spec.stop, list(seeds) if seeds is not None else None, spec.temperature)
    with torch.no_grad():
        gen = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=spec.max_new_tokens, pad_token_id=pad,
                             logits_processor=procs, stopping_criteria=crit)
    return [cut(t, spec.stop) for t in tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)]


class Samples:
    """The texts of batches, as they come (in any order), gathered by prompt: `done(prompt,
    samples)` is called for each prompt as soon as its samples are complete."""

    def __init__(self, spec: GenerateSpec, prompts: tuple[Prompt, ...], done=None):
        self.spec, self.prompts, self.done = spec, prompts, done
        self.texts: dict[Prompt, dict[int, str]] = {p: {} for p in prompts}
        self.out: dict[Prompt, list[str]] = {}

    def add(self, batch: RowBatch, texts: list[str]) -> None:
        do_sample = self.spec.temperature > 0
        n = self.spec.n
        for (p, j), t in zip(batch.rows, texts, strict=True):
            self.texts[p][j] = t
            if len(self.texts[p]) == (n if do_sample else 1):
                got = self.texts[p]
                self.out[p] = [got[k] for k in range(n)] if do_sample else [got[0]] * n
                if self.done is not None:
                    self.done(p, self.out[p])

    def result(self) -> dict[Prompt, list[str]]:
        return {p: self.out[p] for p in self.prompts}


def sample_batch(model: Any, tokenizer: Any, spec: GenerateSpec, prompts: tuple[Prompt, ...], device,
                 done=None) -> dict[Prompt, list[str]]:
    """spec.n samples for each prompt, many rows per forward pass (see the module's notes).
    `done(prompt, samples)` is called for each prompt as soon as its samples are complete."""
    got = Samples(spec, prompts, done)
    for b in plan_batches(tokenizer, spec, prompts):
        got.add(b, generate_batch(model, tokenizer, spec, b.input_ids, b.seeds, device))
    return got.result()


_OFF = Progress("off")


def resolve(gen: Generated, policy_hash: str, load_policy, progress: Progress | None = None,
            sampler=None) -> tuple[Responses, int]:
    """The samples of `gen` as responses, sampling only prompts not in the cache.
    `load_policy()` -> (model, tokenizer, device), called at most once. Returns the data
    and how many prompts were sampled. `progress` (a `progress.Progress`) shows the texts
    sampled. `sampler(spec, prompts, done)`, where given, samples instead of the loaded
    policy (`distributed.sampler`: on Ray workers), calling `done` as `sample_batch` does."""
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
        if sampler is None:
            model, tokenizer, device = load_policy()
        with (progress or _OFF).bar(len(missing) * spec.n, f"sample {gen.label}", unit="text") as bar:

            def done(p: Prompt, got: list[str]) -> None:
                samples[p] = got
                _store(policy_hash, spec, p, got)
                bar.update(spec.n)

            if sampler is None:
                sample_batch(model, tokenizer, spec, tuple(missing), device, done)
            else:
                sampler(spec, tuple(missing), done)
    rows = tuple(Row(p, s, {"prompt": p if isinstance(p, str) else to_messages(p),
                            "response": s}, i + 1)
                 for i, (p, s) in enumerate((p, s) for p in spec.prompts for s in samples[p]))
    return Responses(str(gen), rows), len(missing)


__all__ = ["BATCH_TOKENS", "GenerateSpec", "Generated", "RowBatch", "Samples", "cached_samples", "cut", "encode",
           "generate_batch", "plan_batches", "resolve", "sample", "sample_batch"]
