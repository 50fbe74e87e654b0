"""Custom code a checkpoint folder asks transformers to run, found from its files as data.

transformers imports a folder's own Python files when its `config.json` has an
`auto_map` (classes for AutoConfig, AutoModel..., AutoTokenizer) or its
`tokenizer_config.json` has one, asking "run the custom code? [y/N]" on a terminal and
failing off one; `custom_pipelines` in config.json does the same for pipelines, and a
`custom_generate/` folder replaces `generate`. alg never runs a checkpoint's code:
`reward()` and `generate()` refuse such a folder at check time, every transformers
`from_pretrained` in alg passes `trust_remote_code=False`, and `save` carries the config
as data only (no code file is copied) and says so on the card.
"""

from __future__ import annotations

import json
from pathlib import Path

# (file, key): a key that names classes in the folder's own Python
JSON_MARKERS = (
    ("config.json", "auto_map"),
    ("config.json", "custom_pipelines"),
    ("tokenizer_config.json", "auto_map"),
)
CODE_FOLDERS = ("custom_generate",)  # code that replaces a model method


def code_markers(folder: Path | None) -> list[str]:
    """What in `folder` asks to run its own code, as 'config.json: auto_map' lines (empty
    when nothing does). A file that is missing or not a JSON object holds no marker (its
    other readers report it)."""
    if folder is None:
        return []
    found = []
    for name, key in JSON_MARKERS:
        path = Path(folder) / name
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, UnicodeDecodeError, ValueError):
            data = None
        if isinstance(data, dict) and data.get(key):
            found.append(f"{name}: {key}")
    for name in CODE_FOLDERS:
        if (Path(folder) / name).exists():
            found.append(f"{name}/")
    return found


def card_note(folder: Path) -> list[str]:
    """The card's lines for a saved folder whose config or tokenizer files still name
    custom code (kept as data): none when they do not."""
    markers = code_markers(folder)
    if not markers:
        return []
    return ["", "## Custom code", "",
            f"The input's {', '.join(f'`{m}`' for m in markers)} is kept as data only: alg copied "
            "no code file and ran none, so loading this folder with `trust_remote_code=True` "
            "finds no code of its own here."]
