"""FedEx-LoRA: FedIT's averaged factors plus a dense residual that makes the update exact.

Singhal, Ponkshe & Vepakomma, ACL 2025, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models", arXiv:2410.09432. The factors are averaged as in
FedIT; the part of the mean weight update that they miss,

    residual = scale * (sum_k w_k B_k @ A_k - B @ A),   B_k = B_global + dB_k, A_k likewise,

with ``B``, ``A`` the new (stored, float32) global factors, is kept per layer as a dense
(out, in) matrix. The paper folds it into the frozen base weights every round; here the server
keeps it (summing rounds with :func:`add_residuals`) and adds it to the base at export.

What is exact: ``scale * B @ A + residual`` equals the example-weighted mean of the clients'
``scale * B_k @ A_k``, up to float32 rounding of the residual (accumulated in float64). This
holds for the aggregate as computed here; a server optimizer that then moves the factors breaks
it. Needs each client's factors (the product B_k @ A_k is not linear in the deltas), so it
cannot run on a secure-aggregated sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from fedlora.server.aggregate import apply_delta
from fedlora.server.strategies.base import (
    Arrays,
    ClientUpdate,
    LayerPair,
    LoraAggregator,
    mean_delta,
)
from fedlora.server.strategies.robust import Reducer


def residuals(
    global_adapter: Mapping[str, np.ndarray],
    new_global: Mapping[str, np.ndarray],
    pairs: Mapping[str, LayerPair],
    updates: Sequence[ClientUpdate],
    scale: float,
) -> Arrays:
    """Per layer, ``scale * (mean_k B_k @ A_k - B_new @ A_new)`` in float32 (float64 inside)."""
    total = float(sum(u.num_examples for u in updates))
    out: Arrays = {}
    for prefix, (a_name, b_name) in pairs.items():
        a0 = global_adapter[a_name].astype(np.float64)
        b0 = global_adapter[b_name].astype(np.float64)
        mean_product = np.zeros((b0.shape[0], a0.shape[1]), dtype=np.float64)
        for start in range(0, len(updates), 256):  # sum_k w_k B_k A_k as one product per chunk
            chunk = updates[start : start + 256]
            bs = np.concatenate(
                [(u.num_examples / total) * (b0 + u.delta[b_name]) for u in chunk], axis=1
            )  # (out, K r)
            as_ = np.concatenate([a0 + u.delta[a_name] for u in chunk], axis=0)  # (K r, in)
            mean_product += bs @ as_
        product = new_global[b_name].astype(np.float64) @ new_global[a_name].astype(np.float64)
        out[prefix] = (scale * (mean_product - product)).astype(np.float32)
    return out


def add_residuals(running: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> Arrays:
    """The sum of two rounds' residuals, layer by layer (a layer missing from one counts as 0)."""
    out = {k: v.copy() for k, v in running.items()}
    for k, v in new.items():
        if k in out and out[k].shape != v.shape:
            raise ValueError(f"residual {k}: shape {v.shape}, the running one {out[k].shape}")
        out[k] = (out[k].astype(np.float64) + v).astype(np.float32) if k in out else v.copy()
    return out


class FedExLoRA(LoraAggregator):
    """FedIT averages plus a dense per-layer residual; exact mean of the clients' B @ A."""

    name: ClassVar[str] = "fedex-lora"
    needs_individual_updates: ClassVar[bool] = True
    sends_a: ClassVar[bool] = True
    sends_b: ClassVar[bool] = True

    def __init__(self, reducer: Reducer | None = None) -> None:
        super().__init__(reducer)
        if self.reducer.kind != "mean":
            raise ValueError(
                f"fedex-lora's residual is exact for the example-weighted mean only "
                f"(aggregation {self.reducer.kind!r} would let outliers back in "
                f"through it): use fedit, ffa-lora or fedsa-lora with it"
            )

    def combine(
        self,
        global_adapter: Mapping[str, np.ndarray],
        pairs: Mapping[str, LayerPair],
        updates: Sequence[ClientUpdate],
        scale: float,
    ) -> tuple[Arrays, Arrays]:
        delta = mean_delta(updates, global_adapter)
        new_global = apply_delta(global_adapter, delta)
        return delta, residuals(global_adapter, new_global, pairs, updates, scale)
