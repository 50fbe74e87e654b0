"""Layer surgery and head alignment: checkpoints whose tensors are other checkpoints'
tensors under new names.

One node op, "rename", serves them all. Its parameters are (kind, info, mapping) with
mapping = ((output name, argument index, input name), ...) in output order; lowering
maps each output tensor to the input's expression, so nothing is copied until a save
streams it. Kinds:

    layers     layers(m, start, stop): layers start..stop-1 renumbered from 0, with m's
               embeddings, final norm and head; the config's layer count (and per-layer
               lists such as `layer_types`) follow.
    stack      stack(p1, ..., pk): the parts' layers one after another; the input side
               (embeddings) from p1, everything after the stack (final norm, head) from pk,
               as mergekit's slices do; p1's config with the summed layer count.
    tie_head   a tied checkpoint (no head stored) given its embedding as the head another
               operand has, so that `untied + tied` works.
    drop_head  an untied operand's head left out where the result is tied.

Invariant: a rename's result type is a function of its arguments' types and (kind,
info), so interning by (op, args, params) stays sound.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

from .arch import LAYER_COUNT_KEYS, Arch, arch_of
from .errors import AlgShapeError, AlgTypeError
from .graph import Node
from .schedule import Overflow, _regex, resolve, schedules_in
from .source import Span
from .types import CheckpointType, TensorSpec
from .values import Model

Mapping_ = tuple[tuple[str, int, str], ...]


def renamed(parts: list[Model], kind: str, info: tuple, mapping: Mapping_, config: Mapping[str, Any] | None,
            notes: tuple[str, ...], span: Span | None) -> Model:
    tensors = {out: parts[i].type.tensors[name] for out, i, name in mapping}
    first = parts[0].type
    node = Node("rename", tuple(p.node for p in parts), (kind, info, mapping), span=span)
    return Model(node, CheckpointType(tensors, first.primary, config, first.notes + notes))


# ---- config -----------------------------------------------------------------------------


def per_layer_keys(config: Mapping[str, Any] | None, n_layers: int) -> list[str]:
    """Config lists that hold one entry per layer (`layer_types`, `no_rope_layers`, ...):
    a key that mentions layers, holding a list as long as the stack."""
    return [k for k, v in (config or {}).items()
            if "layer" in k and isinstance(v, list) and len(v) == n_layers]


def _with_layers(config: Mapping[str, Any] | None, n: int, lists: dict[str, list]) -> dict[str, Any] | None:
    if config is None:
        return None
    out = dict(config)
    for key in LAYER_COUNT_KEYS:
        if isinstance(out.get(key), int):
            out[key] = n
    out.update(lists)
    return out


# ---- layers(m, start, stop) -------------------------------------------------------------


def layer_stack(m: Model, what: str, span: Span) -> Arch:
    a = arch_of(m.type)
    if a.layer_prefix is None:
        raise AlgTypeError(
            f"{what}: found no numbered layer stack in this checkpoint ({m.type.architecture}); "
            "layers are tensors named like 'model.layers.N.…' or 'transformer.h.N.…'",
            span,
        )
    return a


def take_layers(m: Model, start: int, stop: int, span: Span) -> Model:
    """Layers [start, stop) of m (indices already checked), renumbered from 0."""
    a = arch_of(m.type)
    if (start, stop) == (0, a.n_layers):
        return m
    mapping: list[tuple[str, int, str]] = []
    layer_names = _by_layer(m, a)
    pre = [n for n in m.type.tensors if a.side(n) == "pre"]
    post = [n for n in m.type.tensors if a.side(n) == "post"]
    mapping += [(n, 0, n) for n in pre]
    for j in range(start, stop):
        mapping += [(a.layer_name(j - start, a.suffix(n)), 0, n) for n in layer_names[j]]
    mapping += [(n, 0, n) for n in post]
    lists = {k: list(m.type.config[k][start:stop]) for k in per_layer_keys(m.type.config, a.n_layers)}
    config = _with_layers(m.type.config, stop - start, lists)
    return renamed([m], "layers", (start, stop), tuple(mapping), config, (), span)


def _by_layer(m: Model, a: Arch) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {i: [] for i in range(a.n_layers)}
    for n in m.type.tensors:
        i = a.layer_of.get(n)
        if i is not None:
            out[i].append(n)
    return out


# ---- stack(p1, ..., pk) -----------------------------------------------------------------


def stack(parts: list[Model], spans: list[Span], span: Span) -> Model:
    """The parts' layers in order; see the module docstring for the other tensors."""
    archs = [layer_stack(p, "stack()", s) for p, s in zip(parts, spans, strict=True)]
    if len(parts) == 1:
        return parts[0]
    first, last = archs[0], archs[-1]
    f_layers = _by_layer(parts[0], first)
    ref = {first.suffix(n): parts[0].type.tensors[n] for n in f_layers[0]}
    for k, (p, a, s) in enumerate(zip(parts, archs, spans, strict=True)):
        if a.layer_prefix != first.layer_prefix:
            raise AlgShapeError(
                f"stack(): part {k + 1} names its layers '{a.layer_prefix}N.' but part 1 "
                f"'{first.layer_prefix}N.'; stack parts of one architecture", s)
        table = {a.suffix(n): p.type.tensors[n] for n in _by_layer(p, a)[0]}
        _same_layer(table, ref, k, s)
    k_last = len(parts) - 1
    pre = [n for n in parts[0].type.tensors if first.side(n) == "pre"]
    post_names = [n for n in parts[0].type.tensors if first.side(n) == "post"]
    mapping: list[tuple[str, int, str]] = [(n, 0, n) for n in pre]
    i = 0
    for k, (p, a) in enumerate(zip(parts, archs, strict=True)):
        for names in _by_layer(p, a).values():
            mapping += [(first.layer_name(i, a.suffix(n)), k, n) for n in names]
            i += 1
    lists: dict[str, list] = {}
    keys = per_layer_keys(parts[0].type.config, first.n_layers)
    for key in keys:
        values: list | None = []
        for p, a in zip(parts, archs, strict=True):
            v = (p.type.config or {}).get(key)
            if values is None or not (isinstance(v, list) and len(v) == a.n_layers):
                values = None
                break
            values.extend(v)
        if values is not None:
            lists[key] = values
    notes = [f"stack() of {len(parts)} parts, {i} layers: the embeddings come from part 1, "
             f"the tensors after the layers (final norm, head) from part {len(parts)}"]
    lt = parts[-1].type.tensors
    for n in post_names:
        want = parts[0].type.tensors[n]
        if n in lt and lt[n].shape == want.shape:
            mapping.append((n, k_last, n))
        elif n == first.head and last.tied and last.embedding is not None \
                and lt[last.embedding].shape == want.shape:
            mapping.append((n, k_last, last.embedding))
            notes.append(f"part {len(parts)} is tied: its embedding '{last.embedding}' serves as '{n}'")
        elif n in lt:
            raise AlgShapeError(
                f"stack(): '{n}' has shape {list(lt[n].shape)} in part {len(parts)} but "
                f"{list(want.shape)} in part 1", spans[-1])
        else:
            raise AlgShapeError(f"stack(): part {len(parts)} has no '{n}', which part 1 has "
                                "(the last part provides the tensors after the layers)", spans[-1])
    if last.head is not None and last.head not in parts[0].type.tensors and first.tied:
        notes.append(f"part {len(parts)}'s own '{last.head}' is not used: part 1 ties its head "
                     "to its embedding, and so does the result")
    config = _with_layers(parts[0].type.config, i, lists)
    dropped = [key for key in keys if key not in lists]
    if dropped:
        notes.append(f"the parts' configs disagree on {', '.join(dropped)}; left to transformers' default")
        config = {key: v for key, v in (config or {}).items() if key not in dropped}
    return renamed(parts, "stack", (len(parts),), tuple(mapping), config, tuple(notes), span)


