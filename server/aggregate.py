"""Aggregation maths as pure functions over ``dict[str, ndarray]``.

FedAvg (McMahan et al., 2017, arXiv:1602.05629) applied to LoRA deltas, each of A and B averaged
separately (FedIT; Zhang et al., 2024, arXiv:2305.05644). Accumulates in float64. Also the bounds
one reply is held to (server/bounds.py): the lower median, weight caps, the norm bound, and the
check that a new global adapter is finite and bounded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.errors import FedloraError


class AggregationError(FedloraError, ValueError):
    """A round's aggregate cannot be used: it would make the global adapter (or a residual)
    non-finite or carry it beyond its bound. The round fails; the previous adapter is kept."""


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


def median_low(values: Sequence[float]) -> float:
    """The lower median: the middle value, or the smaller of the two middle ones.

    Half of the values lie at or above it, so it is one of the honest values whenever fewer than
    half are hostile (of two values, the smaller: one hostile node cannot raise it).
    """
    if not values:
        raise ValueError("the median of no values")
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


def cap_weights(
    claims: Sequence[int], max_examples: int = 0, factor: float = 4.0
) -> tuple[list[int], int]:
    """``(weights, cap)``: each claimed example count clipped to ``cap``.

    ``cap`` is ``max_examples`` when > 0, else ``factor`` times the lower median of the claims
    (at least 1): a node may weigh at most ``factor`` times the typical node, whatever it claims.
    """
    if not claims:
        return [], max_examples
    cap = max_examples if max_examples > 0 else max(1, int(factor * median_low(claims)))
    return [min(int(c), cap) for c in claims], cap


def norm_bound(norms: Sequence[float], factor: float) -> float:
    """The round's L2 bound on a reply: ``factor`` times the lower median of the replies' norms
    (after Sun et al., 2019, "Can You Really Backdoor Federated Learning?", arXiv:1911.07963,
    with the bound set from the round instead of tuned). ``inf`` when off (``factor`` <= 0) or
    when the median norm is 0."""
    if factor <= 0 or not norms:
        return float("inf")
    bound = factor * median_low(norms)
    return bound if bound > 0 else float("inf")


def check_bounded(
    arrays: Mapping[str, np.ndarray], bound: float, what: str = "the global adapter"
) -> None:
    """AggregationError naming the first tensor holding NaN/Inf or a value beyond ``+-bound``."""
    for name in sorted(arrays):
        a = arrays[name]
        if not np.isfinite(a).all():
            raise AggregationError(f"{what} would hold NaN or Inf in {name}")
        peak = float(np.max(np.abs(a))) if a.size else 0.0
        if peak > bound:
            raise AggregationError(
                f"{what} would hold |value| {peak:.3g} in {name}, beyond the bound {bound:g}"
            )
