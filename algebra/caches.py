"""Where alg keeps its on-disk caches, and what each holds.

Every cache lives in one folder: `$ALG_CACHE` if set, else `$XDG_CACHE_HOME/alg`, else
`~/.cache/alg`. Each cache has a name (`alg cache clear NAME`) and a path in that folder;
code that caches something asks `cache_path(name)` here, so `alg cache` sees and clears
exactly what the others write. A cache is a convenience: anything in it may be deleted at
any time (a run recomputes what it misses), and a failure to write it is no error.

Imports nothing heavy: `alg cache` runs without torch.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cache:
    name: str  # what `alg cache clear` calls it
    path: str  # under cache_dir()
    holds: str  # one line for `alg cache`


CACHES: tuple[Cache, ...] = (
    Cache("hashes", "sha256", "sha256 of checkpoint files, keyed by path, size and mtime"),
    Cache("scores", "rewards.sqlite", "reward scores, keyed by model content, text format and text"),
    Cache("generations", "generations", "generate() samples, keyed by policy content, prompt and options"),
    Cache("parser", "parser", "the recipe parser's tables, keyed by grammar, lark and Python version"),
)

WHERE = "$ALG_CACHE, else $XDG_CACHE_HOME/alg, else ~/.cache/alg"


def cache_dir() -> Path:
    """The folder that holds every cache (read from the environment on each call)."""
    root = os.environ.get("ALG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alg"
    )
    return Path(root)


def _cache(name: str) -> Cache:
    for c in CACHES:
        if c.name == name:
            return c
    raise KeyError(f"no cache named {name!r}; the caches are {', '.join(c.name for c in CACHES)}")


def cache_path(name: str) -> Path:
    """Where the cache `name` (one of CACHES) lives: a folder or a file."""
    return cache_dir() / _cache(name).path


def _entries(c: Cache) -> list[Path]:
    """The cache's own path and its sidecars (sqlite's -journal, -wal and -shm files)."""
    main = cache_dir() / c.path
    found = [main] if os.path.lexists(main) else []
    if main.parent.is_dir():
        found += sorted(main.parent.glob(glob.escape(main.name) + "-*"))
    return found


def usage(name: str) -> tuple[int, int]:
    """(bytes, files) that the cache `name` holds on disk; (0, 0) when absent."""
    size = files = 0
    for entry in _entries(_cache(name)):
        if entry.is_dir() and not entry.is_symlink():
            for folder, _, names in os.walk(entry):
                for n in names:
                    try:
                        size += os.lstat(os.path.join(folder, n)).st_size
                    except OSError:
                        continue
                    files += 1
        else:
            try:
                size += os.lstat(entry).st_size
            except OSError:
                continue
            files += 1
    return size, files


def clear(name: str) -> int:
    """Delete the cache `name`; returns the bytes it held."""
    size, _ = usage(name)
    for entry in _entries(_cache(name)):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                entry.unlink()
            except FileNotFoundError:
                pass
    return size


__all__ = ["CACHES", "WHERE", "Cache", "cache_dir", "cache_path", "clear", "usage"]
