"""The builtins of per-layer control and layer surgery: ramp, where, layers, stack.

The value types and their rules live in schedule.py (ramp, where) and surgery.py
(layers, stack); this module only declares their alg signatures and checks arguments,
each error at the argument at fault.
"""

from __future__ import annotations

from typing import Any

from .errors import AlgTypeError, did_you_mean
from .family import Family
from .schedule import RAMP_RULES, Ramp, Schedule, Where, as_param, compile_pattern
from .signature import Call
from .surgery import layer_stack, stack, take_layers
from .values import Model

family = Family("layers")
builtin = family.builtin


@builtin(
    'ramp(values: List[Scalar], rule: String = "alg")',
    "A value per layer, piecewise linear over depth: ramp(v0, ..., vk) puts k+1 evenly "
    "spaced knots from the first layer to the last, and layer i of L gets the "
    "interpolation at i/(L-1) (mergekit's gradient lists). Outside the layer stack, the "
    "input embeddings (and their norm; a tied head, which is the embedding) get v0; the "
    "final norm, the output head and every other tensor after the layers get vk. Usable "
    "wherever a Param is: lerp(a, b, ramp(0, 1)), ramp(1, 0.5) * m, merge(rm, lm, "
    "ramp(0.1, 0.5)). Also ramp([v0, ..., vk]). rule=\"mergekit\" follows mergekit's "
    "gradients instead (what `alg convert mergekit` writes): every tensor outside the stack "
    "gets v0, and a stack of one layer gets vk.",
    variadic=True,
)
def _ramp(call: Call, values: tuple, rule: str = "alg") -> Schedule:
    if rule not in RAMP_RULES:
        raise call.error(AlgTypeError, f"ramp(): rule must be one of "
                         f"{', '.join(map(repr, RAMP_RULES))}, not '{rule}'"
                         f"{did_you_mean(rule, RAMP_RULES)}", "rule")
    if len(values) < 2:
        raise call.error(
            AlgTypeError,
            f"ramp() needs at least two values (the first layer's and the last's), got "
            f"{len(values)}; for one value everywhere write the number itself",
            "values",
        )
    return Ramp(tuple(float(v) for v in values), rule)


@builtin(
    "where(pattern: String, x: Param, y: Param)",
    "A value per tensor: x for tensors whose name matches pattern, y for the others. "
    "pattern is a regular expression searched anywhere in the name, so a plain substring "
    "works: where(\"self_attn\", 0.3, 0.7). x and y may be numbers or per-layer values "
    "(ramp, where); usable wherever a Param is. A pattern that matches no tensor of the "
    "checkpoint it is used on is warned about.",
)
def _where(call: Call, pattern: str, x: Any, y: Any) -> Schedule:
    problem = compile_pattern(pattern)
    if problem is not None:
        raise call.error(AlgTypeError, f"where(): '{pattern}' is not a valid regular expression: "
                         f"{problem}; a plain substring such as \"self_attn\" works", "pattern")
    return Where(pattern, as_param(x), as_param(y), span=call.span)


def _index(call: Call, v: float, param: str) -> int:
    if float(v) != int(v):
        raise call.error(AlgTypeError, f"layers(): {param} must be a whole number, not {v}", param)
    return int(v)


@builtin(
    "layers(m: Checkpoint, start: Int, stop: Int | None = none)",
    "Layers start, ..., stop-1 of m (half-open, like Python's slices and mergekit's "
    "layer_range; negative numbers count from the end; stop defaults to the last layer), "
    "renumbered from 0, with m's embeddings, final norm and head. The config's layer "
    "count and per-layer lists (layer_types, ...) follow. With stack() this builds "
    "frankenmerges; alone it prunes layers. Nothing is copied until a save.",
)
def _layers(call: Call, m: Model, start: float, stop: float | None) -> Model:
    a = layer_stack(m, "layers()", call.at("m"))
    n = a.n_layers
    s = _index(call, start, "start")
    e = n if stop is None else _index(call, stop, "stop")
    s2, e2 = (s + n if s < 0 else s), (e + n if e < 0 else e)
    if not 0 <= s2 < n:
        raise call.error(AlgTypeError, f"layers(): start {s} is out of range; this checkpoint has "
                         f"{n} layers, numbered 0 to {n - 1}", "start")
    if not 0 < e2 <= n:
        raise call.error(AlgTypeError, f"layers(): stop {e} is out of range; this checkpoint has "
                         f"{n} layers, so stop is at most {n} (it is not included)", "stop")
    if e2 <= s2:
        raise call.error(AlgTypeError, f"layers(): start {s} must come before stop {e} "
                         f"(the range is start, ..., stop-1)", "stop")
    return take_layers(m, s2, e2, call.span)


@builtin(
    "stack(parts: List[Checkpoint])",
    "A frankenmerge: the layers of each part, one after another and renumbered, usually "
    "of layers(...) slices: stack(layers(a, 0, 16), layers(b, 8, 24)). The input "
    "embeddings come from the first part, the tensors after the layers (final norm, "
    "head) from the last, as mergekit's slices do; the config is the first part's with "
    "the new layer count, and per-layer config lists concatenated. Also stack([p1, p2]).",
    variadic=True,
)
def _stack(call: Call, parts: tuple) -> Model:
    if not parts:
        raise call.error(AlgTypeError, "stack() needs at least one checkpoint", "parts")
    spans = [call.at(f"parts[{i}]") for i in range(len(parts))]
    return stack(list(parts), spans, call.span)
