"""What a checkpoint's tensors are, from their names and config.json alone.

No per-architecture tables: the layer stack is the numbered module that holds the most
tensors (`model.layers.N.`, `transformer.h.N.`, `bert.encoder.layer.N.`,
`gpt_neox.layers.N.`, ...), cross-checked against the config's layer count
(`num_hidden_layers`, `n_layer`, `num_layers`, `n_layers`). Every other tensor is on one
side of the stack:

    "pre"   the input side: token, position and type embeddings and their norm
            (names holding embed, wte, wpe, word_emb, tok_emb, position_emb, token_type)
    "post"  everything else: the final norm, the output head, a pooler, a score head
            (and names like lm_head, embed_out, output., cls., score. even if they
            mention an embedding)

The input embedding is the pre tensor with the vocabulary's rows (config `vocab_size`;
the embedding's own rows when no tensor has that many); the output head is another 2-D
tensor of the same shape. A checkpoint whose config ties the head to the embedding
(`tie_word_embeddings`, true unless the config says false) and stores no head is *tied*:
its embedding is its head.

This module is the one owner of tensor roles: every other module asks an `Arch`
(`arch_of(t)`) which tensor is what, and no other module matches tensor names.

    role(name)   "layer", "embedding", "head", "score" (a classifier's score head:
                 score., classifier.), "final_norm", "pre" (the rest of the input
                 side: positions, token types, the embedding norm) or "post"
    token_rows   the tensors whose first dimension counts tokens, `vocab_rows` of them:
                 outside the layer stack, not positional, not a score head, and either
                 named like an embedding or head (embed, wte, lm_head, shared, output.,
                 tok_, word_), or the embedding or head itself, or, when the rows are the
                 config's vocab_size, any such tensor (BERT's cls.predictions.bias)

Invariant: pure and header-only: `describe(tensors, config)` reads names, shapes and the
config dict, never a weight, and gives the same answer for the same input.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .types import CheckpointType, TensorSpec

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_NUMBERED = re.compile(r"(?:^|\.)(\d+)\.")
_PRE = re.compile(r"embed|wte|wpe|word_emb|tok_emb|position_emb|token_type", re.I)
_POSITIONAL = re.compile(r"wpe|position|pos_emb|token_type", re.I)
_EMBED = re.compile(r"embed|wte|word_emb|tok_emb|shared", re.I)
_HEADISH = re.compile(r"head|embed_out|output|decoder|logits", re.I)
# output-side names that would otherwise read as embeddings (GPT-NeoX's embed_out)
_OUT = re.compile(r"lm_head|embed_out|(?:^|\.)output\.|(?:^|\.)(?:cls|score|classifier)\.", re.I)
_NORM = re.compile(r"norm|ln_f", re.I)
_SCORE = re.compile(r"(?:^|\.)(?:score|classifier)\.", re.I)
# names whose rows may be tokens (a tensor counts only if its rows are the vocabulary's)
_TOKEN_NAME = re.compile(r"embed|wte|lm_head|shared|(?:^|\.)output\.|tok_|word_", re.I)
# positional tables, never token rows even with the vocabulary's row count
_POSITION_ROWS = re.compile(r"position|pos_|wpe", re.I)

ROLES = ("layer", "embedding", "head", "score", "final_norm", "pre", "post")


@dataclass(frozen=True)
class Arch:
    """The layout of one checkpoint type; see the module docstring."""

    layer_prefix: str | None  # "model.layers." : layer tensors are PREFIX + "N." + suffix
    n_layers: int
    layer_of: Mapping[str, int]  # layer tensors only
    embedding: str | None  # the input embedding's name
    head: str | None  # the stored output head (None when tied or absent)
    tied: bool  # no head stored; the embedding serves as the output head
    final_norm: tuple[str, ...]
    count_key: str | None  # the config key that holds the layer count
    notes: tuple[str, ...] = field(default=())
    vocab_rows: int | None = None  # the rows of the token-row tensors
    token_rows: tuple[str, ...] = field(default=())  # in the checkpoint's tensor order

    def layer(self, name: str) -> int | None:
        return self.layer_of.get(name)

    def role(self, name: str) -> str:
        """One of ROLES; see the module docstring."""
        if name in self.layer_of:
            return "layer"
        if name == self.embedding:
            return "embedding"
        if name == self.head:
            return "head"
        if _SCORE.search(name):
            return "score"
        if name in self.final_norm:
            return "final_norm"
        return "pre" if _is_pre(name) else "post"

    def is_token_rows(self, name: str) -> bool:
        """Whether the tensor's first dimension counts tokens (see `token_rows`)."""
        return name in self.token_rows

    def side(self, name: str) -> str:
        """"layer", "pre" (input embeddings) or "post" (final norm, heads, the rest)."""
        if name in self.layer_of:
            return "layer"
        return "pre" if _is_pre(name) else "post"

    def depth(self, name: str) -> float:
        """Where a tensor sits along the network, in [0, 1]: layer i of L at i/(L-1)
        (0 for a single layer), the input side at 0, everything after the stack at 1."""
        i = self.layer_of.get(name)
        if i is not None:
            return i / (self.n_layers - 1) if self.n_layers > 1 else 0.0
        return 0.0 if _is_pre(name) else 1.0

    def suffix(self, name: str) -> str:
        """A layer tensor's name inside its layer: 'self_attn.q_proj.weight'."""
        i = self.layer_of[name]
        assert self.layer_prefix is not None
        return name[len(self.layer_prefix) + len(str(i)) + 1:]

    def layer_name(self, i: int, suffix: str) -> str:
        assert self.layer_prefix is not None
        return f"{self.layer_prefix}{i}.{suffix}"

    def summary(self) -> str:
        stack = f"{self.n_layers} layers ({self.layer_prefix}N.)" if self.layer_prefix else "no layer stack"
        head = "tied to the embedding" if self.tied else (self.head or "none")
        return f"{stack}; embedding {self.embedding or 'none'}; head {head}"


