"""Plan the scoring of a run: which model scores which texts, in which batches.

Policy. Every query of the run (each `score` and `evaluate` sink, or a TRL call) is
walked once with a recording `TreeEval`, which collects, per reward model and text
format, the distinct (prompt, response) points any term needs (baselines and
`normalize` included). Models are then loaded one at a time, in order of first use, and
each scores every text that any term of any sink needs, so a model is loaded once per
run however many terms and sinks use it. Texts already scored (this session, or the
on-disk cache) are left out. The rest are formatted and tokenized, each distinct text once
per tokenizer and format (models that share both, such as two reward models on one base,
share the token ids), sorted by token length (ties by first use) and cut into batches:
the leaf's `batch_size` texts each, or by default as many as fit the token budget that
generation uses too (`batching.BATCH_TOKENS`: texts x longest <= 4096), so a batch of
short texts is wide, one of long texts narrow, and padding is small. Texts that share a
prefix of `batching.MIN_PREFIX` tokens or more (a prompt's answers, a template's head)
are grouped and batched in blocks whose prefixes are computed once (`batching.
prefix_batches`; `models.score_batch` runs each row's own tokens after them). The ids go
to the forward pass as they are; nothing is tokenized again.

Memory. A job's predicted peak is its parameters in the scoring dtype, plus, for a
computed checkpoint, the weight engine's streaming buffers while it is materialised,
plus an activation estimate for its largest batch: tokens x (4 hidden + 3 intermediate
+ heads x sequence) values, the widest live set inside one decoder layer (residual,
q/k/v/output, the MLP's gate, up and product, eager attention scores), and for a batch
after shared prefixes, the keys and values of its block's prefixes and of its own rows. Estimates, not
the executor's own accounting as on the weight side: transformers allocates here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AlgIOError
from ..graph import Node
from ..options import Options
from ..runconfig import RunConfig
from ..types import human_bytes
from .batching import Prefixes, pad_of, prefix_batches
from .cache import ScoreCache, model_hash, score_key
from .data import Prompt, prompt_text, to_messages
from .pointwise import Points, TreeEval
from .values import ModelReward, Reward

Query = tuple[Reward, Points]


@dataclass
class Batch:
    points: list[tuple[Prompt, str]]
    keys: list[str]  # cache keys, one per point
    input_ids: list[list[int]]
    # rows that share prefixes: their block's Prefixes and each row's index into them
    shared: tuple[Prefixes, list[int]] | None = None

    @property
    def width(self) -> int:
        """Positions each row's attention holds: the block's longest prefix and the longest
        row past its own."""
        if self.shared is None:
            return max(len(x) for x in self.input_ids)
        pre, of = self.shared
        return max(len(p) for p in pre.ids) + max(len(x) - len(pre.ids[k]) for x, k in zip(self.input_ids, of, strict=True))

    @property
    def tokens(self) -> int:
        return len(self.input_ids) * self.width

    @property
    def own_tokens(self) -> int:
        """The tokens its rows run past their shared prefixes (unpadded)."""
        if self.shared is None:
            return sum(len(x) for x in self.input_ids)
        pre, of = self.shared
        return sum(len(x) - len(pre.ids[k]) for x, k in zip(self.input_ids, of, strict=True))


@dataclass
class Group:
    """One text format of one model: the texts it needs."""

    leaf: ModelReward
    points: list[tuple[Prompt, str]]  # distinct, in first-use order
    keys: list[str]
    todo: list[int] = field(default_factory=list)  # indices of points to score
    batches: list[Batch] = field(default_factory=list)


@dataclass
class Job:
    """One model load."""

    node: Node
    label: str
    model: Any  # values.Model
    hash: str
    dtype: torch.dtype
    groups: list[Group]
    params_bytes: int
    stream_bytes: int  # weight engine buffers while materialising a computed checkpoint
    activation_bytes: int

    @property
    def n_texts(self) -> int:
        return sum(len(g.points) for g in self.groups)

    @property
    def n_todo(self) -> int:
        return sum(len(g.todo) for g in self.groups)

    @property
    def peak_bytes(self) -> int:
        return self.params_bytes + max(self.stream_bytes, self.activation_bytes)


@dataclass
class RewardPlan:
    jobs: list[Job]

    @property
    def peak_bytes(self) -> int:
        return max((j.peak_bytes for j in self.jobs if j.n_todo), default=0)


def scoring_dtype(model: Any, options: Options, device: torch.device) -> torch.dtype:
    """float32 on CPU (float64 with --float64); on a GPU the checkpoint's 16-bit dtype."""
    config = RunConfig.of(options)
    if config.compute_dtype == "float64":
        return config.torch_dtype()
    code = model.type.dtype
    if device.type != "cpu" and code in ("BF16", "F16"):
        return torch.bfloat16 if code == "BF16" else torch.float16
    return torch.float32


