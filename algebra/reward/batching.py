"""How texts are cut into batches, for scoring (plan.py) and generation (generate.py).

One token budget and one rule. Rows are sorted by token length, so each batch holds texts
of nearly the same length and padding wastes little; the sorted rows are then cut into
consecutive slices, either `batch_size` rows each or, without one, as many rows as keep

    rows x (longest row in the slice + extra) <= budget          (BATCH_TOKENS)

where `extra` is what each row grows by (generation's max_new_tokens; 0 for scoring). A
row longer than the budget alone is a batch of its own. The budget bounds a forward pass's
activations (tokens x per-token width), so it holds for a 135M and a 70B model alike:
4096 tokens of a 7B model's widest layer set (4 hidden + 3 intermediate values, float32)
are about 0.8 GB.
"""

from __future__ import annotations

from collections.abc import Sequence

# tokens per batch (rows x padded length), when the caller gives no batch_size
BATCH_TOKENS = 4096


def cut_sorted(lengths: Sequence[int], batch_size: int | None = None, extra: int = 0,
               budget: int | None = None) -> list[range]:
    """Consecutive slices of rows already sorted by length (either way): batch_size rows
    each, or (None) the longest runs with rows x (longest + extra) <= budget (default
    BATCH_TOKENS), at least one row each."""
    budget = BATCH_TOKENS if budget is None else budget
    out, i, n = [], 0, len(lengths)
    while i < n:
        if batch_size:
            j = min(i + batch_size, n)
        else:
            j, top = i + 1, lengths[i]
            while j < n and (j - i + 1) * (max(top, lengths[j]) + extra) <= budget:
                top = max(top, lengths[j])
                j += 1
        out.append(range(i, j))
        i = j
    return out


def sorted_batches(lengths: Sequence[int], batch_size: int | None = None, extra: int = 0,
                   budget: int | None = None, longest_first: bool = False) -> list[list[int]]:
    """Indices of `lengths` in batches: sorted by length (shortest first, or longest first;
    ties keep their order) and `cut_sorted`. Every index appears once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i] if longest_first else lengths[i], i))
    return [[order[k] for k in part] for part in cut_sorted([lengths[i] for i in order], batch_size, extra, budget)]


__all__ = ["BATCH_TOKENS", "cut_sorted", "sorted_batches"]
