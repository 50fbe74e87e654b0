"""Data sets that rewards are evaluated on, read from JSONL at check time.

`responses(path)`: rows with `prompt` and `response`. `pairs(path)`: rows with `prompt`,
`chosen`, `rejected`, optional `subset` and `id`. A prompt is text or a conversation (a
list of `{"role", "content"}` messages, kept as a tuple of (role, content[, other fields])
tuples so that it can be a key, and given back whole to a chat template); a response is
text or a list of messages whose last one is taken. A content may be text, None (a tool
call) or a list of typed blocks, as transformers chat templates take them; where text is
needed (a response, a format template's {prompt}) the text blocks are joined.

Invariant: every malformed row is reported before anything runs, as an `AlgIOError`
naming `file:line` and the field at fault, positioned at the recipe's path argument.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AlgIOError
from ..io.files import read_text
from ..source import Span

Prompt = str | tuple  # text, or ((role, content), ...)


@dataclass(frozen=True)
class Row:
    prompt: Prompt
    response: str
    raw: Any  # the input row (a dict), written back by score()
    line: int


@dataclass(frozen=True)
class PairRow:
    prompt: Prompt
    chosen: str
    rejected: str
    subset: str | None
    id: Any
    line: int


@dataclass(frozen=True, eq=False)
class Responses:
    """Prompts with responses (several per prompt allowed)."""

    label: str
    rows: tuple[Row, ...]
    alg_type = "Responses"

    def __str__(self) -> str:
        return f'responses("{self.label}")'

    def points(self) -> list[tuple[Prompt, str]]:
        return [(r.prompt, r.response) for r in self.rows]

    def by_prompt(self) -> dict[Prompt, list[str]]:
        out: dict[Prompt, list[str]] = {}
        for r in self.rows:
            out.setdefault(r.prompt, []).append(r.response)
        return out


@dataclass(frozen=True, eq=False)
class Pairs:
    """Preference pairs: (prompt, chosen, rejected), with optional subset and id."""

    label: str
    rows: tuple[PairRow, ...]
    alg_type = "Pairs"

    def __str__(self) -> str:
        return f'pairs("{self.label}")'

    def points(self) -> list[tuple[Prompt, str]]:
        """Every chosen response, then every rejected one."""
        return [(r.prompt, r.chosen) for r in self.rows] + [(r.prompt, r.rejected) for r in self.rows]


class Frozen(tuple):
    """A JSON object inside a message (a content block, a tool call), as sorted (key,
    value) items so that a prompt can be a key; `thaw` gives the dict back."""

    __slots__ = ()


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return Frozen((k, _freeze(v[k])) for k in sorted(v))
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    return v


def thaw(v: Any) -> Any:
    if isinstance(v, Frozen):
        return {k: thaw(x) for k, x in v}
    if isinstance(v, tuple):
        return [thaw(x) for x in v]
    return v


def _is_content(c: Any) -> bool:
    """What transformers chat templates take as a message's content: text, None (an
    assistant turn that only calls tools), or a list of typed blocks
    ({"type": "text", "text": ...}, images, ...)."""
    if c is None or isinstance(c, str):
        return True
    return isinstance(c, list | tuple) and all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in c)


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m and _is_content(m["content"])


def _message_key(m: dict) -> tuple:
    """(role, content), plus the message's other fields (tool_calls, name, ...) when it
    has any: a chat template is given the message back whole."""
    extra = {k: v for k, v in m.items() if k not in ("role", "content")}
    key = (m["role"], _freeze(m["content"]))
    return key + (_freeze(extra),) if extra else key


def to_messages(prompt: Prompt) -> list[dict]:
    """A prompt as the chat messages it was given as (text: one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    out = []
    for m in prompt:
        msg = {"role": m[0], "content": thaw(m[1])}
        if len(m) > 2:
            msg.update(thaw(m[2]))
        out.append(msg)
    return out


def content_text(c: Any) -> str:
    """A message content as text: the text itself, its text blocks joined, or "" (None)."""
    c = thaw(c)
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    return "".join(b.get("text", "") for b in c if b.get("type") == "text")


def prompt_key(value: Any) -> Prompt | None:
    """A prompt as a hashable key, or None if it is neither text nor a conversation."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and value and all(_is_message(m) for m in value):
        if len(value) == 1 and value[0]["role"] == "user" and set(value[0]) == {"role", "content"} \
                and isinstance(value[0]["content"], str):
            return value[0]["content"]  # one user turn is the plain prompt: one key, one text
        return tuple(_message_key(m) for m in value)
    return None


def response_text(value: Any) -> str | None:
    """A response as text: a string, or the content of a message or of the last of a list
    of messages (text blocks joined; None, a tool call only, is "")."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and _is_message(value):
        return content_text(value["content"])
    if isinstance(value, list | tuple) and value and all(_is_message(m) for m in value):
        return content_text(value[-1]["content"])
    return None


def prompt_text(prompt: Prompt) -> str:
    """The text a format-string template puts for {prompt}: the last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m[1] for m in prompt if m[0] == "user"]
    return content_text(users[-1] if users else prompt[-1][1])


def show_prompt(prompt: Prompt, width: int = 60) -> str:
    text = prompt_text(prompt).replace("\n", " ")
    return json.dumps(text if len(text) <= width else text[: width - 3] + "...")


def _rows(path: Path, label: str, span: Span | None):
    # a regular UTF-8 file under the size limit (algebra.io.files says why not, positioned)
    text = read_text(path, label, span, "data file")
    # JSONL rows end at "\n" only: str.splitlines() would also split inside a JSON string
    # at U+2028, U+0085 or a form feed, which JSON allows unescaped
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AlgIOError(f"{label}:{n}: not valid JSON ({e.msg} at column {e.colno})", span) from None
        except RecursionError:
            raise AlgIOError(f"{label}:{n}: JSON nested too deeply to read", span) from None
        if not isinstance(row, dict):
            raise AlgIOError(f"{label}:{n}: a row must be a JSON object, not {type(row).__name__}", span)
        yield n, row


def _field(row: dict, name: str, label: str, n: int, span: Span | None, kind: str) -> Any:
    if name not in row:
        have = ", ".join(f"'{k}'" for k in row) or "none"
        raise AlgIOError(f"{label}:{n}: row has no '{name}' field (it has {have})", span)
    value = row[name]
    out = prompt_key(value) if kind == "prompt" else response_text(value)
    if out is None:
        what = "text or a list of messages" if kind == "prompt" else "text"
        raise AlgIOError(f"{label}:{n}: '{name}' must be {what}, not {json.dumps(value)[:40]}", span)
    return out


def read_responses(path: Path, label: str, span: Span | None = None) -> Responses:
    rows = []
    for n, row in _rows(path, label, span):
        rows.append(Row(_field(row, "prompt", label, n, span, "prompt"),
                        _field(row, "response", label, n, span, "response"), row, n))
    if not rows:
        raise AlgIOError(f"'{label}' holds no rows", span)
    return Responses(label, tuple(rows))


def read_pairs(path: Path, label: str, span: Span | None = None) -> Pairs:
    rows = []
    for n, row in _rows(path, label, span):
        subset = row.get("subset")
        if subset is not None and not isinstance(subset, str):
            raise AlgIOError(f"{label}:{n}: 'subset' must be text, not {json.dumps(subset)[:40]}", span)
        rows.append(PairRow(
            _field(row, "prompt", label, n, span, "prompt"),
            _field(row, "chosen", label, n, span, "response"),
            _field(row, "rejected", label, n, span, "response"),
            subset, row.get("id"), n,
        ))
    if not rows:
        raise AlgIOError(f"'{label}' holds no rows", span)
    return Pairs(label, tuple(rows))


def from_points(label: str, prompts: list, completions: list) -> Responses:
    """An in-memory data set (the TRL callable's batch)."""
    rows = tuple(Row(p, c, None, i + 1) for i, (p, c) in enumerate(zip(prompts, completions, strict=True)))
    return Responses(label, rows)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


__all__ = ["Frozen", "PairRow", "Pairs", "Prompt", "Responses", "Row", "content_text", "from_points", "prompt_key",
           "prompt_text", "read_pairs", "read_responses", "response_text", "show_prompt", "thaw", "to_messages"]
