"""Sample a process's memory from /proc while it runs (Linux), for tests and benchmarks.

Anonymous RSS is the figure that matters for streaming: pages of an mmap'd checkpoint
are page cache (RssFile) that the kernel can drop at will, while anonymous pages are
what the process really holds. The kernel keeps no peak of RssAnon, so it is sampled.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Usage:
    wall_s: float = 0.0
    peak_anon: int = 0  # bytes
    peak_file: int = 0
    hwm: int = 0  # VmHWM: the kernel's own peak of total RSS
    samples: int = 0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)


def read_status(pid: int) -> dict[str, int]:
    """RssAnon, RssFile, VmHWM of a process in bytes (empty once it has exited)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def run(cmd: list[str], interval: float = 0.002, **popen) -> Usage:
    """Run a command to completion, sampling its memory every `interval` seconds."""
    usage = Usage()
    t0 = time.perf_counter()
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
    usage.stdout, usage.stderr = proc.communicate()
    usage.wall_s = time.perf_counter() - t0
    stop.set()
    thread.join()
    usage.returncode = proc.returncode
    return usage
