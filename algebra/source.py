"""Source text and spans.

Every AST node and every user error carries a `Span`: a half-open character range in one
`Source`. Line and column are computed on demand (1-based, as editors show them), so
spans stay two integers and a reference.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(eq=False)
class Source:
    """One piece of recipe text: a file, a REPL entry, or a string given to the API."""

    text: str
    name: str = "<string>"
    path: Path | None = None
    _line_starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        starts = [0]
        for i, ch in enumerate(self.text):
            if ch == "\n":
                starts.append(i + 1)
        self._line_starts = starts

    def line_col(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        offset = max(0, min(offset, len(self.text)))
        i = bisect.bisect_right(self._line_starts, offset) - 1
        return i + 1, offset - self._line_starts[i] + 1

    def line_text(self, line: int) -> str:
        start = self._line_starts[line - 1]
        end = self.text.find("\n", start)
        return self.text[start : end if end >= 0 else len(self.text)].rstrip("\r")

    @property
    def folder(self) -> Path:
        """Where relative paths in this source resolve: its file's folder, else the cwd."""
        return self.path.resolve().parent if self.path is not None else Path.cwd()


@dataclass(frozen=True, eq=False)
class Span:
    source: Source
    start: int
    end: int

    @property
    def line(self) -> int:
        return self.source.line_col(self.start)[0]

    @property
    def col(self) -> int:
        return self.source.line_col(self.start)[1]

    def text(self) -> str:
        return self.source.text[self.start : self.end]

    def to(self, other: Span) -> Span:
        """The span from the start of self to the end of other."""
        return Span(self.source, min(self.start, other.start), max(self.end, other.end))

    def location(self) -> str:
        line, col = self.source.line_col(self.start)
        return f"{self.source.name}:{line}:{col}"

    def excerpt(self) -> str:
        """The first source line of the span with a caret line under it."""
        line, col = self.source.line_col(self.start)
        text = self.source.line_text(line)
        end_line, end_col = self.source.line_col(max(self.start, self.end - 1))
        width = (end_col - col + 1) if end_line == line else len(text) - col + 1
        width = max(1, width)
        # keep tabs so the caret lines up under tab-indented code
        pad = "".join(c if c == "\t" else " " for c in text[: col - 1])
        return f"    {text}\n    {pad}{'^' * width}"
