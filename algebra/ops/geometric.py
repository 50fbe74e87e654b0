"""The scalar rules and primitives of the geometric merges (Model Stock, NuSLERP,
Multi-SLERP, Karcher mean, NearSwap).

The spherical methods depend on their vectors only through lengths and mutual angles,
and their result lies in the span of the inputs. So each rule here takes a Gram matrix
G (G[i, j] = <v_i, v_j>, float64, accumulated by a streamed reduction) and returns the
coefficients c with result = sum_i c_i v_i; a point x = sum_i a_i u_i of the unit
directions u_i = v_i / |v_i| has |x|^2 = a^T U a with U = D^-1 G D^-1. The rules for
Model Stock and NuSLERP are vectorised over leading axes (one Gram matrix per row for
the row-wise variants). Nothing here reads a tensor: the primitives at the end are the
only tensor code.
"""

from __future__ import annotations

import math

from ..family import Family
from ..lazy import np, torch

family = Family("ops.geometric")
primitive = family.primitive

# NuSLERP: directions within this much of (anti)parallel (|sin W| below it) interpolate
# linearly, as mergekit's nuslerp does.
COLINEAR_SIN = 1e-8
# Multi-SLERP: the weighted mean of the unit directions is treated as zero below this
# norm (float64 cancellation in a^T U a leaves ~1e-8 when directions cancel exactly).
MEAN_NORM_EPS = 1e-6
# Model Stock: 1 + (N-1)c at or below this means the directions cancel exactly.
STOCK_DENOM_EPS = 1e-12


