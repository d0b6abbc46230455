"""FFA-LoRA: A frozen at its (shared) random initialisation, only B trained and averaged.

Sun et al., ICLR 2024, "Improving LoRA in Privacy-preserving Federated Learning",
arXiv:2403.12313. Every client starts from the same random A (same seed) and never changes it;
only B is trained, sent and averaged (FedAvg weighted by examples).

What is exact: with A shared, the weight update is linear in B, so
``scale * mean(B_k) @ A == mean(scale * B_k @ A)``: the aggregated adapter expresses exactly the
example-weighted mean of the clients' weight updates (up to float32 rounding of B), with no
residual. The same linearity makes any server optimizer acting on B act on the weight update.
What is checked: a client whose A delta is not exactly zero has not frozen A, and the
aggregation would no longer be exact, so it is refused with a ValueError naming the tensor.
Clients may leave A out of their update altogether. Runs under secure aggregation.
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
    refuse_moved,
    zeros_like,
)


class FFALoRA(LoraAggregator):
    """Average B deltas; refuse any non-zero A delta (A stays frozen and shared)."""

    name: ClassVar[str] = "ffa-lora"
    needs_individual_updates: ClassVar[bool] = False
    sends_a: ClassVar[bool] = False
    sends_b: ClassVar[bool] = True
    trains_a: ClassVar[bool] = False

    def combine(
        self,
        global_adapter: Mapping[str, np.ndarray],
        pairs: Mapping[str, LayerPair],
        updates: Sequence[ClientUpdate],
        scale: float,
    ) -> tuple[Arrays, Arrays]:
        a_names = [a for a, _ in pairs.values()]
        b_names = [b for _, b in pairs.values()]
        refuse_moved(
            updates,
            a_names,
            "FFA-LoRA keeps A frozen",
            "freeze lora_A on the clients or choose another strategy",
        )
        delta = zeros_like(global_adapter, a_names)
        delta.update(self.reducer(updates, b_names))
        return delta, {}
