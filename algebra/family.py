"""Families: where builtins, lowerings, renderings and value types are declared.

A family is one module's worth of the language: the core builtins (builtins.py), layer
surgery, vocabulary alignment, each merge-method module, rewards. The module makes one
`Family` and declares on it, beside the code they name:

    family = Family("sparse")

    @family.builtin("ties(base: Checkpoint, ...)", "one-line summary")
    def _ties(call, base, ...): ...        # checks and builds a graph node

    @family.lowering("ties")
    def _lower_ties(low, node, name): ...   # one tensor of the node as a TExpr

    @family.describe("ties")
    def _show(node, args): ...              # the node in alg syntax, for plans and cards

Declaring registers nothing: `registry.py` lists the families in one place and assembles
them into the `Registry` in use. This module imports nothing of alg, so the stages that
look things up in the registry in use (`lower.Lowerer`, `graph.Node.describe`) can read it
without importing the families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .registry import Registry


@dataclass(frozen=True)
class Declared:
    """A builtin as its family declares it: `def <header>` implemented by `fn`."""

    header: str
    doc: str
    fn: Callable[..., Any]
    variadic: bool = False

    @property
    def name(self) -> str:
        return self.header.split("(", 1)[0].strip()


@dataclass(eq=False)
class Family:
    name: str
    builtins: list[Declared] = field(default_factory=list)
    lowerings: dict[str, Callable[..., Any]] = field(default_factory=dict)
    describes: dict[str, Callable[..., str]] = field(default_factory=dict)
    value_types: list[str] = field(default_factory=list)

    def builtin(self, header: str, doc: str, variadic: bool = False):
        """Declare the builtin `def <header>` with the decorated implementation, which
        receives a `signature.Call` and the bound arguments. With variadic=True the first
        parameter (typed List[T]) takes every positional argument (signature.VarParam)."""

        def declare(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.builtins.append(Declared(header, doc, fn, variadic))
            return fn

        return declare

    def lowering(self, op: str):
        """Declare how node op `op` lowers: `fn(lowerer, node, name) -> TExpr` for one
        float tensor `name` of the node's result (see lower.Lowerer)."""

        def declare(fn: Callable[..., Any]) -> Callable[..., Any]:
            if op in self.lowerings:
                raise ValueError(f"lowering for op '{op}' is defined twice")
            self.lowerings[op] = fn
            return fn

        return declare

    def describe(self, op: str):
        """Declare how node op `op` renders in alg syntax: `fn(node, rendered args) -> str`."""

        def declare(fn: Callable[..., str]) -> Callable[..., str]:
            self.describes[op] = fn
            return fn

        return declare

    def value_type(self, name: str) -> None:
        """Declare a value type that annotations may name (Reward, Pairs, ...). A value is
        of it when its class says so: `alg_type = name` (types.type_name)."""
        self.value_types.append(name)


# The registry in use: set by registry.py when it assembles the families, and swapped
# for a copy by `registry.scoped()`.
_IN_USE: list[Registry] = []


def in_use() -> Registry:
    if not _IN_USE:
        raise RuntimeError("no registry in use: import algebra.registry (algebra.check does)")
    return _IN_USE[-1]


def _push(registry: Registry) -> None:
    _IN_USE.append(registry)


def _pop(registry: Registry) -> None:
    assert _IN_USE and _IN_USE[-1] is registry, "registries are scoped in stack order"
    _IN_USE.pop()