def layer_index(name: str) -> int | None:
    """The number of a name's first numbered module ('model.layers.3.mlp...' -> 3)."""
    m = _NUMBERED.search(name)
    return int(m.group(1)) if m else None


def _is_pre(name: str) -> bool:
    return bool(_PRE.search(name)) and not _OUT.search(name)


def config_layers(config: Mapping[str, Any] | None) -> tuple[str | None, int | None]:
    """(key, value) of the config's layer count, or (None, None)."""
    for key in LAYER_COUNT_KEYS:
        v = (config or {}).get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return key, v
    return None, None


def describe(tensors: Mapping[str, TensorSpec], config: Mapping[str, Any] | None) -> Arch:
    key, n_config = config_layers(config)
    notes: list[str] = []
    # the layer stack: group names by the text before their first ".N."
    stacks: dict[str, dict[str, int]] = {}
    for name in tensors:
        m = _NUMBERED.search(name)
        if m:
            prefix = name[: m.start(1)]
            stacks.setdefault(prefix, {})[name] = int(m.group(1))
    prefix = None
    if stacks:
        def rank(p: str) -> tuple:
            idx = set(stacks[p].values())
            fits = n_config is not None and idx == set(range(n_config))
            return (fits, len(stacks[p]), p)

        prefix = max(stacks, key=rank)
        if len(set(stacks[prefix].values())) < 2 and n_config is None:
            prefix = None  # one numbered module is not a stack
    layer_of = dict(stacks[prefix]) if prefix is not None else {}
    n_layers = max(layer_of.values()) + 1 if layer_of else 0
    if n_config is not None and layer_of and n_config != n_layers:
        notes.append(f"config {key}={n_config} but the tensor names number {n_layers} layers")
    if layer_of and set(layer_of.values()) != set(range(n_layers)):
        missing = sorted(set(range(n_layers)) - set(layer_of.values()))
        notes.append(f"layers {missing} hold no tensors")

    vocab = _vocab(config)
    outside = [(n, s) for n, s in tensors.items() if n not in layer_of and s.is_float]
    mats2 = [(n, s) for n, s in outside if len(s.shape) == 2]
    embedding = None
    for mats in ([(n, s) for n, s in mats2 if vocab is None or s.shape[0] == vocab], mats2):
        # an embedding padded past the config's vocab_size is still the embedding
        embedding = next((n for n, _ in mats if _EMBED.search(n) and _is_pre(n) and not _POSITIONAL.search(n)), None)
        if embedding is not None:
            break
    head = None
    if embedding is not None:
        shape = tensors[embedding].shape
        others = [n for n, s in mats if n != embedding and s.shape == shape and not _POSITIONAL.search(n)
                  and not _SCORE.search(n)]
        head = next((n for n in others if _HEADISH.search(n)), others[0] if others else None)
    tie_flag = _tie_flag(config)
    tied = embedding is not None and head is None and tie_flag
    final_norm = tuple(n for n, _ in outside if _NORM.search(n) and not _is_pre(n) and not _OUT.search(n)
                       and "predictions" not in n)
    rows, token_rows = _token_rows(outside, vocab, embedding, head, tensors)
    return Arch(prefix, n_layers, layer_of, embedding, head, tied, final_norm, key, tuple(notes),
                rows, token_rows)


def _token_rows(outside, vocab: int | None, embedding: str | None, head: str | None,
                tensors: Mapping[str, TensorSpec]) -> tuple[int | None, tuple[str, ...]]:
    """(rows, names) of the tensors whose first dimension counts tokens: the config's
    vocab_size when a tensor named like an embedding or head has that many rows, else the
    embedding's rows. See the module docstring."""
    cands = [(n, s) for n, s in outside if s.shape and not _POSITION_ROWS.search(n) and not _SCORE.search(n)]
    named = [(n, s) for n, s in cands if _TOKEN_NAME.search(n) or n in (embedding, head)]
    if vocab is not None and any(s.shape[0] == vocab for _, s in named):
        return vocab, tuple(n for n, s in cands if s.shape[0] == vocab)
    if embedding is None:
        return None, ()
    rows = tensors[embedding].shape[0]
    return rows, tuple(n for n, s in named if s.shape[0] == rows)


def _vocab(config: Mapping[str, Any] | None) -> int | None:
    v = (config or {}).get("vocab_size")
    if v is None:
        v = ((config or {}).get("text_config") or {}).get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _tie_flag(config: Mapping[str, Any] | None) -> bool:
    """Whether the config ties the output head to the input embedding. transformers'
    default is to tie; with no config at all nothing is known, so nothing is tied."""
    if config is None:
        return False
    v = config.get("tie_word_embeddings")
    if v is None:
        v = (config.get("text_config") or {}).get("tie_word_embeddings", True)
    return bool(v)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def arch_of(t: CheckpointType) -> Arch:
    """The layout of a checkpoint type (computed once per type)."""
    a = _CACHE.get(t)
    if a is None:
        a = _CACHE[t] = describe(t.tensors, t.config)
    return a


__all__ = ["Arch", "LAYER_COUNT_KEYS", "ROLES", "arch_of", "config_layers", "describe", "layer_index"]
