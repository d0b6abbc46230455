"""Compose a LoRA strategy with its wrappers, after the one compatibility table.

``compose(LoraFedAvg(...), clip_norm=..., dp=..., secagg=...)`` wraps the plain strategy in
server-side clipping, central DP or secure aggregation (nodes add the DP noise there) as
fedlora.choices.RULES allows; a combination it refuses raises with the table's message.
"""

from __future__ import annotations

from collections.abc import Callable

from fedlora.choices import Combination, compatibility_problem
from fedlora.protocol.secagg import SecAggSettings
from fedlora.server.privacy import PrivacyLedger
from fedlora.server.secagg import SecAggError
from fedlora.server.secure import SecureAggregation
from fedlora.server.strategy import LoraFedAvg
from fedlora.server.wrappers import CentralDP, LoraWrapper, ServerClipping


def compose(
    strategy: LoraFedAvg,
    clip_norm: float | None = None,
    dp: PrivacyLedger | None = None,
    secagg: Callable[[int], SecAggSettings] | None = None,
) -> LoraFedAvg | LoraWrapper:
    """``strategy`` wrapped for server-side clipping, DP and secure aggregation."""
    aggregator = strategy.aggregator
    combination = Combination(
        aggregator.name,
        aggregator.reducer.kind,
        secure=secagg is not None,
        dp=dp is not None,
        server_clip=clip_norm is not None,
    )
    if secagg is not None and (problem := compatibility_problem(combination, "secure-aggregation")):
        raise SecAggError(problem)
    if dp is not None and (problem := compatibility_problem(combination, "dp")):
        raise ValueError(problem)
    wrapped: LoraFedAvg | LoraWrapper = strategy
    if clip_norm is not None:
        wrapped = ServerClipping(wrapped, clip_norm)
    if secagg is not None:
        return SecureAggregation(wrapped, secagg, dp)
    return CentralDP(wrapped, dp) if dp is not None else wrapped
