"""FlexLoRA: average the clients' full LoRA products, then SVD back to LoRA factors.

Bai, Chen, Ding, Li et al., NeurIPS 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Language Tasks and Client Resources", arXiv:2402.11505. Each client ``k`` of rank
``r_k`` sends its factors (zero-padded to ``r_max``, fedlora.client.ranks); per layer the server
forms the example-weighted mean of the full updates and factors it again by SVD,

    W = sum_k w_k B_k @ A_k,   w_k = n_k / sum_j n_j,   W = U S V^T,
    B = U[:, :r_max] S[:r_max],   A = V[:, :r_max]^T,

so ``B @ A`` is the best rank-``r_max`` approximation of ``W`` (Eckart-Young); the singular
values go to B (the product, which is what the test checks against the paper's formula, does
not depend on that split). The paper sends client ``k`` the rank-``r_k`` truncation; fedlora's
downlink is one adapter for every node, so the server keeps the rank-``r_max`` factors and a node
of rank ``r_k`` keeps their first ``r_k`` components, which is the same truncation (the
components are sorted by singular value). ``W`` is never formed: with ``Bw = [w_1 B_1 ...]`` and
``Ac = [A_1; ...]``, ``W = Bw @ Ac``, and thin QRs of both reduce the SVD to a (K r_max)-square
matrix. The LoRA scale is alpha / r_max for every client, so the products add in one unit.

Needs each client's factors (the products are not linear in the deltas): no secure aggregation
(fedlora.choices.RULES), and only FedAvg's plain step (the new factors are not a mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from fedlora.server.strategies.base import Arrays, ClientUpdate, LayerPair, LoraAggregator
from fedlora.server.strategies.robust import Reducer


def truncated_svd_of_product(
    bs: np.ndarray, as_: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(B, A)`` with ``B @ A`` the best rank-``rank`` approximation of ``bs @ as_``, singular
    values in B; ``bs`` is (out, m), ``as_`` (m, in). Float64 throughout."""
    qb, rb = np.linalg.qr(bs)  # bs = qb rb
    qa, ra = np.linalg.qr(as_.T)  # as_ = ra^T qa^T
    u, s, vt = np.linalg.svd(rb @ ra.T)
    k = min(rank, s.size)
    b = np.zeros((bs.shape[0], rank))
    a = np.zeros((rank, as_.shape[1]))
    b[:, :k] = (qb @ u[:, :k]) * s[:k]
    a[:k] = (qa @ vt[:k].T).T
    return b, a


def flex_factors(
    global_adapter: Mapping[str, np.ndarray],
    pairs: Mapping[str, LayerPair],
    updates: Sequence[ClientUpdate],
) -> Arrays:
    """The new global factors: per layer, the rank-r_max SVD of ``sum_k w_k B_k A_k``."""
    total = float(sum(u.num_examples for u in updates))
    if total <= 0:
        raise ValueError("flexlora: every client reported 0 examples; nothing to weigh by")
    out: Arrays = {}
    for a_name, b_name in pairs.values():
        a0 = global_adapter[a_name].astype(np.float64)
        b0 = global_adapter[b_name].astype(np.float64)
        bs = np.concatenate(
            [(u.num_examples / total) * (b0 + u.delta[b_name]) for u in updates], axis=1
        )
        as_ = np.concatenate([a0 + u.delta[a_name] for u in updates], axis=0)
        b, a = truncated_svd_of_product(bs, as_, a0.shape[0])
        out[a_name] = a.astype(global_adapter[a_name].dtype)
        out[b_name] = b.astype(global_adapter[b_name].dtype)
    return out


class FlexLoRA(LoraAggregator):
    """Example-weighted mean of the clients' B @ A, factored back to rank r_max by SVD."""

    name: ClassVar[str] = "flexlora"
    needs_individual_updates: ClassVar[bool] = True
    sends_a: ClassVar[bool] = True
    sends_b: ClassVar[bool] = True

    def __init__(self, reducer: Reducer | None = None) -> None:
        super().__init__(reducer)
        if self.reducer.kind != "mean":
            raise ValueError(
                f"flexlora averages the clients' products weighted by examples (aggregation "
                f"{self.reducer.kind!r} has no such product): use aggregation='mean'"
            )

    def combine(
        self,
        global_adapter: Mapping[str, np.ndarray],
        pairs: Mapping[str, LayerPair],
        updates: Sequence[ClientUpdate],
        scale: float,
    ) -> tuple[Arrays, Arrays]:
        new = flex_factors(global_adapter, pairs, updates)
        delta = {
            n: (new[n].astype(np.float64) - global_adapter[n]).astype(global_adapter[n].dtype)
            for n in global_adapter
        }
        return delta, {}
