"""Zero-padding: the naive baseline for clients of different LoRA ranks.

The baseline of Cho et al., EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models" (HetLoRA, arXiv:2401.06432): a client of rank ``r_k <= r_max``
trains the first ``r_k`` components of the global adapter (rows of A, columns of B), the others
held at zero (fedlora.client.ranks), and sends its factors zero-padded to ``r_max``; the server
averages the padded factors weighted by examples,

    A = sum_k w_k pad(A_k),   B = sum_k w_k pad(B_k),   w_k = n_k / sum_j n_j.

On the wire a node sends its delta (padded local minus global), so the new global is
``global + sum_k w_k delta_k``: FedIT's sum (fedlora.server.strategies.fedit), which is what
makes it compose with secure aggregation and DP. Components beyond a client's rank are pulled
toward zero by the share of clients that do not train them: the dilution HetLoRA and FlexLoRA
improve on.
"""

from __future__ import annotations

from typing import ClassVar

from fedlora.server.strategies.fedit import FedIT


class ZeroPad(FedIT):
    """Example-weighted mean of zero-padded factors (FedIT on the padded deltas)."""

    name: ClassVar[str] = "zero-pad"
