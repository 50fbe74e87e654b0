"""Vocabulary alignment: `align(ms, tokenizer=...)` and the output tokenizer.

Models whose tokenizers differ cannot be combined row by row: row j of one embedding is
not the same token as row j of another. `align` remaps every model's token-row tensors
(input embedding, output head, anything whose first dimension counts tokens) into one
output vocabulary, matching tokens by their text in each model's tokenizer files:

    tokenizer="base"   the base's vocabulary (the first model, or base=)
    tokenizer="union"  the base's tokens in base order, then every other model's tokens
                       missing from it, in model order, then id order
    tokenizer=m        the vocabulary of checkpoint m

For each model and output token the row is: the model's own row if it has the token,
else the base's row if the base has it, else the mean of the rows of the models that have
it. Rows past the output tokenizer's tokens (padding: the output keeps the owner's row
count when the vocabulary fits in it) keep the model's own padding row, else take the
base's row, else zeros. Everything is decided here, at check time, from tokenizer files
and headers; lowering turns each remapped tensor into a `lower.Rows` gather that the
executor streams chunk by chunk.

`align_models(call, models, tokenizer, base)` is the entry point for the `tokenizer=`
option of merge methods. `check_same_vocab` is the check that elementwise arithmetic
runs on two checkpoints whose tensors have equal shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

from .arch import arch_of
from .errors import AlgIOError, AlgShapeError, AlgTypeError, did_you_mean, warn
from .family import Family
from .graph import Node
from .io.checkpoint import GENERATION_CONFIG, TOKENIZER_FILES
from .io.tokenizer import Vocab, read_vocab
from .lazy import np
from .signature import Call
from .types import CheckpointType, TensorSpec, TokenizerSpec, type_name
from .values import Model

family = Family("vocab")
builtin = family.builtin

MODES = ("base", "union")

# a row's recipe: ((coef, provider index, source row), ...); () is a zero row
Terms = tuple[tuple[float, int, int], ...]
# runs of rows: (first output row, row count, terms at the first row)
Run = tuple[int, int, Terms]


# ---- what a checkpoint's vocabulary is ---------------------------------------------------


def vocab_tensors(t: CheckpointType) -> tuple[int, tuple[str, ...]] | None:
    """(rows, names) of the tensors whose rows are tokens, as `arch.Arch.token_rows` says;
    None when there is none."""
    a = arch_of(t)
    return (a.vocab_rows, a.token_rows) if a.token_rows and a.vocab_rows is not None else None


def model_tokenizer(m: Model) -> TokenizerSpec | None:
    """Where a checkpoint's tokenizer comes from: its alignment's, else its primary's."""
    t = m.type
    if t.tokenizer is not None:
        return t.tokenizer
    folder = getattr(t.primary, "folder", None)
    return TokenizerSpec(folder) if folder is not None else None


def spec_vocab(spec: TokenizerSpec | None) -> Vocab | None:
    """The vocabulary a tokenizer spec describes: the folder's, then the added tokens."""
    if spec is None:
        return None
    base = read_vocab(spec.folder)
    if base is None or not spec.added:
        return base
    tokens = base.tokens + tuple(c for c, _ in spec.added)
    index = dict(base.index)
    for i, (c, _) in enumerate(spec.added):
        index.setdefault(c, len(base.tokens) + i)
    return Vocab(tokens, index, base.added, base.path)


def model_vocab(m: Model) -> Vocab | None:
    return spec_vocab(model_tokenizer(m))


# ---- arithmetic on unaligned vocabularies -------------------------------------------------


