"""Reward models and policies as transformers models: loading a checked checkpoint value
(a folder, or a computed one materialised in memory) and scoring a batch of token ids.
Shared by the local engine (engine.py) and Ray's actors (distributed.py)."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import AlgRuntimeError
from ..options import Options
from .plan import Job, tokenizer_for


def load_model(model: Any, options: Options, device: torch.device, dtype: torch.dtype, causal: bool = False):
    """A transformers model of a checked checkpoint value, on device, in eval mode. A
    loaded folder is read by transformers; a computed value (a merge, `layers`, `stack`,
    `align`) is built from its own checked config (layer count, vocabulary size: what its
    saved folder's config.json would say) and given its materialised tensors."""
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from ..plan import output_config

    hf_logging.disable_progress_bar()
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    primary = model.type.primary
    if model.node.op == "load" and getattr(primary, "folder", None) is not None:
        m = auto.from_pretrained(primary.folder, dtype=dtype, trust_remote_code=False)
    else:
        from transformers.initialization import no_init_weights

        from ..execute import materialize
        from ..plan import plan_tensors

        cfg = output_config(model.type, model.type.dtype)
        if cfg is None:
            raise AlgRuntimeError(f"{model.node.describe()} has no config.json to build a model from")
        with tempfile.TemporaryDirectory(prefix="alg-config-") as tmp:  # as its saved folder has it
            (Path(tmp) / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
            config = AutoConfig.from_pretrained(tmp, trust_remote_code=False)
        state = materialize(plan_tensors(model, options), options, torch.device("cpu"),
                            desc=f"compute {model.node.describe()}")
        with no_init_weights():  # parameters are replaced below; skip their random init
            m = auto.from_config(config, dtype=dtype, trust_remote_code=False)
        try:
            got = m.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                                    assign=True, strict=False)
        except RuntimeError as e:  # its tensors do not fit its config: a bug of check, said plainly
            raise AlgRuntimeError(f"{model.node.describe()}: its tensors do not fit a {type(m).__name__} built "
                                  f"from its config: {str(e).splitlines()[0]}") from None
        if getattr(m.config, "tie_word_embeddings", False):
            m.tie_weights()  # a tied head is saved once (as the embedding), as transformers saves it
        # a key the tensors lack is fine only when it is tied to one they have
        have = {t.data_ptr() for k, t in m.state_dict(keep_vars=True).items() if k in state}
        lacking = [k for k in got.missing_keys if m.state_dict(keep_vars=True)[k].data_ptr() not in have]
        del state
        if lacking or got.unexpected_keys:
            what = f"lacks {lacking[0]}" if lacking else f"has {got.unexpected_keys[0]}, which it does not use"
            raise AlgRuntimeError(f"{model.node.describe()}: its tensors do not fit a {type(m).__name__} built "
                                  f"from its config: it {what}")
    return m.to(device).eval()


def pad_id(job: Job) -> int:
    """The id a job's batches are padded with: its tokenizer's pad token, else EOS."""
    tok = tokenizer_for(job.groups[0].leaf)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


# The shortest shared prefix (tokens) worth a key/value cache: a chat template's fixed head
# (SmolLM2's default system prompt: 24 of about 53 tokens; its reward model scored 24 texts
# 1.5x faster with the cache, benchmarks/README.md). Below it the saving is within the
# noise of a measurement (the benchmark's template: 4 of 69 tokens).
MIN_PREFIX = 16


def shared_prefix(input_ids: list[list[int]]) -> int:
    """How many leading tokens every row shares, leaving each row at least one of its own."""
    first, n = input_ids[0], min(len(x) for x in input_ids) - 1
    p = 0
    while p < n and all(x[p] == first[p] for x in input_ids):
        p += 1
    return p


def prefix_cache(model: Any, prefix: list[int], device: torch.device) -> Any:
    """The key/value cache of `prefix` (one row), for `score_batch`; None where the model
    does not return one."""
    with torch.no_grad():
        out = model.base_model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
    cache = out.get("cache")  # transformers 5's name for it
    if cache is None:
        cache = out.get("past_key_values")
    return cache if cache is not None and hasattr(cache, "batch_repeat_interleave") else None


def score_batch(model: Any, input_ids: list[list[int]], pad: int, device: torch.device,
                prefixes: dict | None = None) -> list[float]:
    """A reward model's scores (logit 0) of one batch of token ids, right-padded with `pad`
    (real tokens first), in float64. Shared by local runs and Ray workers. With
    `prefixes` (a dict kept across a model's batches), a prefix of MIN_PREFIX tokens or more
    that every row shares is computed once (its key/value cache, kept in the dict) and
    each batch runs only the rest of its rows, at positions after it: the same scores
    within float rounding (tests/test_score_batching.py). One prefix is kept at a time: a
    batch whose rows all start with it reuses it, another replaces it."""
    import copy
    import inspect

    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    # only a decoder takes a cache (an encoder's prefix tokens would see the rest: no reuse)
    p = shared_prefix(input_ids) if prefixes is not None and name is not None else 0
    cache = None
    if p >= MIN_PREFIX:
        # the prefix cached last, if every row starts with it; else this batch's (one kept)
        held = next(iter(prefixes), None)
        if held is not None and len(held) <= p and tuple(input_ids[0][: len(held)]) == held:
            p, cache = len(held), prefixes[held]
        elif len(input_ids) > 1:  # a row alone shares nothing: not worth a cache of its own
            prefixes.clear()
            held = tuple(input_ids[0][:p])
            cache = prefixes[held] = prefix_cache(model, list(held), device)
    if cache is None:
        p = 0
    rows = [x[p:] for x in input_ids]
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), p + width), dtype=torch.long)
    mask[:, :p] = 1
    for i, x in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, p : p + len(x)] = 1
    kwargs: dict[str, Any] = {}
    if cache is not None:
        batch_cache = copy.deepcopy(cache)  # the forward pass appends to it
        batch_cache.batch_repeat_interleave(len(rows))
        kwargs = {name: batch_cache, "use_cache": True}
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
    return logits[:, 0].double().cpu().tolist()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["load_model", "pad_id", "score_batch"]
