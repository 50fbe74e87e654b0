"""Reward models and policies as transformers models: loading a checked checkpoint value
(a folder, or a computed one materialised in memory) and scoring a batch of token ids.
Shared by the local engine (engine.py) and Ray's actors (distributed.py)."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import AlgRuntimeError
from ..options import Options
from .batching import Prefixes, pad_of
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
    return pad_of(tokenizer_for(job.groups[0].leaf))


def scorer(model: Any, pad: int, device: torch.device):
    """score(input_ids, shared) -> scores of one batch with `model` (`score_batch`), batch
    after batch, keeping the current block's prefix cache between calls. Sets the model's
    pad_token_id where it has none: its head finds the scored token by it. Shared by local
    runs and Ray's actors."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad
    held: dict = {}
    return lambda input_ids, shared: score_batch(model, input_ids, pad, device, shared, held)


def score_batch(model: Any, input_ids: list[list[int]], pad: int, device: torch.device,
                shared: tuple[Prefixes, list[int]] | None = None, held: dict | None = None) -> list[float]:
    """A reward model's scores (logit 0) of one batch of token ids, right-padded with `pad`
    (real tokens first), in float64. Shared by local runs and Ray workers.

    With `shared` (the block's `batching.Prefixes` and each row's index into them), the
    block's prefixes are computed once (`block_cache`, kept in `held` across the block's
    batches) and the batch runs only its rows' own tokens, at the positions after their
    prefix, attending to the prefix's keys and values: the same scores within float
    rounding (tests/test_score_batching.py). A model that cannot take such a cache (an
    encoder, whose prefix tokens see the rest; a sliding-window or other special cache)
    scores the rows whole."""
    cached = block_cache(model, shared[0], pad, device, held) if shared is not None else None
    if cached is None:
        return _forward(model, input_ids, pad, device)
    cache, lens = cached
    of = shared[1]
    return _forward(model, input_ids, pad, device, cache, [lens[k] for k in of], of)


def _cache_arg(model: Any) -> str | None:
    """The name the model's forward takes a key/value cache by (transformers 5: `cache`,
    earlier `past_key_values`), None where it takes none (an encoder)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None


def block_cache(model: Any, prefixes: Prefixes, pad: int, device: torch.device,
                held: dict | None) -> tuple[Any, list[int]] | None:
    """The key/value cache of a block's prefixes (one right-padded forward pass, one row
    per prefix) and their lengths; `held` keeps the last block's, by its prefixes (None:
    not kept). None where the model cannot be scored from a cache."""
    if held is not None and prefixes in held:
        return held[prefixes]
    got = None
    if _cache_arg(model) is not None:
        lens = [len(p) for p in prefixes.ids]
        ids = torch.full((len(lens), max(lens)), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prefixes.ids):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        none = torch.zeros(0, dtype=torch.long, device=device)
        with torch.inference_mode(), _tail_only_at(model, (none, none)):  # no position's output is read
            out = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
        cache = out.get("cache")  # transformers 5's name for it
        if cache is None:
            cache = out.get("past_key_values")
        if _full_attention(cache):
            got = (cache, lens)
    if held is not None:
        held.clear()
        held[prefixes] = got
    return got


def _full_attention(cache: Any) -> bool:
    """Whether a cache is transformers' dynamic cache of full-attention layers only, whose
    rows can be selected and extended (a sliding window's would drop prefix tokens)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    return (isinstance(cache, DynamicCache) and bool(getattr(cache, "layers", None))
            and all(type(layer) is DynamicLayer for layer in cache.layers))


def _forward(model: Any, input_ids: list[list[int]], pad: int, device: torch.device, cache: Any = None,
             skip: list[int] | None = None, of: list[int] | None = None) -> list[float]:
    """Logit 0 of each row; with a block's `cache`, row i runs from token skip[i] on, after
    the cache's row of[i]."""
    import copy

    skip = skip or [0] * len(input_ids)
    rows = [x[s:] for x, s in zip(input_ids, skip, strict=True)]
    width = max(len(x) for x in rows)
    held = 0 if cache is None else cache.get_seq_length()
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), held + width), dtype=torch.long)
    for i, (x, s) in enumerate(zip(rows, skip, strict=True)):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, :s] = 1
        mask[i, held : held + len(x)] = 1
    kwargs: dict[str, Any] = {}
    at = _pooled_at(model, ids)
    ids = ids.to(device)
    with torch.inference_mode():
        if cache is not None:
            mine = copy.copy(cache)  # the rows this batch needs, new tensors (the block's stay as they are)
            mine.layers = [copy.copy(layer) for layer in cache.layers]
            mine.batch_select_indices(torch.tensor(of, device=device))
            kwargs = {_cache_arg(model): mine, "use_cache": True,
                      "position_ids": (torch.tensor(skip)[:, None] + torch.arange(width)[None, :]).to(device)}
        scored = None if at is None else (torch.arange(len(at), device=device), at.to(device))
        with _tail_only_at(model, scored):
            logits = model(input_ids=ids, attention_mask=mask.to(device), **kwargs).logits
    return logits[:, 0].double().cpu().tolist()


