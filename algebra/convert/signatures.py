"""alg's own names, read from where they are declared.

The converter must know which functions exist, which keywords each takes and their
defaults (to write a keyword only where mergekit's value differs from alg's default),
the language's keywords and the dtypes `save` accepts. Each of these facts lives in one
place in alg; this module reads them from there:

- builtin signatures: the registry (registry.py), which imports no torch;
- library functions: the `def`s of stdlib/prelude.alg (always in scope);
- keywords: `parser._KEYWORDS`;
- dtypes: the keys of `types.DTYPE_ALIASES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

_REQUIRED = object()


@dataclass(frozen=True)
class Signature:
    name: str
    params: tuple[str, ...]
    defaults: dict[str, Any]  # parameter -> default value, for those that have one
    types: dict[str, str]  # parameter -> its declared type, as written ("Param | List[Param]")

    def default(self, param: str) -> Any:
        if param not in self.params:
            raise KeyError(f"{self.name}() has no parameter '{param}'")
        return self.defaults.get(param, _REQUIRED)

    def has(self, param: str) -> bool:
        return param in self.params

    def per_tensor(self, param: str) -> bool:
        """Whether it takes a per-layer/per-tensor value (ramp, where): its type names Param."""
        return "Param" in self.types.get(param, "")


def builtin_signatures() -> dict[str, Signature]:
    """name -> Signature of every builtin of the registry in use (read afresh: a test may
    add a builtin or a reward op for a while, in a scoped registry)."""
    from ..registry import in_use

    sigs: dict[str, Signature] = {}
    for name, b in in_use().builtins.items():
        types = {p.name: str(p.type) for p in b.params if p.type is not None}
        sigs[name] = Signature(name, tuple(p.name for p in b.params), dict(b.defaults), types)
    return sigs


@cache
def library_functions() -> tuple[str, ...]:
    """The functions of stdlib/prelude.alg, in scope in every recipe."""
    from .. import ast
    from ..parser import parse
    from ..resources import stdlib_dir

    program = parse((stdlib_dir() / "prelude.alg").read_text(encoding="utf-8"), "prelude.alg")
    return tuple(s.name for s in program.stmts if isinstance(s, ast.Def))


@cache
def keywords() -> tuple[str, ...]:
    from ..parser import _KEYWORDS

    return tuple(sorted(_KEYWORDS))


def function_names() -> frozenset[str]:
    """Every name a recipe variable must not take: builtins and library functions."""
    return frozenset(builtin_signatures()) | frozenset(library_functions())


@cache
def save_dtypes() -> tuple[str, ...]:
    """The dtype names `save(..., dtype=)` accepts: types.DTYPE_ALIASES's keys."""
    from ..types import DTYPE_ALIASES

    return tuple(DTYPE_ALIASES)


def signature(name: str) -> Signature:
    return builtin_signatures()[name]


__all__ = ["Signature", "builtin_signatures", "function_names", "keywords", "library_functions",
           "save_dtypes", "signature"]
