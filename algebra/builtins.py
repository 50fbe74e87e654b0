"""The builtin functions of alg: signatures, argument binding, and type rules.

Every builtin is declared once, in this module, by its alg signature (a `def` header
parsed by alg's own parser) and a Python function that receives the bound arguments.
For checkpoint operations the function only *checks* and builds a graph node: it
computes the result's tensor table from its arguments' headers and reports any
mismatch with the position of the argument at fault. The arithmetic of tensors lives in
`lower.py` and `ops/`; nothing here reads a weight.

The operations written in alg itself (lerp, liti, ema, task_vector, ...) are in
stdlib/prelude.alg over these primitives.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import ast
from .arch import arch_of
from .ast import literal_value
from .errors import SIZE_ENV, AlgError, AlgLimitError, AlgShapeError, AlgTypeError, did_you_mean
from .graph import Node
from .schedule import Schedule, as_param, is_param, neg, recip
from .source import Span
from .surgery import align_heads, check_model
from .types import DTYPE_ALIASES, Function, parse_size, type_name
from .values import Closure, Model, Namespace, Sink

if TYPE_CHECKING:
    from .check import Checker

# ---- types --------------------------------------------------------------------------

# Param: a number or a per-layer/per-tensor value (ramp, where; see schedule.py), for
# method weights; Scalar stays strict where a real number is required (range, rtol); Int is
# a Scalar that is a whole number in INT_RANGE (seeds, counts, layer indices), bound as an int
TYPE_NAMES = ("Any", "Scalar", "Int", "Param", "Schedule", "String", "Bool", "None", "Checkpoint",
              "Function", "List", "Module")

# Every number of alg is finite and at most FLOAT_MAX in size (a float64 can hold it):
# number literals, arithmetic results and arguments are checked against this.
FLOAT_MAX = sys.float_info.max
INT_RANGE = (-(2**63), 2**63 - 1)  # what an Int may be: a signed 64-bit integer


def is_finite(v: Any) -> bool:
    """Whether a number is one alg allows (see FLOAT_MAX); other values pass."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return -FLOAT_MAX <= v <= FLOAT_MAX  # exact: Python compares int and float exactly
    return True


def show_number(text: str) -> str:
    """A number's literal text for a message, shortened when it is long."""
    return text if len(text) <= 24 else f"{text[:12]}...{text[-4:]} ({len(text)} characters)"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return (_is_number(v) and is_finite(v) and float(v).is_integer()
            and INT_RANGE[0] <= v <= INT_RANGE[1])
# value types that other modules define (Reward, Responses, ...): name -> membership test;
# registered with `register_type` before any builtin that names them
EXTRA_TYPES: dict[str, Callable[[Any], bool]] = {}


def register_type(name: str, test: Callable[[Any], bool]) -> None:
    EXTRA_TYPES[name] = test


def check_type_expr(t: ast.TypeExpr) -> None:
    if t.name == "|":
        for a in t.args:
            check_type_expr(a)
        return
    if t.name not in TYPE_NAMES and t.name not in EXTRA_TYPES:
        known = (*TYPE_NAMES, *EXTRA_TYPES)
        raise AlgTypeError(f"unknown type '{t.name}'{did_you_mean(t.name, known)}", t.span)
    if t.args and t.name != "List":
        raise AlgTypeError(f"type '{t.name}' takes no parameters", t.span)
    if len(t.args) > 1:
        raise AlgTypeError("List takes one element type", t.span)
    for a in t.args:
        check_type_expr(a)


def conforms(value: Any, t: ast.TypeExpr) -> bool:
    name = t.name
    if name == "|":
        return any(conforms(value, a) for a in t.args)
    if name == "Any":
        return True
    if name == "Scalar":
        return _is_number(value) and is_finite(value)
    if name == "Int":
        return _is_int(value)
    if name == "Param":
        return is_param(value) and is_finite(value)
    if name == "Schedule":
        return isinstance(value, Schedule)
    if name == "String":
        return isinstance(value, str)
    if name == "Bool":
        return isinstance(value, bool)
    if name == "None":
        return value is None
    if name == "Checkpoint":
        return isinstance(value, Model)
    if name == "Function":
        return isinstance(value, Function)
    if name == "Module":
        return isinstance(value, Namespace)
    if name == "List":
        return isinstance(value, tuple) and (not t.args or all(conforms(v, t.args[0]) for v in value))
    if name in EXTRA_TYPES:
        return EXTRA_TYPES[name](value)
    return False


