"""Reading the files a user names: one place for what a path may be, and how big.

Every recipe file (the CLI's argument, `import`, the REPL's `:load`), every data file
(`responses`, `pairs`, `alg score --data`) and every JSON metadata file of a checkpoint
(config.json, the index, tokenizer files) is read through `read_bytes` / `read_text` /
`read_json` here. They guarantee:

- a path with a NUL byte, a path too long for the system, a symlink loop, a dangling
  symlink or a missing file is an `AlgIOError` that says which of these it is;
- only a regular file is read: a folder, a character device (`/dev/zero`,
  `/proc/self/fd/0`), a FIFO or a socket is refused before any byte is read (the file is
  opened non-blocking, so a FIFO with no writer cannot hang the check);
- at most `max_file_bytes()` bytes are read: `ALG_MAX_FILE_MB` (default
  `DEFAULT_MAX_FILE_MB`) raises the limit; weight files (safetensors) are mapped, not
  read, and have no such limit;
- text that is not UTF-8 is reported with its byte offset, line and column.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import AlgIOError
from ..source import Source, Span

MAX_FILE_ENV = "ALG_MAX_FILE_MB"
DEFAULT_MAX_FILE_MB = 256


def max_file_bytes() -> int:
    """The most bytes a recipe, data or metadata file may have ($ALG_MAX_FILE_MB MiB)."""
    raw = os.environ.get(MAX_FILE_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_FILE_MB * 1024 * 1024
    try:
        mb = float(raw)
        if not (mb > 0 and mb < 2**40):
            raise ValueError
    except ValueError:
        raise AlgIOError(f"{MAX_FILE_ENV}={raw!r}: expected a positive number of MiB") from None
    return int(mb * 1024 * 1024)


def check_path_text(text: str | os.PathLike, label: str | None = None, span: Span | None = None) -> None:
    """Refuse a path no system call can take: one with a NUL byte."""
    s = os.fspath(text)
    if "\x00" in s:
        shown = label if label is not None else s
        raise AlgIOError(
            f"path {_show(shown)} contains a NUL byte (\\0), which no file name can hold", span
        )


def joined(text: str | os.PathLike, base: Path) -> Path:
    """`text` with `~` expanded, joined to `base` unless absolute; symlinks not followed."""
    p = Path(text)
    try:
        p = p.expanduser()
    except RuntimeError:  # `~user` with no such user, or no home: the name stays as written
        pass
    return p if p.is_absolute() else base / p


def absolute(text: str | os.PathLike, base: Path) -> Path:
    """`text` (with `~` expanded) made absolute against `base` and resolved where that is
    possible. Never raises: a symlink loop, a too-long path or a NUL byte leaves the path
    unresolved, for `stat_path` / `open_regular` to report with its position."""
    p = joined(text, base)
    try:
        resolved = p.resolve()
    except (OSError, RuntimeError, ValueError):  # a loop is a RuntimeError before Python 3.13
        return Path(os.path.abspath(p))
    if not os.path.exists(resolved) and os.path.lexists(p):  # a dangling symlink: keep the link
        return Path(os.path.abspath(p))
    return resolved


def resolved(p: Path, label: str, span: Span | None = None) -> Path:
    """`p.resolve()`, its failures (a NUL byte, a symlink loop, a too-long path) said as
    user errors at `span`: for paths that are written, where nothing reads them first."""
    check_path_text(p, label, span)
    try:
        return p.resolve()
    except RuntimeError:  # a symlink loop, before Python 3.13
        raise AlgIOError(f"{_show(label)} goes through a symlink loop", span) from None
    except OSError as e:
        raise path_error(p, e, label, span) from None


def missing(p: str | os.PathLike) -> bool:
    """Whether nothing at all is at `p` (not even a dangling symlink). False for a path
    that cannot be asked about (a NUL byte, too long, a loop): reading it says why."""
    try:
        os.lstat(p)
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return False


def stat_path(p: Path, label: str | None = None, span: Span | None = None) -> os.stat_result:
    """`os.stat(p)`, its failures said as what they are."""
    label = str(p) if label is None else label
    check_path_text(p, label, span)
    try:
        return os.stat(p)
    except OSError as e:
        raise path_error(p, e, label, span) from None


def path_error(p: Path, e: OSError, label: str, span: Span | None = None) -> AlgIOError:
    """A user error for an `OSError` raised on path `p`."""
    shown = _show(label)
    code = e.errno
    if code == errno.ENOENT:
        try:
            if stat.S_ISLNK(os.lstat(p).st_mode):
                return AlgIOError(f"{shown} is a symlink to '{os.readlink(p)}', which does not exist", span)
        except OSError:
            pass
        return AlgIOError(f"no such file or folder: {shown} (looked in {p.parent})", span)
    if code == errno.ELOOP:
        try:
            target = os.readlink(p)
            if Path(os.path.normpath(p.parent / target)) == Path(os.path.normpath(p)):
                return AlgIOError(f"{shown} is a symlink that points to itself", span)
        except OSError:
            pass
        return AlgIOError(f"{shown} is a symlink loop: following its links comes back to where it started "
                          "(or goes more than 40 links deep)", span)
    if code == errno.ENAMETOOLONG:
        longest = max((len(os.fsencode(part)) for part in p.parts), default=0)
        return AlgIOError(
            f"path {_show(label, 80)} is longer than the system allows ({len(os.fsencode(str(p)))} bytes; "
            f"its longest name has {longest} bytes)", span
        )
    if code == errno.ENOTDIR:
        return AlgIOError(f"{shown}: a part of this path is a file, not a folder", span)
    if code in (errno.EACCES, errno.EPERM):
        return AlgIOError(f"cannot read {shown}: permission denied", span)
    if code == errno.EISDIR:
        return AlgIOError(f"{shown} is a folder, not a file", span)
    return AlgIOError(f"cannot read {shown}: {e.strerror or e}", span)


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(p: Path, label: str | None = None, span: Span | None = None, what: str = "file") -> int:
    """An fd open for reading on `p`, which must be a regular file. Opened non-blocking, so
    that a FIFO without a writer or a terminal is refused instead of waited on."""
    label = str(p) if label is None else label
    check_path_text(p, label, span)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except OSError as e:
        raise path_error(p, e, label, span) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AlgIOError(f"{_show(label)} is {kind_of(mode)}, not a regular file; a {what} must be a file", span)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(p: Path, label: str | None = None, span: Span | None = None, what: str = "file") -> bytes:
    """All the bytes of the regular file `p`, which may not exceed `max_file_bytes()`."""
    label = str(p) if label is None else label
    limit = max_file_bytes()
    fd = open_regular(p, label, span, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise _too_big(label, size, limit, span, what)
        chunks, total = [], 0
        while True:  # the file may grow while read: never read more than the limit
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _too_big(label, total, limit, span, what)
        return b"".join(chunks)
    except OSError as e:
        raise path_error(p, e, label, span) from None
    finally:
        os.close(fd)


def _too_big(label: str, size: int, limit: int, span: Span | None, what: str) -> AlgIOError:
    return AlgIOError(
        f"{_show(label)} is {_mib(size)}, over the {_mib(limit)} limit for a {what}", span
    ).with_note(f"set {MAX_FILE_ENV} (a number of MiB, default {DEFAULT_MAX_FILE_MB}) to raise the limit")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def decode(data: bytes, label: str, span: Span | None = None) -> str:
    """`data` as UTF-8 text (a leading byte-order mark dropped); an error names the first
    bad byte by offset, line and column."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AlgIOError(f"{_show(label)} is not UTF-8 text: {_where_bad(data, e)}", span) from None
    return text[1:] if text.startswith("\ufeff") else text


