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

    @family.primitive("tv_combine", arity=-1)
    def tv_combine(*chunks, ...): ...       # an elementwise torch function (ops/)

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


@dataclass(frozen=True)
class Primitive:
    """An elementwise tensor primitive (see ops/__init__.py): a pure torch function over
    equally shaped chunks plus scalar parameters."""

    name: str
    fn: Callable[..., Any]
    arity: int  # tensor arguments (-1: any number); scalar parameters follow them
    doc: str
    # extra chunk-sized buffers alive during the call, beyond the result: a number, or a
    # function of the Map expression (for primitives whose scratch depends on their arity)
    scratch: float | Callable[[object], float] = 0
    positional: bool = False  # fn receives e0= (see ops/__init__.py)
    # fn sees whole rows of its result's last dimension (or a function of the Map
    # expression saying whether this call needs them)
    rowwise: bool | Callable[[object], bool] = False
    pooled: bool = False  # fn receives pool= (the evaluator's ChunkPool) for its temporaries
    # fn receives dtype= (the compute dtype) and may be handed an argument as stored
    # (`Evaluator.stored`: a checked bfloat16 input chunk in a float32 run), which it converts
    stored: bool = False

    def scratch_for(self, expr: object) -> float:
        return float(self.scratch(expr) if callable(self.scratch) else self.scratch)

    def rowwise_for(self, expr: object) -> bool:
        return bool(self.rowwise(expr) if callable(self.rowwise) else self.rowwise)


@dataclass(eq=False)
class Family:
    name: str
    builtins: list[Declared] = field(default_factory=list)
    lowerings: dict[str, Callable[..., Any]] = field(default_factory=dict)
    describes: dict[str, Callable[..., str]] = field(default_factory=dict)
    value_types: list[str] = field(default_factory=list)
    primitives: dict[str, Primitive] = field(default_factory=dict)

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

    def primitive(self, name: str, arity: int, scratch: float | Callable[[object], float] = 0,
                  positional: bool = False, rowwise: bool | Callable[[object], bool] = False,
                  pooled: bool = False, stored: bool = False):
        """Declare an elementwise primitive (ops/__init__.py): a node whose op is its name
        lowers to a `Map` over its tensor arguments and scalar parameters."""

        def declare(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self.primitives:
                raise ValueError(f"primitive '{name}' is defined twice")
            self.primitives[name] = Primitive(name, fn, arity, (fn.__doc__ or "").strip(), scratch,
                                              positional, rowwise, pooled, stored)
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