def _unit_gram(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(norms, valid, U): |v_i|, whether v_i has a direction (|v_i| > 0), and the Gram
    matrix of the unit directions (rows and columns of zero vectors are zero)."""
    norms = np.sqrt(np.clip(np.diagonal(g, axis1=-2, axis2=-1), 0.0, None))
    valid = norms > 0
    inv = np.where(valid, 1.0 / np.where(valid, norms, 1.0), 0.0)
    u = g * inv[..., :, None] * inv[..., None, :]
    # a direction's inner product with itself is 1, not 1 +- rounding
    idx = np.arange(g.shape[-1])
    u[..., idx, idx] = np.where(valid, 1.0, 0.0)
    return norms, valid, u


def model_stock_t(g: np.ndarray) -> np.ndarray:
    """Model Stock's interpolation ratio t = N c / (1 + (N-1) c) from the Gram matrix of
    the N task vectors (shape (..., N, N)), c their mean pairwise cosine. A zero task
    vector has cosine 0 with every other. Where the directions cancel exactly
    (1 + (N-1) c <= 1e-12, the least c can be) t is 0: the base."""
    n = g.shape[-1]
    _, _, u = _unit_gram(g)
    iu = np.triu_indices(n, 1)
    cos = np.clip(u[..., iu[0], iu[1]], -1.0, 1.0)
    c = cos.mean(axis=-1)
    denom = 1.0 + (n - 1) * c
    ok = denom > STOCK_DENOM_EPS
    return np.where(ok, n * c / np.where(ok, denom, 1.0), 0.0)


def nuslerp_coefficients(g: np.ndarray, t: float) -> np.ndarray:
    """(ca, cb) with nuslerp(a, b, t) = ca a + cb b, from the 2x2 Gram matrices g (shape
    (..., 2, 2)): sin((1-t)W)/sin W and sin(tW)/sin W, W the angle between a and b.
    Linear (1-t, t) where either vector is zero or |sin W| < 1e-8 ((anti)parallel)."""
    xx, yy, xy = g[..., 0, 0], g[..., 1, 1], g[..., 0, 1]
    zero = (xx <= 0) | (yy <= 0)
    denom = np.sqrt(np.where(zero, 1.0, xx * yy))
    cos = np.clip(np.where(zero, 0.0, xy / denom), -1.0, 1.0)
    w = np.arccos(cos)
    s = np.sin(w)
    lin = zero | (np.abs(s) < COLINEAR_SIN)
    safe = np.where(lin, 1.0, s)
    ca = np.where(lin, 1.0 - t, np.sin((1.0 - t) * w) / safe)
    cb = np.where(lin, t, np.sin(t * w) / safe)
    return np.stack([ca, cb], axis=-1)


def multislerp_coefficients(g: np.ndarray, weights: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Coefficients c with multislerp(v) = sum_i c_i v_i, following mergekit's
    multislerp: m = normalise(sum_i w_i u_i); the weighted tangent vectors
    T = sum_i w_i (u_i - <u_i, m> m) mapped back with the exponential map,
    cos|T| m + sin|T| T/|T|; scaled by sum_i w_i |v_i|. With normalised weights T is zero,
    so the result is the normalised weighted mean of the directions. A zero vector has
    no direction (its unit is 0); where the weighted mean of the directions vanishes
    (|sum w_i u_i| < 1e-6: they cancel), the result is the linear sum_i w_i v_i."""
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms, valid, u = _unit_gram(g)
    a = np.where(valid, w, 0.0)
    mn = math.sqrt(max(float(a @ u @ a), 0.0))
    if mn < MEAN_NORM_EPS:
        return w.copy()
    m = a / mn
    dots = u @ m
    tangent = a - float(a @ dots) * m
    tn = math.sqrt(max(float(tangent @ u @ tangent), 0.0)) + 1e-8
    res = math.cos(tn) * m + (math.sin(tn) / tn) * tangent
    scale = float(w @ norms)
    return np.where(valid, res * scale / np.where(valid, norms, 1.0), 0.0)


def karcher_coefficients(g: np.ndarray, weights: np.ndarray, max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """Coefficients c with karcher(v) = sum_i c_i v_i: the weighted Karcher (geodesic)
    mean of the unit directions, by mergekit's fixed-point iteration (start at the
    normalised weighted mean, or at the first direction if that is shorter than tol;
    step along the weighted mean of the log maps, terms within tol of the mean or of its
    antipode skipped; stop
    after max_iter steps or when the step is shorter than tol), scaled by the weighted
    mean norm sum_i w_i |v_i| (weights normalised to sum 1). Zero vectors have no
    direction and take no part in the mean (only in the norm); if none has a direction
    with positive weight the result is zero."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    norms, valid, u = _unit_gram(g)
    alpha = np.where(valid, w, 0.0)
    if not valid.any() or alpha.sum() <= 0:
        return np.zeros_like(w)
    alpha = alpha / alpha.sum()
    mean = alpha.copy()
    mn = math.sqrt(max(float(mean @ u @ mean), 0.0))
    if mn < tol:
        mean = np.zeros_like(w)
        mean[int(np.argmax(valid))] = 1.0
    else:
        mean = mean / mn
    for _ in range(max_iter):
        dots = np.clip(u @ mean, -1.0, 1.0)
        theta = np.arccos(dots)
        # the log map is undefined at the antipode: such terms are skipped, like those at
        # the mean itself
        use = valid & (theta >= tol) & (theta <= math.pi - tol)
        k = np.where(use, theta / np.where(use, np.sin(theta), 1.0), 0.0)
        coef = alpha * k
        tangent = coef - float(coef @ dots) * mean  # sum_i a_i k_i (e_i - dot_i mean)
        tn = math.sqrt(max(float(tangent @ u @ tangent), 0.0))
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        un = math.sqrt(max(float(mean @ u @ mean), 0.0))
        if un > tol:
            mean = mean / un
    scale = float(w @ norms)
    return np.where(valid, mean * scale / np.where(valid, norms, 1.0), 0.0)


# ---- primitives ---------------------------------------------------------------------------


@primitive("nearswap", arity=2, scratch=1)
def nearswap(base: torch.Tensor, m: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap: base + w (m - base) with w = clamp(t / |base - m|, 0, 1) per element (1
    where they are equal): elements of m close to base are taken, distant ones stay
    near base."""
    d = torch.sub(m, base)
    w = d.abs().reciprocal_().mul_(t)
    w.nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0).clamp_(0.0, 1.0)
    return d.mul_(w).add_(base)


def grid_pieces(at: int, n: int, width: int) -> list[tuple[int, int, int, int, int, int]]:
    """Flat elements [at, at+n) of a row-major grid `width` wide, as at most three
    rectangular pieces (a partial row, whole rows, a partial row): each
    (lo, hi, row, col, rows, cols) with lo/hi relative to `at`."""
    out = []
    pos = 0
    while pos < n:
        r, c = divmod(at + pos, width)
        if c == 0 and n - pos >= width:
            k = (n - pos) // width
            out.append((pos, pos + k * width, r, 0, k, width))
            pos += k * width
        else:
            w = min(width - c, n - pos)
            out.append((pos, pos + w, r, c, 1, w))
            pos += w
    return out


@primitive("row_scale", arity=1, positional=True)
def row_scale(x: torch.Tensor, mode: str, width: int, coefs, e0: int = 0) -> torch.Tensor:
    """x times a coefficient per vector of its tensor, the tensor seen as a row-major grid
    `width` wide: mode "row" gives every row (vector along the last dimension) its own
    coefficient coefs[row], mode "col" every column coefs[col]."""
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    # only the coefficients this chunk touches travel to the device
    first = e0 // width if mode == "row" else 0
    last = (e0 + n - 1) // width + 1 if mode == "row" else width
    c = torch.as_tensor(np.asarray(coefs)[first:last], dtype=x.dtype, device=x.device)
    for lo, hi, r, col, k, w in grid_pieces(e0, n, width):
        cv = c[r - first:r - first + k].view(k, 1) if mode == "row" else c[col:col + w].view(1, w)
        torch.mul(x[lo:hi].view(k, w), cv, out=out[lo:hi].view(k, w))
    return out