def _where_bad(data: bytes, e: UnicodeDecodeError) -> str:
    before = data[: e.start].decode("utf-8")
    line = before.count("\n") + 1
    col = len(before) - (before.rfind("\n") + 1) + 1
    bad = data[e.start : max(e.end, e.start + 1)]
    return f"byte 0x{bad[0]:02x} at byte offset {e.start} (line {line}, column {col}) {e.reason}"


def read_text(p: Path, label: str | None = None, span: Span | None = None, what: str = "file") -> str:
    label = str(p) if label is None else label
    return decode(read_bytes(p, label, span, what), label, span)


def read_json(p: Path, label: str | None = None, span: Span | None = None, what: str = "JSON file",
              expect: type | None = dict) -> Any:
    """A JSON file's value; with `expect`, a value of another type is an error."""
    label = str(p) if label is None else label
    text = read_text(p, label, span, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise AlgIOError(f"{_show(label)} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
                         span) from None
    except RecursionError:
        raise AlgIOError(f"{_show(label)} is JSON nested too deeply to read", span) from None
    if expect is not None and not isinstance(value, expect):
        want = "a JSON object ({...})" if expect is dict else f"a JSON {expect.__name__}"
        raise AlgIOError(f"{_show(label)} must hold {want}, not {_json_kind(value)}", span)
    return value


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return "an object"


def read_source(path: str | Path, name: str | None = None) -> Source:
    """A recipe file as a `Source`. Text that is not UTF-8 is an error positioned at the
    first bad byte (shown as U+FFFD in the excerpt)."""
    name = str(path) if name is None else name
    p = Path(path)
    data = read_bytes(p, name, None, "recipe file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        shown = Source(data.decode("utf-8", errors="replace"), name, p)
        at = len(data[: e.start].decode("utf-8"))
        raise AlgIOError(f"{_show(name)} is not UTF-8 text: {_where_bad(data, e)}",
                         Span(shown, at, at + 1)) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return Source(text, name, p)


def _show(label: str, width: int = 200) -> str:
    s = repr(label)[1:-1] if any(not c.isprintable() for c in label) else label
    if len(s) > width:
        s = s[: width - 3] + "..."
    return f"'{s}'"


__all__ = ["DEFAULT_MAX_FILE_MB", "MAX_FILE_ENV", "absolute", "check_path_text", "decode", "joined", "kind_of", "missing",
           "max_file_bytes", "open_regular", "path_error", "read_bytes", "read_json", "read_source",
           "read_text", "stat_path"]
