"""safetensors files: a validating header reader with mmap'd lazy reads, and a writer
whose layout is fixed before any tensor is computed.

Reading never copies a whole tensor: `read` returns a zero-copy view of a flat element
range of the mapped file, so only the chunk being converted costs anonymous memory.
Everything `open` checks (header JSON, dtypes, shapes against byte ranges, ranges against
the file size) is checked from the header alone, so a truncated or corrupt file is
reported before any weight is read.

Writing: `ShardLayout` computes the header and every tensor's byte offset from names,
shapes and dtypes; `ShardWriter` creates the file at its final size and each chunk is
`pwrite`n straight to its place.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import AlgIOError
from ..lazy import torch
from ..types import DTYPES, TensorSpec, itemsize, torch_dtype
from .files import open_regular

_MAX_HEADER = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE


def _parse_header(raw: bytes) -> dict | None:
    """The header as a JSON object, or None when it is not one."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    spec: TensorSpec
    start: int  # absolute byte offset in the file
    end: int


def looks_like_pickle(head: bytes) -> bool:
    """Whether a file's first bytes are those of a `torch.save` file: a zip archive (the
    default since torch 1.6) or a raw pickle (the PROTO opcode 0x80 and a protocol 2-5).
    Only asked of a file that does not parse as safetensors: a valid safetensors file can
    start with these bytes too (its header length's low bytes)."""
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def pickle_refusal(p: Path) -> AlgIOError:
    return AlgIOError(
        f"'{p}' is a pickle checkpoint; loading pickle can run arbitrary code, so alg refuses "
        "it. Convert it to safetensors (for example: load it yourself with "
        "torch.load(..., weights_only=True) and save with safetensors.torch.save_file)."
    )