def _same_layer(table: dict[str, TensorSpec], ref: dict[str, TensorSpec], k: int, span: Span) -> None:
    for name, spec in ref.items():
        other = table.get(name)
        if other is None:
            raise AlgShapeError(f"stack(): part {k + 1}'s layers have no '{name}', which part 1's "
                                "layers have; stack parts of one architecture", span)
        if other.shape != spec.shape:
            raise AlgShapeError(
                f"stack(): layer tensor '{name}' has shape {list(other.shape)} in part {k + 1} but "
                f"{list(spec.shape)} in part 1 (different hidden sizes?); stacked layers must "
                "come from models of one size", span)
    extra = [n for n in table if n not in ref]
    if extra:
        raise AlgShapeError(f"stack(): part {k + 1}'s layers hold '{extra[0]}', which part 1's "
                            "layers do not; stack parts of one architecture", span)


# ---- tied heads ---------------------------------------------------------------------------


def align_heads(a: Model, b: Model, span: Span | None) -> tuple[Model, Model]:
    """Make b's tensor names match a's where the two differ only in a tied head:
    a has its own head and b is tied -> b's embedding stands in for the head;
    a is tied and b has a head -> b's head is left out (the result is tied like a).
    Anything else is returned unchanged, for the caller's usual table check."""
    ta, tb = a.type.tensors, b.type.tensors
    if ta.keys() == tb.keys():
        return a, b
    A, B = arch_of(a.type), arch_of(b.type)
    if A.head and A.head not in tb and B.tied and B.embedding in tb and \
            tb[B.embedding].shape == ta[A.head].shape and set(tb) | {A.head} == set(ta):
        note = (f"the right operand has no '{A.head}': its output head is tied to its input "
                f"embedding, so '{B.embedding}' is used in its place")
        mapping = tuple((n, 0, B.embedding if n == A.head else n) for n in ta)
        return a, renamed([b], "tie_head", (note,), mapping, b.type.config, (note,), span)
    if B.head and B.head not in ta and A.tied and set(ta) | {B.head} == set(tb):
        note = (f"the right operand's own '{B.head}' is not used: the left operand ties its "
                "head to its input embedding, and so does the result")
        mapping = tuple((n, 0, n) for n in tb if n != B.head)
        return a, renamed([b], "drop_head", (note,), mapping, b.type.config, (note,), span)
    return a, b


