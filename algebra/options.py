"""The one options object that the CLI, the REPL and the Python API share."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

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


# Where a run's scoring goes (--ray, ALG_RAY, Interpreter(ray=...)); "off": in this process.
RAY_CHOICES = ("auto (a running cluster), local or local:N (a new one on this machine, with N "
               "CPUs), an address host:port or ray://host:port, or off")
RAY_ENV = "ALG_RAY"
_RAY_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9._\-]+:([0-9]{1,5})")


def check_ray(text: str, what: str = "--ray") -> str:
    """`text` as a Ray cluster to use (one of RAY_CHOICES, spaces stripped, "" as "off"),
    else a usage error naming `what` (the option or variable it came from). Needs no
    `ray` package: the package is imported when the run first uses the cluster."""
    t = text.strip()
    if t in ("", "off"):
        return "off"
    if t in ("auto", "local"):
        return t
    if t.startswith("local:"):
        n = t.removeprefix("local:")
        if n.isdigit() and int(n) >= 1:
            return f"local:{int(n)}"
        raise AlgUsageError(f"{what}: '{text}': local:N needs a whole number N >= 1 of CPUs, like local:2")
    m = _RAY_ADDRESS.fullmatch(t)
    if m and 1 <= int(m.group(2)) <= 65535:
        return t
    raise AlgUsageError(f"{what}: '{text}' is not a Ray cluster; the choices are {RAY_CHOICES}")


# How many CPU threads torch computes with (--threads, ALG_THREADS, Interpreter(threads=...)):
# a whole number N >= 1, or "auto" (runconfig.auto_threads: the cores other work leaves free
# now, at least one; an OMP_NUM_THREADS of the caller's is kept).
THREADS_CHOICES = "a whole number N >= 1, or auto (the cores other work leaves free)"
THREADS_ENV = "ALG_THREADS"


def check_threads(value: Any, what: str = "--threads") -> int | str:
    """`value` as a thread count (one of THREADS_CHOICES; "" is "auto"), else a usage error
    naming `what` (the option or variable it came from)."""
    if isinstance(value, bool):
        raise AlgUsageError(f"{what}: {value!r} is not a thread count; give {THREADS_CHOICES}")
    if isinstance(value, int):
        if value >= 1:
            return value
        raise AlgUsageError(f"{what}: {value} is not a thread count; give {THREADS_CHOICES}")
    t = str(value).strip()
    if t in ("", "auto"):
        return "auto"
    if t.isdigit() and int(t) >= 1:
        return int(t)
    raise AlgUsageError(f"{what}: '{value}' is not a thread count; give {THREADS_CHOICES}")


def _print_warning(d: Diagnostic) -> None:
    import sys

    print(d.format(), file=sys.stderr)


# The smallest chunk (elements) a run may stream: below it the per-chunk overhead is all
# there is (`--chunk 1` took over 10 minutes on a 215k-element model), and its buffers are
# a few times 16 KiB already, so nothing is saved by going lower.
MIN_CHUNK_ELEMS = 4096


def chunk_problem(n: int, what: str = "chunk_elems") -> str | None:
    """Why `n` is not a usable chunk size (None when it is), with the way out."""
    floor = Options.min_chunk
    if n < floor:
        return (f"{what} must be a positive number of elements, at least {floor}, not {n}: smaller "
                f"chunks only add per-chunk overhead (the default is {Options.chunk_elems})")
    return None


@dataclass
class Options:
    # the floor chunk_elems is held to: MIN_CHUNK_ELEMS (tests/conftest.py lowers it to
    # exercise chunk boundaries on tiny models)
    min_chunk: ClassVar[int] = MIN_CHUNK_ELEMS
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
    # the Ray cluster that scores (check_ray): None reads $ALG_RAY (unset: "off"); once
    # constructed, always a checked value, so `replace` does not read the variable again
    ray: str | None = None
    # torch's CPU threads (check_threads): None reads $ALG_THREADS (unset: "auto"); once
    # constructed, an int >= 1 or "auto"
    threads: int | str | None = None

    def __post_init__(self) -> None:
        import os

        if self.threads is None:
            self.threads = check_threads(os.environ.get(THREADS_ENV, ""), THREADS_ENV)
        else:
            self.threads = check_threads(self.threads, "threads")
        if self.ray is None:
            self.ray = check_ray(os.environ.get(RAY_ENV, ""), RAY_ENV)
        else:
            self.ray = check_ray(self.ray, "ray")
        if self.compute_dtype not in ("float32", "float64"):
            raise ValueError(f"compute_dtype must be float32 or float64, not {self.compute_dtype!r}")
        problem = chunk_problem(self.chunk_elems)
        if problem:
            raise ValueError(problem)
        from .progress import Progress

        self.progress = Progress.of(self.progress)


def picklable_options(options: Options) -> Options:
    """The options with callables that cannot be pickled (lambdas) set to their defaults."""
    changes = {}
    for f in fields(options):
        v = getattr(options, f.name)
        if callable(v):
            try:
                pickle.dumps(v)
            except Exception:
                changes[f.name] = f.default
    return replace(options, **changes)
