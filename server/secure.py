"""Secure aggregation (SecAgg+, Bell et al. 2020) as a wrapper around the plain LoRA strategy.

Flower's loop sends no training message in a secure round: :meth:`SecureAggregation.
configure_train` keeps the sampled nodes and their round configs (with their DP noise shares
when DP is on), and :meth:`SecureAggregation.aggregate_train` runs the four exchanges (five
when authenticated) of fedlora.server.secagg on them; the server sees the sum only. The mean is
held to the clip ball every node applies, aggregated by the held strategy and stepped like a
plain round. With DP the nodes add the noise; the ledger is charged for the shares that protect
a node (:meth:`SecureAggregation.charge_dp`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedlora.errors import FedloraError
from fedlora.protocol.messages import CONFIG, RoundConfig
from fedlora.protocol.secagg import SecAggSettings
from fedlora.server.bounds import bound_secure_mean
from fedlora.server.privacy import PrivacyLedger, effective_noise_multiplier
from fedlora.server.records import rejected_list, secure_record
from fedlora.server.secagg import SecAggResult, as_client_update, secure_weighted_sum
from fedlora.server.strategy import LoraFedAvg, Record, TrainResult
from fedlora.server.wrappers import LoraWrapper

log = logging.getLogger(__name__)


class SecureAggregation(LoraWrapper):
    """Each round a SecAgg+ sum of the sampled nodes' deltas; ``secagg(n)`` gives the
    settings for ``n`` nodes, ``ledger`` (optional) the nodes' DP noise."""

    def __init__(
        self,
        strategy: LoraFedAvg | LoraWrapper,
        secagg: Callable[[int], SecAggSettings],
        ledger: PrivacyLedger | None = None,
    ) -> None:
        super().__init__(strategy)
        self.secagg = secagg
        self.dp = ledger
        self._secure_round: tuple[Grid, list[int], Any] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        contents = {m.metadata.dst_node_id: m.content for m in messages}
        for content in contents.values():
            if self.dp is not None:  # nodes add their share of the noise
                rc = RoundConfig.from_record(content.config_records[CONFIG])
                content.config_records[CONFIG] = dataclasses.replace(
                    rc,
                    dp_noise_multiplier=float(self.dp.settings.noise_multiplier),
                    dp_clip_norm=float(self.dp.settings.clip_norm),
                    dp_expected_clients=len(messages),
                ).to_record()
        self._secure_round = (grid, list(contents), contents)
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        return self.lora.guarded(server_round, self._round)

    def _round(self, server_round: int) -> TrainResult:
        """One SecAgg+ round on the nodes configure_train sampled."""
        lora = self.lora
        grid, nodes, content = self._secure_round or (None, [], None)
        self._secure_round = None
        result, settings, error, rejected = self._sum(server_round, grid, nodes, content)
        if result is None or settings is None:
            log.warning(
                "Round %d: secure aggregation failed (%s); the global adapter is unchanged",
                *(server_round, error),
            )
            for node in nodes:
                lora.acknowledge(node, False)
            record = self._record(server_round, None, len(nodes))
            record.update(
                {"skipped": True, "secagg-error": error, "rejected": rejected_list(rejected)}
            )
            lora.finish_round(server_round, record)
            return None, None
        for node in nodes:
            lora.acknowledge(node, node in result.contributors)
        record = self._record(server_round, result, len(nodes))
        record["downlink-bytes"] = sum(lora.down_bytes.get(n, 0) for n in nodes)
        if len(result.contributors) < max(lora.min_train_nodes, 1) and self.dp is not None:
            self.charge_dp(server_round, record)  # the noised sum was decoded: the server saw it
        if not lora.enough(server_round, len(result.contributors), "contributors", record):
            return None, None
        update, bounded = bound_secure_mean(
            as_client_update(result, lora.global_adapter), settings.clip_norm, result.tolerance
        )
        record.update(bounded)
        if bounded.get("secagg-mean-clipped"):
            log.warning(
                "Round %d: the secure mean has L2 norm %.4g, beyond the clip %g every node "
                "applies: some node skipped its clip; the mean is projected back",
                *(server_round, bounded["secagg-mean-norm"], settings.clip_norm),
            )
        lora.keep(record)
        aggregate = self.strategy.aggregate(server_round, [update], record)
        if aggregate is not None and self.dp is not None:
            self.charge_dp(server_round, record)
        return lora.commit(server_round, aggregate, record)

    def _sum(
        self, server_round: int, grid: Grid | None, nodes: list[int], content: Any
    ) -> tuple[SecAggResult | None, SecAggSettings | None, str, dict[int, str]]:
        """The SecAgg+ sum with its settings, or None with the error and rejected nodes."""
        if grid is None or not nodes or content is None:
            return None, None, "no nodes sampled", {}
        try:
            settings = self.settings_for(len(nodes))
            result = secure_weighted_sum(
                grid,
                nodes,
                content,
                settings,
                {k: v.shape for k, v in self.lora.reply_spec.items()},
                timeout=self.lora.settings.round_timeout,
                group_id=str(server_round),
            )
        except FedloraError as exc:  # SecAggError, or any WireError from the nodes' input
            return None, None, str(exc), dict(getattr(exc, "rejected", {}) or {})
        return result, settings, "", {}

    def _record(self, server_round: int, result: SecAggResult | None, asked: int) -> Record:
        lora = self.lora
        site_name = lora.settings.site_name
        return secure_record(server_round, result, asked, site_name, lora.round_started)

    def charge_dp(self, server_round: int, record: Record) -> None:
        """Account for a decoded secure sum whose noise the nodes added.

        Each of the ``asked`` nodes added a share sized for all of them, so ``a`` contributors
        give ``z * sqrt(a / asked)``. Under add/remove-one-client the protected node may be the
        one missing, so only the other ``a - 1`` shares protect it: the ledger is charged for
        ``z * sqrt((a - 1) / asked)`` (a >= the reconstruction threshold >= 2 in any decoded
        round).
        """
        assert self.dp is not None
        contributors = int(record["replies"])
        expected = int(record.get("asked", contributors))
        z = effective_noise_multiplier(
            self.dp.settings.noise_multiplier, expected, max(contributors - 1, 0)
        )
        record.update(self.dp.record_round(server_round, noise_multiplier=z).metrics())

    def settings_for(self, nodes: int) -> SecAggSettings:
        """The round's SecAgg+ settings; with DP the clip also covers each node's noise share."""
        settings = self.secagg(nodes)
        if self.dp is None:
            return settings
        dp = self.dp.settings
        values = sum(int(np.prod(v.shape)) for v in self.lora.reply_spec.values())
        share = dp.noise_std / np.sqrt(nodes)
        # |clipped delta + noise| <= C + |noise|; |noise| concentrates at share * sqrt(values).
        needed = dp.clip_norm + share * (np.sqrt(values) + 10.0)
        if needed > settings.clip_norm:
            log.info(
                "SecAgg clip raised from %g to %.4g to hold the DP noise shares",
                *(settings.clip_norm, needed),
            )
            settings = dataclasses.replace(settings, clip_norm=float(needed))
        return settings
