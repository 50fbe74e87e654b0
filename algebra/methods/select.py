"""Streamed, exact top-k selection: the magnitude thresholds of TIES and breadcrumbs and
SCE's variance selection, found without sorting and without holding a tensor.

A non-negative float orders like the integer of its bits, so the k-th largest score is
found digit by digit over those bits (a radix select): pass 1 histograms the top 16
bits of every chunk's scores, which fixes the bucket holding rank k and how many scores
lie above it; each next pass histograms the next digit of the scores inside that bucket
only. float32 scores (31 bits) take two passes, float64 (63 bits) four. The result is
the exact threshold t and how many scores equal to t must still be kept; when that is
fewer than all of them, the index J of the last one kept is found by looking again into
the one chunk that holds it (the last pass keeps each chunk's sparse digit counts, up to
a chunk's worth in all; past that, by scanning from the start), so that
ties are kept lowest index first and exactly k elements are kept. Every score and every
rank of one tensor advance together: one streamed pass evaluates each task vector once
per chunk and feeds every histogram. When, after pass 1, the buckets hold at most a
chunk's worth of elements in all (the usual case), pass 2 gathers them with their
indices instead, and t and J follow in memory: two passes in all.

Memory: a histogram of 2^16 counts per (score, rank), and per chunk the task vector and
its key and digit temporaries (`Select.buffers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..ir import Lin
from ..lazy import np, torch
from ..lower import Reduction, Sym, TExpr
from ..ops import sums as fsums
from ..ops.sparse import kernel_array, population_var, split_map, top_mask

KEEP_ALL = (-1.0, 0.0)  # (t, J) that keeps every element
KEEP_NONE = (0.0, -1.0)  # (t, J) that keeps none


@dataclass(frozen=True)
class OfNonzero:
    """A rank given as a fraction of the nonzero scores (SCE: int(nonzero * topk))."""

    frac: float


@dataclass(eq=False)
class Select(Reduction):
    """For each score of one tensor (`("abs", i)`: |d_i|; `("pos", i)`, `("neg", i)`:
    max(d_i, 0) and max(-d_i, 0), whose top ranks are d_i's largest and smallest values;
    `("var", -1)`: the population variance of the d_i across models) and each of its
    ranks k (1 <= k <= N, or an `OfNonzero`), the (t, J) of the top k (see
    `ops.sparse.top_mask`): t is the k-th largest score (k = N: the smallest). Its value
    is the flat tuple t, J, t, J, ... in that order; with `cuts=False` (order statistics
    wanted, not masks) no tie cut is looked for, and the value is t, t, ... alone."""

    deltas: tuple[TExpr, ...]
    scores: tuple[tuple[str, int], ...]
    ranks: tuple[tuple[Any, ...], ...]
    label: str
    deps: tuple[Reduction, ...] = field(default=())
    cuts: bool = True  # False: only each t is wanted (see above)

    def __post_init__(self) -> None:
        self.deps = self._find_deps()

    def exprs(self) -> list[TExpr]:
        return list(self.deltas)

    def _per_tensor_first(self) -> list[TExpr]:
        return [self.deltas[0]]

    def index(self, score: int, rank: int) -> int:
        """Where the t of (score, rank) sits in the value (J follows it, if cut)."""
        return (2 if self.cuts else 1) * (sum(len(r) for r in self.ranks[:score]) + rank)

    @property
    def _var(self) -> bool:
        return any(kind == "var" for kind, _ in self.scores)

    def buffers(self, cs: int, rule) -> float:
        # a task vector (or, for a variance, all of them, their mean and the variance),
        # then its key, digits and the compaction of a bucket
        # (a bucket small enough is gathered instead: at most a chunk of keys and int64
        # indices, 3 units in float32, 2 in float64)
        gathered = 3.0 if cs == 4 else 2.0
        if self._var:
            return sum(rule(d, cs) for d in self.deltas) + 2.0 + 3.5 + gathered
        # (+1: a chunk of the shared base, held while each task vector is formed)
        return max(rule(d, cs) for d in self.deltas) + 1.0 + 3.5 + gathered

    def describe(self) -> str:
        n = sum(len(r) for r in self.ranks)
        if not self._var and not any(kind == "abs" for kind, _ in self.scores):
            return f"{self.label}: {n} exact order statistic(s) of the positive and negative parts"
        what = "variance" if self._var else "magnitude"
        return f"{self.label}: {n} exact top-k {what} threshold(s) by radix select"

    def run(self, ev: Any, chunk: int) -> tuple[float, ...]:
        return _radix_select(self, ev, chunk)

    def __repr__(self) -> str:
        return f"Select({self.label})"


def _value(sel: Select, ranks: list[_Rank]) -> tuple[float, ...]:
    """The Select's value from its ranks' results (each a (t, J))."""
    return tuple(x for r in ranks for x in (r.result if sel.cuts else r.result[:1]))


@dataclass
class _Rank:
    score: int
    k: Any
    rank: int = 0  # how many of the remaining bucket, from the top, are still to keep
    prefix: int = 0  # the bits fixed so far
    equal: int = 0  # how many scores share the final bits
    result: tuple[float, float] | None = None


def _keys(sel: Select, ev: Any, e0: int, e1: int, itype: torch.dtype):
    """(score index, integer key tensor) for every score over one chunk. The keys are
    pool buffers (the task vector's own, made absolute in place where the evaluator
    handed it out, else a copy), valid until the next item: take nothing beyond."""
    pool = ev.pool
    var_scores = [s for s, (kind, _) in enumerate(sel.scores) if kind == "var"]
    if var_scores:
        ds = [ev.eval(d, e0, e1) for d in sel.deltas]
        var = population_var(ds, pool)
        for d in ds:
            pool.give(d)
        key = var.view(itype)
        for s in var_scores:
            yield s, key
        pool.give(var)
    shared = _shared_base(sel.deltas)
    base = None
    for i, d_expr in enumerate(sel.deltas):
        mine = [s for s, (kind, j) in enumerate(sel.scores) if kind == "abs" and j == i]
        sides = [(s, kind) for s, (kind, j) in enumerate(sel.scores) if kind in ("pos", "neg") and j == i]
        if not mine and not sides:
            continue
        if shared is not None:  # d_i = m_i - base, the base read once for all of them
            base = ev.eval(shared[0], e0, e1) if base is None else base
            x = ev.eval(shared[1][i], e0, e1)
            d = torch.sub(x, base, out=pool.take(e1 - e0, ev.dtype))
            pool.give(x)
        else:
            d = ev.eval(d_expr, e0, e1)
        for s, kind in sides:  # max(d, 0) or max(-d, 0), made +0.0 where -0.0 (abs)
            part = pool.take(e1 - e0, d.dtype)
            torch.clamp(d, **({"min": 0.0} if kind == "pos" else {"max": 0.0}), out=part).abs_()
            yield s, part.view(itype)
            pool.give(part)
        if not mine:
            pool.give(d)
            continue
        if pool.owns(d):
            mag = d.abs_()
        else:  # a view of an input: never written
            mag = torch.abs(d, out=pool.take(e1 - e0, d.dtype))
        key = mag.view(itype)
        for s in mine:
            yield s, key
        pool.give(mag)
    if base is not None:
        pool.give(base)


def _shared_base(deltas) -> tuple[TExpr, list[TExpr]] | None:
    """(base, [m_i]) when every task vector is the expression m_i - base of one base (as
    the methods lower them), so that a chunk of the base is read once for all; else None.
    m_i - base computed directly equals the Lin's 1.0 * m_i + (-1.0) * base bit for bit."""
    base, ms = None, []
    for d in deltas:
        if not isinstance(d, Lin):
            return None
        terms = d.terms
        if (len(terms) != 2 or isinstance(d.const, Sym) or d.const != 0
                or any(isinstance(c, Sym) for c, _ in terms) or terms[0][0] != 1.0 or terms[1][0] != -1.0
                or (base is not None and terms[1][1] is not base)):
            return None
        base = terms[1][1]
        ms.append(terms[0][1])
    return (base, ms) if base is not None else None


