"""The core builtins of alg: load, save, merge, slerp, print, assert_close, info and the
list functions, with the lowerings and renderings of the checkpoint ops they build.

Each builtin is declared on this module's `family` (family.py): its alg signature and a
Python function that receives the bound arguments. For checkpoint operations the function
only *checks* and builds a graph node: it computes the result's tensor table from its
arguments' headers and reports any mismatch with the position of the argument at fault.
The arithmetic of tensors lives in the lowerings below, `lower.py` and `ops/`; nothing
here reads a weight. The registry (registry.py) lists this family with the others.

The operations written in alg itself (lerp, liti, ema, task_vector, ...) are in
stdlib/prelude.alg over these primitives.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import SIZE_ENV, AlgLimitError, AlgShapeError, AlgTypeError, did_you_mean
from .family import Family
from .graph import Node, fmt_param
from .lower import Cat, Lowerer, SlerpCoef, Slice, TExpr, lin
from .methods.common import TOKENIZER_PARAM, model_list, with_tokenizer
from .rules import _first, _is_vocab, derived, same_tables
from .schedule import as_param
from .signature import Call, show
from .surgery import align_heads, check_model
from .types import DTYPE_ALIASES, Function, TensorSpec, parse_size, type_name
from .values import Model, Sink
from .vocab import check_same_vocab

family = Family("core")
builtin = family.builtin

@builtin("load(path: String)", "A lazy checkpoint: a Hugging Face folder or a .safetensors file. "
         "Reads headers and config.json only.")
def _load(call: Call, path: str) -> Model:
    return call.checker.load(path, call.at("path"))


@builtin(
    'save(m: Checkpoint, path: String, dtype: String | None = none, '
    'shard_size: Scalar | String = "5GB", overwrite: Bool = false, chat_template: String | None = none)',
    "Write m as a Hugging Face folder: shards with an index, the primary input's config "
    "(dtype updated), tokenizer and generation config, and a model card with the recipe. "
    "chat_template: a template's Jinja text, a name (chatml, llama3), or \"auto\" (the one most "
    "of m's inputs carry) for the output's tokenizer.",
)
def _save(call: Call, m: Model, path: str, dtype: str | None, shard_size: Any, overwrite: bool,
          chat_template: str | None) -> None:
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
    template = None
    if chat_template is not None:
        template = _chat_template(call, m, chat_template)
    call.checker.add_save(m, path, code, shard_bytes, overwrite, call, template)
    return None


def _chat_template(call: Call, m: Model, value: str) -> str | None:
    """The template text save() writes (`chat.choose`), with a positioned error or
    warning."""
    from . import chat

    folders = chat.input_folders(m)
    try:
        text = chat.choose(value, folders)
    except ValueError as e:
        raise call.error(AlgTypeError, str(e), "chat_template") from None
    if text is None:
        call.checker.warning("chat_template=\"auto\": none of the inputs carries a chat template; "
                             "the output's tokenizer files are written as they are", call.at("chat_template"))
    return text


@builtin(
    f"merge(rm: Checkpoint, lm: Checkpoint, lam: Param, {TOKENIZER_PARAM})",
    "DogeRM: (1-lam)*rm + lam*lm on the tensors both hold; tensors only in rm (the score "
    "head) are kept, tensors only in lm (its lm_head) dropped; rm's config and tokenizer. "
    "tokenizer=\"union\" (or \"base\", or a checkpoint) aligns the vocabularies first (see align).",
)
def _merge(call: Call, rm: Model, lm: Model, lam: float, tokenizer: Any) -> Model:
    if tokenizer is not None:
        rm, (lm,) = with_tokenizer(call, tokenizer, rm, (lm,))
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


# ---- lowerings of the core ops: one tensor of a node as a TExpr (lower.py) ---------------


def _arg(low: Lowerer, node: Node, i: int, name: str) -> TExpr:
    return low.tensor(node.args[i], name)


@family.lowering("add")
def _lower_add(low: Lowerer, node: Node, name: str) -> TExpr:
    return lin([(1.0, _arg(low, node, 0, name)), (1.0, _arg(low, node, 1, name))])


@family.lowering("sub")
def _lower_sub(low: Lowerer, node: Node, name: str) -> TExpr:
    return lin([(1.0, _arg(low, node, 0, name)), (-1.0, _arg(low, node, 1, name))])


@family.lowering("scale")
def _lower_scale(low: Lowerer, node: Node, name: str) -> TExpr:
    return lin([(low.param(node.params[0], node, name), _arg(low, node, 0, name))])


@family.lowering("shift")
def _lower_shift(low: Lowerer, node: Node, name: str) -> TExpr:
    return lin([(1.0, _arg(low, node, 0, name))], low.param(node.params[0], node, name))


@family.lowering("merge")
def _lower_merge(low: Lowerer, node: Node, name: str) -> TExpr:
    rm, lm = node.args
    lam, vocab_rows = low.param(node.params[0], node, name), node.params[1]
    a = low.tensor(rm, name)
    if name not in lm.type.tensors:
        return a  # only in rm: the score head is kept
    b = low.tensor(lm, name)
    rows = dict(vocab_rows).get(name)
    if rows is None:
        return lin([(1.0 - lam, a), (lam, b)])
    row = math.prod(a.spec.shape[1:])
    n = rows * row
    head_spec = TensorSpec((rows, *a.spec.shape[1:]), a.spec.dtype)
    tail_spec = TensorSpec((a.spec.shape[0] - rows, *a.spec.shape[1:]), a.spec.dtype)
    head = lin([(1.0 - lam, Slice(a, 0, head_spec)), (lam, Slice(b, 0, TensorSpec(head_spec.shape, b.spec.dtype)))])
    if tail_spec.numel == 0:
        return head
    return Cat((head, Slice(a, n, tail_spec)), a.spec)


@family.lowering("slerp")
def _lower_slerp(low: Lowerer, node: Node, name: str) -> TExpr:
    t, per = low.param(node.params[0], node, name), node.params[1]
    a, b = node.args
    g = low.gram(node, name, per, lambda n: (low.tensor(a, n), low.tensor(b, n)), "slerp")
    return lin([(SlerpCoef(g, t, 0), low.tensor(a, name)), (SlerpCoef(g, t, 1), low.tensor(b, name))])


@family.lowering("slerp_tv")
def _lower_slerp_tv(low: Lowerer, node: Node, name: str) -> TExpr:
    s = low.slerp_tv_vector(node, name, len(node.args) - 1)
    return lin([(1.0, _arg(low, node, 0, name)), (1.0, s)])


# ---- renderings of the core ops in alg syntax (graph.Node.describe) ----------------------

for _op, _sym in (("add", "+"), ("sub", "-"), ("mul", "*"), ("div", "/")):
    family.describe(_op)(lambda node, a, _sym=_sym: f"({a[0]} {_sym} {a[1]})")
family.describe("scale")(
    lambda node, a: f"-{a[0]}" if node.params[0] == -1 else f"{fmt_param(node.params[0])} * {a[0]}")
family.describe("shift")(lambda node, a: f"({a[0]} + {fmt_param(node.params[0])})")
family.describe("rdiv")(lambda node, a: f"({fmt_param(node.params[0])} / {a[0]})")
family.describe("merge")(lambda node, a: f"merge({a[0]}, {a[1]}, {fmt_param(node.params[0])})")
family.describe("slerp")(lambda node, a: f"slerp({a[0]}, {a[1]}, {fmt_param(node.params[0])})")
family.describe("slerp_tv")(
    lambda node, a: f"slerp([{', '.join(a[1:])}], base={a[0]}, per={fmt_param(node.params[0])})")
