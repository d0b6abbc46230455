"""Robust aggregation: coordinate-wise median and trimmed mean (and norm clipping, elsewhere).

For untrusted settings, where some clients may send corrupted or malicious deltas:

- ``clip-norm``: the server scales each client's whole delta down to a maximum L2 norm with
  :func:`fedlora.clipping.clip_l2` (the one clipper, shared with DP and SecAgg+), bounding
  how far any one client can move the global adapter (norm clipping as a defence against
  model replacement and backdoors: Sun, Kairouz, Suresh & McMahan, 2019, "Can You Really
  Backdoor Federated Learning?", arXiv:1911.07963).
- :func:`coordinate_median` and :func:`trimmed_mean` replace the mean, coordinate by
  coordinate (Yin, Chen, Ramchandran & Bartlett, ICML 2018, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", arXiv:1803.01498). Both are *unweighted*, as in
  the paper: a client's claimed number of examples would otherwise let it outvote the others.

A :class:`Reducer` (built by :func:`make_reducer`) turns client updates into one delta with
the signature of :func:`fedlora.server.strategies.base.mean_delta`, so a strategy can swap its
mean for a robust statistic. ``mean`` is the example-weighted mean (FedAvg), the default;
``median`` and ``trimmed-mean`` need each client's update on its own, so secure aggregation,
which only reveals the weighted sum, must refuse them (:attr:`Reducer.needs_individual_updates`).
Under secure aggregation, clipping must happen on the clients.

Order statistics are selected in the inputs' own precision (selection does not round); sums
and averages are accumulated in float64; robust results are float32. Numpy only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedlora.server.aggregate import weighted_mean

if TYPE_CHECKING:  # base.py may import this module: no import of base at run time
    from fedlora.server.strategies.base import ClientUpdate

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
REDUCERS = ("mean", "median", "trimmed-mean")


def _check_same_tensors(deltas: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    if not deltas:
        raise ValueError("no updates to aggregate: need at least one")
    names = sorted(deltas[0])
    for k, d in enumerate(deltas[1:], start=1):
        if sorted(d) != names:
            raise ValueError(f"update {k} holds other tensor names than update 0")
        for name in names:
            if d[name].shape != deltas[0][name].shape:
                raise ValueError(
                    f"update {k}: {name} has shape {d[name].shape}, update 0 "
                    f"{deltas[0][name].shape}"
                )
    return names


def _columns(deltas: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    """The clients' values of tensor ``name`` as a (coordinates, clients) array."""
    first = deltas[0][name]
    dtype = np.result_type(*(d[name].dtype for d in deltas))
    out = np.empty((first.size, len(deltas)), dtype=dtype)
    for j, d in enumerate(deltas):  # each coordinate's values contiguous: fast partition
        out[:, j] = d[name].ravel()
    return out


def coordinate_median(deltas: Sequence[Mapping[str, np.ndarray]]) -> Arrays:
    """The coordinate-wise median of ``deltas`` (Yin et al., 2018, arXiv:1803.01498).

    Unweighted, as in the paper. With an even number of updates, the mean of the two middle
    values. Robust to fewer than half of the updates being arbitrary. Every update must hold the
    same names and shapes; float32 out.
    """
    names = _check_same_tensors(deltas)
    n = len(deltas)
    lo, hi = (n - 1) // 2, n // 2
    out: Arrays = {}
    for name in names:
        values = _columns(deltas, name)
        values.partition(sorted({lo, hi}), axis=-1)
        middle = (values[:, lo].astype(np.float64) + values[:, hi]) / 2
        out[name] = middle.reshape(deltas[0][name].shape).astype(np.float32)
    return out


def check_trim_fraction(trim_fraction: float) -> None:
    """Refuse a trim fraction outside [0, 0.5), saying what to set."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(
            f"trim_fraction is {trim_fraction}: set it in [0, 0.5), the share of "
            f"updates cut at each end (e.g. 0.1; at least the expected share of "
            f"bad clients)"
        )


def trim_count(n: int, trim_fraction: float) -> int:
    """``k = floor(trim_fraction * n)``: the values cut at each end of every coordinate."""
    check_trim_fraction(trim_fraction)
    k = math.floor(trim_fraction * n)
    if 2 * k >= n:
        raise ValueError(
            f"trimming {k} values at each end of {n} updates (trim_fraction "
            f"{trim_fraction}) leaves none: lower trim_fraction"
        )
    return k


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> Arrays:
    """The coordinate-wise trimmed mean of ``deltas`` (Yin et al., 2018, arXiv:1803.01498).

    For each coordinate, the ``k = floor(trim_fraction * n)`` largest and ``k`` smallest of the
    ``n`` values are dropped and the rest averaged (unweighted, as in the paper; float64).
    Robust to up to ``k`` arbitrary updates; with ``k = 0`` (fewer than ``1 / trim_fraction``
    updates) nothing is cut and this is the plain mean. float32 out.
    """
    names = _check_same_tensors(deltas)
    n = len(deltas)
    k = trim_count(n, trim_fraction)
    out: Arrays = {}
    for name in names:
        values = _columns(deltas, name)
        if k:
            values.partition([k, n - k - 1], axis=-1)  # cut values now lie outside [k, n - k)
        kept = values[:, k : n - k].mean(axis=-1, dtype=np.float64)
        out[name] = kept.reshape(deltas[0][name].shape).astype(np.float32)
    return out


@dataclass(frozen=True)
class Reducer:
    """How a strategy combines the clients' deltas of the tensors it averages."""

    kind: str = "mean"  # mean (example-weighted, FedAvg) | median | trimmed-mean (unweighted)
    trim_fraction: float = 0.1  # trimmed-mean: share of updates cut at each end, in [0, 0.5)

    def __post_init__(self) -> None:
        if self.kind not in REDUCERS:
            raise ValueError(f"unknown reducer {self.kind!r}: choose one of {', '.join(REDUCERS)}")
        if self.kind == "trimmed-mean":
            check_trim_fraction(self.trim_fraction)

    @property
    def needs_individual_updates(self) -> bool:
        """True for median and trimmed mean: secure aggregation must refuse them."""
        return self.kind != "mean"

    def __call__(self, updates: Sequence[ClientUpdate], names: Iterable[str]) -> Arrays:
        """The combined delta of the updates' ``names`` (as ``base.mean_delta``)."""
        keep = sorted(names)
        deltas = [{n: u.delta[n] for n in keep} for u in updates]
        if self.kind == "mean":
            return weighted_mean(deltas, [u.num_examples for u in updates])
        if self.kind == "median":
            return coordinate_median(deltas)
        if self.trim_fraction > 0 and trim_count(len(deltas), self.trim_fraction) == 0:
            log.warning(
                "trimmed mean of %d updates with trim_fraction %g cuts nothing: it is "
                "the plain unweighted mean (cutting one per end needs >= %d updates)",
                len(deltas),
                self.trim_fraction,
                math.ceil(1 / self.trim_fraction),
            )
        return trimmed_mean(deltas, self.trim_fraction)


def make_reducer(kind: str, trim_fraction: float = 0.1) -> Reducer:
    """The reducer named ``kind`` (one of :data:`REDUCERS`); ``trim_fraction`` for trimmed-mean."""
    return Reducer(kind, trim_fraction)