def check_same_vocab(a: Model, b: Model, what: str, span, aspan, bspan) -> None:
    """Equal shapes are not enough when the rows are tokens: two tokenizers that give one
    id to different tokens make row-wise arithmetic silently wrong. Raise unless their
    vocabularies agree on every id both have (one extending the other is fine)."""
    sa, sb = model_tokenizer(a), model_tokenizer(b)
    if sa is None or sb is None or (sa.folder == sb.folder and sa.added == sb.added):
        return
    if vocab_tensors(a.type) is None:
        return
    va, vb = spec_vocab(sa), spec_vocab(sb)
    if va is None or vb is None:
        return
    n = min(len(va), len(vb))
    if va.tokens[:n] == vb.tokens[:n]:
        return
    differ = [i for i in range(n) if va.tokens[i] != vb.tokens[i]]
    j = differ[0]
    if all(i in va.added and i in vb.added for i in differ):
        # fine-tunes often rename reserved special tokens (chat markers): the rows are
        # the same slots, so combining them is what users mean; say so, don't refuse
        warn(
            f"{what}: {len(differ)} special token(s) differ between the two sides (id {j} "
            f"is {va.tokens[j]!r} on the left, {vb.tokens[j]!r} on the right); their rows "
            "are combined slot by slot, and the output keeps the left side's tokenizer",
            span,
        )
        return
    raise AlgShapeError(
        f"{what}: the two sides have different vocabularies (token id {j} is "
        f"{va.tokens[j]!r} on the left but {vb.tokens[j]!r} on the right), so their "
        "embedding rows are different tokens",
        span,
    ).with_note("the other side is here", bspan).with_note(ALIGN_HINT)


ALIGN_HINT = 'align them first: align([a, b], tokenizer="union") (or tokenizer="base")'


# ---- alignment --------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Alignment:
    """One align call's decisions: the output vocabulary and, for every target model and
    token-row tensor, its runs of rows (None: unchanged). Held by identity in graph node
    params; `align_models` reuses one per distinct call, so equal calls share nodes."""

    label: str
    call: str  # the options as written, e.g. tokenizer="union"
    n_out: int
    maps: dict[tuple[int, str], tuple[Run, ...] | None]
    keep: tuple[Node, ...]  # the provider nodes, alive as long as this is

    def __repr__(self) -> str:
        return self.call


def _label(m: Model) -> str:
    src = m.type.primary
    return getattr(src, "label", None) or m.type.describe()


def align_models(call: Call, models: list[Model] | tuple[Model, ...], tokenizer: Any,
                 base: Model | None = None, param: str = "ms") -> list[Model]:
    """`models` remapped into one output vocabulary (see the module docstring); the same
    list when `tokenizer` is None. For a merge method's `tokenizer=` option: errors point
    at `param` (the list) or at `tokenizer` / `base`."""
    if tokenizer is None:
        return list(models)
    models = list(models)
    if not models:
        raise call.error(AlgTypeError, "align() needs at least one checkpoint", param)
    for m in models:
        if not isinstance(m, Model):
            raise call.error(AlgTypeError, f"align(): list items must be checkpoints, not {type_name(m)}", param)
    if isinstance(tokenizer, str) and tokenizer not in MODES:
        raise call.error(
            AlgTypeError, f"tokenizer must be \"base\", \"union\" or a checkpoint, not \"{tokenizer}\""
            f"{did_you_mean(tokenizer, MODES)}", "tokenizer")
    base_m = base if base is not None else models[0]
    providers = list(models)
    bi = next((k for k, m in enumerate(models) if m.node is base_m.node), None)
    if bi is None:
        providers.append(base_m)
        bi = len(providers) - 1

    cache = call.checker.__dict__.setdefault("_alignments", {})
    key = (tuple(id(p.node) for p in providers), bi,
           tokenizer if isinstance(tokenizer, str) else id(tokenizer.node))
    hit = cache.get(key)
    if hit is None:
        hit = _plan(call, providers, len(models), bi, tokenizer, param)
        cache[key] = hit
    alignment, types = hit
    out = []
    for i, m in enumerate(models):
        node = Node("align", (m.node, *(p.node for p in providers)), (alignment, i), span=call.span)
        out.append(Model(node, types[i]))
    return out


