"""The one options object that the CLI, the REPL and the Python API share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import Diagnostic


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
    # progress bars on stderr (progress.py): False/"off" (the API's default), True/"on",
    # "auto" (on a terminal; the CLI's default); a `Progress` after construction
    progress: Any = False

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("float32", "float64"):
            raise ValueError(f"compute_dtype must be float32 or float64, not {self.compute_dtype!r}")
        if self.chunk_elems < 1:
            raise ValueError("chunk_elems must be positive")
        from .progress import Progress

        self.progress = Progress.of(self.progress)
