"""Client side of client-level DP: add (a share of) Gaussian noise to the clipped delta.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang, ICLR 2018, arXiv:1710.06963): a client's update
is clipped to global L2 norm ``C`` over all the tensors it sends (for FFA-LoRA, the B factors
only), so adding or removing one client moves the sum of updates by at most ``C``; Gaussian
noise of std ``z * C`` on that sum then makes the released aggregates (epsilon, delta)-DP per
client (accounting and its assumptions: :mod:`fedlora.server.privacy`).

Without secure aggregation the server adds that noise to the sum. With secure aggregation it
only ever sees the sum, so the clients add it, each a share of std ``z * C / sqrt(n)``
(:func:`noise_share_std`): independent Gaussian shares of ``n`` clients sum to std ``z * C``.
This assumes ``n``, the number of honest clients whose shares reach the sum, is known in
advance (e.g. the number sampled, or min-nodes to be safe). If fewer answer, or some are
dishonest and skip their share, the sum carries less noise than promised: the server must
account for the achieved multiplier, ``z * sqrt(actual / expected)``
(``fedlora.server.privacy.effective_noise_multiplier``). Strictly, under add/remove-one-client
the client being protected may be the one missing, so only the *others'* shares protect it: a
conservative ledger passes ``actual - 1`` (with 10 contributors, 5% less z).

Order on a node: clip, then add noise, then encode (:mod:`fedlora.protocol.compression`).
Quantizing a noised share is post-processing of that share, but with secure aggregation the sum
of quantized shares is not exactly Gaussian; the rounding error (at most half a step a value) is
not accounted for. Numpy only.
"""

from __future__ import annotations

import math

import numpy as np

Arrays = dict[str, np.ndarray]


def noise_share_std(noise_multiplier: float, clip_norm: float, expected_clients: int) -> float:
    """Each client's noise std so that the sum over ``expected_clients`` has std z * C."""
    if expected_clients < 1:
        raise ValueError(f"expected_clients={expected_clients}: must be >= 1")
    if noise_multiplier < 0 or clip_norm <= 0:
        raise ValueError(
            f"noise_multiplier={noise_multiplier}, clip_norm={clip_norm}: need z >= 0 and C > 0"
        )
    return noise_multiplier * clip_norm / math.sqrt(expected_clients)


def noise_shares(announced: int, node_bound: int) -> int:
    """How many nodes this node sizes its noise share for: the server's announcement, never
    more than the node's own bound (``dp-max-contributors``; 0: none). A server announcing 10**6
    nodes would otherwise have each add a thousandth of the noise it needs; the node then also
    refuses a secure round in which fewer nodes take part or confirm the sum
    (:mod:`fedlora.client.secagg`)."""
    shares = max(int(announced), 1)
    return min(shares, node_bound) if node_bound > 0 else shares


__all__ = ["noise_share_std", "noise_shares"]
