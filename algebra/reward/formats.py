"""Data files as people have them: the file formats `pairs`/`responses` read, and the
field presets (`format=`) that name a data set's columns.

Formats (by the path): a `.parquet`, `.csv`, `.json` (a list of rows, or one row per
line as `datasets`' `to_json` writes it) or JSONL file (any other name); a folder written
by `datasets`' `save_to_disk` (a `Dataset` or a `DatasetDict` of splits); a Hub-layout
folder of data files (`data/train-00000-of-00001.parquet`, `data/test-*.parquet`,
`test/*.parquet`, ...), whose splits `datasets` names from the file names. Parquet,
CSV and Arrow are read with pyarrow in record batches (only the columns needed, where
the caller says which); pyarrow and `datasets` are imported only when such a file is read.

`PRESETS` is the one table of field rules: which column gives each role of a row, how a
preset derives its rows (Auto-J's label, hh-rlhf's transcripts), and the split it takes
from a folder of several. `preset_table()` renders it for README.md and docs/design.md
(tests/test_data_formats.py checks that both show it).

A row's position: `where` (the file, for a folder the file inside it) and `n`, its line
in a JSONL file or its 1-based row number in any other file; `pos`, its 1-based position
in the whole data set (the row number the engine reports at run time).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AlgIOError, did_you_mean
from ..io.files import open_regular, read_text, stat_path
from ..source import Span

BATCH_ROWS = 1024  # rows per record batch read from a Parquet, CSV or Arrow file


# ---- the presets: one table ----------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """How a data set's columns give a preference pair.

    `fields`: role -> column; a role in `optional` is None where its column is absent
    (unless the recipe names the column itself). `rule`: "plain" (each role read as is),
    "autoj" (chosen/rejected from `first`/`second` by `label`, ties dropped, `subset` the
    scenario's group) or "hh-rlhf" (chosen/rejected are whole transcripts; the prompt is
    their shared conversation). `split`: the split taken from a folder of several when
    split= is not given."""

    name: str
    fields: dict[str, str]
    optional: frozenset[str] = frozenset()
    rule: str = "plain"
    split: str | None = None
    doc: str = ""


PAIR_ROLES = ("prompt", "chosen", "rejected", "subset", "id")  # the fields pairs() may rename
RESPONSE_ROLES = ("prompt", "response")

DEFAULT = Preset("default", {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "subset": "subset",
                             "id": "id"}, frozenset({"subset", "id"}),
                 doc="alg's own layout")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("rewardbench", dict(DEFAULT.fields), frozenset({"id"}), split="filtered",
           doc="allenai/reward-bench; its subsets give the section scores"),
    Preset("autoj", {"prompt": "prompt", "first": "response 1", "second": "response 2", "label": "label",
                     "subset": "scenario", "id": "id"}, frozenset({"id"}), rule="autoj", split="test",
           doc="Auto-J's pairwise test set: `label` 0 prefers `response 1`, 1 `response 2`, 2 (a tie) "
               "drops the row"),
    Preset("hh-rlhf", {"chosen": "chosen", "rejected": "rejected", "subset": "subset", "id": "id"},
           frozenset({"subset", "id"}), rule="hh-rlhf", split="test",
           doc="Anthropic/hh-rlhf: `chosen`, `rejected` are whole `\\n\\nHuman: ...\\n\\nAssistant: ...` "
               "transcripts (turns stripped); a row where they differ before it is dropped, with a warning"),
)}

RESPONSES = Preset("responses", {"prompt": "prompt", "response": "response"},
                   doc="responses(): a prompt (text or chat messages) and a response")

# Auto-J scenarios grouped as DogeRM groups them (MiuLab/DogeRM, src/inference_autoj.py);
# every other scenario is "Other".
AUTOJ_GROUPS: dict[str, tuple[str, ...]] = {
    "Math": ("math_reasoning", "solving_exam_question_with_math"),
    "Code": ("code_simplification", "code_generation", "explaining_code", "code_to_code_translation",
             "code_correction_rewriting"),
}
AUTOJ_OTHER = "Other"
AUTOJ_LABELS = {0: ("first", "second"), 1: ("second", "first")}  # label -> (chosen, rejected)
AUTOJ_TIE = 2


def autoj_group(scenario: str) -> str:
    for group, names in AUTOJ_GROUPS.items():
        if scenario in names:
            return group
    return AUTOJ_OTHER


def preset(name: str | None, span: Span | None = None) -> Preset:
    if name is None or name == DEFAULT.name:
        return DEFAULT
    if name not in PRESETS:
        known = ", ".join(f"'{k}'" for k in PRESETS)
        raise AlgIOError(f"format must be one of {known}, not '{name}'{did_you_mean(name, PRESETS)}", span)
    return PRESETS[name]


def preset_table() -> str:
    """The presets as a Markdown table (README.md and docs/design.md show it)."""
    head = "| `format=` | prompt | chosen | rejected | subset | id | split (of several) | notes |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]

    def col(p: Preset, role: str) -> str:
        c = p.fields.get(role)
        if c is None:
            return "—"
        return f"`{c}`" + (" (if present)" if role in p.optional else "")

    for p in (DEFAULT, *PRESETS.values()):
        name = "none" if p is DEFAULT else f'`"{p.name}"`'
        if p.rule == "autoj":
            chosen = f"`{p.fields['first']}` or `{p.fields['second']}` by `{p.fields['label']}`"
            rejected = "the other"
            subset = f"`{p.fields['subset']}`, grouped: " + "; ".join(
                f"{g} = {', '.join(f'`{n}`' for n in names)}" for g, names in AUTOJ_GROUPS.items()) + \
                f"; any other: {AUTOJ_OTHER}"
        elif p.rule == "hh-rlhf":
            chosen = f"`{p.fields['chosen']}`'s final assistant turn"
            rejected = f"`{p.fields['rejected']}`'s final assistant turn"
            subset = col(p, "subset")
        else:
            chosen, rejected, subset = col(p, "chosen"), col(p, "rejected"), col(p, "subset")
        prompt = col(p, "prompt") if "prompt" in p.fields else "the turns before, as chat messages"
        lines.append(f"| {name} | {prompt} | {chosen} | {rejected} | {subset} | {col(p, 'id')} | "
                     f"{p.split or 'split= needed'} | {p.doc} |")
    return "\n".join(lines)


# ---- reading: files and folders ------------------------------------------------------------


@dataclass
class Part:
    """One file of a data set: its path, how errors name it, and its format."""

    path: Path
    where: str
    kind: str  # "jsonl", "jsonl.gz", "json", "csv", "parquet"


@dataclass
class Source:
    """A data set (one split of it) ready to be read: its files, or a `datasets` Dataset."""

    label: str
    parts: list[Part] = field(default_factory=list)
    dataset: Any = None  # a datasets.Dataset (save_to_disk), read in Arrow batches
    span: Span | None = None

    def columns(self) -> list[str] | None:
        """The column names, where the format has a schema (None for JSON and JSONL)."""
        if self.dataset is not None:
            return list(self.dataset.column_names)
        part = self.parts[0]
        if part.kind == "parquet":
            return _guard(lambda: _parquet_columns(part.path), part.where, self.span)
        if part.kind == "csv":
            return _guard(lambda: _csv_columns(part), part.where, self.span)
        return None

    def rows(self, columns: list[str] | None = None, text: tuple[str, ...] = ()) -> Iterator[tuple[str, int, dict]]:
        """(loc, line, row) for every row. `loc` says where it is in words ("f.jsonl:3",
        "f.parquet: row 3"); `line`, the number the engine reports later: the row's line
        in a lone JSONL file, its row number in another lone file, its 1-based position
        in a data set of several files. `columns`: read only these (where the format
        allows; None: all); `text`: columns a CSV reads as text, never as numbers."""
        pos = 0
        if self.dataset is not None:
            ds = self.dataset if columns is None else self.dataset.select_columns(columns)
            it = iter(_guard(lambda: ds.with_format("arrow").iter(batch_size=BATCH_ROWS), self.label, self.span))
            while (batch := _guard(lambda: next(it, None), self.label, self.span)) is not None:
                for row in batch.to_pylist():
                    pos += 1
                    yield f"{self.label}: row {pos}", pos, row
            return
        one = len(self.parts) == 1
        for part in self.parts:
            for loc, n, row in _part_rows(part, columns, text, self.span):
                pos += 1
                yield loc, n if one else pos, row


SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".jsonl.gz": "jsonl.gz"}


def _kind(p: Path) -> str | None:
    name = p.name.lower()
    return next((k for s, k in SUFFIXES.items() if name.endswith(s)), None)


def open_source(path: Path, label: str, span: Span | None, split: str | None, split_span: Span | None,
                default_split: str | None = None) -> Source:
    """The data at `path`: a file (its format by suffix; JSONL unless it says otherwise)
    or a folder (`save_to_disk`, or Hub layout); `split` picks a folder's split."""
    if not stat.S_ISDIR(stat_path(path, label, span).st_mode):
        if split is not None:
            raise AlgIOError(f"split='{split}': '{label}' is one file, which has no splits; split= picks "
                             "one of a dataset folder's splits", split_span or span)
        return Source(label, [Part(path, label, _kind(path) or "jsonl")], span=span)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _saved(path, label, span, split, split_span, default_split)
    return _hub(path, label, span, split, split_span, default_split)


