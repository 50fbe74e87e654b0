"""The error hierarchy.

`AlgError` and its subclasses are *user* errors: a mistake in a recipe, a bad path, a
corrupt file. They print as `file:line:col: error: message`, the source line and a caret,
plus notes (a call stack through `def` functions, a hint), and never a traceback. Any other
exception is an internal error and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

from .source import Span


@dataclass
class Note:
    message: str
    span: Span | None = None


class AlgError(Exception):
    """A user error, positioned where possible."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, *, notes: Iterable[Note] = ()):
        super().__init__(message)
        self.message = message
        self.span = span
        self.notes: list[Note] = list(notes)

    def with_note(self, message: str, span: Span | None = None) -> AlgError:
        self.notes.append(Note(message, span))
        return self

    def at(self, span: Span | None) -> AlgError:
        """Give a position to an error raised where none was known."""
        if self.span is None:
            self.span = span
        return self

    def format(self) -> str:
        lines = [_line(self.span, self.kind, self.message)]
        for note in self.notes:
            lines.append(_line(note.span, "note", note.message))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _line(span: Span | None, kind: str, message: str) -> str:
    if span is None:
        return f"{kind}: {message}" if kind == "note" else f"alg: {kind}: {message}"
    return f"{span.location()}: {kind}: {message}\n{span.excerpt()}"


class AlgSyntaxError(AlgError):
    pass


class AlgNameError(AlgError):
    pass


class AlgTypeError(AlgError):
    pass


class AlgShapeError(AlgError):
    """Tensors that differ in shape or are missing where an operation needs them."""


class AlgIOError(AlgError):
    """A missing path, a corrupt or truncated file, a refused format, an existing output."""


class AlgLimitError(AlgError):
    """A recipe that would take too much to check: nested too deeply, or past the step or
    size budget of check-time evaluation (README, "Limits")."""


# the environment variables that raise the check-time budgets (read by check.Checker)
STEPS_ENV = "ALG_MAX_STEPS"
SIZE_ENV = "ALG_MAX_SIZE"


class AlgRuntimeError(AlgError):
    """A failure found while computing: a non-finite result."""


class AlgUsageError(AlgError):
    """A bad option: a device that is not one, a --set that names nothing or gives a value
    of the wrong kind. The command line prints its usage and exits with status 2."""


@dataclass
class Diagnostic:
    """A warning: printed like an error, but the run goes on."""

    message: str
    span: Span | None = None

    def format(self) -> str:
        return _line(self.span, "warning", self.message)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# Where check-time warnings go while a program is being checked (set by `Checker.check`):
# type rules deep inside arithmetic have no checker at hand but may still warn.
_WARN: ContextVar = ContextVar("alg_warn", default=None)


def warn(message: str, span: Span | None) -> None:
    """Report a warning to the checker that is running (dropped outside checking)."""
    sink = _WARN.get()
    if sink is not None:
        sink(message, span)
