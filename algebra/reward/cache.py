"""The on-disk score cache and the content hashes that key it.

A score is stored under sha256 of (model content hash, text format, max_length, compute
dtype, prompt, response) in one sqlite3 table, `rewards.sqlite` in the cache
folder (`algebra.caches`). The model content hash is that of its files for a loaded
checkpoint (weights, config, tokenizer files; sha256 cached by path, size and mtime),
and for a computed one (a merge) the hash of its operation, parameters and arguments'
hashes, so re-running a recipe or a sweep scores nothing it already scored, and editing
a model, its tokenizer or the template misses the cache as it should.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from ..caches import cache_path
from ..graph import Node
from ..io.checkpoint import TOKENIZER_FILES, CheckpointSource, MemorySource, file_sha256

_MEMO: dict[int, tuple[Node, str]] = {}


def model_hash(node: Node) -> str:
    """A content hash of the checkpoint a graph node computes."""
    got = _MEMO.get(id(node))
    if got is not None and got[0] is node:
        return got[1]
    h = hashlib.sha256()
    if node.op == "load":
        src = node.params[0]
        h.update(b"load\0")
        if isinstance(src, CheckpointSource):
            for name, digest in src.file_hashes():
                h.update(f"{name}:{digest}\0".encode())
            if src.folder is not None:
                for fname in ("config.json", *TOKENIZER_FILES):
                    p = src.folder / fname
                    if p.is_file():
                        h.update(f"{fname}:{file_sha256(p)}\0".encode())
        elif isinstance(src, MemorySource):
            h.update(json.dumps(src.config, sort_keys=True, default=str).encode())
            for name in sorted(src.tensors):
                t = src.read(name).contiguous().cpu()
                h.update(f"{name}:{src.tensors[name]}\0".encode())
                h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
        else:
            raise TypeError(f"cannot hash a {type(src).__name__}")
    else:
        h.update(f"{node.op}\0{node.params!r}\0".encode())
        for a in node.args:
            h.update(model_hash(a).encode())
    digest = h.hexdigest()
    _MEMO[id(node)] = (node, digest)
    return digest


def score_key(model_key: str, fmt: tuple, max_length: int | None, dtype: str, prompt, response: str) -> str:
    blob = json.dumps([model_key, list(fmt), max_length, dtype, prompt, response], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ScoreCache:
    """key -> score, in sqlite (safe for concurrent runs; a failure to open is no cache)."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path("scores")
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL NOT NULL)")
            self._db.commit()
        except sqlite3.Error:
            self._db = None

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._db is None:
            return out
        keys = list(keys)
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            q = f"SELECT key, score FROM scores WHERE key IN ({','.join('?' * len(part))})"
            out.update(self._db.execute(q, part).fetchall())
        return out

    def put_many(self, items: Iterable[tuple[str, float]]) -> None:
        if self._db is None:
            return
        try:
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)", list(items))
            self._db.commit()
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


__all__ = ["ScoreCache", "model_hash", "score_key"]
