"""Numerics of RAM, Reinforced Agent Merging (arXiv:2601.13572, as mergekit 0.1.5 has it):
which task-vector entries count as updated, and the one combining primitive.

Per element, with d_i = m_i - base in the compute dtype: model i updated the element iff
|d_i| > epsilon; c = how many models did. An element one model updated (unique) takes
that model's d_i times its lambda_i; one several models updated (shared) takes the mean
of their d_i; one nobody updated stays the base's:

    base + Σ_i [|d_i| > ε] · (d_i·[c = 1]·λ_i + d_i·[c > 1] / max(c, 1))

RAM has λ_i = 1. RAM+ (tensor-local) rescales model i's unique entries by
λ_i = 1 + r·clamp(shared_i / max(unique_i, ε), 0, alpha), from how many of model i's
updated entries of the tensor are shared and unique (`counts`, summed by a streamed
reduction in methods/ram.py). The terms are formed and added in mergekit's order (each
model's unique and shared parts, then the models in order), so float32 results match
mergekit's to rounding.
"""

from __future__ import annotations

from ..family import Family
from ..lazy import torch

family = Family("ops.ram")
primitive = family.primitive


def updated(base: torch.Tensor, ms: list[torch.Tensor], epsilon: float) -> tuple[list, list, torch.Tensor]:
    """(d_i, [|d_i| > epsilon], c): the task vectors, which entries each model updated, and
    how many models updated each entry (int32)."""
    ds = [torch.sub(m, base) for m in ms]
    nz = [d.abs() > epsilon for d in ds]
    c = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for mask in nz:
        c.add_(mask)
    return ds, nz, c


def counts(base: torch.Tensor, ms: list[torch.Tensor], epsilon: float) -> list[tuple[int, int]]:
    """Per model, (shared, unique): how many of its updated entries other models updated
    too, and how many only it did."""
    _, nz, c = updated(base, ms, epsilon)
    shared, unique = c > 1, c == 1
    return [(int((mask & shared).sum()), int((mask & unique).sum())) for mask in nz]


def _split(items: tuple) -> tuple[list[torch.Tensor], list[float]]:
    n = sum(isinstance(x, torch.Tensor) for x in items)
    return list(items[:n]), [float(x) for x in items[n:]]


def _scratch(e) -> float:
    n = len(e.args) - 1
    return 2.0 * n + 3.0  # the task vectors and their masks, the counts, two terms


@primitive("ram_combine", arity=-1, scratch=_scratch)
def ram_combine(*items) -> torch.Tensor:
    """RAM's merge of base and models m_1..m_n (the tensors), given epsilon and one
    lambda per model (the scalars after them): see the module docstring."""
    (base, *ms), (epsilon, *lambdas) = _split(items)
    ds, nz, c = updated(base, ms, epsilon)
    unique = (c == 1).to(base.dtype)
    shared = (c > 1).to(base.dtype)
    div = c.clamp_(min=1).to(base.dtype)
    merged = torch.zeros_like(base)
    for d, mask, lam in zip(ds, nz, lambdas, strict=True):
        z = d.mul_(mask)
        term = torch.mul(z, unique)
        if lam != 1.0:
            term.mul_(lam)
        merged.add_(term.add_(z.mul_(shared).div_(div)))
    return merged.add_(base)


__all__ = ["counts", "ram_combine", "updated"]
