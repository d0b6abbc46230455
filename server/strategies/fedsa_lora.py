"""FedSA-LoRA: A shared and averaged, B kept by each client (personalised).

Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", arXiv:2410.01463. The paper finds that the A matrices learn what is general across
clients and the B matrices what is client-specific; so only A is shared and averaged
(weighted by examples), and every client keeps training its own B.

What the server holds: the averaged A and the *initial, shared* B, which the server never
changes (B deltas, if a client sends them, are ignored). A client's own model is
``scale * B_k @ A``; the server's adapter is not any client's model, and with PEFT's default
B = 0 it is a zero update: evaluate FedSA-LoRA on the clients. What is exact: A is exactly the
example-weighted mean of the clients' A. No claim is made that ``B_k @ mean(A)`` equals any
client's ``B_k @ A_k``; the paper does not aim for that. Runs under secure aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from fedlora.server.strategies.base import (
    Arrays,
    ClientUpdate,
    LayerPair,
    LoraAggregator,
    zeros_like,
)


class FedSALoRA(LoraAggregator):
    """Average A deltas; leave the global B as it was (clients keep theirs locally)."""

    name: ClassVar[str] = "fedsa-lora"
    needs_individual_updates: ClassVar[bool] = False
    sends_a: ClassVar[bool] = True
    sends_b: ClassVar[bool] = False

    def combine(
        self,
        global_adapter: Mapping[str, np.ndarray],
        pairs: Mapping[str, LayerPair],
        updates: Sequence[ClientUpdate],
        scale: float,
    ) -> tuple[Arrays, Arrays]:
        delta = zeros_like(global_adapter, [b for _, b in pairs.values()])
        delta.update(self.reducer(updates, [a for a, _ in pairs.values()]))
        return delta, {}
