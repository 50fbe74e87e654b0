"""Sample a process's memory from /proc while it runs (Linux), for tests and benchmarks.

Anonymous RSS is the figure that matters for streaming: pages of an mmap'd checkpoint
are page cache (RssFile) that the kernel can drop at will, while anonymous pages are
what the process really holds. The kernel keeps no peak of RssAnon, so it is sampled.
CPU time is the child's rusage; the CPU that *other* processes used meanwhile is reported
too, since a shared machine makes wall times noisy.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

FIELDS = ("RssAnon", "RssFile", "VmHWM")


@dataclass
class Usage:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system of the child
    others_cpu_s: float = 0.0  # busy CPU of everything else on the machine meanwhile
    peak_anon: int = 0  # bytes
    peak_file: int = 0
    hwm: int = 0  # VmHWM: the kernel's own peak of total RSS
    samples: int = 0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""


def read_status(pid: int) -> dict[str, int]:
    """RssAnon, RssFile, VmHWM of a process in bytes (empty once it has exited)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def with_run_imports(args: list[str], compiled: bool = False) -> list[str]:
    """The command `alg ARGS` in a process that first imports what `alg run` imports (torch
    and the executor; with `compiled`, also the compiled kernels a TIES run on the CPU
    loads, `ops.kernels`: numba, and LLVM's code generator, which its first call starts,
    about 35 MB in all, once per process): with `plan`, the baseline of a run with nothing
    computed (alg plan alone imports no torch)."""
    load = ("; import numpy as np; from algebra.ops import kernels; z = np.zeros(1, np.float32)"
            "; kernels.window_count(z, z, 0, 0, np.zeros(1, np.int32))") if compiled else ""
    code = f"import sys, algebra.execute{load}; from algebra.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def run(cmd: list[str], interval: float = 0.002, log: IO | None = None, **popen) -> Usage:
    """Run a command to completion, sampling its memory every `interval` seconds. Output
    goes to `log` (stdout and stderr together) when given, else into Usage.stdout/stderr."""
    usage = Usage()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, own0 = busy_cpu_s(), sum(os.times()[:2])
    t0 = time.perf_counter()
    if log is not None:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)
    else:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = read_status(proc.pid)
            if s:
                usage.samples += 1
                usage.peak_anon = max(usage.peak_anon, s.get("RssAnon", 0))
                usage.peak_file = max(usage.peak_file, s.get("RssFile", 0))
                usage.hwm = max(usage.hwm, s.get("VmHWM", 0))
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    if log is None:
        usage.stdout, usage.stderr = proc.communicate()
    else:
        proc.wait()
    usage.wall_s = time.perf_counter() - t0
    stop.set()
    thread.join()
    # the reaped child's CPU time is added to this process's RUSAGE_CHILDREN
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    usage.cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    usage.returncode = proc.returncode
    busy, own = busy_cpu_s() - busy0, sum(os.times()[:2]) - own0
    usage.others_cpu_s = max(0.0, busy - own - usage.cpu_s)
    return usage
