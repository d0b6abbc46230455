"""Means with confidence intervals over seeds: pure functions for ``fedlora compare --seeds``.

With ``n`` seeds, a method's mean accuracy has the Student-t interval
``mean +- t(1 - (1 - level) / 2, n - 1) * s / sqrt(n)`` (``s`` the sample standard deviation,
ddof 1). Two methods run on the same seeds (the same split, initialisation and sampling per
seed) are compared by the paired differences, whose interval is narrower than either method's
when the seeds move both the same way. scipy (already a dependency of dp-accounting) gives the
t quantile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds, its sample standard deviation and confidence interval."""

    mean: float
    std: float  # ddof 1; NaN with one seed
    low: float  # NaN with one seed: one run says nothing about the spread
    high: float
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_json(self) -> dict[str, float | int | None]:
        def clean(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "mean": self.mean,
            "std": clean(self.std),
            "ci-low": clean(self.low),
            "ci-high": clean(self.high),
            "n": self.n,
            "level": self.level,
        }

    def text(self, scale: float = 100.0, unit: str = "") -> str:
        """``71.9 +- 0.8`` (``scale`` 100: percentage points); just the mean with one seed."""
        if self.n < 2:
            return f"{self.mean * scale:.1f}{unit}"
        return f"{self.mean * scale:.1f} +- {self.half_width * scale:.1f}{unit}"


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` with its Student-t confidence interval at ``level``."""
    if not values:
        raise ValueError("no values to summarise")
    if not 0 < level < 1:
        raise ValueError(f"level={level}: use a value in (0, 1)")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, n, level)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    from scipy.stats import t

    half = float(t.ppf(1 - (1 - level) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n, level)


def paired_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """``a - b`` seed by seed, summarised: the paired comparison of two methods."""
    if len(a) != len(b):
        raise ValueError(f"paired values of different lengths: {len(a)} and {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b, strict=True)], level)


__all__ = ["Interval", "mean_ci", "paired_diff"]
