"""Data sets that rewards are evaluated on, read at check time.

`responses(path)`: rows with `prompt` and `response`. `pairs(path)`: rows with `prompt`,
`chosen`, `rejected`, optional `subset` and `id`; other column names, and the layouts of
RewardBench, Auto-J and hh-rlhf, come from the field rules of formats.py, which also
reads the files (JSONL, JSON, CSV, Parquet, datasets folders). A prompt is text or a conversation (a
list of `{"role", "content"}` messages, kept as a tuple of (role, content[, other fields])
tuples so that it can be a key, and given back whole to a chat template); a response is
text or a list of messages whose last one is taken. A content may be text, None (a tool
call) or a list of typed blocks, as transformers chat templates take them; where text is
needed (a response, a format template's {prompt}) the text blocks are joined.

Invariant: every malformed row is reported before anything runs, as an `AlgIOError`
naming `file:line` (JSONL) or `file: row N` (other formats; a folder's file inside it) and
the field at fault, positioned at the recipe's path argument; a column the recipe names
that the file lacks is positioned at that name, and lists the file's columns.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AlgIOError, did_you_mean, warn
from ..source import Span
from .formats import (
    AUTOJ_LABELS,
    AUTOJ_TIE,
    PAIR_ROLES,
    RESPONSES,
    Preset,
    Source,
    autoj_group,
    open_source,
    preset,
)

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


def _plain(v: Any) -> Any:
    """A value read from a Parquet/Arrow/CSV row as JSON can hold it (score() writes rows
    back as JSONL): dates and times as ISO text, anything else without a JSON form as text."""
    if v is None or isinstance(v, str | bool | int | float):
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def _show_value(value: Any) -> str:
    try:
        return json.dumps(_plain(value), ensure_ascii=False)[:40]
    except ValueError:  # a value nested too deeply
        return type(value).__name__


class _Fields:
    """Which column gives each role, for one read: the preset's columns, the recipe's
    own names over them, and where to point an error about each."""

    def __init__(self, preset: Preset, given: dict[str, str | None], label: str, span: Span | None,
                 spans: dict[str, Span]):
        self.cols = dict(preset.fields)
        self.optional = set(preset.optional)
        self.spans, self.span, self.label = spans, span, label
        for role, col in given.items():
            if col is None:
                continue
            if role not in self.cols:
                raise AlgIOError(f"{role}= does not apply to format=\"{preset.name}\": "
                                 f"{_derived(preset, role)}", spans.get(role, span))
            self.cols[role] = col
            self.optional.discard(role)  # a column the recipe names must be there

    def at(self, role: str) -> Span | None:
        return self.spans.get(role, self.span)

    def check_columns(self, columns: list[str] | None) -> None:
        """Against a schema (Parquet, CSV, Arrow): a named column that is absent is an
        error listing the columns; an optional one is dropped."""
        if columns is None:
            return
        for role, col in list(self.cols.items()):
            if col in columns:
                continue
            if role in self.optional:
                del self.cols[role]
                continue
            have = ", ".join(f"'{c}'" for c in columns)
            raise AlgIOError(f"'{self.label}' has no column '{col}' (for {role}){did_you_mean(col, columns)}; "
                             f"its columns: {have}", self.at(role))

    def wanted(self) -> list[str]:
        return list(dict.fromkeys(self.cols.values()))

    def get(self, row: dict, role: str, loc: str) -> Any:
        """The row's value for `role`; None for an absent optional column."""
        col = self.cols.get(role)
        if col is None:
            return None
        if col not in row:
            if role in self.optional:
                return None
            have = ", ".join(f"'{k}'" for k in row) or "none"
            raise AlgIOError(f"{loc}: row has no '{col}' field{did_you_mean(col, row)} (it has {have})",
                             self.at(role))
        return row[col]

    def value(self, row: dict, role: str, loc: str, kind: str) -> Any:
        return _convert(self.get(row, role, loc), self.cols[role], loc, self.span, kind)


def _derived(preset: Preset, role: str) -> str:
    if preset.rule == "autoj":
        f = preset.fields
        return (f"it takes chosen and rejected from '{f['first']}' and '{f['second']}' by '{f['label']}'; "
                f"it renames {', '.join(r for r in PAIR_ROLES if r in f)}")
    if preset.rule == "hh-rlhf":
        return "its prompt is the conversation the chosen and rejected transcripts share"
    return f"it has no field for {role}"


