"""Fed-SB: A and B frozen at a shared initialization, only the r x r matrix R trained and averaged.

Singhal et al., 2025, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning", arXiv:2502.15436, on LoRA-SB (Ponkshe et
al., 2024, arXiv:2411.19557). Each layer's update is ``scale * B @ R @ A``; every node derives
the same A and B from the run's seed (fedlora.lora.initial_adapter), trains only R and sends its
R delta: r * r values per layer, independent of the layer's width.

What is exact: with A and B shared, the update is linear in R, so
``scale * B @ mean(R_k) @ A == mean(scale * B @ R_k @ A)``: the aggregate expresses exactly the
example-weighted mean of the nodes' weight updates (up to float32 rounding), with no residual,
under secure aggregation (a weighted sum) and DP (clip and noise on R) alike. What is checked: a
non-zero A or B delta means a node did not freeze them, and is refused with a ValueError naming
the tensor. The saved adapter folds R into A (``A' = R @ A``, fedlora.lora.fold_sb), so it loads
in PEFT and merges like any LoRA adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from fedlora.server.strategies.base import (
    R_SUFFIX,
    Arrays,
    ClientUpdate,
    LayerPair,
    LoraAggregator,
    refuse_moved,
    zeros_like,
)


class FedSB(LoraAggregator):
    """Average R deltas; A and B stay frozen (any non-zero delta of them is refused)."""

    name: ClassVar[str] = "fed-sb"
    needs_individual_updates: ClassVar[bool] = False
    sends_a: ClassVar[bool] = False
    sends_b: ClassVar[bool] = False
    trains_a: ClassVar[bool] = False
    sb: ClassVar[bool] = True

    def combine(
        self,
        global_adapter: Mapping[str, np.ndarray],
        pairs: Mapping[str, LayerPair],
        updates: Sequence[ClientUpdate],
        scale: float,
    ) -> tuple[Arrays, Arrays]:
        r_names = [p + R_SUFFIX for p in pairs]
        if any(n not in global_adapter for n in r_names):
            raise ValueError(
                "fed-sb needs a LoRA-SB adapter (one lora_R per layer): build the run with "
                "strategy='fed-sb' so the initial adapter has them"
            )
        frozen = [n for pair in pairs.values() for n in pair]
        refuse_moved(
            updates, frozen, "Fed-SB keeps A and B frozen", "train only lora_R on the clients"
        )
        delta = zeros_like(global_adapter, frozen)
        delta.update(self.reducer(updates, r_names))
        return delta, {}