# Decoders whose layers are attention, then position-wise modules only (the attention's
# output projection, residual additions, norms, a dense MLP: transformers' llama, mistral,
# qwen2, qwen3, gemma, gemma2 decoder layers). After the last layer's attention, a
# position's output depends on that position alone.
_POSITION_WISE_TAIL = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})


def _tail(model: Any) -> list[tuple[torch.nn.Module, str]] | None:
    """The last decoder layer's position-wise modules after its attention, as (owner,
    attribute): its attention's output projection and its MLP. None where the model is not
    one of `_POSITION_WISE_TAIL` or lacks them."""
    if getattr(getattr(model, "config", None), "model_type", None) not in _POSITION_WISE_TAIL:
        return None
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    last = layers[-1] if isinstance(layers, torch.nn.ModuleList) and len(layers) else None
    attn = getattr(last, "self_attn", None)
    if not isinstance(getattr(attn, "o_proj", None), torch.nn.Linear) or not isinstance(
            getattr(last, "mlp", None), torch.nn.Module):
        return None
    return [(attn, "o_proj"), (last, "mlp")]


def _pooled_at(model: Any, ids: torch.Tensor) -> torch.Tensor | None:
    """The position each row's score is read at, where the model's head is transformers'
    `GenericForSequenceClassification`, computed by its rule (the last position whose id is
    not the config's pad_token_id); None for any other head (or no pad_token_id)."""
    try:
        from transformers.modeling_layers import GenericForSequenceClassification
    except ImportError:
        return None
    if getattr(type(model), "forward", None) is not GenericForSequenceClassification.forward:
        return None
    pad = model.config.get_text_config().pad_token_id
    if pad is None:
        return None
    return (torch.arange(ids.shape[-1], dtype=torch.int32) * (ids != pad).to(torch.int32)).argmax(-1)


class _AtPositions(torch.nn.Module):
    """A position-wise module run at the given (row, position) pairs only; every other
    position's output is zeros. Only for modules after the last attention, whose other
    positions' outputs nothing reads."""

    def __init__(self, inner: torch.nn.Module, at: tuple[torch.Tensor, torch.Tensor], width: int) -> None:
        super().__init__()
        self.inner, self.at, self.width = inner, at, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.at
        out = x.new_zeros(*x.shape[:-1], self.width)
        if len(rows):
            out[rows, cols] = self.inner(x[rows, cols][None])[0]
        return out


@contextmanager
def _tail_only_at(model: Any, at: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
    """While open, the model's last layer runs its position-wise modules after attention
    (`_tail`) only at `at` (row indices, positions; empty: nowhere), the rest of every
    layer as before: a position outside `at` has wrong last-layer outputs, its keys and
    values stay right. Nothing changes where `at` is None or the model has no such tail."""
    tail = _tail(model) if at is not None else None
    if tail is None:
        yield
        return
    width = tail[0][0].o_proj.out_features
    kept = [(owner, name, getattr(owner, name)) for owner, name in tail]
    try:
        for owner, name, inner in kept:
            setattr(owner, name, _AtPositions(inner, at, width))
        yield
    finally:
        for owner, name, inner in kept:
            setattr(owner, name, inner)


def _free(*gone: Any) -> None:
    """Give a released model's memory back: a full garbage collection (a fifth of a second
    with transformers imported) where one of `gone` (weak references to what was released)
    is still alive, held by a reference cycle, or where none are given; then the GPU's
    cached blocks."""
    if not gone or any(ref() is not None for ref in gone):
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["block_cache", "load_model", "pad_id", "score_batch", "scorer"]
