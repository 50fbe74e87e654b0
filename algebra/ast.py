"""Frozen AST nodes. Every node carries the span it was parsed from.

Spans are excluded from equality so that two parses of the same text compare equal
whatever their positions; `dump` prints positions for golden tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .source import Span


@dataclass(frozen=True)
class Node:
    span: Span = field(compare=False, repr=False, kw_only=True)


# ---- expressions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Num(Node):
    value: int | float


@dataclass(frozen=True)
class Str(Node):
    value: str


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class NoneLit(Node):
    pass


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class List(Node):
    items: tuple[Node, ...]


@dataclass(frozen=True)
class ListComp(Node):
    elt: Node
    var: str
    iter: Node
    cond: Node | None


@dataclass(frozen=True)
class Keyword(Node):
    name: str
    value: Node


@dataclass(frozen=True)
class Call(Node):
    func: Node
    args: tuple[Node, ...]
    kwargs: tuple[Keyword, ...]


@dataclass(frozen=True)
class Attr(Node):
    value: Node
    name: str


@dataclass(frozen=True)
class Index(Node):
    value: Node
    index: Node


@dataclass(frozen=True)
class BinOp(Node):
    op: str  # one of + - * /
    left: Node
    right: Node


@dataclass(frozen=True)
class UnaryOp(Node):
    op: str  # - or +
    operand: Node


@dataclass(frozen=True)
class Compare(Node):
    """`a < b <= c`: chained as in Python (a < b and b <= c, b evaluated once)."""

    ops: tuple[str, ...]  # each one of < <= > >= == !=
    operands: tuple[Node, ...]  # one more than ops


@dataclass(frozen=True)
class BoolOp(Node):
    op: str  # and, or; a chain `a and b and c` nests to the left like BinOp
    left: Node
    right: Node


@dataclass(frozen=True)
class Not(Node):
    operand: Node


@dataclass(frozen=True)
class IfExp(Node):
    """`body if cond else orelse`"""

    cond: Node
    body: Node
    orelse: Node


@dataclass(frozen=True)
class Lambda(Node):
    params: tuple[str, ...]
    body: Node


# ---- statements ----------------------------------------------------------------------


@dataclass(frozen=True)
class TypeExpr(Node):
    name: str
    args: tuple[TypeExpr, ...] = ()

    def __str__(self) -> str:
        if self.name == "|":
            return " | ".join(map(str, self.args))
        return self.name + (f"[{', '.join(map(str, self.args))}]" if self.args else "")


@dataclass(frozen=True)
class Param(Node):
    name: str
    type: TypeExpr | None
    default: Node | None


@dataclass(frozen=True)
class Assign(Node):
    name: str
    value: Node


@dataclass(frozen=True)
class Def(Node):
    name: str
    params: tuple[Param, ...]
    body: Node


@dataclass(frozen=True)
class Use(Node):
    name: str


@dataclass(frozen=True)
class Import(Node):
    path: str
    alias: str


@dataclass(frozen=True)
class ExprStmt(Node):
    expr: Node


@dataclass(frozen=True)
class Program(Node):
    stmts: tuple[Node, ...]


def literal_value(node: Node) -> Any:
    """The value of a literal expression (builtin defaults, --set values)."""
    if isinstance(node, Num | Str | Bool):
        return node.value
    if isinstance(node, NoneLit):
        return None
    if isinstance(node, UnaryOp) and node.op == "-" and isinstance(node.operand, Num):
        return -node.operand.value
    if isinstance(node, List):
        return tuple(literal_value(x) for x in node.items)
    from .errors import AlgTypeError

    raise AlgTypeError("expected a literal (number, string, true/false, none or a list)", node.span)


def dump(node: object, indent: int = 0) -> str:
    """An indented, positioned rendering of an AST, stable enough for golden files."""
    pad = "  " * indent
    if isinstance(node, Node):
        head = f"{pad}{type(node).__name__} @{node.span.line}:{node.span.col}"
        scalars, children = [], []
        for f in fields(node):
            if f.name == "span":
                continue
            v = getattr(node, f.name)
            if isinstance(v, Node) or (isinstance(v, tuple) and v and isinstance(v[0], Node)):
                children.append((f.name, v))
            elif isinstance(v, tuple) and not v:
                continue
            else:
                scalars.append(f"{f.name}={v!r}")
        lines = [head + (" " + " ".join(scalars) if scalars else "")]
        for name, v in children:
            lines.append(f"{pad}  .{name}")
            for item in v if isinstance(v, tuple) else (v,):
                lines.append(dump(item, indent + 2))
        return "\n".join(lines)
    return f"{pad}{node!r}"
