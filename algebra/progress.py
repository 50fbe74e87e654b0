"""Progress on long work: bars on stderr, drawn by tqdm, behind a narrow interface.

The run configuration carries a `Progress` (`Options.progress`); the executor and the
reward engine ask it for a bar and report to that bar, and know nothing else:

    with options.progress.bar(total, "save out/m", unit="B", items=40, item_unit="tensors") as bar:
        bar.update(nbytes)        # work done: bytes written, texts scored
        bar.item_done()           # one more tensor finished ("12/40 tensors")
        if bar.live:              # build a note only when someone will see it
            bar.note("step 3/52: reduce slerp layer 0")

A `Progress` is "on" (always draw), "off" (never) or "auto" (draw when the stream, stderr
unless given, is a terminal). The CLI uses "auto" (`--progress` forces "on", `--quiet`
"off"); the Python API defaults to "off". When a bar would not be drawn, `bar()` returns
one shared object whose methods do nothing, and tqdm is never imported: progress costs
one empty call per chunk.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

MODES = ("auto", "on", "off")


class Progress:
    """Whether and where to draw progress bars. Picklable (the stream is resolved when a
    bar starts, so a redirected `sys.stderr` is honoured)."""

    __slots__ = ("mode", "stream")

    def __init__(self, mode: str = "off", stream: IO[str] | None = None):
        if mode not in MODES:
            raise ValueError(f"progress must be one of {', '.join(MODES)} (or True/False), not {mode!r}")
        self.mode = mode
        self.stream = stream

    @classmethod
    def of(cls, value: Any) -> Progress:
        """A Progress from what `Options(progress=...)` accepts: a Progress, True ("on"),
        False ("off") or one of the mode names."""
        if isinstance(value, Progress):
            return value
        if value is True or value is False:
            return cls("on" if value else "off")
        if isinstance(value, str):
            return cls(value)
        raise ValueError(f"progress must be True, False, 'auto', 'on' or 'off', not {value!r}")

    def _stream(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stderr

    def enabled(self) -> bool:
        if self.mode == "off":
            return False
        if self.mode == "on":
            return True
        try:
            return bool(self._stream().isatty())
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            return False

    def bar(self, total: int, desc: str, unit: str = "it", items: int | None = None,
            item_unit: str = "items") -> _Bar | _NullBar:
        """A bar for `total` units of work (unit "B": bytes, shown scaled, with rate and
        ETA), optionally counting `items` finished things beside it. Use it as a context
        manager: it is closed (and, on an error, erased) on exit."""
        if not self.enabled():
            return NULL_BAR
        return _Bar(self._stream(), total, desc, unit, items, item_unit)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Progress) and (self.mode, self.stream) == (other.mode, other.stream)

    def __hash__(self) -> int:
        return hash(self.mode)

    def __repr__(self) -> str:
        return f"Progress({self.mode!r})"

    def __getstate__(self) -> tuple:
        return (self.mode, None)  # a stream does not travel; the receiver's stderr is used

    def __setstate__(self, state: tuple) -> None:
        self.mode, self.stream = state


class _NullBar:
    """The bar when progress is off: every report is a no-op."""

    live = False

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def update(self, n: int = 1) -> None:
        pass

    def item_done(self) -> None:
        pass

    def note(self, text: str) -> None:
        pass


NULL_BAR = _NullBar()


# a bar's description at most (then cut with "…"): at 80 columns the rest of the line
# (": 100%|#| 6/6 [00:00<00:00, 1184.94text/s]", more with a postfix) needs over 40, and
# tqdm cuts what does not fit, the rate first
_DESC_WIDTH = 32


def _shape(stream: IO[str]) -> dict[str, Any]:
    """tqdm's width options: follow a terminal that knows its size; otherwise (a pipe with
    --progress, or a terminal that reports 0x0, where tqdm would draw nothing) 80x24."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        size = None
    if size is not None and size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": 80, "nrows": 24}


class _Bar:
    live = True
    _NOTE_INTERVAL = 0.1  # seconds between redraws forced by a note (tqdm's own pace)

    def __init__(self, stream: IO[str], total: int, desc: str, unit: str, items: int | None, item_unit: str):
        from tqdm import tqdm  # text on the given stream, in a notebook too

        scaled = unit == "B"
        if len(desc) > _DESC_WIDTH:  # a long model description would leave no room for the bar
            desc = desc[: _DESC_WIDTH - 1] + "…"
        self._items = items
        self._item_unit = item_unit
        self._done = 0
        self._note = ""
        self._last = 0.0
        count = "{n_fmt}B/{total_fmt}B" if scaled else "{n_fmt}/{total_fmt}"  # 12.0M -> 12.0MB
        self._t = tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1024 if scaled else 1000,
                       file=stream, leave=True, smoothing=0.1, postfix=self._postfix() or None,
                       bar_format="{l_bar}{bar}| " + count + " [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
                       **_shape(stream))

    def _postfix(self) -> str:
        parts = []
        if self._items is not None:
            parts.append(f"{self._done}/{self._items} {self._item_unit}")
        if self._note:
            parts.append(self._note)
        return ", ".join(parts)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> bool:
        if exc_type is not None:
            self._t.leave = False  # erase the bar: the error message follows on a clean line
        self._t.close()
        return False

    def update(self, n: int = 1) -> None:
        self._t.update(n)

    def item_done(self) -> None:
        self._done += 1
        self._t.set_postfix_str(self._postfix(), refresh=False)  # drawn with the next update

    def note(self, text: str) -> None:
        """What is happening now (the step of a plan); redrawn at once, at most every
        0.1 s, since a long step may make no other report."""
        self._note = text
        now = time.monotonic()
        redraw = now - self._last >= self._NOTE_INTERVAL
        if redraw:
            self._last = now
        self._t.set_postfix_str(self._postfix(), refresh=redraw)


__all__ = ["MODES", "NULL_BAR", "Progress"]
