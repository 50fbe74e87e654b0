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

Shared prefixes (scoring). Texts that begin alike (a pair's chosen and rejected answer
after one prompt, n samples of one prompt, a template's fixed head) are grouped by the
leading tokens they share (`prefix_groups`), and the groups are cut into blocks
(`prefix_batches`): a block's distinct prefixes are computed once, as one forward pass
whose key/value cache each of the block's batches then extends with its rows' own
tokens only. A block holds at most the budget in prefix positions (prefixes x longest);
its rows are sorted by the length of what follows their prefix and cut as above, each
row counting the block's longest prefix as `extra` (the positions its attention holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# tokens per batch (rows x padded length), when the caller gives no batch_size
BATCH_TOKENS = 4096

# The shortest prefix (tokens) a group of texts shares that is worth computing once: a
# prefix pass and a cache per block cost a forward call and copies, which a few shared
# tokens do not repay (the score benchmark's template head: 4 of 69 tokens).
MIN_PREFIX = 16


def pad_of(tokenizer: Any) -> int:
    """The id a tokenizer's texts are padded with, in scoring and generation batches: its
    pad token, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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


@dataclass(frozen=True)
class Prefixes:
    """The distinct prefixes (token id tuples) of one block of batches (`prefix_batches`),
    computed once for all of them. Equal prefixes are one block's, whichever plan, group or
    process (a Ray actor) holds them: a held key/value cache is found by this value."""

    ids: tuple[tuple[int, ...], ...]


def prefix_groups(rows: Sequence[Sequence[int]], keep: Sequence[int],
                  min_prefix: int = MIN_PREFIX) -> list[tuple[int, list[int]]]:
    """Rows grouped by the leading tokens they share, as (prefix length, row indices): each
    group has two rows or more, a prefix of at least `min_prefix` tokens, and no row i
    shares more than its first keep[i] tokens. Rows in no group are left out.

    The grouping saves the most tokens, the sum over groups of (rows - 1) x prefix. Sorted,
    the rows' shareable parts form a tree: a node is a maximal run of rows sharing d
    tokens, its children the runs inside it that share more. The rows of a node's group
    share its d tokens; a child either joins it (all its rows, saving d each) or groups
    within itself, whichever saves more, and the node forms a group when the children
    that join save more than the d its first row does not."""
    n = len(rows)
    if n < 2:
        return []
    part = [list(rows[i][: max(0, min(keep[i], len(rows[i])))]) for i in range(n)]
    order = sorted(range(n), key=lambda i: part[i])
    lcp = []
    for a, b in zip(order, order[1:], strict=False):
        x, y = part[a], part[b]
        cap, p = min(len(x), len(y)), 0
        while p < cap and x[p] == y[p]:
            p += 1
        lcp.append(p)

    class Node:
        __slots__ = ("depth", "lo", "hi", "kids", "best", "joins")

        def __init__(self, depth: int, lo: int) -> None:
            self.depth, self.lo, self.hi, self.kids, self.best, self.joins = depth, lo, lo, [], 0, None

    def close(node: Node, hi: int) -> None:
        node.hi = hi
        d = node.depth
        apart = sum(k.best for k in node.kids)
        if d < min_prefix:
            node.best = apart
            return
        covered = sum(k.hi - k.lo + 1 for k in node.kids)
        joins = [k for k in node.kids if (k.hi - k.lo + 1) * d > k.best]
        gain = (hi - node.lo + 1 - covered) * d + sum((k.hi - k.lo + 1) * d - k.best for k in joins)
        if gain > d:  # the group saves d per row but its first
            node.joins, node.best = joins, apart + gain - d
        else:
            node.best = apart

    root = Node(-1, 0)
    stack = [root]
    for i in range(1, n + 1):  # between sorted rows i-1 and i; past the end, -1 closes all
        cur = lcp[i - 1] if i < n else -1
        lo, last = i - 1, None
        while cur < stack[-1].depth:
            last = stack.pop()
            close(last, i - 1)
            lo = last.lo
            if cur <= stack[-1].depth:
                stack[-1].kids.append(last)
                last = None
        if cur > stack[-1].depth:
            node = Node(cur, lo)
            if last is not None:
                node.kids.append(last)
            stack.append(node)
    out, todo = [], list(root.kids)
    while todo:
        node = todo.pop()
        if node.joins is None:
            todo.extend(node.kids)
            continue
        joined = {id(k) for k in node.joins}
        inner = set()
        for k in node.kids:
            if id(k) not in joined:
                inner.update(range(k.lo, k.hi + 1))
                todo.append(k)
        out.append((node.depth, [order[j] for j in range(node.lo, node.hi + 1) if j not in inner]))
    return sorted(out, key=lambda g: min(g[1]))


def prefix_batches(rows: Sequence[Sequence[int]], keep: Sequence[int], batch_size: int | None = None,
                   budget: int | None = None, min_prefix: int = MIN_PREFIX
                   ) -> list[tuple[list[int], Prefixes | None, list[int] | None]]:
    """Batches of `rows` (token id lists) as (row indices, the block's Prefixes, each row's
    index into them), every row once: rows that share a prefix (`prefix_groups`) in blocks
    of groups with prefixes x longest prefix <= budget, sorted by prefix length; a block's
    rows sorted by their length past the prefix and cut by `sorted_batches`, with the
    block's longest prefix as extra. The rows in no group follow, as `sorted_batches`
    cuts them, with no Prefixes."""
    budget = BATCH_TOKENS if budget is None else budget
    groups = sorted(prefix_groups(rows, keep, min_prefix), key=lambda g: (g[0], min(g[1])))
    blocks: list[list[tuple[int, list[int]]]] = []
    for g in groups:  # ascending prefix length: the last one added is the block's longest
        if blocks and (len(blocks[-1]) + 1) * g[0] <= budget:
            blocks[-1].append(g)
        else:
            blocks.append([g])
    out: list[tuple[list[int], Prefixes | None, list[int] | None]] = []
    for block in blocks:
        pre = Prefixes(tuple(tuple(rows[g[1][0]][: g[0]]) for g in block))
        longest = block[-1][0]
        member = [(i, k) for k, (_, ids) in enumerate(block) for i in ids]
        own = [len(rows[i]) - block[k][0] for i, k in member]
        for part in sorted_batches(own, batch_size, extra=longest, budget=budget):
            out.append(([member[j][0] for j in part], pre, [member[j][1] for j in part]))
    grouped = {i for _, ids in groups for i in ids}
    alone = [i for i in range(len(rows)) if i not in grouped]
    for part in sorted_batches([len(rows[i]) for i in alone], batch_size, budget=budget):
        out.append(([alone[k] for k in part], None, None))
    return out


__all__ = ["BATCH_TOKENS", "MIN_PREFIX", "Prefixes", "cut_sorted", "pad_of", "prefix_batches", "prefix_groups",
           "sorted_batches"]