_TOKENIZERS: dict[str, Any] = {}
_FOLDERS: dict[int, tuple[Any, Any]] = {}  # id(TokenizerSpec) -> (spec, temporary folder)


def tokenizer_folder(model: Any) -> Path:
    """The folder of a checked checkpoint's own tokenizer: the primary input's, or for an
    aligned value its output vocabulary's (`TokenizerSpec`: the base folder's files plus
    the added tokens), written once per process as `save` would write it."""
    import tempfile

    from ..vocab import model_tokenizer, write_tokenizer

    spec = model_tokenizer(model)
    if spec is None:
        raise AlgIOError(f"{model.node.describe()} has no tokenizer files")
    if model.type.tokenizer is None:
        return Path(spec.folder)
    got = _FOLDERS.get(id(spec))
    if got is None:
        tmp = tempfile.TemporaryDirectory(prefix="alg-tokenizer-")
        write_tokenizer(spec, Path(tmp.name))
        got = _FOLDERS[id(spec)] = (spec, tmp)  # the spec is kept so that its id is not reused
    return Path(got[1].name)


# the files AutoTokenizer reads from a folder (config.json: for the tokenizer class when
# tokenizer_config.json does not name it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json", "config.json")


# keys of a saved tokenizer_config.json that say how it was loaded or saved, not what it is
_LOAD_KEYS = {"is_local", "local_files_only", "name_or_path", "_name_or_path", "_commit_hash",
              "transformers_version"}


def _tokenizer_key(folder: Path) -> str:
    """A digest of what a folder's tokenizer is read from: two folders with the same files
    (reward models of one base, each with a copy) load one tokenizer. JSON files count by
    their content less `_LOAD_KEYS`; config.json only by what AutoTokenizer reads there."""
    import hashlib

    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = folder / name
        if not f.is_file():
            continue
        data = f.read_bytes()
        if name.endswith(".json"):
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                keep = {"model_type", "tokenizer_class"} if name == "config.json" else obj.keys() - _LOAD_KEYS
                data = json.dumps({k: obj[k] for k in sorted(keep) if k in obj}, sort_keys=True).encode()
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def tokenizer_for(leaf: ModelReward):
    from transformers import AutoTokenizer

    folder = tokenizer_folder(leaf.model)
    tok = _TOKENIZERS.get(str(folder))
    if tok is None:
        key = _tokenizer_key(folder)
        tok = _TOKENIZERS.get(key)
        if tok is None:
            tok = _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            tok.truncation_side = "left"  # the score is read at the end: keep the response's end
        _TOKENIZERS[str(folder)] = tok
    return tok


def format_text(leaf: ModelReward, tok: Any, prompt: Prompt, response: str) -> tuple[str, bool]:
    """The model's input text, and whether the tokenizer adds its special tokens to it."""
    if leaf.fmt.kind == "chat":
        msgs = to_messages(prompt)
        msgs.append({"role": "assistant", "content": response})
        return tok.apply_chat_template(msgs, chat_template=leaf.fmt.text, tokenize=False), leaf.fmt.special
    eos = tok.eos_token or ""
    if eos and response.endswith(eos):
        eos = ""  # as TRL's RewardTrainer: an EOS is added unless the response ends with one
    return leaf.fmt.text.format(prompt=prompt_text(prompt), response=response, eos=eos), leaf.fmt.special


