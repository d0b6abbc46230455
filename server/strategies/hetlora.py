"""HetLoRA: zero-padded factors averaged with sparsity weights (each client's update norm).

Cho, Liu, Xu, Rakhlin et al., EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", arXiv:2401.06432. Clients of rank ``r_k <= r_max`` train the first
``r_k`` components of the global adapter and send them zero-padded to ``r_max``
(fedlora.client.ranks). The server weighs each client by the Frobenius norm of its LoRA update,
over all layers together (sparsity-weighted aggregation),

    s_k = sqrt(sum_layers ||B_k A_k||_F^2),   p_k = s_k / sum_j s_j,
    A = sum_k p_k pad(A_k),   B = sum_k p_k pad(B_k),

with ``A_k = A + delta A_k`` and ``B_k = B + delta B_k`` the client's local (padded) factors:
a client whose update carries little (a sparse, low-rank or barely trained one) weighs little.
The LoRA scale is the same for every client (alpha / r_max, see docs/simulate.md) and cancels
in ``p_k``. Example counts do not enter (the paper's weights are the norms alone); if every
norm is zero, the example weights are used instead.

What is implemented: the sparsity-weighted aggregation. Not implemented: the paper's rank
self-pruning (a client lowering its own rank when its trailing components carry little); a
node's rank is the node setting ``lora-r``. The weights need each client's factors, so it cannot
run on a secure-aggregated sum (fedlora.choices.RULES refuses that at start-up).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from fedlora.server.aggregate import weighted_mean
from fedlora.server.strategies.base import Arrays, ClientUpdate, LayerPair, LoraAggregator
from fedlora.server.strategies.robust import Reducer


def product_norm(b: np.ndarray, a: np.ndarray) -> float:
    """``||B @ A||_F`` without the (out, in) product: sqrt(sum(A * (B^T B A))), float64."""
    b64, a64 = b.astype(np.float64), a.astype(np.float64)
    return float(np.sqrt(max(float(np.sum(a64 * ((b64.T @ b64) @ a64))), 0.0)))


def sparsity_weights(
    global_adapter: Mapping[str, np.ndarray],
    pairs: Mapping[str, LayerPair],
    updates: Sequence[ClientUpdate],
) -> list[float]:
    """HetLoRA's ``p_k``: each client's ``||B_k A_k||_F`` over all layers, normalised to sum 1
    (the example shares when every norm is 0)."""
    scores = []
    for u in updates:
        total = 0.0
        for a_name, b_name in pairs.values():
            a = global_adapter[a_name] + u.delta[a_name]
            b = global_adapter[b_name] + u.delta[b_name]
            total += product_norm(b, a) ** 2
        scores.append(total**0.5)
    if sum(scores) <= 0:
        scores = [float(u.num_examples) for u in updates]
    whole = sum(scores)
    return [s / whole for s in scores]


class HetLoRA(LoraAggregator):
    """Zero-padded factors, each client weighted by the norm of its LoRA update."""

    name: ClassVar[str] = "hetlora"
    needs_individual_updates: ClassVar[bool] = True
    sends_a: ClassVar[bool] = True
    sends_b: ClassVar[bool] = True

    def __init__(self, reducer: Reducer | None = None) -> None:
        super().__init__(reducer)
        if self.reducer.kind != "mean":
            raise ValueError(
                f"hetlora weighs clients by their update norms (aggregation "
                f"{self.reducer.kind!r} would drop those weights): use aggregation='mean'"
            )

    def combine(
        self,
        global_adapter: Mapping[str, np.ndarray],
        pairs: Mapping[str, LayerPair],
        updates: Sequence[ClientUpdate],
        scale: float,
    ) -> tuple[Arrays, Arrays]:
        weights = sparsity_weights(global_adapter, pairs, updates)
        names = sorted(global_adapter)
        delta = weighted_mean([{n: u.delta[n] for n in names} for u in updates], weights)
        return delta, {}
