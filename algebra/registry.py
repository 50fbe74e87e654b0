"""The registry: every family of the language, listed here, assembled into one table of
builtins, lowerings, renderings, value types and primitives.

`FAMILIES` is the one place that says which families alg has; nothing registers itself
by being imported. Importing this module assembles `REGISTRY` from them and puts it in
use (family.in_use), which is what the checker, the lowerer and `Node.describe` read.

Adding a family, or a builtin to one, from outside (a test, an extension):

    with scoped() as reg:          # a copy of the registry in use, discarded on exit
        reg.add(my_family)         # a Family declared like those in FAMILIES
        ...                        # check and run recipes that call its builtins
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from . import builtins as core
from . import layer_builtins, ops, vocab
from .family import Family, Primitive, _pop, _push, in_use
from .methods import fusion, geometric, lora, ram, sparse
from .ops import fusion as ops_fusion
from .ops import geometric as ops_geometric
from .ops import ram as ops_ram
from .ops import sparse as ops_sparse
from .reward import builtins as reward
from .signature import Builtin, make_builtin

FAMILIES: tuple[Family, ...] = (
    core.family,
    layer_builtins.family,
    vocab.family,
    sparse.family,
    geometric.family,
    ram.family,
    fusion.family,
    lora.family,
    reward.family,
    ops.family,
    ops_geometric.family,
    ops_ram.family,
    ops_fusion.family,
    ops_sparse.family,
)


class Registry:
    """Builtins by name, lowerings and renderings by node op, and value type names, of
    the families added so far. A name declared twice is an error."""

    def __init__(self) -> None:
        self.families: list[Family] = []
        self.builtins: dict[str, Builtin] = {}
        self.lowerings: dict[str, Callable[..., Any]] = {}
        self.describes: dict[str, Callable[..., str]] = {}
        self.value_types: list[str] = []
        self.primitives: dict[str, Primitive] = {}

    @classmethod
    def of(cls, families: tuple[Family, ...]) -> Registry:
        reg = cls()
        for f in families:
            reg.add(f)
        return reg

    def add(self, family: Family) -> None:
        for t in family.value_types:
            if t in self.value_types:
                raise ValueError(f"value type '{t}' is declared twice (family '{family.name}')")
        self.value_types.extend(family.value_types)
        made = [make_builtin(d.header, d.doc, d.fn, d.variadic, self.value_types) for d in family.builtins]
        names = [b.name for b in made]
        for table, new, what in ((self.builtins, names, "builtin"),
                                 (self.lowerings, list(family.lowerings), "lowering for op"),
                                 (self.describes, list(family.describes), "rendering of op"),
                                 (self.primitives, list(family.primitives), "primitive")):
            twice = [k for k in new if k in table or new.count(k) > 1]
            if twice:
                raise ValueError(f"{what} '{twice[0]}' is declared twice (family '{family.name}')")
        self.builtins.update(zip(names, made, strict=True))
        self.lowerings.update(family.lowerings)
        self.describes.update(family.describes)
        self.primitives.update(family.primitives)
        self.families.append(family)

    def copy(self) -> Registry:
        reg = Registry()
        reg.families = list(self.families)
        reg.builtins = dict(self.builtins)
        reg.lowerings = dict(self.lowerings)
        reg.describes = dict(self.describes)
        reg.value_types = list(self.value_types)
        reg.primitives = dict(self.primitives)
        return reg


REGISTRY = Registry.of(FAMILIES)
_push(REGISTRY)


@contextmanager
def scoped() -> Iterator[Registry]:
    """A copy of the registry in use, in use until the block ends; what is added to it
    is gone afterwards, whatever happens in the block. A Checker made inside the block
    sees its builtins."""
    reg = in_use().copy()
    _push(reg)
    try:
        yield reg
    finally:
        _pop(reg)


__all__ = ["FAMILIES", "REGISTRY", "Registry", "in_use", "scoped"]
