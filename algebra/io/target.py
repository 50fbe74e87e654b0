"""Where alg may write, and what `overwrite=true`/`--force` may replace.

One policy, used at check time (`Checker.add_save`) and again right before a finished
save is renamed into place (`execute.save`), since the disk can change in between:

- overwrite replaces only a model folder: an earlier alg output (its card says so), or a
  folder holding nothing but a config, safetensors shards and their index, tokenizer
  files, a generation config and a card (`MODEL_FILES`), or a symlink, which is replaced
  itself (the folder it points to is never touched);
- never the current folder, the home folder, the recipe's folder or an ancestor of it,
  an input or an ancestor of one, a path inside an input, a file, or anything reached
  through a symlink.

Also here: the temporary names of a save (`.NAME.alg-tmp-PID`, `.NAME.alg-old-PID`) and
the removal of those whose process is gone (after kill -9), and the description of an
OSError met while writing (disk full, read-only file system) as a user error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
from pathlib import Path

from ..source import Span
from .card import is_alg_card
from .checkpoint import GENERATION_CONFIG, TOKENIZER_FILES
from .files import joined, resolved

CARD_NAME = "README.md"
MODEL_FILES = frozenset({"config.json", GENERATION_CONFIG, CARD_NAME, *TOKENIZER_FILES})
MODEL_SUFFIXES = (".safetensors", ".safetensors.index.json")

TMP_TAG, OLD_TAG = "alg-tmp", "alg-old"
_TEMP_RE = re.compile(rf"^\.(?P<name>.+)\.(?P<tag>{TMP_TAG}|{OLD_TAG})-(?P<pid>\d+)$")


def temp_name(target: Path, tag: str = TMP_TAG, pid: int | None = None) -> Path:
    return target.parent / f".{target.name}.{tag}-{os.getpid() if pid is None else pid}"


def target_path(path: str, base_dir: Path, span: Span | None = None) -> Path:
    """The absolute path a save writes: relative to `base_dir`, its folder resolved, its
    last component not (a symlink named as the target is replaced, not followed). A path
    no system call can take (NUL, a loop, too long) is a user error at `span`."""
    raw = joined(path, base_dir)
    if raw.name in ("", ".."):
        return resolved(raw, path, span)
    return resolved(raw.parent, path, span) / raw.name


def _symlink_on_the_way(path: str, base_dir: Path) -> Path | None:
    """The first symlink among the folders the written path names (the part the user
    wrote: below `base_dir` for a relative path), if any."""
    raw = Path(path).expanduser()
    start = Path(raw.anchor) if raw.is_absolute() else base_dir
    parts = raw.parts[1:] if raw.is_absolute() else raw.parts
    here = start
    for part in parts[:-1]:
        here = here / part
        if here.is_symlink():
            return here
    return None


def model_folder_problem(folder: Path) -> str | None:
    """Why `folder` is not a model folder alg may replace, or None when it is one."""
    if is_alg_card(folder / CARD_NAME):
        return None
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        return f"it cannot be listed ({e.strerror})"
    for entry in entries:
        if entry.is_symlink() or entry.is_dir():
            return f"it holds '{entry.name}', which is not a model file"
        if entry.name not in MODEL_FILES and not entry.name.endswith(MODEL_SUFFIXES):
            return f"it holds '{entry.name}', which is not a model file"
    return None


def overwrite_refusal(path: str, target: Path, base_dir: Path, inputs: list[Path],
                      recipe_dirs: list[Path] = ()) -> str | None:
    """Why overwrite must not replace the existing `target` (as `target_path` gives it for
    `path`), or None. `inputs`: the resolved paths the recipe reads; `recipe_dirs`: the
    recipe's folder (nothing above it may be replaced; a path inside it may)."""
    link = _symlink_on_the_way(path, base_dir)
    if link is not None:
        return (f"it is reached through the symlink '{link}'; name the real folder, or the "
                "symlink itself to replace the link")
    if target.is_symlink():
        return None  # the link is replaced; what it points to is never touched
    real = target.resolve()
    if real == Path.cwd().resolve():
        return "it is the current folder"
    if real == Path.home().resolve():
        return "it is your home folder"
    for d in recipe_dirs:
        d = d.resolve()
        if real == d or real in d.parents:
            return f"it holds the recipe (in '{d}')"
    for p in inputs:
        if real == p:
            return "it is an input of this recipe"
        if real in p.parents:
            return f"it holds the input '{p}'"
        if p in real.parents:
            return f"it is inside the input '{p}'"
    if not real.is_dir():
        return "it is a file, not a model folder"
    problem = model_folder_problem(real)
    if problem is not None:
        return (f"{problem}; alg replaces only a model folder (an earlier alg output, or config, "
                "safetensors shards, index, tokenizer, generation config and card files)")
    return None


def remove_target(target: Path, old: Path) -> None:
    """Move an existing target out of the way (to `old`) or, for a symlink, remove the
    link itself."""
    if target.is_symlink():
        target.unlink()
    else:
        target.rename(old)


# ---- leftovers and faults -------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's live process
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary folders of saves into `folder` whose process is gone (a run
    killed with SIGKILL cannot clean up after itself). A live process's are kept. A run
    killed between moving an old output aside and renaming the new one into place left
    the old one as `.NAME.alg-old-PID` and no NAME: it is put back, not removed."""
    removed = []
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
            continue
        if m["tag"] == OLD_TAG and not os.path.lexists(folder / m["name"]):
            try:
                entry.rename(folder / m["name"])
                continue
            except OSError:
                pass
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                entry.unlink()
            except OSError:
                continue
        removed.append(entry)
    return removed


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT, SIGTERM and SIGHUP while cleaning up, so a second signal cannot cut
    the cleanup short; they are delivered when it is done."""
    sigs = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created, outermost first."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
    return list(reversed(missing))


