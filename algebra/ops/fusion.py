"""Numerics of Arcee Fusion (mergekit's `arcee_fusion`): the importance of each entry and
the fused write.

Per tensor, with base a and model b seen as rows along their last dimension (a 1-d
tensor is one row), in the compute dtype:

    importance = |b - a| * KL(row),   KL = Σ_j p_j log(p_j / q_j),
    p = softmax(b_row) + 1e-8,        q = softmax(a_row) + 1e-8
    threshold  = median + 1.5 * (q3 - q1)   of the importance over the whole tensor
    fused      = a + (b - a) * [importance >= threshold]

The quantiles are mergekit's: the entry at index floor(q * (N - 1)) of the ascending
order, found by an exact streamed selection (methods/fusion.py). A row's KL is >= 0 in
exact arithmetic but rounds below 0 where b's row barely differs from a's, and such
entries order below 0 as in mergekit's sort. Every operation is mergekit's own, in its
order, so that float32 results match it bit for bit.
"""

from __future__ import annotations

from ..family import Family
from ..lazy import torch

family = Family("ops.fusion")
primitive = family.primitive

KL_EPS = 1e-8  # added to both softmaxes (mergekit's)
IQR_FACTOR = 1.5
QUANTILES = (0.25, 0.5, 0.75)  # q1, median, q3


def quantile_index(q: float, n: int) -> int:
    """mergekit's index of quantile q in the ascending order of n entries."""
    return int(q * (n - 1))


@primitive("fusion_importance", arity=2, scratch=5, rowwise=True)
def importance(a: torch.Tensor, b: torch.Tensor, row: int) -> torch.Tensor:
    """|b - a| times the KL divergence of b's row softmax from a's, per entry (flat chunks
    of whole rows `row` long)."""
    a2, b2 = a.view(-1, row), b.view(-1, row)
    p = torch.softmax(b2, dim=-1).add_(KL_EPS)
    q = torch.softmax(a2, dim=-1).add_(KL_EPS)
    kl = torch.sum(p * torch.log(p / q), dim=-1)
    return torch.sub(b2, a2).abs_().mul_(kl.unsqueeze(-1)).view(-1)


@primitive("fusion_merge", arity=2, scratch=6, rowwise=True)
def fusion_merge(a: torch.Tensor, b: torch.Tensor, row: int, q1: float, median: float, q3: float) -> torch.Tensor:
    """a + (b - a) where the importance reaches median + 1.5 (q3 - q1), else a."""
    imp = importance(a, b, row)
    q1_, med_, q3_ = (torch.tensor(x, dtype=imp.dtype, device=imp.device) for x in (q1, median, q3))
    threshold = med_ + IQR_FACTOR * (q3_ - q1_)
    mask = (imp >= threshold).to(a.dtype)
    return torch.add(a, torch.sub(b, a).mul_(mask))


__all__ = ["IQR_FACTOR", "KL_EPS", "QUANTILES", "fusion_merge", "importance", "quantile_index"]
