"""Checkpoint type rules shared by the builtins: which tensor tables combine, the type
of a derived checkpoint, and checkpoint arithmetic (`a + b`, `0.5 * a`), all computed from
headers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .arch import arch_of
from .errors import AlgShapeError, AlgTypeError
from .graph import Node
from .schedule import as_param, is_param, neg, recip
from .source import Span
from .surgery import align_heads
from .types import type_name
from .values import Model
from .vocab import ALIGN_HINT, check_same_vocab


def _first(names, limit: int = 3) -> str:
    names = list(names)
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def same_tables(a: Model, b: Model, what: str, span: Span, aspan: Span, bspan: Span) -> None:
    """Elementwise ops need the same tensor names with the same shapes."""
    ta, tb = a.type.tensors, b.type.tensors
    only_a = [n for n in ta if n not in tb]
    only_b = [n for n in tb if n not in ta]
    if only_a or only_b:
        side, names, where = ("left", only_a, bspan) if only_a else ("right", only_b, aspan)
        err = AlgShapeError(
            f"{what} needs the same tensors on both sides, but {_first(names)} "
            f"{'is' if len(names) == 1 else 'are'} only on the {side}",
            span,
        )
        err.with_note("the other side is here", where)
        if only_a and only_b:
            err.with_note(f"and {_first(only_b)} only on the right")
        raise err
    for n, spec in ta.items():
        if spec.shape != tb[n].shape:
            err = AlgShapeError(
                f"{what}: tensor '{n}' has shape {list(spec.shape)} on the left but "
                f"{list(tb[n].shape)} on the right",
                span,
            )
            if spec.shape[1:] == tb[n].shape[1:] and _is_vocab(n, a, b):
                err.with_note(f"the vocabularies differ ({spec.shape[0]} vs {tb[n].shape[0]} tokens); "
                              + ALIGN_HINT)
                err.with_note("merge(rm, lm, lam) merges the shared token rows of a reward model and an LM")
            raise err
    check_same_vocab(a, b, what, span, aspan, bspan)


def derived(node: Node, primary: Model, tensors=None, notes: tuple[str, ...] = ()) -> Model:
    t = primary.type
    # replace() carries every other field (config, tokenizer, ...) from the primary
    return Model(node, dataclasses.replace(t, tensors=tensors if tensors is not None else t.tensors,
                                           notes=t.notes + notes))


def scalar_param(value: Any) -> Any:
    """Scalars enter graph keys as floats so that 1 and 1.0 are one node; a schedule
    (ramp, where) enters as itself and is resolved per tensor when lowered."""
    return as_param(value)


def model_arith(op: str, left: Any, right: Any, span: Span, lspan: Span, rspan: Span) -> Any:
    """`left op right` where at least one side is a checkpoint."""
    lm, rm = isinstance(left, Model), isinstance(right, Model)
    sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
    for v, s in ((left, lspan), (right, rspan)):
        if not isinstance(v, Model) and not is_param(v):
            raise AlgTypeError(
                f"cannot use {type_name(v)} in checkpoint arithmetic ('{sym}'); "
                "a checkpoint combines with checkpoints, scalars and per-layer values",
                s,
            )
    if lm and rm:
        left, right = align_heads(left, right, span)
        same_tables(left, right, f"'{sym}'", span, lspan, rspan)
        return derived(Node(op, (left.node, right.node), span=span), left)
    # a scalar or a schedule (resolved per tensor when lowered)
    if lm:
        c = as_param(right)
        if op == "add":
            return derived(Node("shift", (left.node,), (c,), span=span), left)
        if op == "sub":
            return derived(Node("shift", (left.node,), (neg(c),), span=span), left)
        if op == "mul":
            return derived(Node("scale", (left.node,), (c,), span=span), left)
        if c == 0:
            raise AlgTypeError("division of a checkpoint by zero", rspan)
        return derived(Node("scale", (left.node,), (recip(c),), span=span), left)
    c = as_param(left)
    if op == "add":
        return derived(Node("shift", (right.node,), (c,), span=span), right)
    if op == "sub":
        negated = model_neg(right, span)
        return derived(Node("shift", (negated.node,), (c,), span=span), right)
    if op == "mul":
        return derived(Node("scale", (right.node,), (c,), span=span), right)
    return derived(Node("rdiv", (right.node,), (c,), span=span), right)


def model_neg(value: Model, span: Span) -> Model:
    return derived(Node("scale", (value.node,), (-1.0,), span=span), value)


def _is_vocab(name: str, a: Model, b: Model) -> bool:
    """Whether a tensor's first dimension counts tokens in both checkpoints (the tensor
    roles are `arch.Arch`'s)."""
    return arch_of(a.type).is_token_rows(name) and arch_of(b.type).is_token_rows(name)
