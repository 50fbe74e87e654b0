"""The model card (README.md) written beside a saved checkpoint: what made it, from what.

It holds the recipe text verbatim, the expression that was saved, and each input's path
with the sha256 of its weight files (the digest the Hugging Face Hub shows as a file's
LFS oid), so a merged model can be traced and rebuilt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..types import dtype_name, human_bytes
from .remote_code import card_note


def write_card(path: Path, sp: Any, recipe_text: str, hashes: list[tuple[str, list[tuple[str, str]]]]) -> None:
    tp = sp.tensor_plan
    t = tp.model.type
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- alg",
        "- merge",
        "---",
        "",
        f"# {sp.target.name}",
        "",
        f"Made by [alg](https://github.com/) {__version__}, a model-algebra language, from the recipe below.",
        "",
        f"- architecture: {t.architecture}",
        f"- tensors: {len(tp.tensors)}, {human_bytes(tp.nbytes)} as {dtype_name(tp.out_dtype)}",
        f"- expression: `{tp.model.node.describe()}`",
        "",
        "## Recipe",
        "",
        "```",
        recipe_text.rstrip("\n"),
        "```",
        "",
        "## Inputs",
        "",
    ]
    if hashes:
        lines += ["| input | file | sha256 |", "|---|---|---|"]
        for label, files in hashes:
            for fname, digest in files:
                lines.append(f"| `{label}` | `{fname}` | `{digest}` |")
    else:
        lines.append("(in-memory inputs only; no files to hash)")
    if sp.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in sp.notes]
    lines += card_note(path.parent)  # custom code named by the saved config: data only
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
