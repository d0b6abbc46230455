"""A node's own LoRA rank inside the run's wider adapter (heterogeneous ranks).

The run's adapter has rank ``r_max`` (``lora-r-max``); a node of rank ``r <= r_max`` (its node
setting ``lora-r``) trains only the first ``r`` components, rows ``[:r]`` of every A and columns
``[:r]`` of every B, with the others set to zero, where they stay: a component whose row of A
and column of B are both zero is a fixed point of training (the gradient of A's row is B's
column times the rest, and the other way round, so both are exactly zero), and AdamW moves a
parameter whose gradient and value are zero by exactly nothing (zero moments; weight decay
scales zero); tests/test_hetrank.py checks it through a node's real training round. Its delta is
then its padded factors minus the global ones, so what it sends is HetLoRA's zero-padding (Cho
et al., 2024) with the wire's shapes unchanged: protocol, codecs and SecAgg+ see an ordinary
adapter. Every node keeps peft's scale ``alpha / r_max`` whatever its rank, so the products
``B_k A_k`` of all nodes are in one unit (what FlexLoRA adds and HetLoRA's norms compare). The
node computes at ``r_max`` (the masked components cost compute, not accuracy): the rank bounds
what a node learns, not its memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.lora import A_WEIGHT, B_WEIGHT


def rank_problem(own: int, lora_r: int, lora_r_max: int) -> str | None:
    """Why a node of rank ``own`` (0: the run's) cannot join a run of ``lora_r`` / ``lora_r_max``
    (0: one rank for all), or None."""
    if not own or own == lora_r:
        return None
    if not lora_r_max:
        return (
            f"this node's lora-r={own}, but the run trains one rank for all (lora-r={lora_r}, "
            f"no lora-r-max): drop the node's lora-r, or run with lora-r-max"
        )
    if own > lora_r_max:
        return (
            f"this node's lora-r={own} exceeds the run's lora-r-max={lora_r_max}: set the "
            f"node's lora-r to at most {lora_r_max}"
        )
    return None


def truncated(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """``arrays`` with every A's rows and every B's columns from ``rank`` on set to zero."""
    out = dict(arrays)
    for name, value in arrays.items():
        if name.endswith(A_WEIGHT) and value.shape[0] > rank:
            out[name] = value.copy()
            out[name][rank:] = 0
        elif name.endswith(B_WEIGHT) and value.shape[1] > rank:
            out[name] = value.copy()
            out[name][:, rank:] = 0
    return out