def max_tokens(leaf: ModelReward) -> int | None:
    if leaf.max_length is not None:
        return leaf.max_length
    return (leaf.model.type.config or {}).get("max_position_embeddings")


def encode(leaf: ModelReward, tok: Any, prompt: Prompt, response: str) -> list[int]:
    text, special = format_text(leaf, tok, prompt, response)
    limit = max_tokens(leaf)
    return tok(text, add_special_tokens=special, truncation=limit is not None, max_length=limit)["input_ids"]


def collect(queries: list[Query], data, sample=None) -> dict[tuple, tuple[ModelReward, dict]]:
    """scoring key -> (a leaf, {point: None} in first-use order), by a recording walk."""
    wanted: dict[tuple, tuple[ModelReward, dict]] = {}

    def lookup(leaf: ModelReward, points: Points) -> np.ndarray:
        _, seen = wanted.setdefault(leaf.scoring_key, (leaf, {}))
        for p in points:
            seen.setdefault(p, None)
        return np.zeros(len(points))

    ev = TreeEval(lookup, data, record=True, sample=sample)
    for r, points in queries:
        ev.value(r, points)
    return wanted


def plan_rewards(queries: list[Query], options: Options, data, known: dict[str, float] | None = None,
                 cache: ScoreCache | None = None, device: torch.device | None = None,
                 sample=None) -> RewardPlan:
    device = device or RunConfig.of(options).resolve_device()
    known = known if known is not None else {}
    wanted = collect(queries, data, sample)
    by_node: dict[Node, list[tuple[ModelReward, dict]]] = {}
    for leaf, seen in wanted.values():
        by_node.setdefault(leaf.node, []).append((leaf, seen))
    jobs = []
    encoded: dict[tuple, dict] = {}  # (tokenizer, format, limit) -> {point: token ids}, across models
    for node, items in by_node.items():
        model = items[0][0].model
        dtype = scoring_dtype(model, options, device)
        mh = model_hash(node)
        groups = []
        for leaf, seen in items:
            points = list(seen)
            keys = [score_key(mh, leaf.fmt.key, leaf.max_length, str(dtype), p, r)
                    for p, r in points]
            groups.append(Group(leaf, points, keys))
        all_keys = [k for g in groups for k in g.keys if k not in known]
        hits = cache.get_many(all_keys) if cache is not None else {}
        known.update(hits)
        act = 0
        for g in groups:
            g.todo = [i for i, k in enumerate(g.keys) if k not in known]
            g.batches = _batches(g, g.todo, encoded)
            act = max([act] + [_activation(model, b) for b in g.batches])
        itemsize = torch.empty((), dtype=dtype).element_size()
        stream = 0
        if node.op != "load" and any(g.todo for g in groups):
            from ..plan import plan_tensors

            stream = plan_tensors(model, options).peak_bytes
        jobs.append(Job(node, items[0][0].label, model, mh, dtype, groups,
                        model.type.n_params * itemsize, stream, act * itemsize))
    return RewardPlan(jobs)


def _batches(g: Group, todo: list[int], encoded: dict[tuple, dict] | None = None) -> list[Batch]:
    """g's texts `todo` as batches of token ids (see the module's notes); `encoded` holds
    the ids of texts tokenized before, by tokenizer, format and length limit."""
    if not todo:
        return []
    tok = tokenizer_for(g.leaf)
    seen = (encoded if encoded is not None else {}).setdefault((_same_as(tok), g.leaf.fmt, max_tokens(g.leaf)), {})
    for i in todo:
        if g.points[i] not in seen:
            seen[g.points[i]] = encode(g.leaf, tok, *g.points[i])
    ids = [seen[g.points[i]] for i in todo]
    pad = pad_of(tok)
    # a row shares no more than its last scored token (the last one not padding): that one is its own
    keep = [_last_scored(x, pad) for x in ids]
    out = []
    for part, pre, of in prefix_batches(ids, keep, g.leaf.batch_size):
        rows = [todo[k] for k in part]
        out.append(Batch([g.points[i] for i in rows], [g.keys[i] for i in rows], [ids[k] for k in part],
                         None if pre is None else (pre, of)))
    return out


