"""LoRA adapters merged into their base: `lora(m, adapter)`, what peft's
`merge_and_unload()` computes, streamed, without loading either model.

An adapter folder as peft's `save_pretrained` writes it holds `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are named `base_model.model.<module>.lora_A
.weight` ([r, in]) and `.lora_B.weight` ([out, r]) for each adapted linear module, and
`base_model.model.<tensor>` for the tensors trained whole (`modules_to_save`, trained
biases). The merged weight of module M is

    W_M + scale * s_M * (B_M @ A_M),   s_M = alpha_M / r_M   (alpha_M / sqrt(r_M) with use_rslora)

where r_M is the pair's rank and alpha_M the config's `lora_alpha`, or the value of the
first `alpha_pattern` key that matches M as peft matches it (the key is the end of M's
dotted name: `(.*\\.)?KEY$`); a `rank_pattern` must agree with the pair's rank. The
product is scaled before it is added, as peft does, so that float32 merges equal peft's
bit for bit. Tensors trained whole replace m's. Everything else an adapter may hold
(DoRA's magnitudes, embedding or bias LoRA, Conv1D's transposed layout, trainable
tokens) is refused by name at check time, from the header and the config alone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..errors import AlgIOError, AlgTypeError
from ..family import Family
from ..graph import Node, fmt_param
from ..ir import LowRank
from ..lower import Lowerer, TExpr, lin
from ..rules import derived, scalar_param
from ..signature import Call
from ..values import Model

family = Family("lora")

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
PAIR = (".lora_A.weight", ".lora_B.weight")
SAVED = ".modules_to_save.default"  # older peft's name for a tensor trained whole
# config switches alg does not merge: (key, the value alg merges, what the other means)
REFUSED = (
    ("use_dora", False, "DoRA (its magnitude vectors)"),
    ("fan_in_fan_out", False, "a Conv1D layout (GPT-2's transposed weights)"),
    ("lora_bias", False, "a bias on lora_B"),
)


@family.builtin(
    "lora(m: Checkpoint, adapter: String, scale: Param = 1)",
    "m with a PEFT LoRA adapter merged in, as peft's merge_and_unload: each adapted weight "
    "W + scale·(alpha/r)·B·A (alpha/√r with use_rslora; alpha_pattern per module), and the "
    "tensors the adapter trained whole in place of m's. adapter: the folder peft's "
    "save_pretrained wrote (adapter_config.json, adapter_model.safetensors). Headers only.",
)
def _lora(call: Call, m: Model, adapter: str, scale: Any) -> Model:
    from ..io.files import check_path_text, joined, read_json

    at = call.at("adapter")
    folder = joined(adapter, call.checker.base_dir)
    check_path_text(folder / CONFIG, str(Path(adapter) / CONFIG), at)  # a NUL byte, a name too long

    def there(p: Path, test: str) -> bool:  # errors other than absence: said by the reads below
        try:
            return getattr(p, test)()
        except OSError:
            return False

    if there(folder, "is_dir") and not there(folder / CONFIG, "exists"):
        raise call.error(AlgIOError, f"'{adapter}' is not a PEFT adapter folder: it has no {CONFIG}", "adapter")
    if there(folder / "adapter_model.bin", "is_file") and not there(folder / WEIGHTS, "is_file"):
        raise call.error(AlgTypeError, f"'{adapter}' holds adapter_model.bin, a pickle, which alg does not "
                         f"load; save the adapter with safetensors (peft's default) to get {WEIGHTS}", "adapter")
    cfg = read_json(folder / CONFIG, str(Path(adapter) / CONFIG), at, "adapter config")
    weights = call.checker.load(str(Path(adapter) / WEIGHTS), at)
    pairs, whole = _read(call, m, cfg, weights, adapter)
    node = Node("lora", (m.node, weights.node), (scalar_param(scale), pairs, whole, adapter), span=call.span)
    return derived(node, m)


def _read(call: Call, m: Model, cfg: dict, weights: Model, adapter: str) -> tuple[tuple, tuple]:
    """The adapter's pairs ((weight, key of A, key of B, rank, s), ...) and the tensors it
    trained whole ((name, key), ...), checked against m's tensor table."""
    def bad(msg: str) -> AlgTypeError:
        return call.error(AlgTypeError, f"lora(): {msg}", "adapter")

    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise bad(f"'{adapter}' is an adapter of PEFT type {kind!r}; lora() merges LoRA adapters")
    for key, ok, what in REFUSED:
        if cfg.get(key, ok) != ok:
            raise bad(f"the adapter uses {what} ({key}: {cfg[key]!r}), which alg does not merge")
    r, alpha = _number(bad, "r", cfg.get("r"), whole=True), _number(bad, "lora_alpha", cfg.get("lora_alpha"))
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise bad(f"{CONFIG}'s use_rslora must be true or false, not {rslora!r}")
    rank_pattern, alpha_pattern = (_pattern(bad, k, cfg.get(k), k == "rank_pattern")
                                   for k in ("rank_pattern", "alpha_pattern"))
    tensors, table = weights.type.tensors, m.type.tensors
    halves: dict[str, dict[int, str]] = {}
    whole = []
    for key in tensors:
        if not key.startswith(PREFIX):
            raise bad(f"adapter tensor '{key}' does not start with '{PREFIX}' (peft's name for the model)")
        rest = key[len(PREFIX):]
        side = next((i for i, end in enumerate(PAIR) if rest.endswith(end)), None)
        if side is not None:
            halves.setdefault(rest[: -len(PAIR[side])], {})[side] = key
            continue
        name = rest.replace(SAVED, "")
        if "lora_" in rest or name not in table:
            raise bad(f"adapter tensor '{key}' is neither a lora_A/lora_B pair nor a tensor of m "
                      "(alg merges linear layers' LoRA pairs and tensors trained whole)")
        if tensors[key].shape != table[name].shape:
            raise bad(f"adapter tensor '{key}' has shape {list(tensors[key].shape)} but m's '{name}' "
                      f"has {list(table[name].shape)}")
        whole.append((name, key))
    pairs = []
    for module, keys in halves.items():
        if len(keys) != 2:
            raise bad(f"module '{module}' has {PAIR[0 if 0 in keys else 1][1:]} but not "
                      f"{PAIR[1 if 0 in keys else 0][1:]}")
        if not (tensors[keys[0]].is_float and tensors[keys[1]].is_float):
            raise bad(f"module '{module}': lora_A and lora_B must be floating-point tensors, not "
                      f"{tensors[keys[0]].dtype} and {tensors[keys[1]].dtype}")
        a, b = tensors[keys[0]].shape, tensors[keys[1]].shape
        weight = module + ".weight"
        w = table.get(weight)
        if w is None:
            raise bad(f"the adapter adapts '{module}', but m has no tensor '{weight}'")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or tuple(w.shape) != (b[0], a[1]):
            raise bad(f"'{module}': lora_B {list(b)} @ lora_A {list(a)} does not make m's '{weight}' "
                      f"{list(w.shape)}")
        rank = a[0]
        want = rank_pattern.get(_pattern_key(rank_pattern, module), r)
        if want != rank:
            raise bad(f"'{module}' has rank {rank} but {CONFIG} says {want:g}")
        alpha_m = alpha_pattern.get(_pattern_key(alpha_pattern, module), alpha)
        s = alpha_m / (math.sqrt(rank) if rslora else rank)
        pairs.append((weight, keys[0], keys[1], rank, float(s)))
    if not pairs and not whole:
        raise bad(f"'{adapter}' holds no tensor")
    return tuple(sorted(pairs)), tuple(sorted(whole))


