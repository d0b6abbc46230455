"""LoRA-aware aggregation on Flower's Message API: validate replies, aggregate, checkpoint.

Each reply is checked against the wire format (fedlora.protocol), restricted to the factors the
aggregation strategy has nodes send; a bad reply (error, wrong names/shapes/dtypes, NaN/Inf,
metrics outside the whitelist) is logged and dropped and the round goes on with the rest. The
strategy (fedlora.server.strategies: FedIT, FFA-LoRA, FedSA-LoRA, FedEx-LoRA) turns the
example-weighted deltas into an aggregated delta, the server optimizer (FedAvg, FedAvgM,
FedAdam, FedYogi) applies it, and the result is saved after every round. With no usable reply,
or a set of replies the strategy refuses, the global adapter stays unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.data.drugreview import SITES
from fedlora.protocol.adapter import AdapterSpec, restrict
from fedlora.protocol.messages import ProtocolError, TrainReply, to_array_record
from fedlora.server.strategies import (ClientUpdate, FedIT, LoraAggregator, OptimizerState,
                                       ServerOptimizer, clip_update_norm, step)
from fedlora.server.strategies.fedex_lora import add_residuals

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
RoundHook = Callable[[int, Arrays, Arrays, dict[str, Any]], None]


class LoraFedAvg(FedAvg):
    """Flower's FedAvg node sampling with LoRA-aware aggregation of adapter deltas."""

    def __init__(self, spec: AdapterSpec, global_adapter: Arrays,
                 aggregator: LoraAggregator | None = None,
                 optimizer: ServerOptimizer | None = None, scale: float = 1.0,
                 clip_norm: float | None = None,
                 history_file: Path | None = None, on_round: RoundHook | None = None,
                 **fedavg: Any) -> None:
        super().__init__(fraction_evaluate=0.0, **fedavg)
        self.spec = spec
        self.global_adapter = global_adapter
        self.aggregator = aggregator or FedIT()
        self.optimizer = optimizer or ServerOptimizer()
        self.opt_state = OptimizerState()
        self.scale = scale  # lora_alpha / r
        self.clip_norm = clip_norm  # per-client L2 bound on the delta; None: no clipping
        self.residuals: Arrays = {}  # FedEx-LoRA's dense corrections, summed over rounds
        self.reply_spec = restrict(spec, self.aggregator.factors()[1])
        self.history_file = history_file
        self.history: list[dict[str, Any]] = []  # one record per completed round
        self.on_round = on_round
        self.round_offset = 0  # rounds completed before this start (a resumed run)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round_started = time.monotonic()
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                             MetricRecord | None]:
        server_round += self.round_offset
        accepted: list[TrainReply] = []
        dropped = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("Round %d: node %s failed: %s", server_round, node, msg.error.reason)
                dropped += 1
                continue
            try:
                accepted.append(TrainReply.from_content(msg.content, self.reply_spec))
            except (ProtocolError, KeyError) as exc:
                log.warning("Round %d: dropped reply from node %s: %s", server_round, node, exc)
                dropped += 1
        record = self._round_record(server_round, accepted, dropped)
        if len(accepted) < max(self.min_train_nodes, 1):
            log.warning("Round %d: %d usable replies, fewer than the minimum %d; the global "
                        "adapter is unchanged", server_round, len(accepted),
                        self.min_train_nodes)
            record["skipped"] = True
            self._finish_round(server_round, record)
            return None, None
        updates = [ClientUpdate(r.delta, r.num_examples) for r in accepted]
        if self.clip_norm is not None:
            clipped = [clip_update_norm(u.delta, self.clip_norm) for u in updates]
            record["clipped"] = sum(norm > self.clip_norm for _, norm in clipped)
            log.info("Round %d: clipped %d of %d updates to L2 norm %g", server_round,
                     record["clipped"], len(updates), self.clip_norm)
            updates = [ClientUpdate(d, u.num_examples)
                       for (d, _), u in zip(clipped, updates, strict=True)]
        try:
            result = self.aggregator.aggregate(self.global_adapter, updates, self.scale)
        except ValueError as exc:
            log.warning("Round %d: %s refused the replies (%s); the global adapter is unchanged",
                        server_round, self.aggregator.name, exc)
            self._finish_round(server_round, record)
            return None, None
        self.global_adapter, self.opt_state = step(self.global_adapter, result.delta,
                                                   self.opt_state, self.optimizer)
        if result.residuals:
            self.residuals = add_residuals(self.residuals, result.residuals)
        self._finish_round(server_round, record)
        metrics = MetricRecord({"train-loss": record["train-loss"],
                                "num-examples": record["num-examples"],
                                "num-replies": len(accepted)})
        return to_array_record(self.global_adapter), metrics

    def _round_record(self, server_round: int, accepted: list[TrainReply],
                      dropped: int) -> dict[str, Any]:
        n = sum(r.num_examples for r in accepted)
        sites = {}
        for r in accepted:
            name = SITES[r.site_id] if 0 <= r.site_id < len(SITES) else f"site-{r.site_id}"
            sites[name] = {"train-loss": r.train_loss, "num-examples": r.num_examples,
                           "train-seconds": r.train_seconds, "load-seconds": r.load_seconds}
            log.info("Round %d | site %-12s | loss %.4f | examples %4d | %.1f s", server_round,
                     name, r.train_loss, r.num_examples, r.train_seconds)
        loss = sum(r.train_loss * r.num_examples for r in accepted) / n if n else float("nan")
        log.info("Round %d | %-17s | loss %.4f | examples %4d | %d replies, %d dropped",
                 server_round, "aggregate", loss, n, len(accepted), dropped)
        started = getattr(self, "_round_started", None)
        seconds = time.monotonic() - started if started is not None else float("nan")
        return {"round": server_round, "train-loss": loss, "num-examples": n,
                "replies": len(accepted), "dropped": dropped, "seconds": seconds,
                "sites": sites}

    def _finish_round(self, server_round: int, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.on_round is not None:
            self.on_round(server_round, self.global_adapter, self.residuals, record)
        if self.history_file is not None:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            with self.history_file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
