"""The model card (README.md) written beside a saved checkpoint: what made it, from what.

It holds the recipe text, the expression that was saved, and each input named relative to
the recipe's folder with the sha256 of its weight files (the digest the Hugging Face Hub
shows as a file's LFS oid), so a merged model can be traced and rebuilt. The YAML front
matter lists as `base_model` every input that names a Hub id (the Hub places a merge in
its model tree from it). No machine path is written: an input outside the recipe's folder
is named by its own name only (its sha256 identifies it), and absolute paths in the recipe
text are shown the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..types import dtype_name, human_bytes
from ..version import __version__
from .remote_code import card_note

CARD_MARK = "Made by alg"  # how a later save knows an earlier alg output
_OLD_MARK = "Made by [alg]"  # the same line before cards lost their link


def is_alg_card(path: Path) -> bool:
    """Whether `path` is the card of an alg output (so overwrite may replace its folder)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    return any(line.startswith((CARD_MARK, _OLD_MARK)) for line in head.splitlines())

# a Hub repository id: "org/name" (the Hub's own rule: letters, digits, - _ . ; no "--" or
# ".." and no leading or trailing - or .)
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
# the Hub cache's folder for a repository: models--org--name (its snapshots below it)
_HUB_CACHE = re.compile(rf"models--({_HUB_PART})--({_HUB_PART})")
# folders that hold local checkpoints rather than name an organisation: "models/x" is a
# local path, not the Hub id of a user called "models"
_LOCAL_FOLDERS = frozenset({"models", "model", "checkpoints", "ckpt", "runs", "out", "output", "outputs",
                            "tmp", "data", "weights", "results", "merges", "merged", "saved"})


@dataclass(frozen=True)
class CardInput:
    label: str  # the source's label (its path as loaded): replaced by `name` in the card
    name: str  # relative to the recipe's folder, or the bare name of one outside it
    hub_id: str | None  # a Hub id the input names, for base_model
    files: list[tuple[str, str]]  # (file name, sha256) of each weight file


def is_hub_id(s: Any) -> bool:
    return isinstance(s, str) and bool(_HUB_ID.fullmatch(s)) and "--" not in s and ".." not in s


def input_name(path: Path, base_dir: Path | None) -> str:
    """How the card names an input: relative to the recipe's folder (forward slashes) when
    inside it, else its own name (a lone weight file with its folder's name)."""
    p = Path(os.path.abspath(path))
    if base_dir is not None:
        rel = os.path.relpath(p, os.path.abspath(base_dir))
        if not rel.startswith(".."):
            return Path(rel).as_posix()
    return f"{p.parent.name}/{p.name}" if p.suffix == ".safetensors" and p.parent.name else p.name


def hub_id(path: Path, name: str, config: dict | None) -> str | None:
    """The Hub id an input names: a folder given as `org/name` (org not a usual local
    folder name such as models/ or checkpoints/), a Hub cache snapshot
    (models--org--name/snapshots/...), else its config's `_name_or_path` when that is an id."""
    # a lone weight file names its folder when it is the folder's one file (a model's, or
    # a PEFT adapter's); any other .safetensors file names no Hub repository
    folder = next((name[: -len(f)] for f in ("/model.safetensors", "/adapter_model.safetensors")
                   if name.endswith(f)), name)
    if (is_hub_id(folder) and not folder.endswith(".safetensors")
            and folder.split("/")[0].lower() not in _LOCAL_FOLDERS):
        return folder
    for part in Path(os.path.abspath(path)).parts:
        m = _HUB_CACHE.fullmatch(part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    named = (config or {}).get("_name_or_path")
    if is_hub_id(named) and not Path(named).exists():
        return named
    return None


def describe_inputs(sources: list[Any], base_dir: Path | None) -> list[CardInput]:
    """One CardInput per on-disk source (hashes its weight files; run beside the save)."""
    out = []
    for s in sources:
        name = input_name(s.path, base_dir)
        out.append(CardInput(s.label, name, hub_id(s.path, name, s.config), s.file_hashes()))
    return out


def _strip_paths(text: str, inputs: list[CardInput], base_dir: Path | None) -> str:
    """`text` with each input's absolute path replaced by its card name, and the recipe's
    folder and the home folder dropped from any other absolute path."""
    for i in sorted(inputs, key=lambda i: -len(i.label)):
        if os.path.isabs(i.label):
            text = text.replace(i.label, i.name)
    if base_dir is not None:
        text = text.replace(str(Path(os.path.abspath(base_dir))) + os.sep, "")
    home = os.path.expanduser("~")
    if home not in ("", "/", "~"):
        text = text.replace(home + os.sep, "~" + os.sep)
    return text


def write_card(path: Path, sp: Any, recipe_text: str, inputs: list[CardInput],
               base_dir: Path | None = None) -> None:
    tp = sp.tensor_plan
    t = tp.model.type
    hub_ids = list(dict.fromkeys(i.hub_id for i in inputs if i.hub_id))
    front = ["---", "library_name: transformers"]
    if len(hub_ids) == 1:
        front.append(f"base_model: {hub_ids[0]}")
    elif hub_ids:
        front += ["base_model:"] + [f"- {h}" for h in hub_ids]
    front += ["tags:", "- alg", "- merge", "---"]
    lines = front + [
        "",
        f"# {sp.target.name}",
        "",
        f"{CARD_MARK} {__version__}, a model-algebra language, from the recipe below.",
        "",
        f"- architecture: {t.architecture}",
        f"- tensors: {len(tp.tensors)}, {human_bytes(tp.nbytes)} as {dtype_name(tp.out_dtype)}",
        f"- expression: `{_strip_paths(tp.model.node.describe(), inputs, base_dir)}`",
        "",
        "## Recipe",
        "",
        "```",
        _strip_paths(recipe_text.rstrip("\n"), inputs, base_dir),
        "```",
        "",
        "## Inputs",
        "",
    ]
    if inputs:
        lines += ["Named relative to the recipe's folder.", "",
                  "| input | file | sha256 |", "|---|---|---|"]
        for i in inputs:
            for fname, digest in i.files:
                lines.append(f"| `{i.name}` | `{fname}` | `{digest}` |")
    else:
        lines.append("(in-memory inputs only; no files to hash)")
    if sp.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {_strip_paths(n, inputs, base_dir)}" for n in sp.notes]
    lines += card_note(path.parent)  # custom code named by the saved config: data only
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
