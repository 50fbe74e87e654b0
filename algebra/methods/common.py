"""Argument handling shared by the merge methods: lists of models, per-model parameters,
and the tensor-table rules that decide which tensors a method combines."""

from __future__ import annotations

import math
from typing import Any

from ..errors import AlgTypeError
from ..rules import same_tables
from ..signature import Call
from ..types import type_name
from ..values import Model

# the `tokenizer=` option of merge, slerp and every merge method (see vocab.align_models)
TOKENIZER_PARAM = "tokenizer: String | Checkpoint | None = none"


def weight_sum(ws) -> float | None:
    """The exact sum of finite weights (math.fsum), or None when it passes the largest
    float (weights near 1e308), which no normalisation survives."""
    try:
        total = math.fsum(ws)
    except OverflowError:
        return None
    return total if math.isfinite(total) else None


OVERFLOW = "the weights sum beyond the largest float (about 1.8e308), so they cannot be normalised"


def check_normalisable(call: Call, ws: tuple[Any, ...], advice: str, positive: bool = False) -> None:
    """Refuse, at `weights`, plain-number weights whose sum cannot divide them: 0 (or,
    with `positive`, below 0) or past the largest float. Schedules are checked per tensor
    when lowered."""
    if not all(isinstance(w, float) for w in ws):
        return
    total = weight_sum(ws)
    if total is None:
        raise call.error(AlgTypeError, f"{call.name}(): {OVERFLOW}", "weights")
    if total == 0 or (positive and total < 0):
        raise call.error(AlgTypeError, f"{call.name}(): the weights sum to {total:g}, so they cannot be "
                         f"normalised; {advice}", "weights")


def model_list(call: Call, ms: Any, param: str = "ms", at_least: int = 1) -> tuple[Model, ...]:
    """`ms` as a tuple of checkpoints, or a positioned error."""
    items = ms if isinstance(ms, tuple) else (ms,)
    for m in items:
        if not isinstance(m, Model):
            raise call.error(AlgTypeError, f"{call.name}(): {param} must be a list of checkpoints, "
                             f"but it holds {type_name(m)}", param)
    if len(items) < at_least:
        raise call.error(AlgTypeError, f"{call.name}() needs at least {at_least} checkpoint"
                         f"{'s' if at_least != 1 else ''} in {param}, got {len(items)}", param)
    return tuple(items)


def per_model(call: Call, value: Any, n: int, param: str, lo: float | None = None,
              hi: float | None = None) -> tuple[Any, ...]:
    """A scalar (or per-layer value) for every model, or a list of exactly n of them;
    numbers are checked against [lo, hi]."""
    items = value if isinstance(value, tuple) else (value,) * n
    if len(items) != n:
        raise call.error(AlgTypeError, f"{call.name}(): {param} has {len(items)} values for {n} "
                         "models; give one value, or one per model", param)
    out = []
    for v in items:
        if isinstance(v, bool) or v is None:
            raise call.error(AlgTypeError, f"{call.name}(): {param} must be numbers, not {type_name(v)}", param)
        if isinstance(v, int | float):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise call.error(AlgTypeError, f"{call.name}(): {param} must lie in {rng}, got {v}", param)
            v = float(v)
        out.append(v)
    return tuple(out)


def same_as_base(call: Call, base: Model, ms: tuple[Model, ...], base_param: str = "base",
                 ms_param: str = "ms") -> None:
    """Every model must have the base's tensor table (names and shapes)."""
    for m in ms:
        same_tables(base, m, f"{call.name}()", call.span, call.at(base_param), call.at(ms_param))


def with_tokenizer(call: Call, tokenizer: Any, base: Model | None,
                   ms: tuple[Model, ...]) -> tuple[Model | None, tuple[Model, ...]]:
    """A merge method's `tokenizer=` option: base and models remapped into one output
    vocabulary first (`align`, see vocab.py; "base" is the method's base, or its first
    model), so that models with different tokenizers can be merged. Unchanged when
    tokenizer is none."""
    if tokenizer is None:
        return base, ms
    from ..vocab import align_models

    models = ([base] if base is not None else []) + list(ms)
    out = align_models(call, models, tokenizer, base=base, param="ms")
    if base is not None:
        return out[0], tuple(out[1:])
    return None, tuple(out)