def _count_into(hist: torch.Tensor, digits: torch.Tensor) -> None:
    """hist[d] += how many digits equal d (a stride-0 source: no buffer of ones)."""
    hist.index_add_(0, digits, torch.ones(1, dtype=hist.dtype, device=hist.device).expand(digits.numel()))


def _descend(hist: np.ndarray, rank: int) -> tuple[int, int, int]:
    """The digit whose bucket holds the rank-th largest (1-based), the rank within that
    bucket, and the bucket's size."""
    suffix = np.cumsum(hist[::-1])[::-1]  # suffix[d]: how many have a digit >= d
    d = int(np.count_nonzero(suffix >= rank)) - 1
    above = int(suffix[d + 1]) if d + 1 < len(hist) else 0
    return d, rank - above, int(hist[d])


def _radix_select(sel: Select, ev: Any, chunk: int) -> tuple[float, ...]:
    n = sel.deltas[0].numel
    wide = ev.dtype == torch.float64
    itype, ftype, bits = (torch.int64, torch.float64, 63) if wide else (torch.int32, torch.float32, 31)
    widths = [16, 16, 16, 15] if wide else [16, 15]
    ranks = [_Rank(s, k) for s, ks in enumerate(sel.ranks) for k in ks]
    zeros = [0] * len(sel.scores)
    nonzero_ranked = {r.score for r in ranks if isinstance(r.k, OfNonzero)}  # SCE's int(nonzero * topk)
    spans = [(e0, min(n, e0 + chunk)) for e0 in range(0, n, chunk)]
    records: dict[int, Any] = {}  # rank -> per chunk (index, last digits, counts), or None
    budget = [chunk]  # recorded entries in all: at most a chunk's worth
    if len(spans) == 1:  # the whole tensor is one chunk: select in memory, one pass
        return _select_in_chunk(sel, ev, n, ranks, itype, ftype)
    m = _sample_size(n, chunk, len(ranks), len(sel.scores))
    if m:  # a window around each threshold from a sample, then one pass (or, if it missed, as below)
        _window_select(sel, ev, spans, ranks, itype, ftype, m, chunk)
        if all(r.result is not None for r in ranks):
            return _value(sel, ranks)
    done_bits = 0
    for p, width in enumerate(widths):
        shift = bits - done_bits - width
        nbins = 1 << width
        live = [r for r in ranks if r.result is None]
        if not live:
            break
        htype = torch.int32 if n < 2**31 else torch.int64
        hists = {k: torch.zeros(nbins, dtype=htype, device=ev.device)
                 for k in (range(len(sel.scores)) if p == 0 else [id(r) for r in live])}
        final = p == len(widths) - 1
        for j, (e0, e1) in enumerate(spans):
            # chunk-sized temporaries from the pool (a fresh one per chunk fragments the heap)
            high, hit = ev.pool.take(e1 - e0, itype), ev.pool.take(e1 - e0, torch.bool)
            for s, key in _keys(sel, ev, e0, e1, itype):
                if p == 0:
                    _count_into(hists[s], torch.bitwise_right_shift(key, shift, out=high))
                    if s in nonzero_ranked:
                        zeros[s] += int(torch.count_nonzero(torch.eq(key, 0, out=hit)))
                    continue
                for r in live:
                    if r.score != s:
                        continue
                    torch.bitwise_right_shift(key, shift + width, out=high)
                    inside = key[torch.eq(high, r.prefix, out=hit)]
                    digits = inside.bitwise_right_shift_(shift).bitwise_and_(nbins - 1)
                    del inside
                    if not final or not sel.cuts or records.get(id(r), ()) is None:
                        _count_into(hists[id(r)], digits)
                        continue
                    # the last digit: also keep each chunk's (sparse) counts, so that the
                    # tie cut needs to look into one chunk only
                    h = torch.zeros(nbins, dtype=htype, device=ev.device)
                    _count_into(h, digits)
                    hists[id(r)].add_(h)
                    nz = h.nonzero().flatten()
                    rec = records.setdefault(id(r), [])
                    rec.append((j, nz.cpu().numpy(), h[nz].cpu().numpy()))
                    budget[0] -= len(nz)
                    if budget[0] < 0:
                        records[id(r)] = None
            ev.pool.give(high)
            ev.pool.give(hit)
        for r in live:
            hist = hists[r.score if p == 0 else id(r)].cpu().numpy().astype(np.int64)
            if p == 0:
                k = r.k
                if isinstance(k, OfNonzero):
                    k = int((n - zeros[r.score]) * k.frac)
                if k <= 0:
                    r.result = KEEP_NONE
                    continue
                if k > n:
                    r.result = KEEP_ALL
                    continue
                r.rank = k
            d, r.rank, r.equal = _descend(hist, r.rank)
            r.prefix = (r.prefix << width) | d
        done_bits += width
        live = [r for r in ranks if r.result is None]
        if live and sum(r.equal for r in live) <= chunk:
            # the buckets are small: collect them (keys and indices) and finish in memory
            _collect(sel, ev, spans, live, itype, ftype, bits - done_bits)
            break
    # the threshold, and where ties at it stop being kept
    cut: list[_Rank] = []
    for r in ranks:
        if r.result is None:
            t = float(torch.tensor([r.prefix], dtype=itype).view(ftype).item())
            r.result = (t, float(n)) if r.rank == r.equal else (t, math.nan)
            if r.rank != r.equal and sel.cuts:
                cut.append(r)
    if cut:
        # the chunk holding the last tie kept: from the recorded counts when there are
        # any, else by scanning from the start
        start: dict[int, int] = {}
        seen: dict[int, int] = {}
        last_digit = (1 << widths[-1]) - 1
        for r in cut:
            start[id(r)], seen[id(r)] = 0, 0
            for j, digits, counts in records.get(id(r)) or ():
                c = int(counts[digits == (r.prefix & last_digit)].sum())
                if seen[id(r)] + c >= r.rank:
                    start[id(r)] = j
                    break
                seen[id(r)] += c
        if all(records.get(id(r)) is not None for r in cut):
            order = sorted(set(start.values()))
        else:
            order = list(range(min(start.values()), len(spans)))
        for j in order:
            if all(not math.isnan(r.result[1]) for r in cut):
                break
            e0, e1 = spans[j]
            for s, key in _keys(sel, ev, e0, e1, itype):
                for r in cut:
                    if r.score != s or not math.isnan(r.result[1]) or j < start[id(r)]:
                        continue
                    eq = torch.eq(key, r.prefix, out=ev.pool.take(e1 - e0, torch.bool))
                    hits = eq.nonzero().flatten()
                    ev.pool.give(eq)
                    need = r.rank - seen[id(r)]
                    if len(hits) >= need:
                        r.result = (r.result[0], float(e0 + int(hits[need - 1]) + 1))
                    else:
                        seen[id(r)] += len(hits)
    return _value(sel, ranks)


