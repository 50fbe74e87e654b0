"""Stage 3, the model-level graph: hash-consed nodes.

A `Node` is an operation on whole checkpoints (`load`, `add`, `merge`, `slerp`, ...).
Nodes are frozen and interned: building the same operation on the same arguments twice
returns the same object, so a shared subexpression is one node and is computed once
(common-subexpression elimination by construction). A node's type (tensor table,
config) is computed by check and carried beside it, never inside the key.

`build(roots)` collects every node that the roots need into one `networkx.DiGraph`
(edges from argument to user), for `algebra.api.build` and for finding a run's inputs
(`inputs`). Lowering does not use it: `lower.Lowerer` follows each node's `args` from
the output tensor it lowers, memoised per (node, tensor), and planning orders its steps
over a graph of reductions and writes of its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .family import in_use
from .source import Span

if TYPE_CHECKING:
    import networkx as nx

_INTERN: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class Node:
    __slots__ = ("op", "args", "params", "span", "type", "_hash", "__weakref__")

    op: str
    args: tuple[Node, ...]
    params: tuple[Any, ...]
    span: Span | None
    type: Any  # its CheckpointType, set by check (a function of op, args and params)

    def __new__(cls, op: str, args: Iterable[Node] = (), params: Iterable[Any] = (), span: Span | None = None):
        args = tuple(args)
        params = tuple(params)
        # arguments are interned, so their identities stand for their structure; an
        # argument outlives every node that holds it, so its id cannot be reused meanwhile
        key = (op, tuple(id(a) for a in args), params)
        node = _INTERN.get(key)
        if node is not None:
            return node
        node = object.__new__(cls)
        node.op, node.args, node.params, node.span, node.type = op, args, params, span, None
        node._hash = hash(key)
        _INTERN[key] = node
        return node

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"Node({self.op}, {len(self.args)} args, {self.params!r})"

    def walk(self) -> Iterator[Node]:
        """Every node reachable from this one, each once, arguments before users."""
        seen: set[int] = set()
        stack: list[tuple[Node, bool]] = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in seen:
                continue
            if expanded:
                seen.add(id(node))
                yield node
            else:
                stack.append((node, True))
                stack.extend((a, False) for a in reversed(node.args) if id(a) not in seen)

    def describe(self) -> str:
        """A one-line rendering in alg syntax, for plans, `info` and model cards. `load`
        and `rename` (layer surgery, tied heads: surgery.py) are structure; every other op
        renders as its family declares (family.describe), else as a call."""
        a = [x.describe() for x in self.args]
        p = self.params
        if self.op == "load":
            return f'load("{p[0].label}")'
        if self.op == "rename":
            kind, info = p[0], p[1]
            if kind == "layers":
                return f"layers({a[0]}, {info[0]}, {info[1]})"
            if kind == "stack":
                return f"stack({', '.join(a)})"
            return a[0]
        render = in_use().describes.get(self.op)
        if render is not None:
            return render(self, a)
        inner = ", ".join(a + [fmt_param(x) for x in p])
        return f"{self.op}({inner})"


def fmt_param(p: Any) -> str:
    """A node parameter as alg text."""
    if isinstance(p, float):
        return f"{p:g}"
    if isinstance(p, str):
        return f'"{p}"'
    return repr(p)


def build(roots: Iterable[Node]) -> nx.DiGraph:
    """The DiGraph of everything the roots need; node attribute `op`, edge attribute
    `pos` (argument position). Insertion order is deterministic (depth-first, arguments
    first), so iterating the graph's nodes is a valid, reproducible topological order."""
    import networkx as nx  # only for library users (api.build) and the card's input list

    g = nx.DiGraph()
    for root in roots:
        for node in root.walk():
            if node in g:
                continue
            g.add_node(node, op=node.op)
            for i, a in enumerate(node.args):
                g.add_edge(a, node, pos=i)
    return g


def inputs(g: nx.DiGraph) -> list[Node]:
    """The `load` nodes of a graph, in first-use order."""
    return [n for n in g.nodes if n.op == "load"]
