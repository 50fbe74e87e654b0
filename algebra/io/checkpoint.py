"""Checkpoint sources: where a `load` or a binding gets its tensors.

`open_checkpoint(path)` reads a Hugging Face folder (sharded with an index, or not) or a
single .safetensors file: headers, config.json and the names of tokenizer files, never a
weight. `MemorySource` wraps an in-memory state dict (a binding from the Python API).
Both answer the same small protocol: `tensors` (name -> TensorSpec, in storage order),
`read(name, e0, e1)` for a flat element range, `prefetch`, `release`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from functools import cached_property
from pathlib import Path

from ..caches import cache_path
from ..errors import AlgIOError
from ..lazy import torch
from ..types import TensorSpec, code_of
from .files import kind_of, read_json, stat_path
from .safetensors import SafetensorsFile, pickle_refusal

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# files copied from the primary input to a saved model, besides config.json
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "spiece.model", "sentencepiece.bpe.model", "preprocessor_config.json",
)
GENERATION_CONFIG = "generation_config.json"


class CheckpointSource:
    """A checkpoint on disk, known by its headers."""

    def __init__(self, path: Path, files: list[SafetensorsFile], config: dict | None, folder: Path | None):
        self.path = path
        self.files = files
        self.config = config
        self.folder = folder  # the HF folder, or None for a lone .safetensors file
        self._where: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorSpec] = {}
        for f in files:
            for name, info in f.tensors.items():
                if name in self._where:
                    raise AlgIOError(
                        f"tensor '{name}' appears in both '{self._where[name].path.name}' "
                        f"and '{f.path.name}' of '{path}'"
                    )
                self._where[name] = f
                self.tensors[name] = info.spec

    def __repr__(self) -> str:
        return f"CheckpointSource({str(self.path)!r})"

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def extra_files(self) -> list[Path]:
        """Tokenizer and generation-config files to carry to a saved output."""
        if self.folder is None:
            return []
        names = [*TOKENIZER_FILES, GENERATION_CONFIG]
        return [self.folder / n for n in names if (self.folder / n).is_file()]

    @property
    def nbytes_on_disk(self) -> int:
        return sum(f.size for f in self.files)

    def read(self, name: str, e0: int = 0, e1: int | None = None) -> torch.Tensor:
        return self._where[name].read(name, e0, e1)

    def prefetch(self, name: str, e0: int = 0, e1: int | None = None) -> None:
        self._where[name].prefetch(name, e0, e1)

    def release(self, name: str) -> None:
        self._where[name].release(name)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def file_hashes(self) -> list[tuple[str, str]]:
        """(file name, sha256) of each weight file: the same digest the Hugging Face Hub
        shows as a file's LFS oid. Cached on disk by path, size and mtime."""
        return [(f.path.name, file_sha256(f.path)) for f in self.files]


class MemorySource:
    """A state dict held in memory (for example a live model's parameters)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict | None = None, label: str = "<memory>"):
        self.label = label
        self.config = config
        self.folder = None
        self._tensors: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, TensorSpec] = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise AlgIOError(f"binding {label}: value for '{name}' is a {type(t).__name__}, not a tensor")
            t = t.detach()
            try:
                spec = TensorSpec(tuple(t.shape), code_of(t.dtype))
            except KeyError:
                raise AlgIOError(f"binding {label}: tensor '{name}' has unsupported dtype {t.dtype}") from None
            self._tensors[name] = t
            self.tensors[name] = spec

    def __repr__(self) -> str:
        return f"MemorySource({self.label})"

    @cached_property
    def device(self) -> torch.device:
        for t in self._tensors.values():
            return t.device
        return torch.device("cpu")

    extra_files: list[Path] = []
    nbytes_on_disk = 0

    def read(self, name: str, e0: int = 0, e1: int | None = None) -> torch.Tensor:
        t = self._tensors[name]
        flat = t.reshape(-1)  # a view when contiguous; a copy otherwise
        return flat[e0:e1]

    def prefetch(self, name: str, e0: int = 0, e1: int | None = None) -> None:
        pass

    def release(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass

    def file_hashes(self) -> list[tuple[str, str]]:
        return []


def _read_config(path: Path) -> dict | None:
    """config.json as an object, or None where there is none. One that exists but is not
    a regular file holding a JSON object (a folder, `null`, a list) is an error, never
    silently dropped."""
    if not os.path.lexists(path):
        return None
    return read_json(path, what="config file")


def _shard_name(index: Path, name: object, fname: object) -> str:
    """A weight_map value: a relative file name inside the model folder."""
    if not isinstance(name, str) or not isinstance(fname, str) or not fname:
        raise AlgIOError(f"'{index}': weight_map maps {json.dumps(name)} to {json.dumps(fname)}; "
                         "expected a tensor name and a file name")
    if "\x00" in fname or os.path.isabs(fname) or ".." in Path(fname).parts:
        raise AlgIOError(
            f"'{index}' maps '{name}' to {json.dumps(fname)}, outside the model folder; a "
            "shard must be a file inside the folder that holds the index"
        )
    return fname


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Open a checkpoint from its headers. Raises `AlgIOError` (without a position)."""
    p = Path(path)
    mode = stat_path(p, str(path)).st_mode
    if stat.S_ISREG(mode):
        if p.suffix in PICKLE_SUFFIXES:
            raise pickle_refusal(p)
        if p.suffix == ".safetensors":
            config = _read_config(p.parent / "config.json")
            return CheckpointSource(p, [SafetensorsFile(p)], config, None)
        raise AlgIOError(f"'{path}' is not a .safetensors file or a model folder")
    if not stat.S_ISDIR(mode):
        raise AlgIOError(f"'{path}' is {kind_of(mode)}, not a .safetensors file or a model folder")
    config = _read_config(p / "config.json")
    index = p / INDEX
    if os.path.lexists(index):
        weight_map = read_json(index, what="index file").get("weight_map")
        if not isinstance(weight_map, dict):
            raise AlgIOError(f"'{index}' has no weight_map")
        names = sorted({_shard_name(index, k, v) for k, v in weight_map.items()})
        missing = [n for n in names if not os.path.lexists(p / n)]
        if missing:
            raise AlgIOError(f"'{index}' lists '{missing[0]}', which is not in '{path}'")
        files = [SafetensorsFile(p / n) for n in names]
        src = CheckpointSource(p, files, config, p)
        for name, fname in weight_map.items():
            if name not in src.tensors:
                raise AlgIOError(f"'{index}' maps '{name}' to '{fname}', which does not hold it")
        return src
    if os.path.lexists(p / "model.safetensors"):
        shards = [p / "model.safetensors"]
    else:
        shards = sorted(p.glob("*.safetensors"))
    if not shards:
        pickles = sorted(q for q in p.iterdir() if q.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise pickle_refusal(pickles[0])
        raise AlgIOError(f"'{path}' holds no .safetensors file")
    return CheckpointSource(p, [SafetensorsFile(s) for s in shards], config, p)


# ---- content hashes -------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (real path, size, mtime) like git's index."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    cache = cache_path("hashes") / key
    try:
        return cache.read_text().strip()
    except OSError:
        pass
    with open(path, "rb") as f:
        # streams through a small reused buffer: hashing costs no memory that grows
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}")
        tmp.write_text(digest)
        tmp.replace(cache)
    except OSError:
        pass  # a cache is a convenience
    return digest
