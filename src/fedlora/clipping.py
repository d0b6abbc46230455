"""L2 norm clipping and Gaussian noise of a whole update: the one implementation of each.

A node clips its delta before DP noise and before SecAgg+ quantization (client/app.py,
client/secagg.py); the server clips plain replies for central DP and norm-bounded robust
aggregation (server/strategy.py). All of them call :func:`clip_l2`: the norm is global, over
every tensor together, accumulated in float64, so an update's direction is kept. DP noise, a
node's share under secure aggregation or the server's on a plain mean, is added by
:func:`add_noise` on both sides (the standard deviations: client/privacy.py, server/privacy.py).
Numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Arrays = dict[str, np.ndarray]

# Scale a hair below the bound so that rounding the float64 products back to float32 (relative
# error <= 2^-24 a value) cannot push the norm, or any coordinate, over the bound.
CLIP_MARGIN = 1.0 - 2.0**-22


def global_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm over every tensor of ``arrays`` together, accumulated in float64."""
    squares = 0.0
    for a in arrays.values():
        flat = np.asarray(a, dtype=np.float64).reshape(-1)
        squares += float(flat @ flat)
    return math.sqrt(squares)


def clip_l2(
    arrays: Mapping[str, np.ndarray], bound: float, setting: str = "clip-norm"
) -> tuple[Arrays, float, float]:
    """``(clipped, norm_before, scale)``: ``arrays`` scaled to global L2 norm at most ``bound``.

    Within the bound the same arrays come back (no copies) and ``scale`` is 1; above it, each
    tensor is multiplied by ``scale = bound / norm * CLIP_MARGIN`` in float64 and keeps its
    dtype. ``setting`` names the bound in errors (the run-config key it comes from).
    Raises ValueError for a bound that is not positive and finite, or NaN/Inf in ``arrays``.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(
            f"{setting}={bound}: set a positive, finite L2 bound on a client's whole delta "
            f"(e.g. about the median norm of honest updates)"
        )
    norm = global_norm(arrays)
    if not math.isfinite(norm):
        raise ValueError("the update holds NaN or Inf: it cannot be clipped; drop this update")
    if norm <= bound:
        return dict(arrays), norm, 1.0
    scale = bound / norm * CLIP_MARGIN
    clipped = {
        k: (np.asarray(a, dtype=np.float64) * scale).astype(a.dtype) for k, a in arrays.items()
    }
    return clipped, norm, scale


def add_noise(delta: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Arrays:
    """``delta`` plus independent N(0, std^2) noise on every value (tensors in sorted order)."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std={std}: noise standard deviation must be finite and >= 0")
    out: Arrays = {}
    for name in sorted(delta):
        a = delta[name]
        noise = rng.standard_normal(a.shape) * std
        out[name] = (a.astype(np.float64) + noise).astype(a.dtype)
    return out
