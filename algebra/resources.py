"""Find the data the interpreter ships: grammar/, stdlib/ and examples/.

In a source tree they sit beside the package; in an installed wheel they are the
packages algebra._grammar, algebra._stdlib and algebra._examples (pyproject.toml maps
them). This is the only module that knows either layout.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

_TREE = Path(__file__).resolve().parent.parent


@cache
def _folder(name: str) -> Path:
    in_tree = _TREE / name
    marker = {"grammar": "alg.lark", "stdlib": "prelude.alg", "examples": "dogerm.alg"}[name]
    if (in_tree / marker).is_file():
        return in_tree
    spec = importlib.util.find_spec(f"algebra._{name}")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / marker).is_file():
                return Path(loc)
    raise FileNotFoundError(f"alg's {name}/ folder is missing from this installation")


def grammar_path() -> Path:
    return _folder("grammar") / "alg.lark"


def stdlib_dir() -> Path:
    return _folder("stdlib")


def examples_dir() -> Path:
    return _folder("examples")


def stdlib_names() -> list[str]:
    return sorted(p.stem for p in stdlib_dir().glob("*.alg"))
