"""The one options object that the CLI, the REPL and the Python API share."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import AlgUsageError, Diagnostic

# The devices a run can name (--device, Interpreter(device=...)); "auto" is cuda when
# there is one, else cpu.
DEVICE_CHOICES = "cpu, cuda, cuda:N (N = 0, 1, ...) or auto"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(name: str) -> str:
    """`name` if it is one of DEVICE_CHOICES, else a usage error that lists them."""
    if _DEVICE.fullmatch(name):
        return name
    raise AlgUsageError(f"'{name}' is not a device; the choices are {DEVICE_CHOICES}")


def _print_warning(d: Diagnostic) -> None:
    import sys

    print(d.format(), file=sys.stderr)


@dataclass
class Options:
    device: str = "auto"  # cpu | cuda | cuda:N | auto
    force: bool = False  # save over existing folders
    compute_dtype: str = "float32"  # float32 | float64
    chunk_elems: int = 1 << 20  # elements per streamed chunk (4 MiB in float32)
    overrides: dict[str, Any] = field(default_factory=dict)  # --set name=value
    check_finite: bool = True
    warn: Callable[[Diagnostic], None] = _print_warning
    out: Callable[[str], None] = print  # where print/info sinks write

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("float32", "float64"):
            raise ValueError(f"compute_dtype must be float32 or float64, not {self.compute_dtype!r}")
        if self.chunk_elems < 1:
            raise ValueError("chunk_elems must be positive")