# ---- calls --------------------------------------------------------------------------


@dataclass
class Call:
    """What a builtin sees of its call site."""

    checker: Checker
    span: Span  # the whole call
    spans: dict[str, Span]  # argument name -> span of the argument expression
    name: str

    def at(self, param: str) -> Span:
        return self.spans.get(param, self.span)

    def error(self, cls: type[AlgError], message: str, param: str | None = None) -> AlgError:
        return cls(message, self.at(param) if param else self.span)


@dataclass(eq=False)
class Builtin(Function):
    name: str
    params: tuple[ast.Param, ...]
    impl: Callable[..., Any]
    doc: str
    defaults: dict[str, Any]

    def __repr__(self) -> str:
        return f"<builtin {self.signature()}>"

    def signature(self) -> str:
        parts = []
        for p in self.params:
            if isinstance(p, VarParam):
                parts.append(f"{p.name}...: {p.type.args[0] if p.type and p.type.args else 'Any'}")
                continue
            s = p.name + (f": {p.type}" if p.type else "")
            if p.name in self.defaults:
                s += f" = {_show_default(self.defaults[p.name])}"
            parts.append(s)
        return f"{self.name}({', '.join(parts)})"


def _show_default(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


class VarParam(ast.Param):
    """A builtin's first parameter that takes every positional argument, or one list:
    stack(a, b, c) and stack([a, b, c]) bind parts = [a, b, c]. Its type is List[T];
    each item is checked against T at its own position, and `Call.at("parts[i]")` is the
    i-th item's span."""


def _pack(fname: str, p: VarParam, args: list[tuple[Any, Span]]) -> tuple[list, dict[str, Span]]:
    if len(args) == 1 and isinstance(args[0][0], tuple):
        items = [(v, args[0][1]) for v in args[0][0]]
        packed = (args[0][0], args[0][1])
    else:
        items = list(args)
        packed = (tuple(v for v, _ in args), args[0][1].to(args[-1][1]))
    elem = p.type.args[0] if p.type is not None and p.type.args else None
    spans = {}
    for i, (v, s) in enumerate(items):
        spans[f"{p.name}[{i}]"] = s
        if elem is not None and not conforms(v, elem):
            raise AlgTypeError(f"argument {i + 1} of {fname}() must be {elem}, not {type_name(v)}", s)
    return [packed], spans


def _sig_part(p: ast.Param, defaults: dict[str, Any] | None) -> str:
    """How a parameter reads in a short signature: `lam`, `tokenizer=none`, `parts...`."""
    if isinstance(p, VarParam):
        return f"{p.name}..."
    if defaults is not None and p.name in defaults:
        return f"{p.name}={_show_default(defaults[p.name])}"
    return p.name if p.default is None else f"{p.name}=..."


def bind(
    fname: str,
    params: tuple[ast.Param, ...],
    defaults: dict[str, Any] | None,
    args: list[tuple[Any, Span]],
    kwargs: list[tuple[str, Any, Span, Span]],
    call_span: Span,
) -> tuple[dict[str, Any], dict[str, Span]]:
    """Match positional and keyword arguments to parameters; check annotated types.
    `defaults` holds evaluated defaults (builtins); closures pass None and evaluate
    missing defaults themselves (they are marked by absence from the result).
    A variadic builtin's first parameter is a `VarParam`: it takes every positional
    argument (or one list), and item i's span is spans["NAME[i]"]."""
    names = [p.name for p in params]
    item_spans: dict[str, Span] = {}
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    sig = f"{fname}({', '.join(_sig_part(p, defaults) for p in params)})"
    if params and isinstance(params[0], VarParam) and args:
        args, item_spans = _pack(fname, params[0], args)
    if len(args) > len(params):
        raise AlgTypeError(
            f"{fname}() takes at most {len(params)} argument{'s' if len(params) != 1 else ''} "
            f"({', '.join(names)}), got {len(args)}",
            args[len(params)][1],
        )
    for p, (v, s) in zip(params, args, strict=False):
        values[p.name], spans[p.name] = v, s
    for kname, v, kspan, vspan in kwargs:
        if kname not in names:
            raise AlgTypeError(
                f"{fname}() has no parameter '{kname}'{did_you_mean(kname, names)}", kspan
            ).with_note(f"it takes {sig}")
        if kname in values:
            raise AlgTypeError(f"{fname}() got two values for '{kname}'", kspan)
        values[kname], spans[kname] = v, vspan
    for p in params:
        if p.name in values:
            continue
        if defaults is not None and p.name in defaults:
            values[p.name] = defaults[p.name]
        elif p.default is None:
            raise AlgTypeError(f"{fname}() is missing argument '{p.name}'; it takes {sig}", call_span)
    for p in params:
        if p.type is None or p.name not in values:
            continue
        v = values[p.name]
        if not conforms(v, p.type):
            raise AlgTypeError(f"argument '{p.name}' of {fname}() must be {p.type}, not {_mismatch(v, p.type)}",
                               spans.get(p.name, call_span))
        if isinstance(v, float) and _names_int(p.type) and _is_int(v):
            values[p.name] = int(v)  # a whole number given as 3.0 binds as 3 where an Int is wanted
    spans.update(item_spans)
    return values, spans


def _names_int(t: ast.TypeExpr) -> bool:
    return t.name == "Int" or (t.name == "|" and any(_names_int(a) for a in t.args))


def _mismatch(v: Any, t: ast.TypeExpr) -> str:
    """What is wrong with a value that does not conform: its type, or for a number why it
    is not the number wanted."""
    if _is_number(v) and not is_finite(v):
        return f"{v} (not a finite number)"
    if _is_number(v) and _names_int(t):
        why = "not a whole number" if not float(v).is_integer() else (
            f"outside {INT_RANGE[0]} to {INT_RANGE[1]}")
        return f"{show(v)} ({why})"
    return type_name(v)


# ---- the registry -------------------------------------------------------------------

BUILTINS: dict[str, Builtin] = {}


def builtin(header: str, doc: str, variadic: bool = False):
    """Register `def <header>` with the decorated implementation. With variadic=True the
    first parameter (typed List[T]) takes every positional argument (see VarParam)."""
    from .parser import parse

    program = parse(f"def {header} = none", name=f"<builtin {header.split('(')[0]}>")
    d = program.stmts[0]
    assert isinstance(d, ast.Def)
    for p in d.params:
        if p.type is not None:
            check_type_expr(p.type)
    defaults = {p.name: literal_value(p.default) for p in d.params if p.default is not None}
    params = d.params
    if variadic:
        p0 = params[0]
        params = (VarParam(p0.name, p0.type, p0.default, span=p0.span), *params[1:])

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        BUILTINS[d.name] = Builtin(d.name, params, fn, doc, defaults)
        return fn

    return register


# ---- checkpoint type rules -------------------------------------------------------------


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
                from .vocab import ALIGN_HINT

                err.with_note(f"the vocabularies differ ({spec.shape[0]} vs {tb[n].shape[0]} tokens); "
                              + ALIGN_HINT)
                err.with_note("merge(rm, lm, lam) merges the shared token rows of a reward model and an LM")
            raise err
    from .vocab import check_same_vocab

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


# ---- builtin functions ----------------------------------------------------------------


@builtin("load(path: String)", "A lazy checkpoint: a Hugging Face folder or a .safetensors file. "
         "Reads headers and config.json only.")
def _load(call: Call, path: str) -> Model:
    return call.checker.load(path, call.at("path"))


@builtin(
    'save(m: Checkpoint, path: String, dtype: String | None = none, '
    'shard_size: Scalar | String = "5GB", overwrite: Bool = false)',
    "Write m as a Hugging Face folder: shards with an index, the primary input's config "
    "(dtype updated), tokenizer and generation config, and a model card with the recipe.",
)
def _save(call: Call, m: Model, path: str, dtype: str | None, shard_size: Any, overwrite: bool) -> None:
    code = None
    if dtype is not None:
        code = DTYPE_ALIASES.get(dtype.lower())
        if code is None:
            raise call.error(
                AlgTypeError, f"unknown dtype '{dtype}'{did_you_mean(dtype.lower(), DTYPE_ALIASES)}", "dtype"
            ).with_note(f"dtypes: {', '.join(sorted(DTYPE_ALIASES))}")
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as e:
        raise call.error(AlgTypeError, str(e), "shard_size") from None
    check_model(m, call.checker, call.span)
    call.checker.add_save(m, path, code, shard_bytes, overwrite, call)
    return None


# the `tokenizer=` option of merge, slerp and every merge method (see vocab.align_models)
TOKENIZER_PARAM = "tokenizer: String | Checkpoint | None = none"


@builtin(
    f"merge(rm: Checkpoint, lm: Checkpoint, lam: Param, {TOKENIZER_PARAM})",
    "DogeRM: (1-lam)*rm + lam*lm on the tensors both hold; tensors only in rm (the score "
    "head) are kept, tensors only in lm (its lm_head) dropped; rm's config and tokenizer. "
    "tokenizer=\"union\" (or \"base\", or a checkpoint) aligns the vocabularies first (see align).",
)
def _merge(call: Call, rm: Model, lm: Model, lam: float, tokenizer: Any) -> Model:
    if tokenizer is not None:
        from .methods.common import with_tokenizer

        rm, (lm,) = with_tokenizer(call, tokenizer, rm, (lm,))
    from .vocab import check_same_vocab

    # rows of different tokens must not be averaged (one vocabulary extending the other,
    # as a reward model's added tokens do, is the shared-leading-rows case below)
    check_same_vocab(rm, lm, "merge", call.span, call.at("rm"), call.at("lm"))
    ta, tb = rm.type.tensors, lm.type.tensors
    shared = [n for n in ta if n in tb]
    if not shared:
        raise call.error(
            AlgShapeError,
            "merge: rm and lm share no tensor names; are they built on the same base model?",
        )
    vocab_rows: dict[str, int] = {}
    for n in shared:
        sa, sb = ta[n], tb[n]
        if sa.shape == sb.shape:
            continue
        if len(sa.shape) >= 1 and sa.shape[1:] == sb.shape[1:] and _is_vocab(n, rm, lm):
            vocab_rows[n] = min(sa.shape[0], sb.shape[0])
            continue
        raise call.error(
            AlgShapeError,
            f"merge: tensor '{n}' has shape {list(sa.shape)} in rm but {list(sb.shape)} in lm",
            "lm",
        )
    for n, rows in vocab_rows.items():
        na, nb = ta[n].shape[0], tb[n].shape[0]
        call.checker.warning(
            f"merge: '{n}' has {na} rows in rm and {nb} in lm; rows 0..{rows - 1} (the token "
            f"ids both vocabularies share) are merged and the other {na - rows} come from rm "
            "unchanged. This assumes both tokenizers agree on those ids.",
            call.span,
        )
    only_lm = [n for n in tb if n not in ta]
    only_rm = [n for n in ta if n not in tb]
    notes = []
    if only_rm:
        notes.append(f"merge kept {len(only_rm)} tensor(s) only in rm: {_first(only_rm)}")
    if only_lm:
        notes.append(f"merge dropped {len(only_lm)} tensor(s) only in lm: {_first(only_lm)}")
    node = Node(
        "merge", (rm.node, lm.node), (as_param(lam), tuple(sorted(vocab_rows.items()))), span=call.span
    )
    return derived(node, rm, notes=tuple(notes))


def _is_vocab(name: str, a: Model, b: Model) -> bool:
    """Whether a tensor's first dimension counts tokens in both checkpoints (the tensor
    roles are `arch.Arch`'s)."""
    return arch_of(a.type).is_token_rows(name) and arch_of(b.type).is_token_rows(name)


PER_CHOICES = ("tensor", "layer", "model")


@builtin(
    "slerp(a: Checkpoint | List[Checkpoint], b: Checkpoint | None = none, t: Param | None = none, "
    "base: Checkpoint | None = none, per: String | None = none, "
    f"{TOKENIZER_PARAM})",
    "slerp(a, b, t): spherical interpolation per tensor of raw weights. "
    "slerp([m1, ..., mM], base=init, per=\"layer\"): WARP's SLERP of task vectors m_i - init, "
    "folded left with t = 1/k, one angle per layer, tensor or the whole model; the result "
    "has init's config. tokenizer= aligns the vocabularies first (see align).",
)
def _slerp(call: Call, a: Any, b: Model | None, t: float | None, base: Model | None, per: str | None,
           tokenizer: Any) -> Model:
    if per is not None and per not in PER_CHOICES:
        raise call.error(
            AlgTypeError, f"per must be one of {', '.join(map(repr, PER_CHOICES))}, not '{per}'"
            f"{did_you_mean(per, PER_CHOICES)}", "per"
        )
    if isinstance(a, Model):
        if b is None or t is None:
            raise call.error(AlgTypeError, "slerp(a, b, t) needs two checkpoints and t; "
                             "for task vectors write slerp([m1, m2], base=init)")
        if base is not None:
            raise call.error(AlgTypeError, "slerp(a, b, t) takes no base; for task vectors "
                             "write slerp([a, b], base=init)", "base")
        if tokenizer is not None and b is not None:
            from .methods.common import with_tokenizer

            a, (b,) = with_tokenizer(call, tokenizer, a, (b,))
        a, b = align_heads(a, b, call.span)
        same_tables(a, b, "slerp", call.span, call.at("a"), call.at("b"))
        node = Node("slerp", (a.node, b.node), (as_param(t), per or "tensor"), span=call.span)
        return derived(node, a)
    ms = list(a)
    if b is not None or t is not None:
        raise call.error(AlgTypeError, "slerp([m1, ..., mM], base=init) takes no b or t: "
                         "t is 1/k for the k-th model", "b" if b is not None else "t")
    if base is None:
        raise call.error(AlgTypeError, "slerp of a list needs base=init (the task vectors are m_i - init)")
    if len(ms) < 2:
        raise call.error(AlgTypeError, f"slerp needs at least two checkpoints, got {len(ms)}", "a")
    if tokenizer is not None:
        from .methods.common import model_list, with_tokenizer

        base, ms = with_tokenizer(call, tokenizer, base, model_list(call, tuple(ms), "a"))
    aligned = []
    for m in ms:
        if not isinstance(m, Model):
            raise call.error(AlgTypeError, f"slerp: list items must be checkpoints, not {type_name(m)}", "a")
        _, m = align_heads(base, m, call.span)
        same_tables(base, m, "slerp", call.span, call.at("base"), call.at("a"))
        aligned.append(m)
    node = Node("slerp_tv", (base.node, *(m.node for m in aligned)), (per or "layer",), span=call.span)
    return derived(node, base)


@builtin("print(x: Any)", "Print a value when the recipe runs (checkpoints print as a summary).")
def _print(call: Call, x: Any) -> None:
    call.checker.add_sink(Sink("print", call.span, x))


@builtin(
    "assert_close(x: Any, y: Any, rtol: Scalar = 1e-5, atol: Scalar = 1e-6)",
    "Fail the run unless |x - y| <= atol + rtol*|y| everywhere: for checkpoints, every element "
    "of every tensor (streamed like a save); for numbers and lists of numbers, each value.",
)
def _assert_close(call: Call, x: Any, y: Any, rtol: float, atol: float) -> None:
    if rtol < 0 or atol < 0:
        raise call.error(AlgTypeError, "assert_close() tolerances must not be negative", "rtol" if rtol < 0 else "atol")
    if isinstance(x, Model) or isinstance(y, Model):
        if not (isinstance(x, Model) and isinstance(y, Model)):
            raise call.error(AlgTypeError, f"assert_close() compares a checkpoint with a checkpoint, "
                             f"not with {type_name(y if isinstance(x, Model) else x)}")
        check_model(x, call.checker, call.span)
        check_model(y, call.checker, call.span)
        same_tables(x, y, "assert_close", call.span, call.at("x"), call.at("y"))
        node = Node("close_excess", (x.node, y.node), (float(rtol), float(atol)), span=call.span)
        value: Any = derived(node, x)
    else:
        xs, ys = _numbers(call, x, "x"), _numbers(call, y, "y")
        if len(xs) != len(ys):
            raise call.error(AlgTypeError, f"assert_close() got {len(xs)} values and {len(ys)}")
        value = (xs, ys)
    call.checker.add_sink(Sink("assert_close", call.span, value, {"rtol": rtol, "atol": atol}))


def _numbers(call: Call, v: Any, param: str) -> tuple[float, ...]:
    items = v if isinstance(v, tuple) else (v,)
    for item in items:
        if not isinstance(item, int | float) or isinstance(item, bool):
            raise call.error(AlgTypeError, f"assert_close() compares numbers or checkpoints, "
                             f"not {type_name(v)}", param)
    return tuple(float(i) for i in items)


@builtin("info(m: Checkpoint)", "Print architecture, tensor count, parameters, dtype and size, "
         "from headers only.")
def _info(call: Call, m: Model) -> None:
    call.checker.add_sink(Sink("info", call.span, m))


@builtin("range(start: Scalar, stop: Scalar | None = none, step: Scalar = 1)",
         "Numbers from start up to (not including) stop; floats allowed, e.g. range(0, 1.01, 0.1).")
def _range(call: Call, start: float, stop: float | None, step: float) -> tuple:
    bound = "stop" if stop is not None else "start"  # the argument that is the upper bound
    if stop is None:
        start, stop = 0, start
    if step == 0:
        raise call.error(AlgTypeError, "range() step must not be zero", "step")
    count = (float(stop) - float(start)) / float(step)  # may be inf: the bounds are finite, not their span
    limit = call.checker.max_size
    if not count <= limit:
        raise call.error(AlgLimitError, f"range() would make more than {limit:,} values (the size "
                         f"budget; {SIZE_ENV} raises it)", bound)
    n = math.ceil(count - 1e-9)
    integral = all(isinstance(v, int) for v in (start, stop, step))
    out = []
    for i in range(max(0, n)):
        v = start + i * step
        out.append(v if integral else float(round(v, 12)))
    return tuple(out)


@builtin("str(x: Any)", "A value as text, e.g. for output paths: \"out/m-\" + str(lam).")
def _str(call: Call, x: Any) -> str:
    return show(x, quote=False)


@builtin("len(xs: List)", "The number of items of a list.")
def _len(call: Call, xs: tuple) -> int:
    return len(xs)


@builtin("fold(f: Function, xs: List, init: Any = none)",
         "f(...f(f(init, x1), x2)..., xn); without init, starts from x1.")
def _fold(call: Call, f: Function, xs: tuple, init: Any) -> Any:
    items = list(xs)
    if init is None:
        if not items:
            raise call.error(AlgTypeError, "fold() of an empty list needs init", "xs")
        acc, items = items[0], items[1:]
    else:
        acc = init
    for x in items:
        acc = call.checker.apply(f, [(acc, call.at("init")), (x, call.at("xs"))], call.span)
    return acc


def show(v: Any, quote: bool = True) -> str:
    """How print() and the REPL render a value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v) if not v.is_integer() or abs(v) >= 1e16 else f"{v:.1f}"
    if isinstance(v, str):
        return f'"{v}"' if quote else v
    if isinstance(v, tuple):
        return "[" + ", ".join(show(x) for x in v) + "]"
    if isinstance(v, Model):
        return v.type.describe()
    if isinstance(v, Builtin):
        return f"<builtin {v.signature()}>"
    if isinstance(v, Closure):
        return repr(v)
    return str(v)


__all__ = ["BUILTINS", "Builtin", "Call", "VarParam", "bind", "conforms", "model_arith", "model_neg",
           "register_type", "show"]