def _where(k: int, n_models: int, param: str) -> str:
    return param if k < n_models else "base"


def _plan(call: Call, providers: list[Model], n_models: int, bi: int, tokenizer: Any, param: str):
    vocabs: list[Vocab] = []
    tables: list[tuple[int, tuple[str, ...]]] = []
    for k, m in enumerate(providers):
        v = model_vocab(m)
        if v is None:
            raise call.error(AlgIOError, f"align: {_label(m)} has no tokenizer files (tokenizer.json or "
                             "vocab.json); alignment matches tokens by their text", _where(k, n_models, param))
        vt = vocab_tensors(m.type)
        if vt is None:
            raise call.error(AlgShapeError, f"align: cannot tell which tensors of {_label(m)} hold token "
                             "rows (no embedding named like embed_tokens, wte or lm_head whose rows "
                             "match config vocab_size)", _where(k, n_models, param))
        vocabs.append(v)
        tables.append(vt)

    # the output vocabulary and the tokenizer that writes it
    base_spec = model_tokenizer(providers[bi])
    assert base_spec is not None
    added: list[tuple[str, dict[str, Any]]] = []
    if tokenizer == "base":
        owner_spec, out_tokens, owner_rows = base_spec, list(vocabs[bi].tokens), tables[bi][0]
        label = f"align to the vocabulary of {_label(providers[bi])}"
    elif tokenizer == "union":
        out_tokens = list(vocabs[bi].tokens)
        seen = set(vocabs[bi].index)
        for k in [bi] + [k for k in range(len(providers)) if k != bi]:
            v = vocabs[k]
            for i, tok in enumerate(v.tokens):
                if tok is not None and tok not in seen:
                    seen.add(tok)
                    out_tokens.append(tok)
                    props = dict(v.added.get(i, {}))
                    props.pop("id", None)
                    props.pop("content", None)
                    added.append((tok, props))
        if added and not vocabs[bi].contiguous:
            hole = vocabs[bi].tokens.index(None)
            raise call.error(AlgIOError, f"align: the base tokenizer has no token with id {hole}, so "
                             "tokens cannot be appended after it; use tokenizer=\"base\"", "tokenizer")
        if added and not (base_spec.folder / "tokenizer.json").is_file():
            raise call.error(AlgIOError, "align: tokenizer=\"union\" adds tokens to the base's "
                             "tokenizer.json, and the base has none", "tokenizer")
        owner_spec = dataclasses.replace(base_spec, added=base_spec.added + tuple(added),
                                         generation_config=None)
        owner_rows = tables[bi][0]
        label = (f"align to the union vocabulary: {_label(providers[bi])}'s {len(vocabs[bi])} tokens "
                 f"and {len(added)} more")
    else:
        owner_spec = model_tokenizer(tokenizer)
        v = spec_vocab(owner_spec)
        if owner_spec is None or v is None:
            raise call.error(AlgIOError, f"align: {_label(tokenizer)} has no tokenizer files", "tokenizer")
        out_tokens = list(v.tokens)
        vt = vocab_tensors(tokenizer.type)
        owner_rows = vt[0] if vt is not None else len(out_tokens)
        label = f"align to the vocabulary of {_label(tokenizer)}"
    owner_spec = dataclasses.replace(owner_spec, generation_config=None)
    n_tok = len(out_tokens)
    n_out = max(n_tok, owner_rows)

    # which providers hold each output token as a row
    # has[k, j]: provider k's row of output row j's token, or -1
    has = np.full((len(providers), n_out), -1, dtype=np.int64)
    for k, (v, (rows, _)) in enumerate(zip(vocabs, tables, strict=True)):
        col = np.fromiter((v.index.get(t, -1) if t is not None else -1 for t in out_tokens), np.int64, n_tok)
        col[col >= rows] = -1
        has[k, :n_tok] = col
    is_tok = np.zeros(n_out, dtype=bool)
    is_tok[:n_tok] = np.fromiter((t is not None for t in out_tokens), bool, n_tok)
    nobody = np.flatnonzero(is_tok & (has < 0).all(axis=0))
    if len(nobody):
        raise call.error(
            AlgShapeError, f"align: {len(nobody)} token(s) of the output vocabulary are in none of the "
            f"models, e.g. {', '.join(repr(out_tokens[j]) for j in nobody[:3])}; include the "
            "tokenizer's model in the list", "tokenizer")

    maps: dict[tuple[int, str], tuple[Run, ...] | None] = {}
    types: list[CheckpointType] = []
    by_avail: dict[tuple[int, tuple[bool, ...]], tuple[tuple[Run, ...] | None, int]] = {}
    for i in range(n_models):
        m = providers[i]
        rows_i, names_i = tables[i]
        tensors = dict(m.type.tensors)
        for name in names_i:
            spec = tensors[name]
            avail = []
            for k, p in enumerate(providers):
                s = p.type.tensors.get(name)
                ok = s is not None and name in tables[k][1]
                if ok and s.shape[1:] != spec.shape[1:]:
                    raise call.error(AlgShapeError, f"align: '{name}' has rows of shape {list(spec.shape[1:])} "
                                     f"in {_label(m)} but {list(s.shape[1:])} in {_label(p)}",
                                     _where(k, n_models, param))
                avail.append(ok)
            akey = (i, tuple(avail))
            if akey not in by_avail:
                by_avail[akey] = _runs(i, bi, avail, has, is_tok, vocabs, tables)
            runs, zeros = by_avail[akey]
            if zeros:
                call.checker.warning(
                    f"align: {zeros} row(s) of '{name}' in {_label(m)} are zeros: their tokens are only "
                    f"in models without '{name}'", call.span)
            maps[(i, name)] = runs
            tensors[name] = TensorSpec((n_out, *spec.shape[1:]), spec.dtype)
        out_index: dict[str, int] = {}
        for j, tok in enumerate(out_tokens):
            if tok is not None:
                out_index.setdefault(tok, j)
        owner_model = tokenizer if isinstance(tokenizer, Model) else providers[bi]
        owner_config = owner_model.type.config or {}
        config = None
        if m.type.config is not None:
            config = _remap_ids(dict(m.type.config), vocabs[i], out_index, owner_config)
            if "vocab_size" in config:
                config["vocab_size"] = n_out
        gen = _generation_config(m)
        spec_i = dataclasses.replace(
            owner_spec,
            generation_config=_remap_ids(gen, vocabs[i], out_index, _generation_config(owner_model) or {})
            if gen is not None else None)
        unchanged = all(maps[(i, n)] is None for n in names_i) and tokenizer == "base" and i == bi
        types.append(dataclasses.replace(
            m.type, tensors=tensors, config=config, tokenizer=None if unchanged else spec_i,
            notes=m.type.notes + ((label + f" ({n_out} rows)",) if not unchanged else ())))
    keep = tuple(p.node for p in providers) + ((tokenizer.node,) if isinstance(tokenizer, Model) else ())
    written = f'tokenizer="{tokenizer}"' if isinstance(tokenizer, str) else f"tokenizer={tokenizer.node.describe()}"
    if bi != 0:
        written += f", base={providers[bi].node.describe()}"
    return Alignment(label, written, n_out, maps, keep), types