def _last_scored(ids: list[int], pad: int) -> int:
    """Where the token a classifier scores sits: the last one that is not padding (0 if all are)."""
    j = len(ids) - 1
    while j > 0 and ids[j] == pad:
        j -= 1
    return j


_CONTENT: dict[int, str] = {}  # id(tokenizer) -> what it tokenizes by (the tokenizers are kept in _TOKENIZERS)


def _same_as(tok: Any) -> str:
    """A key equal for tokenizers that turn every text into the same ids (two reward models
    of one base each have a copy of its tokenizer): a digest of the fast tokenizer's whole
    definition (vocabulary, merges, normalizer, added tokens, post-processor) and the EOS
    token that templates add; a slow tokenizer is only the same as itself."""
    import hashlib

    key = _CONTENT.get(id(tok))
    if key is None:
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            key = f"id:{id(tok)}"
        else:
            blob = "\0".join([type(tok).__name__, str(tok.eos_token), tok.truncation_side, backend.to_str()])
            key = hashlib.sha256(blob.encode()).hexdigest()
        _CONTENT[id(tok)] = key
    return key


def _activation(model: Any, b: Batch) -> int:
    cfg = model.type.config or {}
    h = cfg.get("hidden_size", 0)
    inter = cfg.get("intermediate_size", 4 * h)
    heads = cfg.get("num_attention_heads", 1)
    seq = b.width
    act = b.tokens * (4 * h + 3 * inter + heads * seq)
    if b.shared is not None:  # the block's cache, and this batch's rows of it extended (keys and values)
        pre = b.shared[0].ids
        kv = 2 * cfg.get("num_hidden_layers", 1) * cfg.get("num_key_value_heads", heads) * (h // max(heads, 1))
        act += (len(pre) * max(map(len, pre)) + b.tokens) * kv
    return act


def format_reward_plan(plan: RewardPlan) -> str:
    lines = ["scoring (reward models are loaded one at a time):"]
    if not plan.jobs:
        lines.append("  nothing to score")
    for j in plan.jobs:
        cached = j.n_texts - j.n_todo
        batches = sum(len(g.batches) for g in j.groups)
        longest = max((len(x) for g in j.groups for b in g.batches for x in b.input_ids), default=0)
        lines.append(f"  {j.label}")
        lines.append(f"    {j.n_texts} distinct texts: {j.n_todo} to score in {batches} batch(es) "
                     f"(longest {longest} tokens), {cached} cached")
        blocks = {b.shared[0] for g in j.groups for b in g.batches if b.shared is not None}
        if blocks:
            whole = sum(len(x) for g in j.groups for b in g.batches for x in b.input_ids)
            pre = sum(len(p) for blk in blocks for p in blk.ids)
            own = sum(b.own_tokens for g in j.groups for b in g.batches)
            lines.append(f"    {sum(len(blk.ids) for blk in blocks)} shared prefix(es) computed once: "
                         f"{pre + own} of {whole} tokens to run")
        lines.append(f"    {human_bytes(j.params_bytes)} of parameters in {str(j.dtype).removeprefix('torch.')}"
                     + (f"; materialised from the graph (streaming {human_bytes(j.stream_bytes)})"
                        if j.node.op != "load" else "")
                     + f"; predicted peak {human_bytes(j.peak_bytes) if j.n_todo else '0 B (all cached)'}")
    lines.append(f"predicted peak memory of scoring: {human_bytes(plan.peak_bytes)}")
    return "\n".join(lines)


__all__ = ["Batch", "Group", "Job", "Query", "RewardPlan", "collect", "encode", "format_reward_plan",
           "pad_of", "plan_rewards", "scoring_dtype", "tokenizer_folder", "tokenizer_for"]