# ---- checks when a value reaches a sink -------------------------------------------------

_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_model(m: Model, checker: Any, at: Span) -> None:
    """Before anything runs: resolve every schedule on every tensor it applies to (a
    division by zero is an error at the division), warn about where() patterns that
    match no tensor, ramps over checkpoints without layers, and stand-in heads. Each
    warning is given once per checker. Warnings whose place is inside the stdlib are
    shown at `at` (the sink's call)."""
    seen = _WARNED.setdefault(checker, set())

    def warn(message: str, span: Span | None) -> None:
        if span is None or span.source.name.startswith("stdlib/"):
            span = at
        key = (message, id(span.source), span.start)
        if key not in seen:
            seen.add(key)
            checker.warning(message, span)

    for node in m.node.walk():
        if node.op == "rename" and node.params[0] in ("tie_head", "drop_head"):
            warn(node.params[1][0], node.span)
        scheds = schedules_in(node.params)
        if not scheds:
            continue
        t: CheckpointType = node.type
        a = arch_of(t)
        floats = [n for n, s in t.tensors.items() if s.is_float]
        for s in scheds:
            for n in floats:
                try:
                    resolve(s, n, a)
                except ZeroDivisionError as e:
                    i = a.layer(n)
                    where = f"layer {i}" if i is not None else (
                        "the input embeddings" if a.side(n) == "pre" else "the tensors after the layers")
                    what = "is not finite" if isinstance(e, Overflow) else "divides by zero"
                    raise AlgTypeError(f"the per-layer value {s!r} {what} for tensor '{n}' "
                                       f"({where})", node.span) from None
            for w in s.wheres():
                if not any(_regex(w.pattern).search(n) for n in t.tensors):
                    example = next(iter(a.layer_of), next(iter(t.tensors), ""))
                    warn(f"where(\"{w.pattern}\", ...) matches no tensor of this checkpoint "
                         f"({t.architecture}; names look like '{example}'), so it is "
                         f"{_branch(w.other)} everywhere", w.span or node.span)
            if s.uses_depth() and a.layer_prefix is None:
                warn(f"{s!r}: this checkpoint has no numbered layers, so a ramp gives its first "
                     "value to embeddings and its last to every other tensor", node.span)


def _branch(v: Any) -> str:
    return repr(v) if not isinstance(v, float) else f"{v:g}"


__all__ = ["align_heads", "check_model", "layer_stack", "per_layer_keys", "stack", "take_layers"]