def _runs(i: int, bi: int, avail: list[bool], has: np.ndarray, is_tok: np.ndarray, vocabs, tables):
    """The runs of rows of target i for a tensor that the providers `avail` hold, and how
    many token rows had to be zeros. None for the identity map. Vectorised: a 150k-token
    vocabulary costs a Python step per run, not per row."""
    n_out = len(is_tok)
    j = np.arange(n_out)
    rows_i, rows_b = tables[i][0], tables[bi][0]
    prov = np.full(n_out, -1, dtype=np.int64)  # the one source of a row, -1: zeros or a mean
    src = j.copy()  # zero rows count as consecutive, so they merge into one run
    own = has[i] >= 0
    prov[own], src[own] = i, has[i][own]
    take_base = is_tok & ~own & (has[bi] >= 0) if avail[bi] else np.zeros(n_out, dtype=bool)
    prov[take_base], src[take_base] = bi, has[bi][take_base]
    rest = is_tok & ~own & ~take_base
    held = has[:, rest] >= 0
    held &= np.asarray(avail, dtype=bool)[:, None]
    n_held = held.sum(axis=0)
    zeros = int((n_held == 0).sum())
    multi = np.zeros(n_out, dtype=bool)
    single = np.flatnonzero(rest)[n_held == 1]
    k_single = held[:, n_held == 1].argmax(axis=0)
    prov[single], src[single] = k_single, has[k_single, single]
    multi[np.flatnonzero(rest)[n_held > 1]] = True
    # padding: the model's own padding row, else the base's row, else zeros
    vi = vocabs[i]
    own_free = np.ones(n_out, dtype=bool)  # rows that are no token in model i itself
    n_vi = min(len(vi), n_out)
    own_free[:n_vi] = np.fromiter((t is None for t in vi.tokens[:n_vi]), bool, n_vi)
    pad_own = ~is_tok & (j < rows_i) & own_free
    prov[pad_own], src[pad_own] = i, j[pad_own]
    pad_base = ~is_tok & ~pad_own & (j < rows_b) if avail[bi] else np.zeros(n_out, dtype=bool)
    prov[pad_base], src[pad_base] = bi, j[pad_base]
    if n_out == rows_i and (prov == i).all() and (src == j).all():
        return None, zeros
    brk = np.ones(n_out, dtype=bool)
    brk[1:] = (prov[1:] != prov[:-1]) | (src[1:] != src[:-1] + 1) | multi[1:] | multi[:-1]
    starts = np.flatnonzero(brk)
    counts = np.diff(np.append(starts, n_out))
    runs: list[Run] = []
    for start, count, p, r, is_multi in zip(starts.tolist(), counts.tolist(), prov[starts].tolist(),
                                            src[starts].tolist(), multi[starts].tolist(), strict=True):
        if is_multi:
            ks = np.flatnonzero((has[:, start] >= 0) & np.asarray(avail, dtype=bool)).tolist()
            terms: Terms = tuple((1.0 / len(ks), k, int(has[k, start])) for k in ks)
            prev = runs[-1] if runs else None
            if prev is not None and prev[0] + prev[1] == start and len(prev[2]) == len(terms) and all(
                    c0 == c1 and k0 == k1 and r0 + prev[1] == r1
                    for (c0, k0, r0), (c1, k1, r1) in zip(prev[2], terms, strict=True)):
                runs[-1] = (prev[0], prev[1] + 1, prev[2])
                continue
        else:
            terms = ((1.0, p, r),) if p >= 0 else ()
        runs.append((start, count, terms))
    return tuple(runs), zeros


