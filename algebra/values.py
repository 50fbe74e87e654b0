"""Values that check computes with, besides plain Python scalars, strings, bools, None
and tuples (alg lists).

`Model` pairs a graph node with its checked type; `Closure` is a `def` or a lambda;
`Namespace` is an `import`ed library; `Sink` records one effect (save, print, info, a
REPL expression) for the executor to run, in program order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import ast
from .graph import Node
from .source import Span
from .types import CheckpointType, Function


@dataclass(frozen=True, eq=False)
class Model:
    """A lazy checkpoint: the node that computes it and what is known of it."""

    node: Node
    type: CheckpointType
    alg_type: ClassVar[str] = "Checkpoint"  # its name in alg (types.type_name)

    def __post_init__(self) -> None:
        # an interned node's type follows from its op, arguments and parameters, so the
        # first one computed is the type; lowering reads tensor tables from nodes
        if self.node.type is None:
            self.node.type = self.type

    def __repr__(self) -> str:
        return self.type.describe()


@dataclass(eq=False)
class Closure(Function):
    name: str
    params: tuple[ast.Param, ...]
    body: ast.Node
    env: Env
    span: Span

    def __repr__(self) -> str:
        return f"<function {self.name}({', '.join(p.name for p in self.params)})>"


@dataclass(eq=False)
class Namespace:
    name: str
    env: Env
    alg_type: ClassVar[str] = "Module"

    def __repr__(self) -> str:
        return f"<module {self.name}>"


@dataclass
class Sink:
    kind: str  # "save" | "print" | "info" | "show"
    span: Span
    value: Any
    options: dict[str, Any] = field(default_factory=dict)


class Env:
    """A lexical scope: names to values, with a parent."""

    def __init__(self, parent: Env | None = None, values: dict[str, Any] | None = None):
        self.parent = parent
        self.values: dict[str, Any] = dict(values or {})

    def lookup(self, name: str) -> Any:
        return self.where(name).values[name]

    def where(self, name: str) -> Env:
        """The scope that binds `name` (KeyError if none does)."""
        env: Env | None = self
        while env is not None:
            if name in env.values:
                return env
            env = env.parent
        raise KeyError(name)

    def names(self) -> list[str]:
        out: list[str] = []
        env: Env | None = self
        while env is not None:
            out.extend(env.values)
            env = env.parent
        return out

    def child(self, values: dict[str, Any] | None = None) -> Env:
        return Env(self, values)
