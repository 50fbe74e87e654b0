"""A checkpoint's vocabulary, read from its tokenizer files (metadata, like config.json).

`read_vocab(folder)` gives the token string of every id: the model's vocab from
`tokenizer.json` (a dict for BPE, WordPiece and WordLevel, a list of [piece, score] for
Unigram) plus its `added_tokens`; without a tokenizer.json, a GPT-2 style `vocab.json`
with `added_tokens.json`. Tokens are compared across models by these strings. Results
are cached by (path, size, mtime): a vocabulary is read once per session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AlgIOError
from .files import read_json, stat_path

# Ids at or past this are refused: a vocabulary is held as a dense tuple of its ids, so
# one hostile id must not cost gigabytes. The largest real vocabularies have ~262k tokens.
MAX_TOKEN_ID = 1 << 24


@dataclass(frozen=True, eq=False)
class Vocab:
    """id -> token (None for an id no token uses), and token -> its lowest id."""

    tokens: tuple[str | None, ...]
    index: dict[str, int]
    added: dict[int, dict[str, Any]] = field(default_factory=dict)  # tokenizer.json's added_tokens
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def contiguous(self) -> bool:
        """Whether every id below len(self) names a token (no holes)."""
        return all(t is not None for t in self.tokens)


_CACHE: dict[tuple, Vocab] = {}


def read_vocab(folder: Path | None) -> Vocab | None:
    """The vocabulary of a Hugging Face folder, or None when it has no readable tokenizer
    files. A file that exists but cannot be parsed is an `AlgIOError`."""
    if folder is None:
        return None
    for name in ("tokenizer.json", "vocab.json"):
        path = Path(folder) / name
        if os.path.lexists(path):
            break
    else:
        return None
    st = stat_path(path)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    vocab = _CACHE.get(key)
    if vocab is None:
        vocab = _parse_tokenizer_json(path) if path.name == "tokenizer.json" else _parse_vocab_json(path)
        _CACHE[key] = vocab
    return vocab


def _load(path: Path) -> Any:
    return read_json(path, what="tokenizer file", expect=None)


def _malformed(parse):
    """A parser whose every surprise in the file's shape is an `AlgIOError` naming it."""

    def parse_checked(path: Path) -> Vocab:
        try:
            return parse(path)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise AlgIOError(f"'{path}' is malformed: {type(e).__name__}: {e}") from None

    return parse_checked


def _id(i: Any, path: Path) -> int:
    """A token id: an integer in [0, MAX_TOKEN_ID)."""
    if isinstance(i, bool) or not isinstance(i, int | str):
        raise ValueError(f"token id {i!r} is not an integer")
    i = int(i)
    if not 0 <= i < MAX_TOKEN_ID:
        raise AlgIOError(f"'{path}' gives a token the id {i}, outside [0, {MAX_TOKEN_ID})")
    return i


@_malformed
def _parse_tokenizer_json(path: Path) -> Vocab:
    data = _load(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise AlgIOError(f"'{path}' has no tokenizer model")
    raw = model.get("vocab")
    by_id: dict[int, str] = {}
    if isinstance(raw, dict):  # BPE, WordPiece, WordLevel
        for tok, i in raw.items():
            by_id.setdefault(_id(i, path), tok)
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...], the id is the position
        for i, item in enumerate(raw):
            by_id[_id(i, path)] = item[0] if isinstance(item, list) else str(item)
    else:
        raise AlgIOError(f"'{path}': unsupported tokenizer model '{model.get('type')}' (no vocab)")
    added: dict[int, dict[str, Any]] = {}
    for item in data.get("added_tokens") or []:
        i = _id(item["id"], path)
        by_id.setdefault(i, item["content"])
        added[i] = dict(item)
    return _vocab(by_id, added, path)


@_malformed
def _parse_vocab_json(path: Path) -> Vocab:
    raw = _load(path)
    if not isinstance(raw, dict):
        raise AlgIOError(f"'{path}' is not a token -> id mapping")
    by_id = {_id(i, path): tok for tok, i in raw.items()}
    extra = path.parent / "added_tokens.json"
    if os.path.lexists(extra):
        for tok, i in _load(extra).items():
            by_id.setdefault(_id(i, extra), tok)
    return _vocab(by_id, {}, path)


def _vocab(by_id: dict[int, str], added: dict[int, dict[str, Any]], path: Path) -> Vocab:
    n = max(by_id, default=-1) + 1
    tokens = tuple(by_id.get(i) for i in range(n))
    index: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok is not None:
            index.setdefault(tok, i)
    return Vocab(tokens, index, added, path)