def remove_created(created: list[Path]) -> None:
    """Remove the folders `make_parents` created, innermost first, while they are empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


def existing_ancestor(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def unwritable(folder: Path) -> str | None:
    """Why nothing can be written in `folder` (or in the folders it would be made in), or
    None."""
    p = existing_ancestor(folder)
    if not p.is_dir():
        return f"'{p}' is a file, not a folder"
    try:
        if os.statvfs(p).f_flag & os.ST_RDONLY:
            return f"'{p}' is on a read-only file system"
    except OSError:
        pass
    if not os.access(p, os.W_OK | os.X_OK):
        return f"no permission to write in '{p}'"
    return None


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(existing_ancestor(folder)).free
    except OSError:
        return None


def describe_os_error(e: OSError, target: Path, nbytes: int | None = None) -> str:
    """A user's message for an OSError met while writing `target`."""
    from ..types import human_bytes

    where = target.parent
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        need = f" (the output needs {human_bytes(nbytes)})" if nbytes else ""
        return f"no space left on the device holding '{where}' while writing '{target.name}'{need}"
    if e.errno == errno.EROFS:
        return f"'{where}' is on a read-only file system; cannot write '{target.name}'"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write '{target.name}' in '{where}'"
    name = f" '{e.filename}'" if e.filename else ""
    return f"could not write '{target}': {e.strerror or e}{name}"


__all__ = [
    "MODEL_FILES", "describe_os_error", "free_bytes", "make_parents", "model_folder_problem",
    "overwrite_refusal", "pid_alive", "remove_created", "remove_stale_temps", "remove_target",
    "Staging", "target_path", "temp_name", "unwritable",
]


class OverwriteGuard:
    """What a save needs to re-judge its target right before replacing it: the path as
    written, the folder it is relative to, the recipe's inputs and folder."""

    def __init__(self, path: str, base_dir: Path, inputs: list[Path], recipe_dirs: list[Path]):
        self.path, self.base_dir = path, base_dir
        self.inputs, self.recipe_dirs = list(inputs), list(recipe_dirs)

    def refusal(self, target: Path) -> str | None:
        return overwrite_refusal(self.path, target, self.base_dir, self.inputs, self.recipe_dirs)


def overlap(a: Path, b: Path) -> bool:
    """Whether writing one of two paths changes the other: the same, or one inside the other."""
    return a == b or a in b.parents or b in a.parents


# ---- all-or-nothing runs -----------------------------------------------------------------


class Staging:
    """The outputs of one run, staged under temporary names (`temp_name`) and moved into
    place together: every sink registers its finished (temporary, final) pair with `add`;
    `commit` moves them all into place once every sink has succeeded, and `rollback`
    (on any failure, a signal included) removes what was staged. Should a move fail
    half-way through `commit`, the outputs already moved are taken back out and each
    output they replaced, kept aside as `.NAME.alg-old-PID` meanwhile, is put back.

    `check(final)` is called right before its pair is moved (the disk may have changed
    since the recipe was checked) and raises to refuse it. `created`: the parent folders
    a sink made (`make_parents`), removed again on rollback while empty."""

    def __init__(self) -> None:
        self._staged: list[tuple] = []  # (temporary, final, check or None)
        self._created: list[Path] = []
        self.added = 0  # outputs ever staged (a rollback or commit empties the list)

    def __len__(self) -> int:
        return len(self._staged)

    def made(self, created: list[Path]) -> None:
        self._created.extend(created)

    def add(self, tmp: Path, final: Path, check=None) -> None:
        self._staged.append((tmp, final, check))
        self.added += 1

    def commit(self) -> None:
        from ..errors import AlgIOError

        moved: list[list] = []  # [final, its old output set aside or None, whether the new one is in place]
        final = None
        try:
            with signals_held():
                for tmp, final, check in self._staged:
                    if check is not None:
                        check(final)
                    old = None
                    if os.path.lexists(final):
                        old = temp_name(final, OLD_TAG)
                        final.rename(old)  # a symlink is moved itself, never followed
                    entry = [final, old, False]
                    moved.append(entry)
                    tmp.rename(final)
                    entry[2] = True
        except BaseException as exc:
            with signals_held():
                for done, old, placed in reversed(moved):
                    if placed:
                        _remove_path(done)
                    if old is not None and os.path.lexists(old) and not os.path.lexists(done):
                        old.rename(done)  # the output it replaced is put back
            self.rollback()
            if isinstance(exc, OSError) and final is not None:
                raise AlgIOError(f"{describe_os_error(exc, final)}; no output of this run was moved into "
                                 "place, and what it would have replaced is as it was") from None
            raise
        with signals_held():
            for _, old, _ in moved:
                if old is not None:
                    _remove_path(old)
            self._staged, self._created = [], []

    def rollback(self) -> None:
        """Remove every staged temporary and the parent folders made for them (innermost
        first, while empty)."""
        with signals_held():
            for tmp, _, _ in self._staged:
                _remove_path(tmp)
            for d in reversed(self._created):
                with contextlib.suppress(OSError):
                    d.rmdir()
            self._staged, self._created = [], []


def _remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()
