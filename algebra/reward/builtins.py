"""The reward builtins: reward models, data sets, pointwise algebra, baselines, sinks.

Like every builtin, these only check and build values: `reward(m)` reads headers, the
config and the tokenizer's files (never a weight); `responses`/`pairs` read their JSONL
(data is small and its errors should come before any model is loaded); `score` and
`evaluate` record sinks that `reward.engine` runs together after checking.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..chat import folder_template
from ..errors import AlgIOError, AlgTypeError, did_you_mean
from ..family import Family
from ..io.files import absolute, joined, resolved
from ..io.remote_code import code_markers
from ..signature import Call, is_finite
from ..types import type_name
from ..values import Model, Sink
from . import ops
from .batching import BATCH_TOKENS
from .data import Pairs, Responses, read_pairs, read_responses
from .generate import Generated, GenerateSpec
from .ops import PointwiseOp
from .values import (
    Baseline,
    Const,
    ModelReward,
    Normalize,
    Op,
    Refusal,
    Reward,
    TextFormat,
    is_number,
)

family = Family("reward")
builtin = family.builtin
# a value is of these types when its class says so (alg_type): Reward and its kinds,
# Responses and Generated, Pairs
family.value_type("Reward")
family.value_type("Responses")
family.value_type("Pairs")

DEFAULT_TEMPLATE = "{prompt}\n{response}"
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


@dataclass
class ScoreRequest:
    reward: Reward
    data: Responses | Generated
    out: Path
    names: list[tuple[str, Reward]]  # named sub-terms, written beside `reward`
    overwrite: bool = False  # an existing out may be replaced (overwrite=true or --force)


@dataclass
class EvalRequest:
    rewards: list[Reward]
    pairs: Pairs
    out: Path
    xs: list | None  # one x per reward (a sweep), or None
    xlabel: str
    plot: Path | None
    overwrite: bool = False  # existing out and plot may be replaced (overwrite=true or --force)
    by: str = "subset"  # the plot's lines: per subset, or per RewardBench section


# ---- helpers ----------------------------------------------------------------------------


def _path(call: Call, path: str) -> Path:
    return absolute(path, call.checker.base_dir)  # never raises: reading says what is wrong


def _checkpoint(call: Call, m: Any, param: str) -> Model:
    if isinstance(m, str):
        return call.checker.load(m, call.at(param))
    return m


def _read_path(call: Call, path: str, param: str) -> Path:
    """A data file the recipe reads (recorded: a recipe may not read what it writes)."""
    p = _path(call, path)
    call.checker.note_read(p, call.at(param), f"{call.name}() reads it", path)
    return p


def _no_custom_code(call: Call, model: Model, param: str) -> None:
    """Refuse a checkpoint whose folders ask transformers to run their own Python (its
    primary input's config, its tokenizer's files): alg never runs a checkpoint's code
    (io/remote_code.py)."""
    folders = [getattr(model.type.primary, "folder", None), _tokenizer_dir(model)]
    for folder in dict.fromkeys(f for f in folders if f is not None):
        markers = code_markers(folder)
        if markers:
            raise call.error(AlgIOError, f"{call.name}() would load this checkpoint with transformers, but "
                             f"'{folder}' asks to run its own Python ({', '.join(markers)}); alg never runs a "
                             "checkpoint's code. Use a checkpoint of a standard transformers architecture, "
                             "without these entries", param)


def _responses(call: Call, data: Any, param: str) -> Responses | Generated:
    if isinstance(data, str):
        return read_responses(_read_path(call, data, param), data, call.at(param))
    return data


def _pairs(call: Call, data: Any, param: str) -> Pairs:
    if isinstance(data, str):
        return read_pairs(_read_path(call, data, param), data, call.at(param))
    return data


def _out(call: Call, out: str, suffix: str, param: str = "out", overwrite: bool = False) -> Path:
    """A file the recipe writes. An existing one is refused unless `overwrite` (the
    sink's overwrite=true, or --force)."""
    target = resolved(joined(out, call.checker.base_dir), out, call.at(param))
    if target.suffix != suffix:
        raise call.error(AlgTypeError, f"{call.name}() writes {suffix}, so its output path must end in "
                         f"{suffix}, not '{target.name}'", param)
    if target.is_dir():
        raise call.error(AlgIOError, f"'{out}' is a folder", param)
    if os.path.lexists(target) and not overwrite:
        raise call.error(AlgIOError, f"'{out}' already exists; pass overwrite=true to {call.name}(), or "
                         "--force to alg run", param)
    call.checker.note_write([target], call.at(param), f"{call.name}()", out)
    return target


def _label(model: Model) -> str:
    """How plans and outputs name a checkpoint: its path relative to the cwd, or its
    expression for a computed one."""
    if model.node.op != "load":
        return model.node.describe()
    label = model.type.primary.label
    try:
        return str(Path(label).relative_to(Path.cwd()))
    except ValueError:
        return label


def _tokenizer_dir(model: Model) -> Path | None:
    """The folder holding the files of a checkpoint's own tokenizer (an aligned value's
    output vocabulary, else its primary input's), or None if it has none."""
    from ..vocab import model_tokenizer

    spec = model_tokenizer(model)
    folder = Path(spec.folder) if spec is not None else None
    if folder is None or not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return folder


def _check_template(call: Call, template: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise call.error(AlgTypeError, f"template is not a format string: {e}; write literal braces "
                         "as {{ and }}", "template") from None
    unknown = sorted(fields - {"prompt", "response", "eos"})
    if unknown:
        raise call.error(AlgTypeError, f"template may use {{prompt}}, {{response}} and {{eos}}, not "
                         f"{{{unknown[0]}}}", "template")
    if "response" not in fields:
        raise call.error(AlgTypeError, "template must contain {response}", "template")


def _positive_int(call: Call, v: Any, param: str) -> int:
    if not is_number(v) or v != int(v) or v < 1:
        raise call.error(AlgTypeError, f"{param} must be a positive whole number, not {v}", param)
    return int(v)


def _reward_arg(call: Call, v: Any, param: str) -> Reward | float:
    if isinstance(v, Reward):
        return v
    if is_number(v):
        return float(v)
    raise call.error(AlgTypeError, f"{call.name}() takes rewards and numbers, not {type_name(v)}", param)


# ---- reward models and data ---------------------------------------------------------------


@builtin(
    "reward(m: Checkpoint | String, template: String | None = none, batch_size: Int | None = none, "
    "max_length: Int | None = none, add_special_tokens: Bool | None = none)",
    "A reward model as a function (prompt, response) -> float: a sequence-classification "
    "checkpoint with one label (a path, or any checkpoint value such as a merge), scored at "
    "its last non-padding token. Text: `template`, a format string with {prompt}, "
    "{response} and optionally {eos} (the tokenizer's EOS token, unless the response ends "
    "with it), if given; else the tokenizer's chat template (the prompt's messages, then an "
    "assistant turn) if it has one; else \"{prompt}\\n{response}\". add_special_tokens: "
    "whether the tokenizer adds its special tokens (BOS, ...) to the text; default true for "
    "a format string, false for a chat template (which writes its own). TRL's GRPO scores "
    "text prompts as template=\"{prompt}{response}\", add_special_tokens=false; its "
    "RewardTrainer as template=\"{prompt}{response}{eos}\". Scored in batches of texts of "
    f"similar length: batch_size texts each, by default as many as fit {BATCH_TOKENS} tokens (texts x longest); "
    "texts are truncated to max_length tokens (default: the model's limit).",
)
def _reward(call: Call, m: Any, template: str | None, batch_size: float | None, max_length: float | None,
            add_special_tokens: bool | None) -> Reward:
    model = _checkpoint(call, m, "m")
    config = model.type.config or {}
    arch = model.type.architecture
    if not arch.endswith("ForSequenceClassification"):
        hint = ("; a causal LM is a policy (generate), and merge(rm, lm, lam) makes a reward model of one"
                if arch.endswith("ForCausalLM") else "")
        raise call.error(AlgTypeError, f"reward() needs a sequence-classification model, but this "
                         f"checkpoint is {arch}{hint}", "m")
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
    if labels != 1:
        raise call.error(AlgTypeError, f"reward() needs a model with one label (a scalar score); "
                         f"this one has {labels}", "m")
    folder = _tokenizer_dir(model)
    if folder is None:
        raise call.error(AlgIOError, "reward() needs the model's tokenizer, but its checkpoint has no "
                         "tokenizer files; load it from a Hugging Face folder", "m")
    _no_custom_code(call, model, "m")
    if template is not None:
        _check_template(call, template)
        kind, text = "format", template
    else:
        chat = folder_template(folder)
        kind, text = ("chat", chat) if chat else ("format", DEFAULT_TEMPLATE)
    special = (kind == "format") if add_special_tokens is None else bool(add_special_tokens)
    fmt = TextFormat(kind, text, special)
    bs = None if batch_size is None else _positive_int(call, batch_size, "batch_size")
    ml = None if max_length is None else _positive_int(call, max_length, "max_length")
    label = _label(model)
    return ModelReward(model.node, fmt, bs, ml, label, model)


@builtin('responses(path: String, prompt: String = "prompt", response: String = "response", '
         'split: String | None = none)',
         "Prompts with responses (several per prompt allowed): a JSONL, JSON, CSV or Parquet "
         "file, a datasets save_to_disk folder or a Hub-layout folder (split picks one of its "
         "splits). prompt and response name the columns. A prompt is text or a list of chat "
         "messages.")
def _responses_builtin(call: Call, path: str, prompt: str, response: str, split: str | None) -> Responses:
    return read_responses(_read_path(call, path, "path"), path, call.at("path"),
                          fields={"prompt": prompt, "response": response}, split=split, spans=call.spans)


@builtin('pairs(path: String, prompt: String | None = none, chosen: String | None = none, '
         'rejected: String | None = none, subset: String | None = none, id: String | None = none, '
         'split: String | None = none, format: String | None = none)',
         "Preference pairs: a JSONL, JSON, CSV or Parquet file, a datasets save_to_disk folder "
         "or a Hub-layout folder (split picks one of its splits). Columns 'prompt', 'chosen', "
         "'rejected' and optional 'subset' and 'id', or as format= lays them out (\"rewardbench\", "
         "\"autoj\", \"hh-rlhf\"); prompt=, chosen=, ... name other columns.")
def _pairs_builtin(call: Call, path: str, prompt: str | None, chosen: str | None, rejected: str | None,
                   subset: str | None, id: str | None, split: str | None, format: str | None) -> Pairs:
    fields = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "subset": subset, "id": id}
    return read_pairs(_read_path(call, path, "path"), path, call.at("path"), format=format, fields=fields,
                      split=split, spans=call.spans)


# ---- pointwise algebra: an alg function for each op of reward.ops --------------------------------


def _declare(op: PointwiseOp) -> Callable[[], None]:
    """Declare `op` as an alg function (an operator has none): on rewards it builds the tree
    node, on numbers it is `op.scalar`, a finite number or an error. Returns the retraction."""
    name, header = op.name, op.header
    if header is None:
        return lambda: None

    def impl(call: Call, **kw: Any) -> Any:
        if op.arity is None:
            items = kw["xs"]
            if len(items) == 1 and isinstance(items[0], tuple):  # sum([1, 2, 3])
                items = items[0]
            if not items:
                raise call.error(AlgTypeError, f"{name}() needs at least one value")
            for i, v in enumerate(items):
                if not (isinstance(v, Reward) or is_number(v)):
                    raise AlgTypeError(f"{name}() takes rewards and numbers, not {type_name(v)}",
                                       call.spans.get(f"xs[{i}]", call.span))
            args, at = tuple(items), None
        else:
            args, at = tuple(kw[p] for p in op.arg_names), (op.arg_names[0] if op.arity == 1 else None)
            unmet = op.check(kw) if op.check is not None else None
            if unmet is not None:
                raise call.error(AlgTypeError, unmet[1], unmet[0])
        if any(isinstance(v, Reward) for v in args):
            return Op(name, tuple(v if isinstance(v, Reward) else Const(float(v)) for v in args))
        try:
            out = op.scalar(*args)
        except (ArithmeticError, ValueError):  # exact arithmetic: an int quotient too large for a float
            out = math.nan
        if not is_finite(out):
            raise call.error(AlgTypeError, f"{name}({', '.join(map(str, args))}) is not a finite number", at)
        return out

    if _AT_IMPORT:  # one of this family's builtins, assembled with it by registry.py
        builtin(header, op.doc, variadic=op.arity is None)(impl)
        return lambda: None
    # an op registered later (a test, an extension): a family of its own, added to the
    # registry in use and taken out again by the retraction
    from ..family import in_use

    reg = in_use()
    if name in reg.builtins:
        raise ValueError(f"'{name}' is an alg function already")
    own = Family(f"reward op {name}")
    own.builtin(header, op.doc, variadic=op.arity is None)(impl)
    reg.add(own)

    def retract() -> None:
        reg.builtins.pop(name, None)
        if own in reg.families:
            reg.families.remove(own)

    return retract


_AT_IMPORT = True
ops.watch(_declare)
_AT_IMPORT = False


# ---- per-prompt baselines and normalisation ---------------------------------------------------


MISSING_DOC = ("missing: what a prompt with no responses in refs gets: \"error\" (the default: "
               "the run stops, naming the prompt), a number (a fixed value), or a generate(policy, ...) "
               "value, whose policy and sampling options give it references on demand (sampled once, "
               "cached on disk like generate's).")


def _missing(call: Call, missing: Any) -> Any:
    if isinstance(missing, str):
        if missing != "error":
            raise call.error(AlgTypeError, f'missing must be "error", a number or a generate(...) value, '
                             f"not '{missing}'", "missing")
        return missing
    if is_number(missing):
        if not math.isfinite(missing):
            raise call.error(AlgTypeError, f"missing must be a finite number, not {missing}", "missing")
        return float(missing)
    if isinstance(missing, Generated):
        return missing
    raise call.error(AlgTypeError, "missing=: a data set cannot answer for prompts it lacks; give a "
                     "generate(policy, ...) value to sample references, or a number", "missing")


@builtin('quantile(r: Reward, refs: Responses, q: Scalar, missing: String | Scalar | Responses = "error")',
         "Per prompt: the q-quantile (linear interpolation between order statistics) of r over "
         "that prompt's responses in refs. A reward that depends only on the prompt. " + MISSING_DOC)
def _quantile(call: Call, r: Reward, refs: Any, q: float, missing: Any) -> Reward:
    if not 0 <= q <= 1:
        raise call.error(AlgTypeError, f"quantile() needs 0 <= q <= 1, got {q}", "q")
    return Baseline(r, refs, "quantile", float(q), _missing(call, missing))


@builtin(f'refusal(r: Reward, text: String = "{DEFAULT_REFUSAL}")',
         "Per prompt: r of a fixed refusal response to the same prompt.")
def _refusal(call: Call, r: Reward, text: str) -> Reward:
    return Refusal(r, text)


BASELINE_STATS = ("mean", "median")


@builtin('baseline(r: Reward, refs: Responses, stat: String = "mean", '
         'missing: String | Scalar | Responses = "error")',
         "Per prompt: the mean (or median) of r over that prompt's responses in refs. " + MISSING_DOC)
def _baseline(call: Call, r: Reward, refs: Any, stat: str, missing: Any) -> Reward:
    if stat not in BASELINE_STATS:
        raise call.error(AlgTypeError, f"baseline() stat must be one of {', '.join(map(repr, BASELINE_STATS))}, "
                         f"not '{stat}'{did_you_mean(stat, BASELINE_STATS)}", "stat")
    fallback = _missing(call, missing)
    if stat == "median":
        return Baseline(r, refs, "quantile", 0.5, fallback)
    return Baseline(r, refs, "mean", None, fallback)


@builtin("normalize(r: Reward, data: Responses | Pairs | String)",
         "z-score: (r - mean) / std, with the mean and (population) standard deviation of r over "
         "data (every response; for pairs, every chosen and rejected), fixed once computed.")
def _normalize(call: Call, r: Reward, data: Any) -> Reward:
    return Normalize(r, _responses(call, data, "data"))


@builtin(
    "generate(policy: Checkpoint | String, prompts: String | List[String] | Responses | Pairs, "
    "n: Int = 16, temperature: Scalar = 0.9, max_new_tokens: Int = 64, seed: Int = 0, "
    "stop: String | List[String] | None = none, batch_size: Int | None = none)",
    "n samples per distinct prompt from a causal LM (transformers, seeded per prompt and sample), as a "
    "responses value. Prompts: a JSONL path (rows with 'prompt'), a list of strings, or the "
    "prompts of a data set. A sample ends at the first stop string, which is cut off. Many rows "
    "per forward pass (left-padded): batch_size rows, by default as many as fit a token budget. "
    "Cached on disk by policy content, prompts and options.",
)
def _generate(call: Call, policy: Any, prompts: Any, n: float, temperature: float, max_new_tokens: float,
              seed: float, stop: Any, batch_size: float | None) -> Generated:
    model = _causal_lm(call, policy, "policy")
    distinct = _distinct_prompts(call, prompts)
    if temperature < 0:
        raise call.error(AlgTypeError, "temperature must not be negative", "temperature")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if "" in stops:
        raise call.error(AlgTypeError, "a stop string must not be empty", "stop")
    spec = GenerateSpec(distinct, _positive_int(call, n, "n"), float(temperature),
                        _positive_int(call, max_new_tokens, "max_new_tokens"), int(seed), tuple(dict.fromkeys(stops)),
                        None if batch_size is None else _positive_int(call, batch_size, "batch_size"))
    label = _label(model)
    return Generated(model.node, spec, label, model)


def _causal_lm(call: Call, m: Any, param: str) -> Model:
    """A checkpoint that can sample text: a causal LM with its tokenizer, no custom code."""
    model = _checkpoint(call, m, param)
    arch = model.type.architecture
    if not arch.endswith("ForCausalLM"):
        raise call.error(AlgTypeError, f"{call.name}() samples from a causal LM, not {arch}", param)
    if _tokenizer_dir(model) is None:
        raise call.error(AlgIOError, f"{call.name}() needs the {param}'s tokenizer; load it from a "
                         "Hugging Face folder", param)
    _no_custom_code(call, model, param)
    return model


def _distinct_prompts(call: Call, prompts: Any) -> tuple:
    """The distinct prompts, in first-seen order, of a JSONL path, a list, or a data set."""
    if isinstance(prompts, str):
        prompts = _prompt_rows(call, prompts)
    elif isinstance(prompts, Responses | Pairs):
        prompts = tuple(r.prompt for r in prompts.rows)
    elif isinstance(prompts, Generated):
        prompts = prompts.spec.prompts
    distinct = tuple(dict.fromkeys(prompts))
    if not distinct:
        raise call.error(AlgTypeError, f"{call.name}() needs at least one prompt", "prompts")
    return distinct


def _prompt_rows(call: Call, path: str) -> tuple:
    from .data import read_prompts

    return read_prompts(_read_path(call, path, "prompts"), path, call.at("prompts"))


# ---- sinks -------------------------------------------------------------------------------


def _named_terms(call: Call, r: Reward) -> list[tuple[str, Reward]]:
    """The recipe's top-level names bound to a sub-term of r (in binding order)."""
    terms = set(r.walk())
    out = []
    for name, value in call.checker.env.values.items():
        if isinstance(value, Reward) and value in terms and value != r and name != "reward":
            out.append((name, value))
    return out


@builtin("score(r: Reward, data: Responses | String, out: String, overwrite: Bool = false)",
         "Write data's rows to out (JSONL) with a 'reward' field, and a field for each named "
         "sub-term of r (a top-level name bound to a reward that r uses); an existing out only "
         "with overwrite=true.")
def _score(call: Call, r: Reward, data: Any, out: str, overwrite: bool) -> None:
    data = _responses(call, data, "data")
    if isinstance(data, Responses) and _path(call, data.label) == _path(call, out):
        raise call.error(AlgIOError, "score() would overwrite its own input", "out")
    force = overwrite or call.checker.options.force
    target = _out(call, out, ".jsonl", overwrite=force)
    call.checker.add_sink(Sink("score", call.span, ScoreRequest(r, data, target, _named_terms(call, r), force)))


@builtin(
    'evaluate(r: Reward | List[Reward], pairs: Pairs | String, out: String, x: List | None = none, '
    'xlabel: String = "x", plot: String | None = none, overwrite: Bool = false, by: String = "subset")',
    "Accuracy on preference pairs (chosen scored strictly above rejected), per subset and "
    "overall, with RewardBench's section scores when its subset names are present; written "
    "to out (JSON) and printed as a table. A list of rewards is a sweep: x gives each one's "
    "value on the axis (default 0, 1, ...), and plot=\"file.png\" draws accuracy against x. "
    "Each point records accuracy, the mean chosen-rejected margin and the mean reward, per subset too; "
    "by=\"section\" draws RewardBench's sections instead of subsets. "
    "Existing out and plot files are replaced only with overwrite=true.",
)
def _evaluate(call: Call, r: Any, pairs: Any, out: str, x: tuple | None, xlabel: str, plot: str | None,
              overwrite: bool, by: str) -> None:
    rewards = list(r) if isinstance(r, tuple) else [r]
    if not rewards:
        raise call.error(AlgTypeError, "evaluate() needs at least one reward", "r")
    for v in rewards:
        if not isinstance(v, Reward):
            raise call.error(AlgTypeError, f"evaluate() takes rewards, not {type_name(v)}", "r")
    xs = None
    if x is not None:
        if len(x) != len(rewards):
            raise call.error(AlgTypeError, f"x has {len(x)} values for {len(rewards)} rewards", "x")
        xs = list(x)
    force = overwrite or call.checker.options.force
    plot_path = None
    if plot is not None:
        plot_path = _out(call, plot, ".png", "plot", force)
    target = _out(call, out, ".json", overwrite=force)
    data = _pairs(call, pairs, "pairs")
    if by not in ("subset", "section"):
        raise call.error(AlgTypeError, f'by must be "subset" or "section", not {by!r}', "by")
    if by == "section":
        from .evaluate import section_scores

        if not section_scores({r.subset: 0.0 for r in data.rows if r.subset is not None}):
            raise call.error(AlgTypeError, 'by="section" needs RewardBench subset names in the pairs '
                             "(none of their subsets belongs to a section)", "by")
    call.checker.add_sink(Sink("evaluate", call.span, EvalRequest(rewards, data, target, xs, xlabel, plot_path,
                                                                  force, by)))


# ---- policy-level evaluation (reward/policy_eval.py) ------------------------------------


@dataclass
class KLRequest:
    policies: list[Model]  # one (kl) or a sweep (front)
    ref: Model
    spec: Any  # policy_eval.KLSpec
    reward: Reward | None  # front: the reward of each policy's samples
    xs: list | None
    xlabel: str
    out: Path | None
    plot: Path | None
    overwrite: bool = False

    def describe(self) -> str:
        what = self.policies[0].node.describe() if len(self.policies) == 1 else f"{len(self.policies)} policies"
        tail = f", reward {self.reward}" if self.reward is not None else ""
        return (f"{what} against {self.ref.node.describe()} on {len(self.spec.prompts)} prompt(s) x "
                f"{self.spec.n} sample(s){tail}")


@dataclass
class WinRequest:
    reward: Reward
    samples: Responses | Generated
    base: Responses | Generated
    out: Path | None
    overwrite: bool = False

    def describe(self) -> str:
        return f"{self.reward} on {self.samples} against {self.base}"


def _kl_spec(call: Call, prompts: Any, n: float, max_new_tokens: float, seed: float) -> Any:
    from .policy_eval import KLSpec

    return KLSpec(_distinct_prompts(call, prompts), _positive_int(call, n, "n"),
                  _positive_int(call, max_new_tokens, "max_new_tokens"), int(seed))


def _policy_and_ref(call: Call, policy: Any, ref: Model, param: str = "policy") -> Model:
    from ..vocab import check_same_vocab

    check_same_vocab(policy, ref, f"{call.name}()", call.span, call.at(param), call.at("ref"))
    return policy


def _optional_out(call: Call, out: str | None, suffix: str, param: str, force: bool) -> Path | None:
    return None if out is None else _out(call, out, suffix, param, force)


@builtin(
    "kl(policy: Checkpoint | String, ref: Checkpoint | String, prompts: String | List[String] | Responses | Pairs, "
    "n: Int = 16, max_new_tokens: Int = 64, seed: Int = 0, out: String | None = none, overwrite: Bool = false)",
    "A Monte-Carlo estimate of KL(policy || ref) on the prompts, in nats, from n samples per prompt drawn "
    "from the policy at temperature 1: the mean of each sample's summed per-token log-ratio, with its "
    "standard error. Printed, and written to out (JSON) when given.",
)
def _kl(call: Call, policy: Any, ref: Any, prompts: Any, n: float, max_new_tokens: float, seed: float,
        out: str | None, overwrite: bool) -> None:
    pm, rm = _causal_lm(call, policy, "policy"), _causal_lm(call, ref, "ref")
    _policy_and_ref(call, pm, rm)
    spec = _kl_spec(call, prompts, n, max_new_tokens, seed)
    force = overwrite or call.checker.options.force
    req = KLRequest([pm], rm, spec, None, None, "x", _optional_out(call, out, ".json", "out", force), None, force)
    call.checker.add_sink(Sink("kl", call.span, req))


@builtin(
    "winrate(r: Reward, samples: Responses, base_samples: Responses, out: String | None = none, "
    "overwrite: Bool = false)",
    "The fraction of prompts on which r's mean over the policy's samples is above its mean over the base "
    "policy's samples (a tie counts half), with Wilson's 95% interval. Printed, and written to out (JSON) "
    "when given.",
)
def _winrate(call: Call, r: Reward, samples: Any, base_samples: Any, out: str | None, overwrite: bool) -> None:
    force = overwrite or call.checker.options.force
    req = WinRequest(r, _responses(call, samples, "samples"), _responses(call, base_samples, "base_samples"),
                     _optional_out(call, out, ".json", "out", force), force)
    call.checker.add_sink(Sink("winrate", call.span, req))


@builtin(
    "front(policies: List[Checkpoint], ref: Checkpoint | String, r: Reward, "
    "prompts: String | List[String] | Responses | Pairs, out: String, x: List | None = none, "
    'xlabel: String = "x", plot: String | None = none, n: Int = 16, max_new_tokens: Int = 64, seed: Int = 0, '
    "overwrite: Bool = false)",
    "WARP's KL-reward front of a sweep of policies: for each, kl(policy, ref, prompts) and the mean of r "
    "over the same samples, with standard errors; written to out (JSON), printed as a table, and drawn "
    "as reward against KL with plot=\"file.png\".",
)
def _front(call: Call, policies: tuple, ref: Any, r: Reward, prompts: Any, out: str, x: tuple | None,
           xlabel: str, plot: str | None, n: float, max_new_tokens: float, seed: float, overwrite: bool) -> None:
    if not policies:
        raise call.error(AlgTypeError, "front() needs at least one policy", "policies")
    rm = _causal_lm(call, ref, "ref")
    pms = [_policy_and_ref(call, _causal_lm(call, p, "policies"), rm, "policies") for p in policies]
    if x is not None and len(x) != len(pms):
        raise call.error(AlgTypeError, f"x has {len(x)} values for {len(pms)} policies", "x")
    force = overwrite or call.checker.options.force
    req = KLRequest(pms, rm, _kl_spec(call, prompts, n, max_new_tokens, seed), r,
                    list(x) if x is not None else None, xlabel, _out(call, out, ".json", overwrite=force),
                    _optional_out(call, plot, ".png", "plot", force), force)
    call.checker.add_sink(Sink("front", call.span, req))
