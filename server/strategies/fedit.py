"""FedIT: the common baseline, averaging the LoRA factors A and B separately.

Zhang et al., 2024, "Towards Building the Federated GPT: Federated Instruction Tuning",
arXiv:2305.05644: FedAvg (McMahan et al., 2017, arXiv:1602.05629) applied to each LoRA tensor.

What is exact and what is not: the new factors are exactly the example-weighted means of the
clients' factors, ``A = sum_k w_k A_k`` and ``B = sum_k w_k B_k``. The weight update they express,
``scale * B @ A``, is *not* the mean of the clients' updates ``sum_k w_k scale * B_k @ A_k``: the
two differ by ``scale * (mean(B_k A_k) - mean(B_k) mean(A_k))``, a cross-covariance of the
clients' factors that vanishes only when the clients agree (or one factor is shared, see
FFA-LoRA) and grows with client heterogeneity. FedEx-LoRA keeps that difference as a residual.
Needs only the weighted sum of the deltas, so it runs under secure aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from fedlora.server.strategies.base import Arrays, ClientUpdate, LayerPair, LoraAggregator


class FedIT(LoraAggregator):
    """Average A and B deltas separately, weighted by examples."""

    name: ClassVar[str] = "fedit"
    needs_individual_updates: ClassVar[bool] = False
    sends_a: ClassVar[bool] = True
    sends_b: ClassVar[bool] = True

    def combine(
        self,
        global_adapter: Mapping[str, np.ndarray],
        pairs: Mapping[str, LayerPair],
        updates: Sequence[ClientUpdate],
        scale: float,
    ) -> tuple[Arrays, Arrays]:
        return self.reducer(updates, list(global_adapter)), {}