def _unnull(value: Any) -> Any:
    """Messages without their null fields other than role and content: Parquet and Arrow
    store a list of messages as structs of every key any message has, the missing ones
    null (a chat template would see `name: None`)."""
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return [{k: v for k, v in m.items() if v is not None or k in ("role", "content")} for m in value]
    return value


def _convert(value: Any, col: str, loc: str, span: Span | None, kind: str) -> Any:
    value = _unnull(value)
    out = prompt_key(value) if kind == "prompt" else response_text(value)
    if out is None:
        what = "text or a list of messages" if kind == "prompt" else "text"
        raise AlgIOError(f"{loc}: '{col}' must be {what}, not {_show_value(value)}", span)
    return out


def _text_or_none(value: Any, col: str, loc: str, span: Span | None) -> str | None:
    if value is not None and not isinstance(value, str):
        raise AlgIOError(f"{loc}: '{col}' must be text, not {_show_value(value)}", span)
    return value


def _open(path: Path, label: str, span: Span | None, split: str | None, spans: dict[str, Span],
          preset: Preset) -> Source:
    return open_source(path, label, span, split, spans.get("split"), preset.split)


def _text_columns(fields: _Fields, roles: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(fields.cols[r] for r in roles if r in fields.cols)


def read_responses(path: Path, label: str, span: Span | None = None, *, fields: dict[str, str | None] | None = None,
                   split: str | None = None, spans: dict[str, Span] | None = None) -> Responses:
    """Prompts with responses from a data file or folder (formats.py). `fields`: role ->
    column for 'prompt' and 'response'. Every column of a row is kept (score() writes
    the row back with its rewards)."""
    spans = spans or {}
    f = _Fields(RESPONSES, fields or {}, label, span, spans)
    src = _open(path, label, span, split, spans, RESPONSES)
    f.check_columns(src.columns())
    rows = []
    for loc, line, row in src.rows(None, _text_columns(f, ("prompt", "response"))):
        rows.append(Row(f.value(row, "prompt", loc, "prompt"), f.value(row, "response", loc, "response"),
                        {str(k): _plain(v) for k, v in row.items()}, line))
    if not rows:
        raise AlgIOError(f"'{src.label}' holds no rows", span)
    return Responses(label, tuple(rows))


def read_prompts(path: Path, label: str, span: Span | None = None) -> tuple[Prompt, ...]:
    """The 'prompt' of every row of a data file or folder (generate's prompts)."""
    f = _Fields(RESPONSES, {}, label, span, {})
    del f.cols["response"]
    src = open_source(path, label, span, None, None)
    f.check_columns(src.columns())
    return tuple(f.value(row, "prompt", loc, "prompt") for loc, _, row in src.rows(f.wanted(), ("prompt",)))


def read_pairs(path: Path, label: str, span: Span | None = None, *, format: str | None = None,
               fields: dict[str, str | None] | None = None, split: str | None = None,
               spans: dict[str, Span] | None = None) -> Pairs:
    """Preference pairs from a data file or folder (formats.py), its columns named by the
    preset `format` (formats.PRESETS) and `fields` (role -> column) over it. Only the
    columns the pairs need are read."""
    spans = spans or {}
    p = preset(format, spans.get("format", span))
    f = _Fields(p, fields or {}, label, span, spans)
    src = _open(path, label, span, split, spans, p)
    f.check_columns(src.columns())
    text = _text_columns(f, ("prompt", "chosen", "rejected", "first", "second", "subset"))
    rows, apart = [], []
    for loc, line, row in src.rows(f.wanted(), text):
        pair = _PAIR_RULES[p.rule](f, row, loc)
        if pair is None:  # an Auto-J tie
            continue
        if pair is _APART:
            apart.append(loc)
            continue
        prompt, chosen, rejected, subset = pair
        rows.append(PairRow(prompt, chosen, rejected, subset, _plain(f.get(row, "id", loc)), line))
    if apart:
        warn(f"{len(apart)} row(s) of '{src.label}' dropped: their '{f.cols['chosen']}' and "
             f"'{f.cols['rejected']}' transcripts differ before the final assistant turn, so they share no "
             f"prompt (the first: {apart[0]})", span)
    if not rows:
        why = {"autoj": " (every pair was a tie)", "hh-rlhf": " (no pair shared its prompt)"}.get(p.rule, "")
        raise AlgIOError(f"'{src.label}' holds no rows{why}", span)
    return Pairs(label, tuple(rows))


def _plain_pair(f: _Fields, row: dict, loc: str):
    return (f.value(row, "prompt", loc, "prompt"), f.value(row, "chosen", loc, "response"),
            f.value(row, "rejected", loc, "response"),
            _text_or_none(f.get(row, "subset", loc), f.cols.get("subset", ""), loc, f.span))


def _autoj_pair(f: _Fields, row: dict, loc: str):
    label = f.get(row, "label", loc)
    key = label
    if isinstance(label, str) and label.strip().isdigit():  # a CSV read as text
        key = int(label)
    elif isinstance(label, float) and label.is_integer():
        key = int(label)
    if isinstance(key, bool) or key not in (*AUTOJ_LABELS, AUTOJ_TIE):
        raise AlgIOError(f"{loc}: '{f.cols['label']}' must be 0 ('{f.cols['first']}' preferred), 1 "
                         f"('{f.cols['second']}' preferred) or 2 (a tie), not {_show_value(label)}", f.span)
    if key == AUTOJ_TIE:
        return None
    scenario = f.get(row, "subset", loc)
    if not isinstance(scenario, str):
        raise AlgIOError(f"{loc}: '{f.cols['subset']}' must be text (an Auto-J scenario), not "
                         f"{_show_value(scenario)}", f.span)
    chosen, rejected = AUTOJ_LABELS[key]
    return (f.value(row, "prompt", loc, "prompt"), f.value(row, chosen, loc, "response"),
            f.value(row, rejected, loc, "response"), autoj_group(scenario))


def _hh_pair(f: _Fields, row: dict, loc: str):
    got = []
    for role in ("chosen", "rejected"):
        text = f.get(row, role, loc)
        if not isinstance(text, str):
            raise AlgIOError(f"{loc}: '{f.cols[role]}' must be a transcript (text), not {_show_value(text)}", f.span)
        split = split_transcript(text)
        if isinstance(split, str):
            raise AlgIOError(f"{loc}: '{f.cols[role]}' {split}", f.span)
        got.append(split)
    (prompt, chosen), (other, rejected) = got
    if prompt != other:
        return _APART
    return (prompt_key(prompt), chosen, rejected,
            _text_or_none(f.get(row, "subset", loc), f.cols.get("subset", ""), loc, f.span))


_APART = object()  # an hh-rlhf row whose transcripts differ before their last turn: dropped, with a warning
_PAIR_RULES = {"plain": _plain_pair, "autoj": _autoj_pair, "hh-rlhf": _hh_pair}

# a turn of an hh-rlhf transcript: "\n\nHuman: ..." or "\n\nAssistant: ..." (the first may
# start the text without the blank line)
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def split_transcript(text: str) -> tuple[list[dict], str] | str:
    """An hh-rlhf transcript as (the chat messages before the final assistant turn, that
    turn's text), each turn's text stripped; or what is wrong with it, in words."""
    marks = list(_TURN.finditer(text))
    if not marks:
        return "has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns"
    if text[: marks[0].start()].strip():
        return "has text before its first '\\n\\nHuman:' turn"
    turns = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        turns.append({"role": "user" if m.group(1) == "Human" else "assistant", "content": text[m.end():end].strip()})
    if turns[-1]["role"] != "assistant":
        return "does not end with an assistant turn"
    if not any(t["role"] == "user" for t in turns[:-1]):
        return "has no human turn before its final assistant turn"
    return turns[:-1], turns[-1]["content"]


def from_points(label: str, prompts: list, completions: list) -> Responses:
    """An in-memory data set (the TRL callable's batch)."""
    rows = tuple(Row(p, c, None, i + 1) for i, (p, c) in enumerate(zip(prompts, completions, strict=True)))
    return Responses(label, rows)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


__all__ = ["Frozen", "PairRow", "Pairs", "Prompt", "Responses", "Row", "content_text", "from_points", "prompt_key",
           "prompt_text", "read_pairs", "read_prompts", "read_responses", "split_transcript", "response_text", "show_prompt", "thaw", "to_messages"]