def _choose(splits: list[str], label: str, span: Span | None, split: str | None, split_span: Span | None,
            default_split: str | None) -> str:
    shown = ", ".join(f"'{s}'" for s in splits)
    if split is not None:
        if split not in splits:
            raise AlgIOError(f"'{label}' has no split '{split}'{did_you_mean(split, splits)}; its splits: {shown}",
                             split_span or span)
        return split
    if len(splits) == 1:
        return splits[0]
    if default_split in splits:
        return default_split
    raise AlgIOError(f"'{label}' holds several splits ({shown}); choose one with split=\"...\"", span)


def _saved(path: Path, label: str, span: Span | None, split: str | None, split_span: Span | None,
           default_split: str | None) -> Source:
    """A folder written by `datasets`' save_to_disk: memory-mapped Arrow, read in batches."""
    import datasets

    loaded = _guard(lambda: datasets.load_from_disk(str(path)), label, span)
    if isinstance(loaded, datasets.DatasetDict):
        name = _choose(list(loaded), label, span, split, split_span, default_split)
        return Source(f"{label} ({name})", dataset=loaded[name], span=span)
    if split is not None:
        raise AlgIOError(f"split='{split}': '{label}' is one saved Dataset, which has no splits", split_span or span)
    return Source(label, dataset=loaded, span=span)


