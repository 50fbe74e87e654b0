"""Rewards as values: a reward is a frozen, hashable expression tree over reward models.

A `Reward` is a function (prompt, response) -> float, built lazily at check time:

- `ModelReward`, a leaf: a sequence-classification checkpoint (a graph `Node`, so a merge
  is a reward model with no detour through disk) plus how text is formatted for it;
- `Const`, a number;
- `Op`, a pointwise operation of rewards (`+ - * /`, neg, logsig, sigmoid, exp, log, clip,
  min, max, sum, mean: the registry of `reward.ops`, which defines each one);
- per-prompt baselines, rewards that depend only on the prompt: `Baseline` (a quantile or
  the mean of r over the prompt's reference responses), `Refusal` (r of a fixed response);
- `Normalize`, a z-score with statistics of r over a data set.

Invariant: equal trees are equal values (dataclass equality; graph nodes and data sets
compare by identity, and both are interned or created once per call), so a sub-term that
several terms share is one key and is evaluated once. Nothing here scores a text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import AlgTypeError
from ..graph import Node
from ..source import Span
from ..types import type_name
from .ops import POINTWISE


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Reward:
    """Base of reward expressions; gives them alg's operators."""

    alg_type = "Reward"

    def alg_binop(self, op: str, other: Any, reflected: bool, span: Span, self_span: Span,
                  other_span: Span) -> Any:
        if is_number(other):
            other = Const(float(other))
        elif not isinstance(other, Reward):
            if type_name(other) == "Checkpoint":
                raise AlgTypeError(
                    f"cannot combine a Reward with a Checkpoint by '{POINTWISE[op].symbol}'; "
                    "make the checkpoint a reward first: reward(m)", other_span)
            return NotImplemented
        if op == "div" and isinstance(other, Const) and other.value == 0 and not reflected:
            raise AlgTypeError("division of a reward by zero", other_span)
        args = (other, self) if reflected else (self, other)
        return Op(op, args)

    def alg_unary(self, op: str, span: Span) -> Any:
        return self if op == "+" else Op("neg", (self,))

    def children(self) -> tuple[Reward, ...]:
        return ()

    def walk(self):
        """Every sub-term, each once, arguments first."""
        seen: set = set()
        out: list[Reward] = []

        def visit(r: Reward) -> None:
            if r in seen:
                return
            seen.add(r)
            for c in r.children():
                visit(c)
            out.append(r)

        visit(self)
        return out

    def models(self) -> list[ModelReward]:
        return [r for r in self.walk() if isinstance(r, ModelReward)]


@dataclass(frozen=True)
class TextFormat:
    """How (prompt, response) becomes the reward model's input tokens: the tokenizer's
    chat template (kind "chat", text = the template) or a format string (kind "format"),
    tokenized with or without the tokenizer's special tokens."""

    kind: str
    text: str
    special: bool  # whether the tokenizer adds its special tokens (add_special_tokens=)

    @property
    def key(self) -> tuple:
        """What the score cache keys a format by."""
        return (self.kind, self.text) if self.special == (self.kind == "format") else (self.kind, self.text, self.special)


@dataclass(frozen=True)
class ModelReward(Reward):
    node: Node  # the checkpoint (interned: equal computations are one node)
    fmt: TextFormat
    batch_size: int | None  # texts per batch; None: by token budget (batching.py)
    max_length: int | None
    label: str = field(compare=False)
    model: Any = field(compare=False, repr=False)  # the checked `values.Model`

    def __str__(self) -> str:
        return f"reward({self.label})"

    @property
    def scoring_key(self) -> tuple:
        """Leaves that share this key score a text identically (batch size aside)."""
        return (self.node, self.fmt, self.max_length)


@dataclass(frozen=True)
class Const(Reward):
    value: float

    def __str__(self) -> str:
        return f"{self.value:g}"


@dataclass(frozen=True)
class Op(Reward):
    op: str  # a name in reward.ops.POINTWISE
    args: tuple[Reward, ...]

    def __post_init__(self) -> None:
        arity = POINTWISE[self.op].arity
        assert len(self.args) == arity if arity is not None else self.args, (self.op, len(self.args))

    def children(self) -> tuple[Reward, ...]:
        return self.args

    def __str__(self) -> str:
        symbol = POINTWISE[self.op].symbol
        if symbol is not None:  # an operator: binary, or unary minus
            return f"({self.args[0]} {symbol} {self.args[1]})" if len(self.args) == 2 else f"{symbol}{self.args[0]}"
        return f"{self.op}({', '.join(map(str, self.args))})"


@dataclass(frozen=True)
class Baseline(Reward):
    """Per prompt: a statistic of r over that prompt's responses in refs."""

    r: Reward
    refs: Any  # data.Responses or generate.Generated
    stat: str  # "quantile" | "mean"
    q: float | None = None
    # a prompt with no responses in refs: "error", a fixed value (float), or a
    # generate.Generated whose policy and options sample references for it (cached)
    missing: Any = "error"

    def children(self) -> tuple[Reward, ...]:
        return (self.r,)

    def __str__(self) -> str:
        more = "" if self.missing == "error" else f", missing={self.missing}"
        if self.stat == "quantile":
            return f"quantile({self.r}, {self.refs}, {self.q:g}{more})"
        return f'baseline({self.r}, {self.refs}, "{self.stat}"{more})'


@dataclass(frozen=True)
class Refusal(Reward):
    """Per prompt: r of one fixed response to that prompt."""

    r: Reward
    text: str

    def children(self) -> tuple[Reward, ...]:
        return (self.r,)

    def __str__(self) -> str:
        return f"refusal({self.r})"


@dataclass(frozen=True)
class Normalize(Reward):
    """(r - mean) / std, the statistics of r over `data`, fixed once computed."""

    r: Reward
    data: Any  # data.Responses, data.Pairs or generate.Generated

    def children(self) -> tuple[Reward, ...]:
        return (self.r,)

    def __str__(self) -> str:
        return f"normalize({self.r}, {self.data})"


__all__ = ["Baseline", "Const", "ModelReward", "Normalize", "Op", "Refusal", "Reward", "TextFormat", "is_number"]