_ID_KEYS = re.compile(r"_token_ids?$")


def _remap_ids(config: dict[str, Any] | None, vocab: Vocab, out_index: dict[str, int],
               owner: dict[str, Any]) -> dict[str, Any] | None:
    """Token ids in a config (bos_token_id, eos_token_id, pad_token_id, ...) moved to the
    output vocabulary; an id whose token is not there takes the owner's value."""
    if config is None:
        return None

    def one(x: Any) -> int | None:
        if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < len(vocab):
            return None
        tok = vocab.tokens[x]
        return out_index.get(tok) if tok is not None else None

    for k, v in list(config.items()):
        if not _ID_KEYS.search(k) or v is None:
            continue
        items = v if isinstance(v, list) else [v]
        mapped = [one(x) for x in items]
        if all(x is not None for x in mapped):
            config[k] = mapped if isinstance(v, list) else mapped[0]
        elif k in owner:
            config[k] = owner[k]
    return config


def _generation_config(m: Model) -> dict[str, Any] | None:
    folder = getattr(m.type.primary, "folder", None)
    path = Path(folder) / GENERATION_CONFIG if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---- lowering and saving ----------------------------------------------------------------


# params: (alignment, which model); args: (model, *providers)
family.describe("align")(lambda node, a: f"align([{', '.join(a[1:])}], {node.params[0]!r})[{node.params[1]}]")


