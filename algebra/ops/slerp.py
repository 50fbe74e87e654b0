"""SLERP's scalar rule, shared by per-tensor, per-layer and per-model SLERP.

slerp(x, y, t) = sin((1-t)W)/sin(W) * x + sin(tW)/sin(W) * y, where cos(W) is the cosine
of x and y as flattened vectors. The tensors enter only through three sums (x.y, x.x,
y.y), which a streamed reduction accumulates over whatever group shares one angle.
"""

from __future__ import annotations

import math

# Fall back to linear interpolation when the directions are this close to (anti)parallel,
# where sin(W) is too small to divide by; a zero vector has no direction and falls back too.
DOT_THRESHOLD = 0.9995


def slerp_coefficients(xy: float, xx: float, yy: float, t: float) -> tuple[float, float]:
    """(cx, cy) with slerp(x, y, t) = cx*x + cy*y, from x.y, x.x and y.y."""
    if xx <= 0.0 or yy <= 0.0:
        return 1.0 - t, t
    cos = xy / math.sqrt(xx * yy)
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s
