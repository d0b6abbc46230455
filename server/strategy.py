"""The plain LoRA strategy on Flower's Message API: check replies, aggregate, step, record.

Replies pass the one reply-check helper and their value bounds (fedlora.server.replies); the
aggregation strategy (fedlora.server.strategies) turns the deltas into an aggregated delta and
the server optimizer applies it. Nodes evaluate every ``evaluate_every`` rounds (and after the
last), then the round completes: :meth:`LoraFedAvg.complete_round` is the one place a finished
record is emitted (history, ``on_round``, metrics.jsonl). DP, server-side clipping and secure
aggregation wrap this strategy (fedlora.server.wrappers, fedlora.server.secure, composed by
fedlora.server.build.compose). The round is a boundary: any exception while aggregating,
publishing, evaluating or saving, or a global adapter non-finite or beyond its bound, fails that
round only (its starting state comes back, the record says ``failed`` and why); the run goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.protocol.adapter import AdapterSpec, restrict
from fedlora.protocol.compression import nbytes
from fedlora.protocol.messages import EvalReply, TrainReply, to_array_record, wire_record
from fedlora.server.aggregate import check_bounded
from fedlora.server.downlink import Downlink
from fedlora.server.records import append_line, failed_record, plain_record, rejection
from fedlora.server.replies import bound_updates, cap_weights, check_replies, record_evaluation
from fedlora.server.settings import StrategySettings
from fedlora.server.state import ServerState
from fedlora.server.strategies import (
    AggregationResult,
    ClientUpdate,
    FedIT,
    LoraAggregator,
    OptimizerState,
    ServerOptimizer,
    step,
)
from fedlora.server.strategies.fedex_lora import add_residuals

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Record = dict[str, Any]
TrainResult = tuple[ArrayRecord | None, MetricRecord | None]
RoundHook = Callable[[int, Arrays, Arrays, Record], None]
CentralEval = Callable[[int, Arrays], dict[str, float]]
Aggregate = Callable[[int, list[ClientUpdate], Record], AggregationResult | None]


class LoraFedAvg(FedAvg):
    """Flower's FedAvg node sampling with LoRA-aware aggregation of adapter deltas."""

    def __init__(
        self,
        spec: AdapterSpec,
        global_adapter: Arrays,
        aggregator: LoraAggregator | None = None,
        optimizer: ServerOptimizer | None = None,
        settings: StrategySettings | None = None,
        central_eval: CentralEval | None = None,
        on_round: RoundHook | None = None,
        resumed: ServerState | None = None,
    ) -> None:
        self.settings = settings or StrategySettings()
        super().__init__(**self.settings.sampling())
        self.spec = spec
        self.aggregator = aggregator or FedIT()
        self.optimizer = optimizer or ServerOptimizer()
        self.central_eval = central_eval
        self.on_round = on_round  # called with each completed round (checkpoint, report)
        self.reply_spec = restrict(spec, self.aggregator.factors()[1])
        self.global_adapter = global_adapter
        self.opt_state = resumed.optimizer if resumed else OptimizerState()
        self.residuals: Arrays = resumed.residuals if resumed else {}  # FedEx-LoRA's corrections
        self.history: list[Record] = resumed.history if resumed else []  # completed rounds
        self.round_offset = resumed.completed_round if resumed else 0  # rounds done before
        s, sent = self.settings, self.aggregator.factors()[1]  # nodes get the factors they send
        self.downlink = Downlink(global_adapter, sent, s.down_codec, s.codec_block, s.seeded)
        self.down_bytes: dict[int, int] = {}  # node -> payload bytes it was sent this round
        self.round_started: float | None = None
        self._saved: tuple[Arrays, OptimizerState, Arrays, Downlink] | None = None
        self._record: Record | None = None  # the running round's record, once it has one
        self._pending: Record | None = None  # trained round awaiting its evaluation

    @property
    def lora(self) -> LoraFedAvg:  # the plain strategy a wrapper holds: here itself
        return self

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.round_started = time.monotonic()
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def _construct_messages(
        self, record: RecordDict, node_ids: list[int], message_type: str
    ) -> Iterable[Message]:
        """One message per node: the round config plus that node's downlink payload."""
        messages = []
        self.down_bytes = {}
        base = record.config_records[self.configrecord_key]
        for node in node_ids:
            arrays, fields = self.downlink.payload(node)
            config = ConfigRecord(dict(base))
            config.update({k.replace("_", "-"): v for k, v in fields.items()})
            content = RecordDict(
                {self.arrayrecord_key: wire_record(arrays), self.configrecord_key: config}
            )
            self.down_bytes[node] = nbytes(arrays)
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def acknowledge(self, node: int, used: bool) -> None:
        """A node's reply was used (it holds what it was sent) or not (send it exact values)."""
        self.downlink.settle(node, used)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        return self.train_round(server_round, replies, self.aggregate)

    def train_round(
        self, server_round: int, replies: Iterable[Message], aggregate: Aggregate
    ) -> TrainResult:
        """A plain round, ``aggregate`` being the outermost wrapper's (DP, clipping)."""
        return self.guarded(server_round, lambda r: self._plain_round(r, replies, aggregate))

    def guarded(self, server_round: int, body: Callable[[int], TrainResult]) -> TrainResult:
        """Run a round's aggregation; any exception fails the round, never the run."""
        server_round += self.round_offset
        # what a round changes, restored when it fails (the downlink with its node tables)
        self._saved = self.global_adapter, self.opt_state, self.residuals, self.downlink.copy()
        self._record = None
        try:
            return body(server_round)
        except Exception as exc:  # noqa: BLE001 -- the round boundary: the run goes on
            self._fail_round(server_round, exc, self._record)
            return None, None

    def _plain_round(
        self, server_round: int, replies: Iterable[Message], aggregate: Aggregate
    ) -> TrainResult:
        s = self.settings

        def decode(content: RecordDict) -> TrainReply:
            return TrainReply.from_content(content, self.reply_spec, s.codec, s.codec_block)

        checked, rejected = check_replies(server_round, replies, decode, self.acknowledge)
        nodes = [n for n, _ in checked]
        accepted, capped = cap_weights(server_round, [r for _, r in checked], nodes, s.bounds)
        names = [s.site_name(r.site_id, n) for n, r in checked]
        down = sum(self.down_bytes.values())
        record = plain_record(server_round, accepted, names, rejected, self.round_started, down)
        record.update(capped)
        if not self.enough(server_round, len(accepted), "usable replies", record):
            return None, None
        updates = [ClientUpdate(r.delta, r.num_examples) for r in accepted]
        updates = bound_updates(server_round, updates, names, nodes, s.bounds, record)
        self.keep(record)
        return self.commit(server_round, aggregate(server_round, updates, record), record)

    def enough(self, server_round: int, count: int, what: str, record: Record) -> bool:
        """Whether ``count`` replies make a round; if not it completes unchanged (skipped)."""
        if count >= max(self.min_train_nodes, 1):
            return True
        log.warning(
            "Round %d: %d %s, fewer than the minimum %d; the global adapter is unchanged",
            *(server_round, count, what, self.min_train_nodes),
        )
        record["skipped"] = True
        self.finish_round(server_round, record)
        return False

    def keep(self, record: Record) -> None:
        """A failure from here on keeps what the round's record knew (whose reply it was)."""
        self._record = record

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], record: Record
    ) -> AggregationResult | None:
        """The strategy's aggregate of ``updates``, or None when it refuses them."""
        try:
            return self.aggregator.aggregate(self.global_adapter, updates, self.settings.scale)
        except ValueError as exc:
            log.warning(
                "Round %d: %s refused the replies (%s); the global adapter is unchanged",
                *(server_round, self.aggregator.name, exc),
            )
            return None

    def commit(
        self, server_round: int, result: AggregationResult | None, record: Record
    ) -> TrainResult:
        """Step the server optimizer on the aggregate and publish the new global adapter."""
        if result is None:
            self.finish_round(server_round, record)
            return None, None
        new_global, opt_state = step(
            self.global_adapter, result.delta, self.opt_state, self.optimizer
        )
        residuals = add_residuals(self.residuals, result.residuals) if result.residuals else None
        bound = self.settings.bounds.max_global_value  # beyond it the round fails
        check_bounded(new_global, bound)
        check_bounded(residuals or {}, bound, "FedEx-LoRA's residuals")
        self.global_adapter = self.downlink.publish(new_global)
        self.opt_state = opt_state
        if residuals is not None:
            self.residuals = residuals
        self.finish_round(server_round, record)
        keys = {
            "train-loss": "train-loss",
            "num-examples": "num-examples",
            "num-replies": "replies",
        }
        metrics = MetricRecord({k: record[v] for k, v in keys.items()})
        return to_array_record(self.global_adapter), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.settings.evaluates(server_round) or not self.settings.federated_eval:
            return []  # aggregate_evaluate still completes the round (and the central eval)
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Complete the round with its evaluation; any exception fails the round."""
        server_round += self.round_offset
        record, self._pending = self._pending, None
        if record is None:  # no evaluation this round: it completed after training
            return None
        try:
            return self._evaluate_round(server_round, replies, record)
        except Exception as exc:  # noqa: BLE001 -- the round boundary: the run goes on
            self._fail_round(server_round, exc, record)
            return None

    def _evaluate_round(
        self, server_round: int, replies: Iterable[Message], record: Record
    ) -> MetricRecord | None:
        decode = EvalReply.from_content
        checked, rejected = check_replies(server_round, replies, decode, self.acknowledge, "eval")
        record["eval-dropped"] = len(rejected)
        record["eval-rejected"] = rejected
        results = [(self.settings.site_name(r.site_id, n), r) for n, r in checked]
        metrics = record_evaluation(server_round, results, record)
        if self.central_eval is not None and self.settings.evaluates(server_round):
            central = self.central_eval(server_round, self.global_adapter)
            record.update({f"central-{k}": v for k, v in central.items()})
            summary = ", ".join(f"{k} {v:.4f}" for k, v in central.items())
            log.info("Round %d | central eval | %s", server_round, summary)
        self.complete_round(server_round, record)
        return MetricRecord(dict(metrics)) if metrics else None

    def finish_round(self, server_round: int, record: Record) -> None:
        """Training is done; the round completes now, or after its evaluation."""
        if self.settings.evaluates(server_round):
            self._pending = record
        else:
            self.complete_round(server_round, record)

    def complete_round(self, server_round: int, record: Record) -> None:
        """The one place a finished round's record is emitted: history, hook, metrics.jsonl."""
        self.history.append(record)
        if self.on_round is not None:
            self.on_round(server_round, self.global_adapter, self.residuals, record)
        append_line(self.settings.history_file, record)

    def _fail_round(self, server_round: int, exc: BaseException, record: Record | None) -> None:
        """The round fails cleanly: the state it started from comes back, the record says why
        (``failed``, ``failure``), the checkpoint and report are written for it as for any
        round, and the next round runs. Nothing raised here ends the run."""
        cause = rejection(0, f"{type(exc).__name__}: {exc}")["error"]
        log.warning(
            "Round %d failed (%s); the global adapter is unchanged and the run goes on",
            *(server_round, cause),
        )
        if self._saved is not None:
            self.global_adapter, self.opt_state, self.residuals, self.downlink = self._saved
        self._pending = None
        failed = failed_record(self.history, server_round, cause, record)
        if self.on_round is not None:
            try:
                self.on_round(server_round, self.global_adapter, self.residuals, failed)
            except Exception as again:  # noqa: BLE001 -- recorded; the run goes on
                log.warning("Round %d: saving the failed round failed too: %s", server_round, again)
                failed["save-failure"] = rejection(0, f"{type(again).__name__}: {again}")["error"]
        try:
            append_line(self.settings.history_file, failed)
        except (OSError, TypeError, ValueError) as again:
            log.warning("Round %d: metrics.jsonl not written: %s", server_round, again)
