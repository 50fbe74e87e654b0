"""mergekit YAML -> alg recipe: `mergekit_to_alg(yaml_text, name)`.

A pure function from config text to recipe text; it reads no checkpoint, so it cannot know
a model's layer count and never needs to: mergekit's `layer_range` maps to `layers(m, s, e)`
as written, gradients to `ramp(..., rule="mergekit")`, filters to `where(...)`.

Policy:
- Faithful or refused. Every key is either translated to the alg expression that means the
  same, recorded in a `# note:` comment (a key mergekit itself ignores, a setting alg does
  not need), or refused with a `ConvertError` positioned at the YAML node. A mergekit
  parameter that alg's function cannot express with a value other than mergekit's default
  (DARE with `rescale: false`, a gradient `gamma`, ...) is an error, never dropped.
- Defaults: `METHODS` holds mergekit's side (each parameter's default and scope, and the
  keyword of alg's function that takes it); alg's side (which keywords exist, their
  defaults, whether they take per-tensor values) is read from the builtins' declarations
  by `signatures.py`. A keyword is written exactly when mergekit's value for it (the
  config's, else mergekit's default) differs from alg's default.
- mergekit's parameter lookup is reproduced exactly: for each tensor, the first level
  that yields a value wins (slice source, output slice, top level, then the method's
  default); inside a level, conditional entries are tried in order, the first whose
  `filter` is a substring of the tensor name wins, an entry without filter (or "*")
  matches everything. So entries become nested `where(...)`s whose last `else` is the
  next level's expression.
- The output is deterministic: names, order and formatting follow the config's order.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import chat
from ..errors import did_you_mean
from ..source import Source
from ._yaml import ConvertError, Y, documents
from .signatures import function_names, keywords, save_dtypes, signature

TOP_KEYS = (
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
    "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name", "out_path",
)
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
COND_KEYS = ("filter", "value")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")

# dtype names `save` accepts, keywords, and the names a recipe variable must not take
# (builtins, library functions and `out`): read from alg's own declarations (signatures.py)
DTYPES = save_dtypes()
KEYWORDS = keywords()
FUNCTIONS = tuple(sorted(function_names()))
RESERVED = frozenset(KEYWORDS) | function_names() | {"out"}

REQUIRED = object()  # a mergekit parameter without a default


@dataclass(frozen=True)
class MkParam:
    """One parameter of a mergekit method: mergekit's default (from mergekit's source),
    its scope, and the keyword of alg's function that takes it (None: it has none).
    alg's default for that keyword is read from the function's signature."""

    default: Any
    shared: bool  # mergekit resolves it once per tensor (True) or per input model (False)
    keyword: str | None = None


@dataclass(frozen=True)
class Method:
    """What alg needs to know of one mergekit merge method."""

    func: str  # alg's function of the same meaning
    base: str  # "required" | "pair" (base + exactly one other) | "optional" | "none" | "passthrough"
    params: dict[str, MkParam]  # mergekit's parameters
    rescales: bool = False  # alg's function rescales what it drops (alg's dare/della do)
    seeded: bool = False  # random masks: alg seeds them, mergekit does not

    def alg_default(self, keyword: str) -> Any:
        return signature(self.func).default(keyword)

    def takes(self, keyword: str | None) -> bool:
        return keyword is not None and signature(self.func).has(keyword)


def _gta(normalize: bool, rescale: bool, **extra: MkParam) -> dict[str, MkParam]:
    """mergekit's GeneralizedTaskArithmeticMerge parameters (default_normalize,
    default_rescale per method; gamma/epsilon for breadcrumbs/della)."""
    return {
        "int8_mask": MkParam(False, True),
        "normalize": MkParam(normalize, True, "normalize"),
        "rescale": MkParam(rescale, True),
        "lambda": MkParam(1.0, True, "scale"),
        "weight": MkParam(REQUIRED, False, "weights"),
        "density": MkParam(1.0, False, "density"),
        **extra,
    }


_GAMMA = MkParam(0.01, False, "gamma")
_EPSILON = MkParam(0.15, False, "epsilon")
# mergekit 0.1.5's registry (merge_methods/registry.py and each method's signature);
# tests/test_convert.py compares this table with an installed mergekit when there is one
METHODS: dict[str, Method] = {
    "linear": Method("linear", "none", {"weight": MkParam(REQUIRED, False, "weights"),
                                        "normalize": MkParam(True, True, "normalize")}),
    # (task_arithmetic accepts density but sparsifies nothing: nothing to write)
    "task_arithmetic": Method("task_arithmetic", "required",
                              {**_gta(False, False), "density": MkParam(1.0, False)}),
    "ties": Method("ties", "required", _gta(True, False)),
    "dare_linear": Method("dare_linear", "required", _gta(False, True), rescales=True, seeded=True),
    "dare_ties": Method("dare_ties", "required", _gta(False, True), rescales=True, seeded=True),
    "breadcrumbs": Method("breadcrumbs", "required", _gta(False, False, gamma=_GAMMA)),
    "breadcrumbs_ties": Method("breadcrumbs_ties", "required", _gta(False, False, gamma=_GAMMA)),
    "della": Method("della", "required", _gta(True, True, epsilon=_EPSILON), rescales=True, seeded=True),
    "della_linear": Method("della_linear", "required", _gta(False, True, epsilon=_EPSILON),
                           rescales=True, seeded=True),
    "model_stock": Method("model_stock", "required",
                          {"filter_wise": MkParam(False, True, "filter_wise")}),
    "sce": Method("sce", "required", {"int8_mask": MkParam(False, True),
                                      "select_topk": MkParam(1.0, True, "topk")}),
    "nuslerp": Method("nuslerp", "optional", {
        "weight": MkParam(REQUIRED, False),
        "nuslerp_row_wise": MkParam(False, True, "row_wise"),
        "nuslerp_flatten": MkParam(True, True, "flatten"),
    }),
    "multislerp": Method("multislerp", "optional", {
        "weight": MkParam(REQUIRED, False, "weights"),
        "normalize_weights": MkParam(True, True, "normalize"),
        "eps": MkParam(1e-8, True),
    }),
    "karcher": Method("karcher", "none", {"max_iter": MkParam(10, True, "max_iter"),
                                          "tol": MkParam(1e-5, True, "tol")}),
    "nearswap": Method("nearswap", "pair", {"t": MkParam(REQUIRED, True, "t")}),
    "slerp": Method("slerp", "pair", {"t": MkParam(REQUIRED, True, "t")}),
    "passthrough": Method("passthrough", "passthrough", {"scale": MkParam(None, False)}),
    "arcee_fusion": Method("arcee_fusion", "pair", {}),
    "ram": Method("ram", "required", {"epsilon": MkParam(1e-5, True, "epsilon")}),
    "ramplus_tl": Method("ramplus_tl", "required", {"r": MkParam(0.1, True, "r"),
                                                    "alpha": MkParam(0.2, True, "alpha"),
                                                    "epsilon": MkParam(1e-5, True, "epsilon")}),
}
ALL_PARAMS = sorted({p for m in METHODS.values() for p in m.params} | {"embed_slerp"})
# mergekit methods alg has no function for, and why (none at present)
UNSUPPORTED_METHODS: dict[str, str] = {}


@dataclass(frozen=True)
class P:
    """An alg expression for a parameter value; `num` when it is a plain number."""

    text: str
    num: float | None = None
    node: Y | None = field(default=None, compare=False)

    @property
    def simple(self) -> bool:
        return "(" not in self.text and "[" not in self.text


@dataclass
class Src:
    ref: str
    node: Y  # the model reference, for positions
    expr: str  # the alg expression of this input (a name, or layers(name, s, e))
    params: Y | None
    layer_range: tuple[int, int] | None


@dataclass
class OutSlice:
    sources: list[Src]
    params: Y | None
    base_ref: str | None
    base_node: Y | None
    node: Y
    sliced: bool
    offset: int = 0  # the output layer number of its first layer (earlier slices' lengths)


def mergekit_to_alg(
    yaml_text: str, name: str = "config.yml", model_paths: Mapping[str, str] | None = None
) -> str:
    """Translate a mergekit config (one document, or several as for mergekit-mega) into an
    alg recipe. `model_paths` maps a model reference to the path `load` should read (the
    reference stays in a comment). Raises ConvertError, positioned in the config."""
    return _Converter(Source(yaml_text, name=name), dict(model_paths or {})).run()


def _q(s: str) -> str:
    """An alg string literal."""
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{out}"'


def _num(v: float | int) -> str:
    return repr(v) if isinstance(v, int) else repr(float(v))


def _ident(ref: str) -> str:
    stem = ref.rstrip("/\\").replace("\\", "/").split("/")[-1]
    stem = re.sub(r"\.safetensors$", "", stem)
    s = re.sub(r"[^0-9A-Za-z]+", "_", stem).strip("_").lower() or "model"
    return "m_" + s if s[0].isdigit() else s


def _call(fn: str, args: list[str], width: int = 80) -> str:
    """fn(args) on one line, or one argument a line when that is too wide."""
    one = f"{fn}({', '.join(args)})"
    if len(one) <= width and "\n" not in one:
        return one
    return f"{fn}(\n" + "".join(f"    {a},\n" for a in args) + ")"


def _comment(text: str, width: int = 92) -> str:
    return "\n".join(textwrap.wrap(text, width, initial_indent="# note: ",
                                   subsequent_indent="#   "))


_LAYER_NUMBER = re.compile(r"(^|\.)\d+(\.|$)")  # a filter naming a layer: "layers.3.", ".12"
_REGEX_META = re.compile(r"[.^$*+?{}\[\]\\|()]")


class _Converter:
    def __init__(self, source: Source, model_paths: dict[str, str]):
        self.source = source
        self.model_paths = model_paths
        self.used: set[str] = set(RESERVED)
        self.models: dict[str, str] = {}  # model reference -> variable
        self.results: dict[str, str] = {}  # mega: a document's name / out_path -> variable
        self.loads: list[str] = []
        self.lines: list[str] = []
        self.numbering = 0  # the first layer number of the names mergekit's filters see

    def note(self, text: str) -> None:
        self.lines.append(_comment(text))

    def fresh(self, stem: str) -> str:
        name, i = stem, 2
        while name in self.used:
            name, i = f"{stem}_{i}", i + 1
        self.used.add(name)
        return name

    # ---- the recipe ----------------------------------------------------------------------

    def run(self) -> str:
        docs = documents(self.source)
        if not docs:
            raise ConvertError(f"{self.source.name} holds no mergekit config")
        body: list[str] = []
        for i, doc in enumerate(docs):
            self.loads, self.lines = [], []
            header, save = self.document(doc, i, len(docs), i == len(docs) - 1)
            body.append("\n".join([*header, *self.loads]))
            body.append("\n".join([*self.lines, *save]))
        head = [
            f"# Converted from {os.path.basename(self.source.name)} by `alg convert mergekit`.",
            "# alg reads local folders and downloads nothing: fetch each model first, e.g.",
            "#   hf download ORG/NAME --local-dir ORG/NAME",
            "# (relative paths resolve against this recipe's folder), or edit the paths.",
            "",
            'out = "merged"  # the output folder: alg run RECIPE --set out=PATH',
        ]
        return "\n".join(head) + "\n\n" + "\n\n".join(b for b in body if b) + "\n"

    def document(self, doc: Y, index: int, count: int, last: bool) -> tuple[list[str], list[str]]:
        if not doc.is_map:
            raise doc.error("a mergekit config is a mapping (merge_method:, models: or slices:, ...)")
        top = doc.mapping(TOP_KEYS, "a mergekit config")
        header = []
        if count > 1:
            label = next((top[k].string(k) for k in ("name", "out_path") if k in top), None)
            header.append(f"# ---- document {index + 1} of {count}" + (f": {label}" if label else ""))
        if "modules" in top:
            raise top["modules"].error(
                "'modules' (a separate merge per module of a multimodal model) is not supported "
                "by alg; convert one module's models/slices at a time"
            )
        if "merge_method" not in top:
            raise doc.error("missing 'merge_method' (linear, ties, slerp, passthrough, ...)")
        method_y = top["merge_method"]
        mname = method_y.string("merge_method")
        if mname in UNSUPPORTED_METHODS:
            raise method_y.error(UNSUPPORTED_METHODS[mname])
        if mname not in METHODS:
            raise method_y.error(
                f"merge method '{mname}' is not supported{did_you_mean(mname, METHODS)}"
            ).with_note(f"supported: {', '.join(METHODS)}")
        method = METHODS[mname]
        if ("models" in top) == ("slices" in top):
            raise doc.error("a mergekit config needs exactly one of 'models' or 'slices'")
        base_node = top.get("base_model")
        base_ref = self.ref(base_node) if base_node is not None and not base_node.is_null else None
        if base_ref is None:
            base_node = None
        gparams = self.params_map(top.get("parameters"))
        described = [f"merge_method: {mname}"] + ([f"base_model: {base_ref}"] if base_ref else [])
        header.append("# mergekit " + ", ".join(described))

        # models first, in the config's order (the base first), so loads read top-down
        if base_ref is not None and method.base != "none":
            self.model(base_ref, base_node, "base_model")
        slices = self.slices(top, base_ref, base_node, method)
        tokenizer = self.tokenizer(top, method, slices)

        parts = []
        for k, slc in enumerate(slices):
            tag = f"_{k + 1}" if len(slices) > 1 else ""
            parts.append(self.merge(method, slc, gparams, tokenizer, tag, method_y))
        if len(parts) == 1:
            expr = parts[0]
        else:
            names = []
            for k, p in enumerate(parts):
                n = self.fresh(f"part{k + 1}")
                self.lines.append(f"{n} = {p}")
                names.append(n)
            expr = f"stack({', '.join(names)})"

        label = next((top[k].string(k) for k in ("name", "out_path") if k in top), None)
        var = self.fresh("merged" if last or label is None else _ident(label))
        self.lines.append(f"{var} = {expr}")
        save: list[str] = []
        dtype = self.dtype(top)
        template = self.chat_template(top)
        if last:
            extra = "".join(f", {k}={_q(v)}" for k, v in (("dtype", dtype), ("chat_template", template)) if v is not None)
            save.append(f"save({var}, out{extra})")
        else:
            for k in ("name", "out_path"):
                if k in top:
                    self.results[self.norm(top[k].string(k))] = var
            where = f" to {top['out_path'].string('out_path')}" if "out_path" in top else ""
            save.append(_comment(
                f"mergekit-mega wrote this document{where}; alg keeps it in memory and streams "
                f"it into the next (add save({var}, \"PATH\") to keep a copy)"))
            if dtype is not None:
                save.append(_comment(f"mergekit stored this intermediate as {dtype}; alg keeps "
                                     "full precision"))
            if template is not None:
                save.append(_comment("mergekit gave this intermediate a chat template; a copy saved "
                                     f"with save({var}, \"PATH\", chat_template=...) would have it"))
        return header, save

    @staticmethod
    def chat_template(top: dict[str, Y]) -> str | None:
        """The config's chat_template (a name, "auto" or a template), checked as save()
        checks it (chat.choose), or None."""
        if "chat_template" not in top or top["chat_template"].is_null:
            return None
        value = top["chat_template"].string("chat_template")
        if not value:
            return None  # mergekit: an empty template sets none
        try:
            chat.choose(value, [])
        except ValueError as e:
            raise top["chat_template"].error(str(e)) from None
        return value

    def dtype(self, top: dict[str, Y]) -> str | None:
        chosen = None
        for k in ("dtype", "out_dtype"):
            if k in top and not top[k].is_null:
                d = top[k].string(k)
                if d.lower() not in DTYPES:
                    raise top[k].error(f"unknown dtype '{d}'{did_you_mean(d.lower(), DTYPES)}")
                chosen = d.lower()
        if "dtype" in top and "out_dtype" not in top:
            self.note(f"mergekit computes in dtype {chosen}; alg computes in float32 "
                              f"(--float64 on request) and stores {chosen}")
        return chosen

    # ---- models ----------------------------------------------------------------------------

    @staticmethod
    def norm(ref: str) -> str:
        return os.path.normpath(ref) if ref.startswith((".", "/")) else ref

    def ref(self, y: Y) -> str:
        if y.is_map:
            raise y.error("write the model reference as a string: org/name or a local path")
        ref = y.string("a model reference")
        if ref.count("+") > 1 or ref.startswith("+") or ref.endswith("+"):
            raise y.error(f"'{ref}' is not a model reference: write MODEL or MODEL+LORA (one adapter)")
        if "@" in ref:
            raise y.error(
                f"'{ref}' pins a revision ('@'); alg reads local folders only: download that "
                "revision to a folder and reference the folder"
            )
        return ref

    def model(self, ref: str, node: Y | None, role: str = "") -> str:
        key = self.norm(ref)
        if key in self.results:
            return self.results[key]
        if key in self.models:
            return self.models[key]
        if "+" in ref:  # mergekit's MODEL+LORA: the adapter merged into its model first
            model, adapter = ref.split("+")
            inner = self.model(model, node)
            var = self.fresh(_ident(adapter))
            self.models[key] = var
            path = self.model_paths.get(adapter, adapter)
            self.loads.append(f"{var} = lora({inner}, {_q(path)})" + (f"  # {role}" if role else ""))
            return var
        var = self.fresh(_ident(ref))
        self.models[key] = var
        path = self.model_paths.get(ref, ref)
        comment = [role] if role else []
        if path != ref:
            comment.append(ref)
        self.loads.append(f"{var} = load({_q(path)})" + (f"  # {', '.join(comment)}" if comment else ""))
        return var

    def slices(self, top: dict[str, Y], base_ref: str | None, base_node: Y | None,
               method: Method) -> list[OutSlice]:
        if "models" in top:
            entries = top["models"].seq("models")
            if not entries:
                raise top["models"].error("models is empty")
            sources = []
            for e in entries:
                m = e.mapping(MODEL_KEYS, "a models entry")
                if "model" not in m:
                    raise e.error("a models entry needs 'model'")
                ref = self.ref(m["model"])
                role = "base_model" if ref == base_ref else ""
                sources.append(Src(ref, m["model"], self.model(ref, m["model"], role),
                                   self.params_map(m.get("parameters")), None))
            if base_ref is not None and method.base == "none" and all(s.ref != base_ref for s in sources):
                # mergekit adds a base_model missing from models as one more input
                sources.append(Src(base_ref, base_node, self.model(base_ref, base_node, "base_model"),
                                   None, None))
                self.note(f"mergekit adds base_model {base_ref} to the models of "
                                  f"{method.func}, as one more input")
            return [OutSlice(sources, None, base_ref, base_node, top["models"], sliced=False)]
        out = []
        for s in top["slices"].seq("slices"):
            m = s.mapping(SLICE_KEYS, "an output slice")
            if "residual_weight" in m:
                raise m["residual_weight"].error("residual_weight is not supported by alg")
            if "sources" not in m:
                raise s.error("an output slice needs 'sources'")
            sb_node = m.get("base_model")
            sb = self.ref(sb_node) if sb_node is not None and not sb_node.is_null else None
            sources = []
            for e in m["sources"].seq("sources"):
                sm = e.mapping(SOURCE_KEYS, "a slice source")
                if "model" not in sm:
                    raise e.error("a slice source needs 'model'")
                if "layer_range" not in sm:
                    raise e.error("a slice source needs 'layer_range: [start, stop]'")
                ref = self.ref(sm["model"])
                start, stop = self.layer_range(sm["layer_range"])
                var = self.model(ref, sm["model"], "base_model" if ref == (sb or base_ref) else "")
                sources.append(Src(ref, sm["model"], f"layers({var}, {start}, {stop})",
                                   self.params_map(sm.get("parameters")), (start, stop)))
            if not sources:
                raise m["sources"].error("sources is empty")
            lengths = {x.layer_range[1] - x.layer_range[0] for x in sources}
            if len(lengths) > 1:
                raise m["sources"].error("all sources of a slice must span the same number of layers")
            out.append(OutSlice(sources, self.params_map(m.get("parameters")), sb or base_ref,
                                sb_node if sb else base_node, s, sliced=True,
                                offset=sum(o.sources[0].layer_range[1] - o.sources[0].layer_range[0]
                                           for o in out)))
        if not out:
            raise top["slices"].error("slices is empty")
        return out

    @staticmethod
    def layer_range(y: Y) -> tuple[int, int]:
        v = y.value() if y.is_seq else None
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            raise y.error("layer_range must be [start, stop]: two whole numbers")
        if not 0 <= v[0] < v[1]:
            raise y.error(f"layer_range [{v[0]}, {v[1]}] is empty or negative: start < stop, "
                          "half-open like Python's range")
        return v[0], v[1]

    def tokenizer(self, top: dict[str, Y], method: Method, slices: list[OutSlice]) -> str | None:
        node = top.get("tokenizer_source")
        if "tokenizer" in top:
            if node is not None:
                raise top["tokenizer"].error("give tokenizer_source or tokenizer, not both")
            t = top["tokenizer"].mapping(TOKENIZER_KEYS, "tokenizer")
            for k in ("tokens", "pad_to_multiple_of"):
                if k in t and not t[k].is_null:
                    raise t[k].error(f"tokenizer.{k} is not supported by alg")
            node = t.get("source")
        if node is None or node.is_null:
            return None
        src = node.string("tokenizer_source")
        if method.base == "passthrough":
            raise node.error("tokenizer_source with passthrough is not supported: stack() takes "
                             "the first part's tokenizer; align the models' vocabularies first")
        if len(slices) > 1:
            raise node.error("tokenizer_source with several output slices is not supported; "
                             "align([...]) the models first, then slice them")
        if src in ("base", "union"):
            return _q(src)
        ref = src[len("model:"):] if src.startswith("model:") else src
        return self.model(ref, node, "tokenizer_source")

    # ---- parameters ----------------------------------------------------------------------

    def params_map(self, y: Y | None) -> Y | None:
        if y is None or y.is_null:
            return None
        if not y.is_map:
            raise y.error("parameters must be a mapping of name: value")
        for name, key, _ in y.items():
            if name not in ALL_PARAMS:
                close = did_you_mean(name, ALL_PARAMS)
                if close:
                    raise key.error(f"unknown mergekit parameter '{name}'{close}")
        return y

    @staticmethod
    def lookup(y: Y | None, name: str) -> Y | None:
        if y is None:
            return None
        for k, _, v in y.items():
            if k == name and not v.is_null:
                return v
        return None

    def chain(self, name: str, levels: list[Y | None], default: P | None, missing: Y,
              who: str | None = None) -> P:
        """mergekit's lookup: the first level with a value for a tensor wins."""
        present = [lv for lv in levels if lv is not None]
        cut = next((i for i, lv in enumerate(present) if self.total(lv)), None)
        if cut is not None:
            present, acc = present[: cut + 1], None
        else:
            acc = default
        if not present and acc is None:
            where = (f" for model {who}: give it in this model's parameters or in the top-level "
                     "parameters" if who else ": give it in the top-level parameters")
            raise missing.error(f"missing parameter '{name}'{where}")
        for lv in reversed(present):
            acc = self.setting(name, lv, acc)
        assert acc is not None
        return acc

    @staticmethod
    def total(y: Y) -> bool:
        """Whether a setting yields a value for every tensor."""
        if y.is_scalar or (y.is_seq and all(Y(n, y.source).is_scalar for n in y.node.value)):
            return True
        conds = [y] if y.is_map else y.seq("a parameter")
        for c in conds:
            f = _Converter.lookup(c, "filter") if c.is_map else None
            if f is None or f.value() == "*":
                return True
        return False

    def setting(self, name: str, y: Y, fallback: P | None) -> P:
        if y.is_scalar or (y.is_seq and all(Y(n, y.source).is_scalar for n in y.node.value)):
            return self.value(name, y)
        conds = [y] if y.is_map else y.seq(f"parameter '{name}'")
        # entries after one without filter are never reached
        for i, c in enumerate(conds):
            f = self.lookup(c, "filter") if c.is_map else None
            if f is None or f.value() == "*":
                conds = conds[: i + 1]
                break
        acc = fallback
        for c in reversed(conds):
            m = c.mapping(COND_KEYS, f"a conditional value of '{name}'")
            if "value" not in m:
                raise c.error(f"a conditional value of '{name}' needs 'value'")
            val = self.value(name, m["value"])
            f = m.get("filter")
            pattern = None if f is None or f.is_null else f.string("filter")
            if pattern is None or pattern == "*":
                acc = val
                continue
            if acc is None:
                raise c.error(
                    f"'{name}' has no value for tensors that match none of its filters; add an "
                    f"entry without filter (- value: ...) as the default"
                )
            if self.numbering and _LAYER_NUMBER.search(pattern):
                raise f.error(
                    f"filter '{pattern}' names a layer number, which alg cannot match as "
                    f"mergekit does here: mergekit matches '{name}' against tensor names whose "
                    f"layers count from {self.numbering} in this slice, alg's layers(...) counts "
                    "them from 0"
                )
            pat = re.escape(pattern) if _REGEX_META.search(pattern) else pattern
            acc = P(f"where({_q(pat)}, {val.text}, {acc.text})", node=c)
        assert acc is not None
        return acc

    def value(self, name: str, y: Y) -> P:
        """A scalar or a gradient (list of numbers -> ramp)."""
        if y.is_seq:
            items = y.seq(name)
            if not items:
                raise y.error(f"'{name}': an empty gradient")
            nums = [self.number(name, i) for i in items]
            if len(nums) == 1:
                return P(_num(nums[0]), nums[0], y)
            return P(f"ramp({', '.join(_num(v) for v in nums)}, rule=\"mergekit\")", node=y)
        if y.is_map:
            raise y.error(f"'{name}': a conditional value cannot nest another")
        v = self.number(name, y)
        return P(_num(v), v, y)

    @staticmethod
    def number(name: str, y: Y) -> float | int:
        v = y.value() if y.is_scalar else None
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v in (float("inf"), float("-inf")):
            raise y.error(f"'{name}' must be a finite number or a list of numbers (a gradient)")
        return v

    def flag(self, name: str, slc: OutSlice, gparams: Y | None, default: bool | None) -> tuple[bool | None, Y | None]:
        """A boolean (global) parameter: its value and node, or the default and None."""
        for lv in (slc.params, gparams):
            y = self.lookup(lv, name)
            if y is not None:
                v = y.value() if y.is_scalar else None
                if not isinstance(v, bool):
                    raise y.error(f"'{name}' must be true or false")
                return v, y
        return default, None

    def scalar_global(self, name: str, slc: OutSlice, gparams: Y | None, default: P | None,
                      missing: Y) -> P:
        # mergekit matches a shared parameter's filters against the output tensor's name
        self.numbering = slc.offset
        return self.chain(name, [self.lookup(slc.params, name), self.lookup(gparams, name)],
                          default, missing)

    def per_model(self, name: str, src: Src, slc: OutSlice, gparams: Y | None,
                  default: P | None) -> P:
        levels = [self.lookup(src.params, name), self.lookup(slc.params, name), self.lookup(gparams, name)]
        # mergekit matches a per-model parameter's filters against that model's tensor name
        self.numbering = src.layer_range[0] if src.layer_range else 0
        return self.chain(name, levels, default, src.node, src.ref)

    def bind(self, arg: str, p: P, tag: str = "") -> str:
        """A parameter as an argument: inline when short, else a named top-level value."""
        if p.simple:
            return p.text
        var = self.fresh(arg + tag)
        self.lines.append(f"{var} = {p.text}")
        return var

    def per_model_arg(self, arg: str, ps: list[P], srcs: list[Src], tag: str) -> str:
        """One value for all models, or a list with one per model."""
        if all(p.text == ps[0].text for p in ps):
            return self.bind(arg, ps[0], tag=tag)
        if all(p.num is not None for p in ps):
            return self.bind(arg, P("[" + ", ".join(p.text for p in ps) + "]"), tag=tag)
        var = self.fresh(arg + tag)
        rows = [f"    {p.text},  # {s.ref}" for p, s in zip(ps, srcs, strict=True)]
        self.lines.append("\n".join([f"{var} = [", *rows, "]"]))
        return var

    def ignored(self, method: Method, mname: str, slc: OutSlice, gparams: Y | None) -> None:
        seen, per_model = [], []
        for lv in [*(s.params for s in slc.sources), slc.params, gparams]:
            if lv is None:
                continue
            for k, _, _ in lv.items():
                if k not in method.params and k not in seen:
                    seen.append(k)
        for s in slc.sources:
            for k, _, _ in (s.params.items() if s.params is not None else ()):
                if k in method.params and method.params[k].shared and k not in per_model:
                    per_model.append(k)
        if seen:
            self.note(f"mergekit's {mname} does not read {', '.join(seen)}; left out")
        if per_model:
            self.note(f"mergekit reads {', '.join(per_model)} once per tensor, from the slice or "
                      "top-level parameters, never a model's; the model-level value is left out")

    # ---- one merge -----------------------------------------------------------------------

    def keyword(self, method: Method, mk: str, p: P, tag: str, kw: list[str], node: Y | None) -> None:
        """Write `keyword=value` for mergekit parameter `mk` when its value is not alg's
        default; refuse a value alg's function cannot take."""
        spec = method.params[mk]
        sig = signature(method.func)
        if not method.takes(spec.keyword):
            if p.num is not None and p.num == spec.default:
                return
            raise (node or p.node).error(f"{mk}: {p.text} is not supported: alg's {method.func} has no "
                                         f"counterpart of it (mergekit's default is {_show(spec.default)})")
        if p.num is not None and p.num == sig.default(spec.keyword):
            return
        if p.num is None and not sig.per_tensor(spec.keyword):
            raise (node or p.node).error(f"'{mk}' varies over tensors here, but alg's {method.func} "
                                         f"takes one number for {spec.keyword}=")
        kw.append(f"{spec.keyword}={self.bind(spec.keyword, p, tag=tag)}")

    def boolean(self, method: Method, mk: str, slc: OutSlice, gparams: Y | None, kw: list[str]) -> bool:
        """A shared true/false parameter: written as alg's keyword when it is not alg's
        default; refused when alg's function has no keyword and does not do that."""
        spec = method.params[mk]
        v, node = self.flag(mk, slc, gparams, spec.default)
        if method.takes(spec.keyword):
            if v != method.alg_default(spec.keyword):
                kw.append(f"{spec.keyword}={_show(v)}")
        elif v != spec.default and node is not None:
            raise node.error(f"{mk}: {_show(v)} is not supported for {method.func}: alg's "
                             f"{method.func} has no {mk}= and does what mergekit's default "
                             f"({mk}: {_show(spec.default)}) does")
        return v

    def number_param(self, method: Method, mk: str, slc: OutSlice, gparams: Y | None, tag: str,
                     kw: list[str], others: list[Src] | None = None) -> None:
        """A numeric parameter with a default: shared (slice, top level) or, when mergekit
        reads it per model (gamma, epsilon), one value that every model must agree on."""
        spec = method.params[mk]
        dflt = P(_num(spec.default), spec.default)
        if spec.shared or others is None:
            p = self.scalar_global(mk, slc, gparams, dflt, slc.node)
            node = self.lookup(slc.params, mk) or self.lookup(gparams, mk)
        else:
            ps = [self.per_model(mk, s, slc, gparams, dflt) for s in others]
            for q, s in zip(ps[1:], others[1:], strict=True):
                if q.text != ps[0].text:
                    raise (self.lookup(s.params, mk) or s.node).error(
                        f"'{mk}' differs between models; alg's {method.func} takes one value for all")
            p = ps[0]
            node = next((y for s in others for y in [self.lookup(s.params, mk)] if y is not None),
                        None) or self.lookup(slc.params, mk) or self.lookup(gparams, mk)
        self.keyword(method, mk, p, tag, kw, node)

    def merge(self, method: Method, slc: OutSlice, gparams: Y | None, tokenizer: str | None,
              tag: str, method_y: Y) -> str:
        mname = method.func
        self.ignored(method, mname, slc, gparams)
        srcs = slc.sources
        if method.base == "passthrough":
            if len(srcs) != 1:
                raise slc.node.error(f"passthrough takes one model per slice, got {len(srcs)}")
            s = srcs[0]
            scale = self.per_model("scale", s, slc, gparams, P("1", 1))
            if scale.num == 1:
                return s.expr
            return f"{self.bind('scale', scale, tag=tag)} * {s.expr}"
        base: Src | None = None
        others = srcs
        if method.base != "none" and slc.base_ref is not None:
            found = [s for s in srcs if s.ref == slc.base_ref]
            if found:
                base = found[0]
                others = [s for s in srcs if s.ref != slc.base_ref]
                if base.params is not None:
                    self.note(f"{mname} does not read the parameters of "
                              f"base_model {slc.base_ref}")
            elif slc.sliced:
                raise slc.base_node.error(
                    f"base_model {slc.base_ref} is not one of this slice's sources; list it there "
                    "with the layer_range to use"
                )
            else:  # mergekit adds a base_model missing from models as one more input
                base = Src(slc.base_ref, slc.base_node, self.model(slc.base_ref, slc.base_node),
                           None, None)
        if method.base in ("required", "pair") and base is None:
            raise method_y.error(f"{mname} needs a base_model")
        if not others:
            raise slc.node.error(f"{mname} needs models besides base_model {slc.base_ref}")
        if method.base == "pair" and len(others) != 1:
            raise slc.node.error(f"{mname} merges base_model with exactly one other model, "
                                 f"got {len(others)}")

        kw: list[str] = []
        ms = "[" + ", ".join(s.expr for s in others) + "]"

        def weights() -> list[P]:
            return [self.per_model("weight", s, slc, gparams, None) for s in others]

        if mname in ("slerp", "nearswap"):
            t = self.scalar_global("t", slc, gparams, None, method_y)
            pos = [base.expr, others[0].expr, self.bind("t", t, tag=tag)]
        elif mname == "linear":
            kw.append(f"weights={self.per_model_arg('weights', weights(), others, tag)}")
            self.boolean(method, "normalize", slc, gparams, kw)
            pos = [ms]
        elif mname == "model_stock":
            if len(others) < 2:
                raise slc.node.error("model_stock needs at least two models besides base_model")
            self.boolean(method, "filter_wise", slc, gparams, kw)
            pos = [base.expr, ms]
        elif mname == "sce":
            self.number_param(method, "select_topk", slc, gparams, tag, kw)
            self.int8(slc, gparams)
            pos = [base.expr, ms]
        elif mname == "karcher":
            for pname in ("max_iter", "tol"):
                self.number_param(method, pname, slc, gparams, tag, kw)
            pos = [ms]
        elif mname == "arcee_fusion":
            pos = [base.expr, others[0].expr]
        elif mname in ("ram", "ramplus_tl"):
            for pname in method.params:
                self.number_param(method, pname, slc, gparams, tag, kw)
            pos = [base.expr, ms]
        elif mname == "nuslerp":
            if len(others) != 2:
                raise slc.node.error(f"nuslerp merges exactly two models (plus an optional "
                                     f"base_model), got {len(others)}")
            if self.boolean(method, "nuslerp_flatten", slc, gparams, kw):
                row_wise, _ = self.flag("nuslerp_row_wise", slc, gparams, False)
                if row_wise:
                    self.note("mergekit ignores nuslerp_row_wise while nuslerp_flatten is true "
                              "(the whole tensor is one vector); left out")
            else:
                self.boolean(method, "nuslerp_row_wise", slc, gparams, kw)
            wa, wb = weights()
            if wa.num is not None and wb.num is not None:
                total = wa.num + wb.num
                t = P(_num(0.5 if abs(total) < 1e-6 else wb.num / total))
                self.note(f"t = weight of the second / sum of weights "
                          f"({_num(wb.num)} / ({_num(wa.num)} + {_num(wb.num)}))")
            else:
                t = P(f"{wb.text} / ({wa.text} + {wb.text})")
            pos = [others[0].expr, others[1].expr, self.bind("t", t, tag=tag)]
            if base is not None:
                kw.insert(0, f"base={base.expr}")
        elif mname == "multislerp":
            kw.append(f"weights={self.per_model_arg('weights', weights(), others, tag)}")
            if base is not None:
                kw.append(f"base={base.expr}")
            self.boolean(method, "normalize_weights", slc, gparams, kw)
            eps = self.lookup(slc.params, "eps") or self.lookup(gparams, "eps")
            if eps is not None and self.number("eps", eps) != method.params["eps"].default:
                raise eps.error("eps other than mergekit's 1e-8 is not supported by alg's multislerp")
            pos = [ms]
        else:
            pos = self.gta(method, mname, base, others, slc, gparams, tag, kw, weights)
        if tokenizer is not None:
            kw.append(f"tokenizer={tokenizer}")
        return _call(mname, [*pos, *kw])

    def int8(self, slc: OutSlice, gparams: Y | None) -> None:
        v, _ = self.flag("int8_mask", slc, gparams, False)
        if v:
            self.note("int8_mask only saves mergekit memory; alg streams, so it "
                      "has no counterpart")

    def gta(self, method: Method, mname: str, base: Src, others: list[Src], slc: OutSlice,
            gparams: Y | None, tag: str, kw: list[str], weights) -> list[str]:
        ws = weights()
        norm_spec = method.params["normalize"]
        norm, norm_node = self.flag("normalize", slc, gparams, norm_spec.default)
        norm_kw: list[str] = []
        if method.takes(norm_spec.keyword):
            if norm != method.alg_default(norm_spec.keyword):
                norm_kw.append(f"normalize={_show(norm)}")
        elif norm:
            # alg's function adds the weighted task vectors unnormalized: divide the weights
            # by their sum (mergekit divides by 1 where that sum is below 1e-8)
            if not all(w.num is not None for w in ws):
                raise norm_node.error(
                    f"normalize: true is not supported for {mname} with per-layer or per-tensor "
                    f"weights: alg's {mname} has no normalize=, and the converter divides only "
                    "plain-number weights by their sum"
                )
            total = sum(w.num for w in ws)
            if abs(total) >= 1e-8:
                ws = [P(f"{w.text} / {_num(total)}", w.num / total) for w in ws]
            self.note("normalize: true divides the weights by their sum")
        rescale, rnode = self.flag("rescale", slc, gparams, method.params["rescale"].default)
        if rescale != method.rescales:
            assert rnode is not None
            raise rnode.error(f"rescale: {_show(rescale)} is not supported for {mname}; alg's "
                              f"{mname} {'always rescales' if method.rescales else 'never rescales'} "
                              f"(mergekit's default, rescale: {_show(method.params['rescale'].default)})")
        self.int8(slc, gparams)
        lead = [f"weights={self.per_model_arg('weights', ws, others, tag)}"]
        if method.takes(method.params["density"].keyword):
            ds = [self.per_model("density", s, slc, gparams, P("1.0", 1.0)) for s in others]
            lead.append(f"density={self.per_model_arg('density', ds, others, tag)}")
        for pname in ("gamma", "epsilon"):
            if pname in method.params:
                self.number_param(method, pname, slc, gparams, tag, lead, others)
        lead += norm_kw
        self.number_param(method, "lambda", slc, gparams, tag, lead)
        if method.seeded:
            self.note(f"mergekit draws {mname}'s random masks unseeded; alg seeds "
                      "them (seed=0), so the result is reproducible but not mergekit's draw")
        kw[:0] = lead
        return [base.expr, "[" + ", ".join(s.expr for s in others) + "]"]


def _show(v: Any) -> str:
    """A value as alg writes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if v is REQUIRED:
        return "required"
    return _num(v) if isinstance(v, int | float) else str(v)


__all__ = ["METHODS", "mergekit_to_alg"]