@family.lowering("align")
def lower_align(lowerer: Any, node: Node, name: str):
    """The tensor `name` of an aligned model: a `Rows` gather, or the input unchanged."""
    from .lower import Rows

    alignment, i = node.params
    runs = alignment.maps.get((i, name))
    if runs is None:
        return lowerer.tensor(node.args[0], name)
    spec = node.type.tensors[name]
    row_len = math.prod(spec.shape[1:])
    exprs: dict[int, Any] = {}

    def source(k: int):
        if k not in exprs:
            exprs[k] = lowerer.tensor(node.args[1 + k], name)
        return exprs[k]

    lowered = tuple((start, count, tuple((c, source(k), r) for c, k, r in terms)) for start, count, terms in runs)
    dtype = node.args[0].type.tensors[name].dtype
    return Rows(lowered, row_len, TensorSpec(spec.shape, dtype))


def write_tokenizer(spec: TokenizerSpec, folder: Path) -> set[str]:
    """Write the tokenizer files of `spec` into `folder`; return the file names written
    (the primary's files of those names are not copied over them)."""
    written: set[str] = set()
    src = Path(spec.folder)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
            written.add(name)
    written.update(TOKENIZER_FILES)  # the primary's other tokenizer files do not belong
    if spec.added:
        _add_tokens(src, folder, spec.added)
    if spec.generation_config is not None:
        (folder / GENERATION_CONFIG).write_text(json.dumps(spec.generation_config, indent=2) + "\n")
        written.add(GENERATION_CONFIG)
    return written


def _add_tokens(src: Path, folder: Path, added: tuple[tuple[str, dict[str, Any]], ...]) -> None:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    first = tok.get_vocab_size(with_added_tokens=True)
    keys = ("single_word", "lstrip", "rstrip", "normalized", "special")
    new = [AddedToken(c, **{k: bool(p.get(k, False)) for k in keys}) for c, p in added]
    tok.add_tokens(new)
    for i, (c, _) in enumerate(added):
        if tok.token_to_id(c) != first + i:
            raise AlgIOError(f"the output tokenizer gave the added token {c!r} id {tok.token_to_id(c)}, "
                             f"not {first + i}; its rows would not match")
    tok.save(str(folder / "tokenizer.json"))
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():  # transformers 4 lists added tokens here as well
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            for i, (c, p) in enumerate(added):
                cfg["added_tokens_decoder"][str(first + i)] = {
                    "content": c, **{k: bool(p.get(k, False)) for k in keys}}
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- the builtin ------------------------------------------------------------------------


@builtin(
    'align(ms: List[Checkpoint], tokenizer: String | Checkpoint = "base", base: Checkpoint | None = none)',
    "The checkpoints of ms (same order) with their embedding and head rows remapped to one "
    "vocabulary, so they can be merged: tokenizer=\"base\" (the base's: the first model, or "
    "base=), \"union\" (the base's tokens, then every other model's new tokens in model and id "
    "order) or a checkpoint (its tokenizer). A token a model lacks takes the base's row, else "
    "the mean of the models that have it; tokens are matched by their text. A saved result "
    "gets the output tokenizer and config vocab_size.",
)
def _align(call: Call, ms: tuple, tokenizer: Any, base: Model | None) -> tuple:
    return tuple(align_models(call, ms, tokenizer, base))


__all__ = ["ALIGN_HINT", "Alignment", "align_models", "check_same_vocab", "lower_align", "model_vocab",
           "vocab_tensors", "write_tokenizer"]