def _number(bad, name: str, v: Any, whole: bool = False) -> float:
    """A config number: positive (a whole number for a rank), finite, not a boolean."""
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
            or (whole and v != int(v))):
        raise bad(f"{CONFIG}'s {name} must be a positive {'whole ' if whole else ''}number, not {v!r}")
    return v


def _pattern(bad, name: str, v: Any, whole: bool) -> dict[str, float]:
    """rank_pattern / alpha_pattern: module-name regexes to numbers (absent: none)."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad(f"{CONFIG}'s {name} must map module names to numbers, not {v!r}")
    for key, x in v.items():
        try:
            re.compile(key)
        except re.error as e:
            raise bad(f"{CONFIG}'s {name} key {key!r} is not a regular expression ({e})") from None
        _number(bad, f"{name}[{key!r}]", x, whole)
    return v


def _pattern_key(keys, module: str) -> str | None:
    """peft's choice among rank_pattern / alpha_pattern keys: the first whose regex
    matches the end of the module's dotted name."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@family.lowering("lora")
def _lower(low: Lowerer, node: Node, name: str) -> TExpr:
    m, adapter = node.args
    scale, pairs, whole, _ = node.params
    w = low.tensor(m, name)
    for weight, key in whole:
        if weight == name:
            return low.tensor(adapter, key)
    for weight, ka, kb, rank, s in pairs:
        if weight == name:
            c = low.param(scale, node, name)
            delta = LowRank(low.tensor(adapter, kb), low.tensor(adapter, ka), rank, s if c == 1.0 else c * s, w.spec)
            return lin([(1.0, w), (1.0, delta)])
    return w


family.describes["lora"] = lambda node, a: f"lora({a[0]}, {json.dumps(node.params[3])}" + (
    "" if node.params[0] == 1.0 else f", scale={fmt_param(node.params[0])}") + ")"