class SafetensorsFile:
    """One safetensors file: validated header, lazily mapped data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        fd = open_regular(self.path, what="safetensors file")
        with os.fdopen(fd, "rb") as f:
            try:
                self.size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                plausible = 0 <= n <= _MAX_HEADER and 8 + n <= self.size
                raw = f.read(n) if plausible else b""
            except OSError as e:
                raise AlgIOError(f"cannot read '{self.path}': {e.strerror}") from None
        header = _parse_header(raw) if plausible else None
        if header is None:
            # not safetensors: only now may its first bytes say what it is instead
            if looks_like_pickle(head):
                raise pickle_refusal(self.path)
            if len(head) < 8:
                raise self._corrupt(f"only {len(head)} bytes long; not a safetensors file")
            if not plausible:
                raise self._corrupt(
                    f"header length {n} exceeds the file size {self.size} "
                    "(truncated, or not a safetensors file)"
                )
            try:
                json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise self._corrupt(f"header is not valid JSON ({e})") from None
            raise self._corrupt("header is not a JSON object")
        self.data_start = 8 + n
        metadata = header.pop("__metadata__", None) or {}
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise self._corrupt("__metadata__ is not an object of strings")
        self.metadata: dict[str, str] = metadata
        self.tensors: dict[str, TensorInfo] = {}
        data_len = self.size - self.data_start
        for name, entry in header.items():
            self.tensors[name] = self._entry(name, entry, data_len)
        # storage order: reading in it is sequential on disk
        self.tensors = dict(sorted(self.tensors.items(), key=lambda kv: (kv[1].start, kv[0])))
        prev_end, prev = self.data_start, None
        for info in self.tensors.values():
            if info.start < prev_end and info.end > info.start:
                raise self._corrupt(f"tensors '{prev}' and '{info.name}' overlap")
            prev_end, prev = max(prev_end, info.end), info.name
        self._mm: mmap.mmap | None = None
        self._file = None

    def _corrupt(self, why: str) -> AlgIOError:
        return AlgIOError(f"'{self.path}' is corrupt: {why}")

    def _entry(self, name: str, entry: object, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._corrupt(f"entry for '{name}' is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise self._corrupt(f"tensor '{name}' has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._corrupt(f"tensor '{name}' has invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise self._corrupt(f"tensor '{name}' has invalid data_offsets {offsets!r}")
        spec = TensorSpec(tuple(shape), dtype)
        if offsets[1] - offsets[0] != spec.nbytes:
            raise self._corrupt(
                f"tensor '{name}' of shape {tuple(shape)} and dtype {dtype} needs "
                f"{spec.nbytes} bytes but its data_offsets span {offsets[1] - offsets[0]}"
            )
        if offsets[1] > data_len:
            raise self._corrupt(
                f"truncated: tensor '{name}' ends at byte {self.data_start + offsets[1]} "
                f"but the file has only {self.size} bytes"
            )
        return TensorInfo(name, spec, self.data_start + offsets[0], self.data_start + offsets[1])

    # ---- lazy reads ------------------------------------------------------------------

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._file = open(self.path, "rb")
            # ACCESS_COPY (private, writable) lets torch wrap the buffer without a
            # read-only warning; nothing ever writes to it, so pages stay file-backed.
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def read(self, name: str, e0: int = 0, e1: int | None = None) -> torch.Tensor:
        """A zero-copy flat view of elements [e0, e1) of a tensor, in its stored dtype."""
        info = self.tensors[name]
        n = info.spec.numel
        e1 = n if e1 is None else e1
        if e1 <= e0:
            return torch.empty(0, dtype=torch_dtype(info.spec.dtype))
        size = itemsize(info.spec.dtype)
        return torch.frombuffer(
            self._map(), dtype=torch_dtype(info.spec.dtype), count=e1 - e0,
            offset=info.start + e0 * size,
        )

    def _advise(self, advice: int, name: str, e0: int, e1: int | None) -> None:
        if not hasattr(mmap, "MADV_WILLNEED") or self.size == 0:
            return
        info = self.tensors[name]
        size = itemsize(info.spec.dtype)
        e1 = info.spec.numel if e1 is None else e1
        start = info.start + e0 * size
        end = info.start + e1 * size
        start -= start % _PAGE
        if end > start:
            try:
                self._map().madvise(advice, start, min(end, self.size) - start)
            except (OSError, ValueError):
                pass  # advice only

    def prefetch(self, name: str, e0: int = 0, e1: int | None = None) -> None:
        """Ask the kernel to start reading a range now (asynchronous readahead)."""
        self._advise(mmap.MADV_WILLNEED, name, e0, e1)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process's mapping (they stay in page cache)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._advise(mmap.MADV_DONTNEED, name, 0, None)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                return  # a view is still alive; the mapping goes with it
            self._mm = None
        if self._file is not None:
            self._file.close()
            self._file = None


# ---- writing --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardLayout:
    """The complete byte layout of one output file, fixed before computing."""

    header: bytes
    offsets: dict[str, tuple[int, int]]  # name -> absolute (start, end)
    size: int

    @classmethod
    def build(cls, entries: list[tuple[str, TensorSpec]], metadata: dict[str, str]) -> ShardLayout:
        # larger items first keeps every tensor aligned to its element size without holes
        ordered = sorted(enumerate(entries), key=lambda ie: (-itemsize(ie[1][1].dtype), ie[0]))
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        rel: dict[str, tuple[int, int]] = {}
        pos = 0
        for _, (name, spec) in ordered:
            rel[name] = (pos, pos + spec.nbytes)
            header[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [pos, pos + spec.nbytes]}
            pos += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        data_start = 8 + len(raw)
        blob = struct.pack("<Q", len(raw)) + raw
        offsets = {n: (data_start + a, data_start + b) for n, (a, b) in rel.items()}
        return cls(blob, offsets, data_start + pos)


class ShardWriter:
    """Writes one file of a `ShardLayout`: header first, then chunks at fixed offsets."""

    def __init__(self, path: Path, layout: ShardLayout):
        self.path = path
        self.layout = layout
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, layout.size)
        self._pwrite(layout.header, 0)

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, byte_offset: int, data: torch.Tensor) -> None:
        """Write `data` (contiguous, CPU) at `byte_offset` bytes into tensor `name`."""
        start, end = self.layout.offsets[name]
        raw = data.reshape(-1).view(torch.uint8).numpy()
        if start + byte_offset + raw.nbytes > end:
            raise AssertionError(f"write past the end of '{name}'")
        self._pwrite(raw, start + byte_offset)

    def close(self) -> None:
        # no fsync: atomicity comes from renaming a finished folder into place; a flush to
        # disk would charge every run for durability against power loss, which it is not for
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