# The windowed selection: sample size and width (see _window_select)
SAMPLE_MIN = 1 << 14  # keys sampled at least; a tensor under SAMPLE_SHARE times this takes the radix passes
SAMPLE_SHARE = 16  # at most this fraction (1/16) of a tensor is sampled
SAMPLE_BLOCKS = 64  # spread over this many contiguous blocks
WINDOW_SIGMAS = 5.0  # the window's half-width, in standard deviations of the sampled rank


def _sample_size(n: int, chunk: int, nranks: int = 1, nscores: int = 1) -> int:
    """How many keys `_window_select` samples from a tensor of n elements for `nranks`
    ranks (0: too small for a sample to pay, take the radix passes). Enough that the
    windows of all the ranks hold about half a chunk of elements together (the budget
    they share is a chunk): a window's share of the tensor is at most about
    WINDOW_SIGMAS / sqrt(m), so m grows with the square of the number of ranks. (Sized
    per rank, two ranks' windows filled the whole budget, and one tensor in five went
    over it into the radix passes: two more passes, and their temporaries.) The samples
    of the `nscores` scores are held together: at most a chunk's worth in all."""
    cap = min(n // SAMPLE_SHARE, chunk // max(1, nscores))  # the samples: at most a chunk in all
    if cap < SAMPLE_MIN:
        return 0
    return min(cap, max(SAMPLE_MIN, math.ceil((2 * WINDOW_SIGMAS * max(1, nranks) * n / chunk) ** 2)))


def _window_select(sel: Select, ev: Any, spans, ranks: list[_Rank], itype, ftype, m: int, chunk: int) -> None:
    """Each rank's exact (t, J) from one pass over the tensor, where it can: a sample of m
    keys (SAMPLE_BLOCKS evenly spread blocks) brackets the rank-k key in a window [lo, hi]
    of keys; the pass counts the keys above hi exactly and records, per chunk, the distinct
    keys inside the window with their counts (at most a chunk's worth in all). When the
    count above is < k <= the count above plus the window's, the threshold t is the
    window's key where the count reaches k, and J, if ties at t are cut, is found by
    reading again the one chunk that holds the last tie kept. A rank whose window missed
    (or overflowed the budget) keeps result None: the radix passes find it."""
    n = sel.deltas[0].numel
    pool = ev.pool
    top = torch.iinfo(itype).max  # above every key
    bs = -(-m // SAMPLE_BLOCKS)
    starts = sorted({min(n - bs, (n - bs) * b // max(1, SAMPLE_BLOCKS - 1)) for b in range(SAMPLE_BLOCKS)})
    # each score's sample goes into one pool buffer (at most a chunk's worth for all the
    # scores: _sample_size), sorted in place on the CPU
    zero_counted = {r.score for r in ranks if isinstance(r.k, OfNonzero)}
    compiled = _compiled_window(sel, ev, zero_counted)
    sample = _sample_compiled(sel, ev, n, starts, bs, compiled) if compiled is not None else None
    if sample is None:
        sample = {}
        for j, a in enumerate(starts):
            for s, key in _keys(sel, ev, a, a + bs, itype):
                if s not in sample:
                    sample[s] = pool.take(len(starts) * bs, itype)
                sample[s][j * bs:(j + 1) * bs].copy_(key)
    ascending = {}
    for s, buf in sample.items():
        if buf.device.type == "cpu":
            buf.numpy().sort()
            ascending[s] = buf
        else:
            ascending[s] = torch.sort(buf).values
    windows: dict[int, list] = {}  # rank -> [lo, hi, above, zeros, [(chunk, keys, counts)]]
    for r in ranks:
        asc = ascending[r.score]
        size = asc.numel()
        if isinstance(r.k, OfNonzero):
            est = int(int(torch.count_nonzero(asc)) * r.k.frac)
        else:
            est = round(r.k * size / n)
        est = min(max(est, 1), size)
        q = min(max(est / size, 1 / size), 1 - 1 / size)
        half = math.ceil(WINDOW_SIGMAS * math.sqrt(size * q * (1 - q))) + 1
        # the (est - 1 -+ half)-th largest sampled keys
        hi = int(asc[size - est + half]) if est - 1 - half >= 0 else top
        lo = int(asc[size - est - half]) if est - 1 + half < size else 0
        windows[id(r)] = [lo, hi, 0, 0, []]
    for buf in sample.values():
        pool.give(buf)
    del sample, ascending
    budget = chunk
    for j, (e0, e1) in enumerate(spans):
        counts = (_window_counts_compiled(sel, ev, e0, e1, ranks, windows, compiled) if compiled is not None
                  else _window_counts(sel, ev, e0, e1, itype, ranks, windows, zero_counted))
        for r, n_above, cand in counts:
            windows[id(r)][2] += n_above
            # np.unique: torch's CPU unique took 100x longer on these few keys
            vals, counts_ = np.unique(cand, return_counts=True)
            if vals.size:
                windows[id(r)][4].append((j, vals, counts_))
            budget -= vals.size
        if budget < 0:
            return  # the windows hold too many distinct keys: the radix passes instead
    cuts: list[tuple[_Rank, int, int, int]] = []  # (rank, chunk, key t, ties still to keep there)
    for r in ranks:
        lo, hi, above, zeros, recs = windows[id(r)]
        k = r.k
        if isinstance(k, OfNonzero):
            k = int((n - zeros) * k.frac)
        if k <= 0 or k > n:
            r.result = KEEP_NONE if k <= 0 else KEEP_ALL
            continue
        need = k - above  # how many of the window's keys, from the top, are kept
        if need <= 0 or not recs:
            continue  # the window missed: below the threshold
        uniq, inverse = np.unique(np.concatenate([v for _, v, _ in recs]), return_inverse=True)
        totals = np.bincount(inverse, weights=np.concatenate([c for _, _, c in recs]), minlength=uniq.size)
        totals = totals.astype(np.int64)[::-1]  # from the largest key down
        cum = np.cumsum(totals)
        if int(cum[-1]) < need:
            continue  # the window missed: above the threshold
        pos = int(np.searchsorted(cum, need))  # the first key where the count reaches need
        t = int(uniq[::-1][pos])
        keep_equal = need - (int(cum[pos - 1]) if pos else 0)
        tf = float(torch.tensor([t], dtype=itype).view(ftype).item())
        if keep_equal == int(totals[pos]) or not sel.cuts:
            r.result = (tf, float(n) if keep_equal == int(totals[pos]) else math.nan)
            continue
        for j, v, c in recs:  # the chunk holding the keep_equal-th key equal to t
            here = int(c[v == t].sum())
            if keep_equal <= here:
                cuts.append((r, j, t, keep_equal))
                r.result = (tf, math.nan)
                break
            keep_equal -= here
    for j in sorted({j for _, j, _, _ in cuts}):
        e0, e1 = spans[j]
        if compiled is not None:
            _cut_compiled(ev, e0, e1, [c for c in cuts if c[1] == j], sel, compiled)
            continue
        for s, key in _keys(sel, ev, e0, e1, itype):
            for r, jj, t, need in cuts:
                if jj == j and r.score == s:
                    hits = torch.eq(key, t, out=pool.take(e1 - e0, torch.bool))
                    at = hits.nonzero().flatten()
                    pool.give(hits)
                    r.result = (r.result[0], float(e0 + int(at[need - 1]) + 1))


def _window_counts(sel: Select, ev: Any, e0: int, e1: int, itype, ranks: list[_Rank], windows: dict,
                   zero_counted: set):
    """(rank, how many of its keys are above its window, its keys inside the window as a
    numpy array) for every rank over one chunk, from `_keys` (any scores, any device);
    each item valid until the next. Adds the chunk's zero keys to the windows of
    OfNonzero ranks."""
    pool = ev.pool
    above, inside = pool.take(e1 - e0, torch.bool), pool.take(e1 - e0, torch.bool)
    for s, key in _keys(sel, ev, e0, e1, itype):
        zeros = int(torch.count_nonzero(torch.eq(key, 0, out=inside))) if s in zero_counted else 0
        for r in ranks:
            if r.score != s:
                continue
            lo, hi = windows[id(r)][:2]
            windows[id(r)][3] += zeros
            if key.device.type == "cpu":  # numpy: 5-10x faster than torch here (measured)
                yield (r, *_window_count(key.numpy(), above.numpy(), inside.numpy(), lo, hi))
            else:
                torch.gt(key, hi, out=above)
                n_above = int(torch.count_nonzero(above))
                torch.ge(key, lo, out=inside).logical_and_(above.logical_not_())
                yield r, n_above, key[inside].cpu().numpy()
    pool.give(above)
    pool.give(inside)


def _compiled_window(sel: Select, ev: Any, zero_counted: set) -> tuple[TExpr, list[TExpr]] | None:
    """(base, [m_i]) where the window pass can run the compiled count
    (`ops.kernels.window_count`: keys of |m_i - base| in float32 on the CPU, no zero
    counts), else None."""
    if zero_counted or ev.dtype != torch.float32 or ev.device.type != "cpu":
        return None
    if any(kind != "abs" for kind, _ in sel.scores):
        return None
    return _shared_base(sel.deltas)


def _window_counts_compiled(sel: Select, ev: Any, e0: int, e1: int, ranks: list[_Rank], windows: dict,
                            shared: tuple[TExpr, list[TExpr]]):
    """`_window_counts` of task vectors m_i - base, each chunk of the base read once, the
    difference, its magnitude and the count in one compiled pass (split between the run's
    threads): the same keys and counts. A bfloat16 input is read as stored and converted
    and checked finite in that pass (`_stored`), and the evaluator told so: the write
    pass reading the chunk again does not check it again."""
    from ..ops import kernels

    pool = ev.pool
    base, base_buf, base_leaf = _stored(ev, shared[0], e0, e1)
    found = pool.take(e1 - e0, torch.int32)
    fn = found.numpy()
    for i, m_expr in enumerate(shared[1]):
        mine = [r for r in ranks if sel.scores[r.score] == ("abs", i)]
        if not mine:
            continue
        xn, x_buf, x_leaf = _stored(ev, m_expr, e0, e1)
        for r in mine:
            lo, hi = windows[id(r)][:2]

            def part(a: int, b: int, xn=xn, lo=lo, hi=hi):
                n_above, c, bad = kernels.window_count(xn[a:b], base[a:b], lo, hi, fn[a:b])
                return n_above, fn[a:a + c], bad

            pieces = split_map(e1 - e0, part)
            if ev.check_inputs and any(bad for _, _, bad in pieces):
                for e in (shared[0], m_expr):
                    pool.give(ev.eval(e, e0, e1))  # the evaluator's own check: a positioned error
                raise AssertionError("the compiled window pass saw a non-finite input the evaluator did not")
            yield (r, sum(n for n, _, _ in pieces),
                   pieces[0][1] if len(pieces) == 1 else np.concatenate([c for _, c, _ in pieces]))
        for leaf in (base_leaf, x_leaf):
            if leaf is not None:
                ev.mark_checked(leaf, e0, e1)
        if x_buf is not None:
            pool.give(x_buf)
    pool.give(found)
    if base_buf is not None:
        pool.give(base_buf)


def _sample_compiled(sel: Select, ev: Any, n: int, starts: list[int], size: int,
                     shared: tuple[TExpr, list[TExpr]]) -> dict[int, torch.Tensor] | None:
    """`_window_select`'s sample (each score's keys over the blocks [a, a + size), a in
    `starts`, in one pool buffer) read from the whole tensors as stored, where every
    input is a stored bfloat16 (`Evaluator.as_stored`: a view, nothing read until
    touched), in one compiled call per score; else None. Unchecked: the window pass
    that follows checks every element."""
    from ..ops import kernels

    whole = [ev.as_stored(e, 0, n) for e in (shared[0], *shared[1])]
    if any(x is None for x in whole):
        return None
    at = np.asarray(starts, dtype=np.int64)
    sample = {}
    for s, (_, i) in enumerate(sel.scores):
        sample[s] = ev.pool.take(len(starts) * size, torch.int32)
        kernels.sample_keys(kernel_array(whole[1 + i]), kernel_array(whole[0]), at, size, sample[s].numpy())
    return sample


def _cut_compiled(ev: Any, e0: int, e1: int, cuts: list, sel: Select, shared: tuple[TExpr, list[TExpr]]) -> None:
    """`_window_select`'s tie cuts inside chunk [e0, e1): each rank's J, where its
    need-th key equal to t lies, by a compiled scan of |m_i - base| that stops there."""
    from ..ops import kernels

    base, base_buf, _ = _stored(ev, shared[0], e0, e1)
    for r, _, t, need in cuts:
        xn, x_buf, _ = _stored(ev, shared[1][sel.scores[r.score][1]], e0, e1)
        at = kernels.nth_key(xn, base, t, need)
        assert at >= 0, "the tie cut's chunk changed between passes"
        r.result = (r.result[0], float(e0 + at + 1))
        if x_buf is not None:
            ev.pool.give(x_buf)
    if base_buf is not None:
        ev.pool.give(base_buf)


def _stored(ev: Any, e: TExpr, e0: int, e1: int):
    """Elements [e0, e1) of `e` for a compiled kernel: (numpy array, the evaluator's buffer
    to give back, the Leaf read as stored). A bfloat16 input (`Evaluator.as_stored`) is
    its stored bits (the kernel converts and checks them); anything else is evaluated
    (float32, checked)."""
    x = ev.as_stored(e, e0, e1)
    if x is not None:
        return kernel_array(x), None, e
    y = ev.eval(e, e0, e1)
    return kernel_array(y), y, None


def _window_count(kn, a, b, lo: int, hi: int):
    """(how many keys are above hi, the keys in [lo, hi]) of one chunk of keys, with
    `a` and `b` its scratch masks; the chunk is split between the run's threads (numpy
    lets go of the GIL), the pieces put back in order: the same result on any number."""
    def part(r0: int, r1: int):
        k, x, y = kn[r0:r1], a[r0:r1], b[r0:r1]
        above = (r1 - r0) - int(np.count_nonzero(np.less_equal(k, hi, out=x)))
        return above, k[np.logical_and(x, np.greater_equal(k, lo, out=y), out=y)]

    pieces = split_map(kn.size, part)
    if len(pieces) == 1:
        return pieces[0]
    return sum(x for x, _ in pieces), np.concatenate([c for _, c in pieces])


def _collect(sel: Select, ev: Any, spans, live: list[_Rank], itype, ftype, low_bits: int) -> None:
    """One pass gathering every key of each rank's bucket with its index, then the exact
    (t, J) from them: at most `chunk` candidates in all, and no pass for the tie cut."""
    # each bucket's keys and indices go straight into buffers of its known size (r.equal):
    # no list of pieces interleaved with each chunk's temporaries on the heap
    pool = ev.pool
    keys = {id(r): pool.take(r.equal, itype) for r in live}
    where = {id(r): pool.take(r.equal, torch.int64) for r in live}
    filled = dict.fromkeys(keys, 0)
    for e0, e1 in spans:
        high, inside = pool.take(e1 - e0, itype), pool.take(e1 - e0, torch.bool)
        for s, key in _keys(sel, ev, e0, e1, itype):
            for r in live:
                if r.score == s:
                    torch.bitwise_right_shift(key, low_bits, out=high)
                    hit = torch.eq(high, r.prefix, out=inside).nonzero().flatten()
                    f, g = filled[id(r)], filled[id(r)] + hit.numel()
                    torch.index_select(key, 0, hit, out=keys[id(r)][f:g])
                    torch.add(hit, e0, out=where[id(r)][f:g])
                    filled[id(r)] = g
                    del hit
        pool.give(high)
        pool.give(inside)
    n = sel.deltas[0].numel
    for r in live:
        key, idx = keys.pop(id(r)), where.pop(id(r))
        assert filled[id(r)] == key.numel(), "the bucket's size changed between passes"
        order = torch.sort(key, descending=True, stable=True).indices  # ties: index order
        t = key[order[r.rank - 1]]
        equal = idx[key == t]  # ascending: gathered in index order
        keep_equal = r.rank - int((key > t).sum())
        cut = n if keep_equal == len(equal) else int(equal[keep_equal - 1]) + 1
        r.result = (float(t.view(ftype).item()), float(cut))
        pool.give(key)
        pool.give(idx)


def _kth_largest(key: torch.Tensor, ks: list[int], pool) -> list[torch.Tensor]:
    """The k-th largest of a flat tensor of keys for each k of `ks`, as 0-d tensors; on
    the CPU by one numpy introselect for all of them on a pool copy (torch's kthvalue took
    13-18 ns an element against about 1, measured on 2^18-2^22 keys)."""
    n = key.numel()
    if key.device.type != "cpu":
        return [key.kthvalue(n - k + 1).values for k in ks]
    buf = pool.take(n, key.dtype)
    a = buf.copy_(key).numpy()
    a.partition(sorted({n - k for k in ks}))
    ts = [key.new_full((), int(a[n - k])) for k in ks]
    pool.give(buf)
    return ts


NTH_BLOCK = 1 << 16


def _nth_true(mask: torch.Tensor, j: int) -> int:
    """The index of the j-th True (1-based) of a flat bool tensor that holds at least j:
    counted per block of NTH_BLOCK, then looked up inside the one block holding it, so
    that no index array as long as the tensor is made (all its keys may be equal)."""
    n = mask.numel()
    whole = n // NTH_BLOCK * NTH_BLOCK
    per = mask[:whole].view(-1, NTH_BLOCK).sum(1, dtype=torch.int64).tolist() if whole else []
    per.append(int(mask[whole:].sum()))
    for b, c in enumerate(per):
        if j <= c:
            lo = b * NTH_BLOCK
            return lo + int(mask[lo:lo + NTH_BLOCK].nonzero()[j - 1])
        j -= c
    raise AssertionError("fewer True entries than asked for")


def _select_in_chunk(sel: Select, ev: Any, n: int, ranks: list[_Rank], itype, ftype) -> tuple[float, ...]:
    """The same (t, J) as the radix select, for a tensor that fits in one chunk."""
    for s, key in _keys(sel, ev, 0, n, itype):
        todo = []
        for r in ranks:
            if r.score != s:
                continue
            k = r.k
            if isinstance(k, OfNonzero):
                k = int(int((key != 0).sum()) * k.frac)
            if k <= 0 or k > n:
                r.result = KEEP_NONE if k <= 0 else KEEP_ALL
                continue
            todo.append((r, k))
        if not todo:
            continue
        for (r, k), t in zip(todo, _kth_largest(key, [k for _, k in todo], ev.pool), strict=True):
            if not sel.cuts:
                r.result = (float(t.view(ftype).item()), math.nan)
                continue
            eq = key == t
            keep_equal = k - int((key > t).sum())
            cut = n if keep_equal == int(eq.sum()) else _nth_true(eq, keep_equal) + 1
            r.result = (float(t.view(ftype).item()), float(cut))
    return _value(sel, ranks)


@dataclass(eq=False)
class Pick(Sym):
    """Entry `index` of a reduction's tuple value (a threshold t or a cut index J)."""

    red: Reduction
    index: int

    @property
    def deps(self) -> tuple[Reduction, ...]:
        return (self.red,)

    def value(self, results: dict) -> float:
        return float(results[self.red][self.index])

    def __repr__(self) -> str:
        return f"{self.red.label}[{self.index}]"


@dataclass(eq=False)
class MaskedSquares(Reduction):
    """Σ d_i² per model over one tensor, of the task vectors after SCE's variance
    selection (`select`, or none): SCE's per-model weights are their means."""

    deltas: tuple[TExpr, ...]
    select: Select | None
    label: str
    deps: tuple[Reduction, ...] = field(default=())

    def __post_init__(self) -> None:
        self.deps = self._find_deps() + ((self.select,) if self.select is not None else ())

    def exprs(self) -> list[TExpr]:
        return list(self.deltas)

    def _per_tensor_first(self) -> list[TExpr]:
        return [self.deltas[0]]

    def buffers(self, cs: int, rule) -> float:
        wide = 1.0 if cs >= 8 else 8 / cs
        return sum(rule(d, cs) for d in self.deltas) + 2.0 + 1.5 + wide

    def describe(self) -> str:
        return f"{self.label}: squared norms of {len(self.deltas)} selected task vector(s)"

    def run(self, ev: Any, chunk: int) -> tuple[float, ...]:
        n = self.deltas[0].numel
        sums = [0.0] * len(self.deltas)
        tj = ev.results[self.select] if self.select is not None else None
        for e0 in range(0, n, chunk):
            e1 = min(n, e0 + chunk)
            ds = [ev.eval(d, e0, e1) for d in self.deltas]
            keep = top_mask(population_var(ds), tj[0], tj[1], e0) if tj is not None else None
            for i, d in enumerate(ds):
                x = d.to(torch.float64)
                if keep is not None:
                    x = x.masked_fill_(~keep, 0.0)
                sums[i] += fsums.dot(x, x)
                del x
                ev.pool.give(d)
        return tuple(sums)

    def __repr__(self) -> str:
        return f"MaskedSquares({self.label})"


@dataclass(eq=False)
class SceWeight(Sym):
    """Model i's SCE weight: its mean squared (selected) task vector over the sum of
    them; equal weights when that sum is below 1e-6 (as mergekit does)."""

    red: MaskedSquares
    i: int
    numel: int

    @property
    def deps(self) -> tuple[Reduction, ...]:
        return (self.red,)

    def value(self, results: dict) -> float:
        means = [s / self.numel for s in results[self.red]]
        total = math.fsum(means)
        if abs(total) < 1e-6:
            return 1.0 / len(means)
        return means[self.i] / total

    def __repr__(self) -> str:
        return f"sce_weight({self.red.label}, {self.i})"


__all__ = ["KEEP_ALL", "KEEP_NONE", "MaskedSquares", "OfNonzero", "Pick", "SceWeight", "Select"]
