"""Secure aggregation (SecAgg+) on Flower's Message API: the server's entry point.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS
2020) on the double-masking protocol of Bonawitz et al. ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017), built on ``flwr.common.secure_aggregation``
and ``cryptography``. One call runs one round over a ``Grid``; every stage is a
``train.secagg`` message (the ClientApp registers ``@app.train("secagg")``):

1. ``setup``: the plain round's train content (global adapter + round config) and the SecAgg
   settings out; nodes train, clip, quantize, and reply two public keys.
2. ``share-keys``: each node gets its neighbours' keys (a random ``num_shares``-regular graph)
   and returns Shamir shares of its self-mask seed and mask key, encrypted per neighbour.
3. ``collect-masked-vectors``: the server forwards the encrypted shares; nodes reply
   ``[w, s, w·q(x)] + self mask ± pair masks (mod 2**modulus_bits)`` as uint64, or on a
   narrow wire ``[w, s, q(w·x / max_weight)] + masks`` as uint16 / uint32 (``s``: the node's
   training scalars in limbs). The server keeps the sum only.
4. ``unmask``: survivors send shares of the self-mask seeds of contributors and of the mask keys
   of nodes that dropped before masking; the server removes all masks and decodes.

The server sees the sum of weighted updates, the total weight and the sums of the training
scalars (examples, loss, tokens, seconds, how many clipped), plus each node's wire version and
site index; never one node's update, loss or update norm. It composes with strategies that
need only the weighted mean (:func:`check_composable`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid
from numpy.typing import DTypeLike

from fedlora.choices import Combination, compatibility_problem
from fedlora.protocol.secagg import (
    CLIPPED,
    SecAggSettings,
    Spec,
    Stage,
    decode_scalars,
    decode_sum,
    scalar_slots,
    vector_length,
)
from fedlora.protocol.secagg_encoding import limb_bits
from fedlora.protocol.secagg_graph import majority
from fedlora.server.secagg_stages import (
    SecAggError,
    Session,
    collect,
    consistency_check,
    setup,
    share_keys,
    signed_round,
    unmask,
)
from fedlora.server.strategies.base import ClientUpdate, LoraAggregator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggResult:
    """One successful secure aggregation: sums, never individual updates."""

    weighted_sum: dict[str, np.ndarray]  # Σ w_i · clip(x_i) by tensor name, float64
    total_weight: int  # Σ w_i (examples, each capped at max_weight)
    contributors: tuple[int, ...]  # nodes whose masked vectors are in the sum (U3)
    dropped: tuple[int, ...]  # asked at setup but not in the sum
    metrics: dict[int, dict[str, Any]]  # per contributor: the clear ones (wire version, site)
    seconds: dict[str, float]  # per stage (send + wait + server work), "reconstruct", "total"
    bytes_sent: dict[str, int] = field(default_factory=dict)  # payload bytes per stage
    bytes_received: dict[str, int] = field(default_factory=dict)
    tolerance: float = 0.0  # per-coordinate bound on |mean - plain mean of clipped updates|
    # (settings.tolerance_for(len(contributors), total_weight))
    rejected: dict[int, str] = field(default_factory=dict)  # node -> why its reply was invalid
    # Sums over contributors of the scalars that travel inside the masked vectors
    # (SUMMED_SCALARS: examples, Σ examples·loss, tokens, seconds, clipped / capped counts).
    scalars: dict[str, float] = field(default_factory=dict)

    def mean(self, dtype: DTypeLike = np.float64) -> dict[str, np.ndarray]:
        """The example-weighted mean update, Σ w_i x_i / Σ w_i."""
        return {k: (v / self.total_weight).astype(dtype) for k, v in self.weighted_sum.items()}

    @property
    def num_clipped(self) -> int:
        return int(self.scalars.get(CLIPPED, 0))

    @property
    def train_loss(self) -> float:
        """The example-weighted mean train loss of the contributors (NaN without examples)."""
        examples = self.scalars.get("num-examples", 0.0)
        return self.scalars.get("train-loss", 0.0) / examples if examples else float("nan")


def secure_weighted_sum(
    grid: Grid,
    node_ids: Iterable[int],
    train_content: RecordDict | Mapping[int, RecordDict],
    settings: SecAggSettings,
    spec: Spec,
    timeout: float | None = None,
    *,
    stage_timeout: float | None = None,
    group_id: str = "",
) -> SecAggResult:
    """Run one SecAgg+ round on ``node_ids``; return the weighted sum or raise SecAggError.

    ``train_content`` is what a plain round sends in its train message (one for all nodes, or
    one per node id: each node's downlink differs); nodes train on it in the setup stage,
    which waits up to ``timeout`` seconds. The other stages wait up to ``stage_timeout``
    (default: ``timeout``). ``spec`` maps tensor names to shapes (the sent
    factors). Contributors that vanish after sending their masked vectors are recovered while
    at least ``reconstruction_threshold`` share holders answer the unmask stage; with fewer,
    SecAggError is raised and nothing is returned. ConfigError if the modulus could overflow.
    In a signed round the survivors' consistency signatures must come from more than
    ``(|U1| + settings.corrupt_nodes) / 2`` participants (each node checks the same, with the
    larger of that bound and its own).
    """
    nodes = sorted(set(node_ids))
    settings.check_overflow(len(nodes))
    t = settings.reconstruction_threshold
    if len(nodes) < t:
        raise SecAggError(
            f"{len(nodes)} nodes sampled, fewer than the reconstruction "
            f"threshold {t}: sample more nodes or lower the threshold"
        )
    stage_timeout = timeout if stage_timeout is None else stage_timeout
    start = time.perf_counter()
    s = Session(
        settings=settings,
        spec={k: tuple(v) for k, v in spec.items()},
        group_id=group_id,
    )
    try:
        u3 = _run_stages(grid, s, nodes, train_content, timeout, stage_timeout)
        u4 = None
        if signed_round(s, sorted(s.keys)):
            u4 = consistency_check(grid, s, u3, stage_timeout)
            _enough(u4, majority(len(s.keys), settings.corrupt_nodes), Stage.CONSISTENCY, "signers")
        total = unmask(grid, s, s.u2, u3, stage_timeout, u4)
        weighted_sum, weight, scalars = checked_decode(total, settings, s.spec, len(u3))
    except SecAggError as exc:
        exc.rejected = dict(s.rejected)
        raise
    s.seconds["total"] = time.perf_counter() - start
    result = SecAggResult(
        weighted_sum=weighted_sum,
        total_weight=weight,
        contributors=tuple(u3),
        dropped=tuple(sorted(set(nodes) - set(u3))),
        metrics=s.metrics,
        seconds=dict(s.seconds),
        bytes_sent=dict(s.bytes_sent),
        bytes_received=dict(s.bytes_received),
        tolerance=settings.tolerance_for(len(u3), weight),
        rejected=dict(s.rejected),
        scalars=scalars,
    )
    log.info(
        "secagg: %d of %d nodes in the sum (weight %d, %d clipped to %g), %d dropped "
        "(%d rejected); %.2f s, %.1f MiB up",
        len(u3),
        len(nodes),
        weight,
        result.num_clipped,
        settings.clip_norm,
        len(result.dropped),
        len(result.rejected),
        s.seconds["total"],
        sum(s.bytes_received.values()) / 2**20,
    )
    return result


def _run_stages(
    grid: Grid,
    s: Session,
    nodes: list[int],
    train_content: RecordDict | Mapping[int, RecordDict],
    timeout: float | None,
    stage_timeout: float | None,
) -> list[int]:
    """Stages setup, share-keys and collect: the contributors (U3); U2 is kept in ``s.u2``."""
    t = s.settings.reconstruction_threshold
    u1 = setup(grid, s, nodes, train_content, timeout)
    _enough(u1, t, Stage.SETUP)
    s.u2 = share_keys(grid, s, u1, stage_timeout)
    _enough(s.u2, t, Stage.SHARE_KEYS)
    u3 = collect(grid, s, s.u2, stage_timeout)
    _enough(u3, t, Stage.COLLECT)
    return u3


def checked_decode(
    total: np.ndarray, settings: SecAggSettings, spec: Spec, survivors: int
) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
    """Decode the unmasked sum after checking it is one that honest contributors can produce:
    ``(Σ w_i x_i by tensor name, Σ w_i, the summed scalars)``.

    The total weight lies in ``[1, survivors * max_weight]``, every scalar limb sum in
    ``[0, survivors * (2**limb_bits - 1)]`` and every weighted coordinate ``Σ w_i q_i`` in
    ``[0, W * L]`` (narrow: ``Σ q_i`` in ``[0, survivors * L]``), so each decoded value in
    ``[-C W, C W]``; anything else means a wrong share or mask slipped through, and the round
    fails (SecAggError).
    """
    length = vector_length(spec, settings)
    if total.shape != (length,):
        raise SecAggError(f"the sum has shape {total.shape}, expected ({length},)")
    weight = int(total[0])
    if not 1 <= weight <= survivors * settings.max_weight:
        raise SecAggError(
            f"the decoded total weight {weight} lies outside [1, {survivors} x "
            f"{settings.max_weight}]: the unmasking went wrong, nothing is aggregated"
        )
    head = 1 + scalar_slots(settings)
    limbs = total[1:head]
    if limbs.size and int(limbs.max()) > survivors * (2 ** limb_bits(settings) - 1):
        raise SecAggError(
            "a decoded scalar limb exceeds what the contributors can send: the unmasking went "
            "wrong, nothing is aggregated"
        )
    per_level, name = (survivors, "contributors") if settings.narrow else (weight, "weight")
    if total.size > head and int(total[head:].max()) > per_level * settings.levels:
        raise SecAggError(
            f"a decoded coordinate exceeds {name} {per_level} x {settings.levels} levels (beyond "
            f"the clip range {settings.clip_norm:g}): the unmasking went wrong, nothing is "
            f"aggregated"
        )
    weighted_sum, weight = decode_sum(total, settings, spec, survivors)
    return weighted_sum, weight, decode_scalars(limbs, settings)


def _enough(survivors: list[int], threshold: int, stage: str, what: str = "") -> None:
    if len(survivors) < threshold:
        need = (
            f"the {threshold} signers the nodes need (a majority beyond the corrupt bound)"
            if what
            else f"the reconstruction threshold {threshold}"
        )
        raise SecAggError(
            f"after stage {stage!r} {len(survivors)} nodes remain, fewer than {need}: the round "
            f"fails, nothing is aggregated"
        )


def check_composable(aggregator: LoraAggregator) -> None:
    """Raise SecAggError for a strategy that needs individual updates (secure sums hide them),
    after the one compatibility table (fedlora.choices.RULES)."""
    combination = Combination(aggregator.name, aggregator.reducer.kind, secure=True)
    problem = compatibility_problem(combination, "secure-aggregation")
    if problem:
        raise SecAggError(problem)


def as_client_update(result: SecAggResult, like: Mapping[str, np.ndarray]) -> ClientUpdate:
    """The secure mean as one ClientUpdate (dtype of ``like``) weighted by the total weight.

    A strategy whose aggregation is the example-weighted mean gives the same result on this
    single update as on the individual ones it replaces.
    """
    mean = result.mean()
    return ClientUpdate({k: v.astype(like[k].dtype) for k, v in mean.items()}, result.total_weight)


__all__ = [
    "SecAggError",
    "SecAggResult",
    "as_client_update",
    "check_composable",
    "secure_weighted_sum",
]
