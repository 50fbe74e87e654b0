"""Float64 sums whose rounding does not depend on torch's thread count.

torch reduces a tensor to one value by splitting it among its threads and adding the
partial sums, so `torch.dot(a, b)` or `x.sum()` of more than a few thousand elements
rounds differently on 1 and 2 threads (BLAS, behind `@`, does too). A reduction to many
values is split by output instead, each output summed by one thread in a fixed order,
and a tensor below torch's grain (32768 elements) is summed by one thread. So these sums
cut a vector into blocks of `BLOCK` elements, sum each block (many outputs), then add the
block sums (fewer than the grain for any vector up to 2^27 elements). The result depends
on the vector and the block size only: a merge's reductions (SLERP angles, Gram matrices,
SCE's weights) give the same bits whatever `--threads` is, which `auto` makes depend on
the machine's load. Zeros pad the last block; adding zero changes no sum.
"""

from __future__ import annotations

from ..lazy import torch

BLOCK = 4096


def total(x: torch.Tensor) -> torch.Tensor:
    """The sum of every element of x (a 0-d tensor of x's dtype), blocked as above."""
    x = x.reshape(-1)
    n = x.numel()
    if n <= BLOCK:
        return x.sum()
    pad = (-n) % BLOCK
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return total(x.view(-1, BLOCK).sum(1))


def dot(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> float:
    """<a, b> of two vectors, as a Python float; `out` (a's size and dtype) holds the
    products if given, else a temporary does."""
    return float(total(torch.mul(a, b, out=out)))


def sum_axis(x: torch.Tensor, axis: int) -> torch.Tensor:
    """x (2-d) summed along `axis`: one output per other index, each by one thread; a
    single output is summed blocked."""
    if x.shape[1 - axis] == 1:
        return total(x).reshape(1)
    return x.sum(axis)


__all__ = ["BLOCK", "dot", "sum_axis", "total"]
