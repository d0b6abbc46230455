"""Strategies that hold a LoRA strategy and add one step to its aggregation, as Flower's DP
wrappers do (``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping``).

:class:`LoraWrapper` forwards everything to the strategy it holds; a wrapper overrides
:meth:`LoraWrapper.aggregate` (the updates before, the aggregate after). A plain round runs the
outermost wrapper's ``aggregate``, so ``CentralDP(ServerClipping(LoraFedAvg(...)))`` clips to the
DP bound, then to clip-norm, aggregates, and adds the noise before the server optimizer's step.
Secure aggregation is a wrapper too (fedlora.server.secure). Which wrappers compose is decided
by the one table, fedlora.choices.RULES (fedlora.server.build.build_strategy).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.clipping import add_noise, clip_l2
from fedlora.server.privacy import PrivacyLedger
from fedlora.server.strategies import AggregationResult, ClientUpdate
from fedlora.server.strategy import Arrays, LoraFedAvg, Record, TrainResult

log = logging.getLogger(__name__)


class LoraWrapper(Strategy):
    """Holds a LoRA strategy (plain or wrapped) and forwards to it."""

    def __init__(self, strategy: LoraFedAvg | LoraWrapper) -> None:
        self.strategy = strategy

    @property
    def lora(self) -> LoraFedAvg:
        """The plain strategy at the centre."""
        return self.strategy.lora

    @property
    def global_adapter(self) -> Arrays:
        return self.lora.global_adapter

    @property
    def residuals(self) -> Arrays:
        return self.lora.residuals

    @property
    def history(self) -> list[Record]:
        return self.lora.history

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        return self.lora.train_round(server_round, replies, self.aggregate)

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], record: Record
    ) -> AggregationResult | None:
        return self.strategy.aggregate(server_round, updates, record)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class ServerClipping(LoraWrapper):
    """Each update clipped to L2 norm ``clip_norm`` on the server before aggregation
    (clip-norm; a robustness bound, not DP)."""

    def __init__(self, strategy: LoraFedAvg | LoraWrapper, clip_norm: float) -> None:
        super().__init__(strategy)
        if not clip_norm > 0:
            raise ValueError(f"clip-norm={clip_norm}: use a positive L2 norm, or no clipping")
        self.clip_norm = clip_norm

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], record: Record
    ) -> AggregationResult | None:
        clipped = [clip_l2(u.delta, self.clip_norm) for u in updates]
        record["clipped"] = sum(scale < 1.0 for _, _, scale in clipped)
        log.info(
            "Round %d: clipped %d of %d updates to L2 norm %g",
            *(server_round, record["clipped"], len(updates), self.clip_norm),
        )
        pairs = zip(clipped, updates, strict=True)
        updates = [ClientUpdate(d, u.num_examples) for (d, _, _), u in pairs]
        return self.strategy.aggregate(server_round, updates, record)


class CentralDP(LoraWrapper):
    """Client-level central DP on plain replies: each delta clipped to the DP bound and weighed
    equally, Gaussian noise of std z * C on the sum (so z * C / n on the mean), each round charged
    to the privacy ledger (McMahan et al. 2018, "Learning Differentially Private Recurrent
    Language Models")."""

    def __init__(self, strategy: LoraFedAvg | LoraWrapper, ledger: PrivacyLedger) -> None:
        super().__init__(strategy)
        self.dp = ledger

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], record: Record
    ) -> AggregationResult | None:
        bound = self.dp.settings.clip_norm
        updates = [ClientUpdate(clip_l2(u.delta, bound, "dp-clip-norm")[0], 1) for u in updates]
        result = self.strategy.aggregate(server_round, updates, record)
        if result is None:
            return None
        rng = np.random.default_rng()  # OS entropy: DP noise must not be predictable
        std = self.dp.settings.noise_std / len(updates)  # noise on the sum, of the mean
        result = dataclasses.replace(result, delta=add_noise(result.delta, std, rng))
        record.update(self.dp.record_round(server_round).metrics())
        return result
