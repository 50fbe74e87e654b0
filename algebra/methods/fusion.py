"""Arcee Fusion (mergekit's `arcee_fusion`): take a model's change to the base only where
it matters most. The rule is in `ops/fusion.py`.

Per tensor, a streamed exact selection (`methods/select.py`'s `Select`, the same that
finds TIES' thresholds) finds the three quantiles of the importance (q1, median, q3)
without holding the tensor (the importance can round below 0: the selection ranks its
positive and its negative part, `Quantile` picks); the write pass recomputes the importance chunk by chunk
(whole rows: it needs each row's softmax) and keeps b's value where it reaches
median + 1.5 (q3 - q1). Two reads of each input, memory a few chunks.

mergekit takes the quantiles of a random sample of 10^6 entries when a tensor has more;
alg's are exact over every entry, so on such tensors the threshold (and the output)
differs from mergekit's by the sample's error, and does not change from run to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..family import Family
from ..graph import Node
from ..lower import Lowerer, Map, Reduction, Sym, TExpr
from ..ops.fusion import QUANTILES, quantile_index
from ..plan import row_length
from ..rules import derived, same_tables
from ..signature import Call
from ..values import Model
from .common import TOKENIZER_PARAM, with_tokenizer
from .select import Select

family = Family("fusion")


@family.builtin(
    f"arcee_fusion(base: Checkpoint, m: Checkpoint, {TOKENIZER_PARAM})",
    "Arcee Fusion (mergekit's arcee_fusion): per tensor, the importance of each entry is "
    "|m - base| times the KL divergence of m's row softmax from base's; m's value is taken "
    "where the importance reaches median + 1.5·IQR of the tensor's importances (exact "
    "quantiles, streamed), base's elsewhere. base's config.",
)
def _arcee_fusion(call: Call, base: Model, m: Model, tokenizer: Any = None) -> Model:
    base, (m,) = with_tokenizer(call, tokenizer, base, (m,))
    same_tables(base, m, "arcee_fusion()", call.span, call.at("base"), call.at("m"))
    return derived(Node("arcee_fusion", (base.node, m.node), (), span=call.span), base)


@dataclass(eq=False)
class Quantile(Sym):
    """The entry at ascending index i of a tensor's values x, from a `Select` of the
    (n - i)-th largest of max(x, 0) (`pos`, at `pos`) and the (i + 1)-th largest of
    max(-x, 0) (`neg`): the first when it is above 0 (then at least n - i values are, and
    it is x's entry), else minus the second (x's entry is <= 0: the (i + 1)-th most
    negative value, or 0 when fewer than i + 1 are negative)."""

    sel: Select
    pos: int
    neg: int

    @property
    def deps(self) -> tuple[Reduction, ...]:
        return (self.sel,)

    def value(self, results: dict) -> float:
        above = float(results[self.sel][self.pos])
        return above if above > 0 else -float(results[self.sel][self.neg])

    def __repr__(self) -> str:
        return f"quantile({self.sel.label}, {self.pos}, {self.neg})"


@family.lowering("arcee_fusion")
def _lower(low: Lowerer, node: Node, name: str) -> TExpr:
    a, b = (low.tensor(x, name) for x in node.args)
    n, row = a.numel, row_length(a.spec)
    index = [quantile_index(q, n) for q in QUANTILES]
    pos = tuple(sorted({n - i for i in index}))
    neg = tuple(sorted({i + 1 for i in index}))
    imp = Map("fusion_importance", (a, b), (row,), a.spec)
    sel = low.reduction((id(node), name, "fusion"), lambda: Select(
        (imp,), (("pos", 0), ("neg", 0)), (pos, neg), f"arcee_fusion {name}", cuts=False))
    qs = [Quantile(sel, sel.index(0, pos.index(n - i)), sel.index(1, neg.index(i + 1))) for i in index]
    return Map("fusion_merge", (a, b), (row, *qs), a.spec)


family.describes["arcee_fusion"] = lambda node, a: f"arcee_fusion({a[0]}, {a[1]})"
