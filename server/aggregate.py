"""Aggregation maths as pure functions over ``dict[str, ndarray]``.

FedAvg (McMahan et al., 2017, arXiv:1602.05629) applied to LoRA deltas, each of A and B averaged
separately (FedIT; Zhang et al., 2024, arXiv:2305.05644). Accumulates in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def weighted_mean(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """The weight-normalised mean of ``updates``, tensor by tensor, in each tensor's dtype."""
    if not updates or len(updates) != len(weights):
        raise ValueError(
            f"{len(updates)} updates and {len(weights)} weights: need >= 1 of each, equally many"
        )
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    names = set(updates[0])
    if any(set(u) != names for u in updates):
        raise ValueError("updates do not all hold the same tensor names")
    out = {}
    for name in sorted(names):
        acc = np.zeros(updates[0][name].shape, dtype=np.float64)
        for update, weight in zip(updates, weights, strict=True):
            acc += (weight / total) * update[name].astype(np.float64)
        out[name] = acc.astype(updates[0][name].dtype)
    return out


def apply_delta(
    base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``base + delta`` tensor by tensor (same names), in base's dtype."""
    if set(base) != set(delta):
        raise ValueError("base and delta hold different tensor names")
    return {k: (base[k].astype(np.float64) + delta[k]).astype(base[k].dtype) for k in base}
