"""The run configuration: where a run computes, in which dtype, in chunks of how many
elements, on how many CPU threads.

It is decided once, from the options (`RunConfig.of`), when a run is planned, and every
plan carries it (`plan.TensorPlan.config`, beside the chunk each step streams); the
executor reads these decisions from the plan instead of deciding again. Planning needs
only names: the device is resolved (`resolve_device`, which imports torch) when
execution starts, once per evaluator, and with it torch's CPU thread count is set
(`apply_threads`), so a run computes on the threads its configuration names.

Threads. torch's default is one intra-op thread per core. On a machine that other work
keeps busy, those threads wait on each other at every parallel region: at a load average
above the core count, scoring took several times longer on torch's two threads than on
one (benchmarks/README.md: bench_score, bench_ray, bench_generate). So the default,
"auto", takes the cores that other work leaves free now (at least one; on a quiet
machine, one per core as torch would), decided once per process; an OMP_NUM_THREADS that
the caller set is kept as is. "Now" is the machine's CPU time over a tenth of a second
(`busy_cores`, from /proc/stat): the one-minute load average, used where there is no
/proc/stat, lags, and right after another job it left an idle machine at one thread.

Waiting threads. GNU OpenMP (torch's CPU thread pool) keeps its workers spinning after
each parallel region, 300,000 turns by default. alg's CPU runs alternate torch's regions
with work on other threads (TIES's compiled kernels on Python threads,
`ops.sparse.split_map`), which those spinning workers take cores from: a TIES merge of
1.1B parameters on two threads burned 27-30 s of CPU for 22-25 s of wall time. Workers
that sleep at once (OMP_WAIT_POLICY=PASSIVE) gave that back (19-21 s of CPU) but made
SmolLM2's batched generation 2-21% slower (four runs), where torch's small operations
follow each other closely; a short spin, GOMP_SPINCOUNT=10000, did both (TIES 20-22 s of
CPU; generation 6.05 s twice against the default's 6.21 and 6.74). So the `alg` process
sets GOMP_SPINCOUNT (`OPENMP_SPIN`) before torch loads (`quiet_openmp`), unless the
caller set it or a wait policy; a process embedding alg keeps its own, and so do the
workers of a Ray cluster alg did not start (those of `--ray local` inherit it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import AlgIOError
from .options import Options, check_device, check_threads

# compute dtype (Options.compute_dtype) -> its dtype code (types.DTYPES)
COMPUTE_CODES = {"float32": "F32", "float64": "F64"}


@dataclass(frozen=True)
class RunConfig:
    device: str  # as requested: cpu | cuda | cuda:N | auto (see resolve_device)
    compute_dtype: str  # float32 | float64
    chunk_elems: int  # elements per streamed chunk (a write step may round it to rows)
    threads: int | str = "auto"  # torch's CPU threads: N >= 1 or "auto" (apply_threads)

    @classmethod
    def of(cls, options: Options | RunConfig) -> RunConfig:
        if isinstance(options, RunConfig):
            return options
        return cls(options.device, options.compute_dtype, options.chunk_elems, check_threads(options.threads))

    @property
    def compute_code(self) -> str:
        """The compute dtype's code: F32 or F64."""
        return COMPUTE_CODES[self.compute_dtype]

    @property
    def compute_itemsize(self) -> int:
        """Bytes per element in the compute dtype (the planner's unit)."""
        from .types import itemsize

        return itemsize(self.compute_code)

    def torch_dtype(self) -> Any:
        from .types import torch_dtype

        return torch_dtype(self.compute_code)

    def resolve_device(self) -> Any:
        """The device, when execution starts; torch's thread count is set here too."""
        self.apply_threads()
        return resolve_device(self.device)

    def apply_threads(self) -> int:
        """Set torch's intra-op thread count to this run's (see the module's notes) and
        return it."""
        import torch

        n = self.threads if isinstance(self.threads, int) else auto_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n


_AUTO: list[int] = []  # the "auto" thread count, decided once per process


def free_cores(cores: int, load: float) -> int:
    """The cores a load (busy cores, or a load average) leaves free: cores - load, rounded,
    at least one."""
    return max(1, min(cores, cores - round(load)))


BUSY_SAMPLE_S = 0.1  # how long busy_cores watches the machine's CPU time


def busy_cores(interval: float = BUSY_SAMPLE_S) -> float | None:
    """How many cores the machine keeps busy now: the share of all CPU time that was not
    idle (nor waiting on I/O) over `interval` seconds, times the CPU count, from
    /proc/stat; None where it cannot be read."""
    import os
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(v), v[3] + v[4]

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    if total <= 0:
        return None
    return (total - (idle1 - idle0)) / total * (os.cpu_count() or 1)


OPENMP_SPIN = 10000  # GOMP_SPINCOUNT for the alg process (see "Waiting threads")


def quiet_openmp() -> None:
    """OpenMP's workers spin briefly after a parallel region, then sleep (see "Waiting
    threads" above), unless the caller chose a spin count or a wait policy: for the `alg`
    process, before torch loads (OpenMP reads them once, then)."""
    import os

    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", str(OPENMP_SPIN))


def auto_threads() -> int:
    """The "auto" thread count: OMP_NUM_THREADS where the caller set it (torch's own
    choice), else the cores this process may use, lowered to those other work leaves free
    now (`busy_cores`; else by the one-minute load average). Decided on first use and kept
    for the process, so every run in it computes on the same threads."""
    import os

    if not _AUTO:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        if omp.isdigit() and int(omp) >= 1:
            n = int(omp)
        else:
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:  # not on Linux
                cores = os.cpu_count() or 1
            load = busy_cores()
            if load is None:
                try:
                    load = os.getloadavg()[0]
                except OSError:  # no load average on this platform
                    load = 0.0
            n = free_cores(cores, load)
        _AUTO.append(n)
    return _AUTO[0]


def resolve_device(name: str) -> Any:
    """The torch.device a device name runs on ("auto": cuda when there is one, else cpu);
    an AlgIOError when the machine does not have it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        check_device(name)  # not one of ours: says which are
        raise
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AlgIOError(f"--device {name}: CUDA is not available on this machine; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AlgIOError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


__all__ = ["COMPUTE_CODES", "RunConfig", "auto_threads", "busy_cores", "free_cores", "resolve_device"]
