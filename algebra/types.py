"""Value types known at check time.

A checkpoint's type is its tensor table (name -> shape, dtype) plus the metadata of its
primary input (config, tokenizer files), all read from headers. Plain values (numbers,
strings, booleans, lists) are Python values folded during checking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .io.checkpoint import CheckpointSource

# safetensors dtype code -> (torch's name for the dtype, bytes per element). Plain data:
# checking and planning read sizes and names from here without importing torch; only
# execution asks for the torch dtype itself (`torch_dtype`).
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}

FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

# what users may write for save(..., dtype=...) -> safetensors code
DTYPE_ALIASES = {
    "float64": "F64", "fp64": "F64", "double": "F64",
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}
# safetensors code -> the name transformers writes in config.json
CONFIG_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def dtype_name(code: str) -> str:
    """bfloat16, float32, ... for a safetensors code (the code itself when unnamed)."""
    return CONFIG_DTYPE_NAMES.get(code, code.lower())


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code (execution only: this imports torch)."""
    import torch

    return getattr(torch, DTYPES[code][0])


def itemsize(code: str) -> int:
    return DTYPES[code][1]


def code_of(dtype: torch.dtype) -> str:
    import torch

    for code, (name, _) in DTYPES.items():
        if getattr(torch, name, None) == dtype:
            return code
    raise KeyError(f"unsupported tensor dtype {dtype}")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors code

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    def __str__(self) -> str:
        return f"{self.dtype.lower()}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True, eq=False)
class TokenizerSpec:
    """The tokenizer a saved checkpoint gets when it is not its primary input's (after
    `align`): the tokenizer files of `folder`, with `added` tokens appended in order (their
    ids follow the folder's vocabulary), and the primary's generation config with its
    token ids remapped (None: copy the primary's file as it is)."""

    folder: Path
    added: tuple[tuple[str, dict[str, Any]], ...] = ()  # (content, AddedToken properties)
    generation_config: Mapping[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class CheckpointType:
    """What check knows about a checkpoint without reading a weight."""

    tensors: Mapping[str, TensorSpec]
    primary: CheckpointSource | None = None  # source of config, tokenizer, card defaults
    config: Mapping[str, Any] | None = None
    notes: tuple[str, ...] = field(default=())
    tokenizer: TokenizerSpec | None = None  # None: the primary input's tokenizer files

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, MappingProxyType):
            object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    @property
    def architecture(self) -> str:
        archs = (self.config or {}).get("architectures") or []
        return archs[0] if archs else "unknown"

    @property
    def dtype(self) -> str:
        """The dtype of the floating tensors: the most common one, ties by order."""
        counts: dict[str, int] = {}
        for spec in self.tensors.values():
            if spec.is_float:
                counts[spec.dtype] = counts.get(spec.dtype, 0) + spec.numel
        if not counts:
            return "F32"
        return max(counts, key=lambda c: counts[c])

    @property
    def n_params(self) -> int:
        return sum(s.numel for s in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.tensors.values())

    def describe(self) -> str:
        return (
            f"Checkpoint({self.architecture}, {len(self.tensors)} tensors, "
            f"{human_count(self.n_params)} parameters, {dtype_name(self.dtype)})"
        )


class Function:
    """Base class of callable values (builtins, defs, lambdas); each has a `name`."""


def type_name(value: Any) -> str:
    """The alg name of a value's type, for messages and `:type`. Value classes defined
    elsewhere (checkpoints, modules, rewards) name their type in a class attribute
    `alg_type`."""
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, int | float):
        return "Scalar"
    if isinstance(value, str):
        return "String"
    if value is None:
        return "None"
    if isinstance(value, Function):
        return "Function"
    if isinstance(value, tuple):
        inner = sorted({type_name(v) for v in value})
        return f"List[{' | '.join(inner) if inner else 'Any'}]"
    return getattr(type(value), "alg_type", None) or type(value).__name__


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    raise AssertionError


def parse_size(text: str | int | float) -> int:
    """'2GB', '500MiB', 1000000 -> bytes."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if not 0 < text < math.inf:
            raise ValueError("a size must be a positive, finite number")
        return int(text)
    s = str(text).strip().upper().replace(" ", "")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            number = s[: -len(unit)]
            try:
                value = float(number)
            except ValueError:
                break
            if not 0 < value * units[unit] < math.inf:
                raise ValueError("a size must be a positive, finite number")
            return int(value * units[unit])
    raise ValueError(f"cannot read {text!r} as a size; write e.g. '2GB', '500MiB' or a byte count")