def _hub(path: Path, label: str, span: Span | None, split: str | None, split_span: Span | None,
         default_split: str | None) -> Source:
    """A Hub-layout folder: `datasets` names the splits from the file names; each file is
    read by its own format."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
        files = DataFilesDict.from_patterns(patterns, base_path=str(path))
    except EmptyDatasetError:
        raise AlgIOError(f"'{label}' is a folder with no data files: alg reads a file ("
                         f"{', '.join(SUFFIXES)}), a folder written by datasets' save_to_disk, or a "
                         "Hub-layout folder (data/train-00000-of-00001.parquet, ...)", span) from None
    except (OSError, ValueError) as e:
        raise AlgIOError(f"cannot read the folder '{label}': {e}", span) from None
    name = _choose([str(s) for s in files], label, span, split, split_span, default_split)
    parts = []
    for f in sorted(files[name]):
        p = Path(f)
        where = os.path.join(label, os.path.relpath(p, path))
        kind = _kind(p)
        if kind is None:
            raise AlgIOError(f"'{where}': alg reads {', '.join(SUFFIXES)} files in a dataset folder, not "
                             f"'{p.suffix or p.name}'", span)
        parts.append(Part(p, where, kind))
    return Source(f"{label} ({name})", parts, span=span)


def _guard(fn, where: str, span: Span | None):
    """Run a pyarrow/datasets call; its failures (a corrupt or truncated file) as an
    AlgIOError naming the file."""
    try:
        return fn()
    except AlgIOError:
        raise
    except Exception as e:  # pyarrow.ArrowException, OSError, datasets' own errors: all the file's fault
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AlgIOError(f"cannot read '{where}': {msg}", span) from None


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    with _open(path) as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


def _csv_columns(part: Part) -> list[str]:
    import pyarrow.csv as pcsv

    with _open(part.path) as f:
        return list(pcsv.open_csv(f).schema.names)


def _open(path: Path, where: str | None = None, span: Span | None = None):
    """A binary file object on `path`, which must be a regular file (else said why, at `span`)."""
    return os.fdopen(open_regular(path, where or str(path), span, "data file"), "rb")


def _gunzip(part: Part, span: Span | None) -> str:
    """A gzip-compressed JSONL file (Anthropic/hh-rlhf ships `train.jsonl.gz`), as text;
    its uncompressed size is held to the data-file limit."""
    import gzip

    from ..io.files import _too_big, decode, max_file_bytes

    limit = max_file_bytes()
    with _open(part.path, part.where, span) as raw:
        try:
            data = gzip.GzipFile(fileobj=raw).read(limit + 1)
        except (OSError, EOFError) as e:
            raise AlgIOError(f"cannot read '{part.where}': not a complete gzip file ({e})", span) from None
    if len(data) > limit:
        raise _too_big(part.where, len(data), limit, span, "data file (uncompressed)")
    return decode(data, part.where, span)


def _part_rows(part: Part, columns: list[str] | None, text: tuple[str, ...], span: Span | None):
    if part.kind == "jsonl":
        yield from _jsonl_rows(read_text(part.path, part.where, span, "data file"), part.where, span)
    elif part.kind == "json":
        yield from _json_rows(part, span)
    elif part.kind == "jsonl.gz":
        yield from _jsonl_rows(_gunzip(part, span), part.where, span)
    else:
        yield from _arrow_rows(part, columns, text, span)


def _jsonl_rows(text: str, where: str, span: Span | None) -> Iterator[tuple[int, dict]]:
    # JSONL rows end at "\n" only: str.splitlines() would also split inside a JSON string
    # at U+2028, U+0085 or a form feed, which JSON allows unescaped
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AlgIOError(f"{where}:{n}: not valid JSON ({e.msg} at column {e.colno})", span) from None
        except RecursionError:
            raise AlgIOError(f"{where}:{n}: JSON nested too deeply to read", span) from None
        if not isinstance(row, dict):
            raise AlgIOError(f"{where}:{n}: a row must be a JSON object, not {type(row).__name__}", span)
        yield f"{where}:{n}", n, row


def _json_rows(part: Part, span: Span | None) -> Iterator[tuple[int, dict]]:
    """A .json file: a list of row objects, or (as datasets' to_json writes) one per line."""
    text = read_text(part.path, part.where, span, "data file")
    if not text.lstrip().startswith("["):  # JSON Lines under a .json name
        yield from _jsonl_rows(text, part.where, span)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise AlgIOError(f"{part.where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", span) from None
    except RecursionError:
        raise AlgIOError(f"{part.where}: JSON nested too deeply to read", span) from None
    if not isinstance(rows, list):
        raise AlgIOError(f"{part.where}: a JSON data file holds a list of rows ([{{...}}, ...]) or one row "
                         "per line", span)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise AlgIOError(f"{part.where}: row {n}: a row must be a JSON object, not {type(row).__name__}", span)
        yield f"{part.where}: row {n}", n, row


def _arrow_rows(part: Part, columns: list[str] | None, text: tuple[str, ...], span: Span | None):
    """Parquet and CSV, in record batches of BATCH_ROWS rows."""
    import pyarrow as pa

    with _open(part.path, part.where, span) as f:
        if part.kind == "parquet":
            import pyarrow.parquet as pq

            pf = _guard(lambda: pq.ParquetFile(f), part.where, span)
            batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        else:
            import pyarrow.csv as pcsv

            convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in text}, include_columns=columns)
            batches = _guard(lambda: pcsv.open_csv(f, convert_options=convert), part.where, span)
        n = 0
        it = iter(batches)
        while True:
            batch = _guard(lambda: next(it, None), part.where, span)
            if batch is None:
                return
            for row in batch.to_pylist():
                n += 1
                yield f"{part.where}: row {n}", n, row


__all__ = ["AUTOJ_GROUPS", "AUTOJ_OTHER", "DEFAULT", "PAIR_ROLES", "PRESETS", "RESPONSES", "RESPONSE_ROLES",
           "Preset", "Source", "autoj_group", "open_source", "preset", "preset_table"]
