"""LoRA-aware aggregation on Flower's Message API: validate replies, aggregate, checkpoint.

Each reply passes the decoding gate (fedlora.protocol.gate), restricted to the factors the
aggregation strategy has nodes send; a bad reply (an error, or any WireError: wrong names,
shapes, dtypes or byte lengths, NaN/Inf, metrics outside the whitelist or their ranges) is logged
in one line naming the node, counted in the round record (``dropped`` and ``rejected``: node and
reason; ``eval-dropped`` / ``eval-rejected`` for evaluation) and dropped; the round goes on with
the rest. The
strategy (fedlora.server.strategies: FedIT, FFA-LoRA, FedSA-LoRA, FedEx-LoRA) turns the
example-weighted deltas into an aggregated delta, the server optimizer (FedAvg, FedAvgM,
FedAdam, FedYogi) applies it. With no usable reply, or a set of replies the strategy refuses,
the global adapter stays unchanged.

After training, nodes evaluate the global adapter on their eval splits (every
``evaluate_every`` rounds and after the last): loss, perplexity and, for label tasks, accuracy,
weighted by eval examples. An optional central evaluation runs on the server's own test data.
Then the round is complete: its record goes to the history (metrics.jsonl, built by
fedlora.server.records) and ``on_round`` saves the checkpoint and the report.

Replies right in form but hostile in value are bounded before aggregation (fedlora.server.bounds:
example weights capped, plain deltas norm-clipped, a secure mean held to the clip ball), and the
round is a boundary: any exception while aggregating, encoding the downlink, evaluating or
saving, and any global adapter that would be non-finite or beyond its bound, fails that round
only (the state it started from comes back, the record says ``failed`` and why) and the next
round runs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.clipping import add_noise, clip_l2
from fedlora.errors import FedloraError, WireError
from fedlora.protocol.adapter import AdapterSpec, restrict
from fedlora.protocol.compression import nbytes
from fedlora.protocol.messages import (
    CONFIG,
    EvalReply,
    RoundConfig,
    TrainReply,
    to_array_record,
    wire_record,
)
from fedlora.protocol.secagg import SecAggSettings
from fedlora.server.aggregate import check_bounded
from fedlora.server.bounds import (
    ReplyBounds,
    bound_norms,
    bound_secure_mean,
    cap_examples,
)
from fedlora.server.downlink import Downlink
from fedlora.server.privacy import PrivacyLedger, effective_noise_multiplier
from fedlora.server.records import (
    capped_eval,
    finite,
    plain_record,
    rejected_list,
    rejection,
    secure_record,
    weighted_eval,
)
from fedlora.server.secagg import (
    SecAggError,
    SecAggResult,
    as_client_update,
    check_composable,
    secure_weighted_sum,
)
from fedlora.server.strategies import (
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
RoundHook = Callable[[int, Arrays, Arrays, dict[str, Any]], None]
CentralEval = Callable[[int, Arrays], dict[str, float]]


class LoraFedAvg(FedAvg):
    """Flower's FedAvg node sampling with LoRA-aware aggregation of adapter deltas."""

    def __init__(
        self,
        spec: AdapterSpec,
        global_adapter: Arrays,
        aggregator: LoraAggregator | None = None,
        optimizer: ServerOptimizer | None = None,
        scale: float = 1.0,
        clip_norm: float | None = None,
        history_file: Path | None = None,
        on_round: RoundHook | None = None,
        evaluate_every: int = 0,
        federated_eval: bool = True,
        num_rounds: int = 0,
        central_eval: CentralEval | None = None,
        secagg: Callable[[int], SecAggSettings] | None = None,
        round_timeout: float = 3600.0,
        codec: str = "none",
        codec_block: int = 64,
        dp: PrivacyLedger | None = None,
        site_names: Sequence[str] = (),
        down_codec: str = "none",
        seeded: bool = False,
        bounds: ReplyBounds | None = None,
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        self.spec = spec
        self.bounds = bounds or ReplyBounds()  # weight, norm and global-value bounds (bounds.py)
        self._saved: tuple[Any, ...] | None = None  # state at the start of the running round
        self._record: dict[str, Any] | None = None  # the running round's record, once it has one
        self.global_adapter = global_adapter
        self.aggregator = aggregator or FedIT()
        self.optimizer = optimizer or ServerOptimizer()
        self.opt_state = OptimizerState()
        self.scale = scale  # lora_alpha / r
        self.clip_norm = clip_norm  # per-client L2 bound on the delta; None: no clipping
        self.residuals: Arrays = {}  # FedEx-LoRA's dense corrections, summed over rounds
        self.reply_spec = restrict(spec, self.aggregator.factors()[1])
        # What each node receives: the factors it sends back, exact or as the change since the
        # version it holds (fedlora.server.downlink); the other factors it derives from the seed,
        # and so the sent ones too while they are at their seeded start (``seeded``).
        self.downlink = Downlink(
            global_adapter, self.aggregator.factors()[1], down_codec, codec_block, seeded
        )
        self._sent: dict[int, int] = {}  # node -> the global version its last message carried
        self._down_bytes: dict[int, int] = {}  # node -> payload bytes it was sent this round
        self.history_file = history_file
        self.history: list[dict[str, Any]] = []  # one record per completed round
        self.on_round = on_round
        self.round_offset = 0  # rounds completed before this start (a resumed run)
        self.evaluate_every = evaluate_every  # federated evaluation every N rounds; 0 = never
        self.federated_eval = federated_eval  # False: only the central evaluation runs
        self.num_rounds = num_rounds  # rounds of the whole run (the last one is evaluated)
        self.central_eval = central_eval
        self.site_names = tuple(site_names)  # a node's site-id indexes this; else node-<id>
        self._pending: dict[str, Any] | None = None  # trained round awaiting its evaluation
        self.secagg = secagg  # None: plain replies; else SecAgg+ settings for n sampled nodes
        self.round_timeout = round_timeout
        self._secure_round: tuple[Grid, list[int], Any] | None = None
        self.codec, self.codec_block = codec, codec_block  # how nodes encode their deltas
        self.dp = dp  # client-level DP: clip + Gaussian noise, accounted round by round
        if dp is not None and self.aggregator.individual_updates_needed:
            raise ValueError(
                f"differential privacy needs a mean-type aggregation; "
                f"{self.aggregator.name} with {self.aggregator.reducer.kind} is not"
            )
        if secagg is not None:
            check_composable(self.aggregator)
            if clip_norm is not None:
                raise SecAggError(
                    "clip-norm clips individual updates on the server, which "
                    "secure aggregation hides: nodes clip to secagg-clip-norm"
                )

    def evaluates(self, server_round: int) -> bool:
        """Whether nodes evaluate after ``server_round`` (counted over the whole run)."""
        every = self.evaluate_every
        return every > 0 and (server_round % every == 0 or server_round == self.num_rounds)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.monotonic()
        messages = super().configure_train(server_round + self.round_offset, arrays, config, grid)
        if self.secagg is None:
            return messages
        # Secure rounds take four exchanges (five when authenticated), run from aggregate_train;
        # Flower's loop sends none.
        messages = list(messages)
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

    def _construct_messages(
        self, record: RecordDict, node_ids: list[int], message_type: str
    ) -> Iterable[Message]:
        """One message per node: the round config plus that node's downlink payload (only the
        factors it sends back, exact or as the change since the version it holds)."""
        messages = []
        self._down_bytes = {}
        base = record.config_records[self.configrecord_key]
        for node in node_ids:
            arrays, fields = self.downlink.payload(node)
            config = ConfigRecord(dict(base))
            config.update({k.replace("_", "-"): v for k, v in fields.items()})
            content = RecordDict(
                {self.arrayrecord_key: wire_record(arrays), self.configrecord_key: config}
            )
            self._sent[node] = self.downlink.version
            self._down_bytes[node] = nbytes(arrays)
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def _acknowledge(self, node: int, ok: bool) -> None:
        """A node's reply was used (it holds what it was sent) or not (send it exact values)."""
        if ok and node in self._sent:
            self.downlink.acknowledge(node, self._sent[node])
        else:
            self.downlink.forget(node)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the round; any exception fails the round, never the run (_fail_round)."""
        server_round += self.round_offset
        self._saved = self._snapshot()
        self._record = None
        try:
            if self.secagg is not None:
                return self._aggregate_secure(server_round)
            return self._aggregate_plain(server_round, replies)
        except Exception as exc:  # noqa: BLE001 -- the round boundary: the run goes on
            self._fail_round(server_round, exc, self._record)
            return None, None

    def _aggregate_plain(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[TrainReply] = []
        names: list[str] = []
        nodes: list[int] = []
        rejected: list[dict[str, Any]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("Round %d: node %s failed: %s", server_round, node, msg.error.reason)
                rejected.append(rejection(node, f"node error: {msg.error.reason}"))
                self._acknowledge(node, False)
                continue
            try:
                reply = TrainReply.from_content(
                    msg.content, self.reply_spec, self.codec, self.codec_block
                )
            except WireError as exc:
                log.warning("Round %d: dropped reply from node %s: %s", server_round, node, exc)
                rejected.append(rejection(node, str(exc)))
                self._acknowledge(node, False)
                continue
            self._acknowledge(node, True)
            accepted.append(reply)
            names.append(self.site_name(reply.site_id, node))
            nodes.append(node)
        accepted, capped = self._cap_weights(server_round, accepted, nodes)
        started = getattr(self, "_round_started", None)
        down = sum(self._down_bytes.values())
        record = plain_record(server_round, accepted, names, rejected, started, down)
        record.update(capped)
        if len(accepted) < max(self.min_train_nodes, 1):
            log.warning(
                "Round %d: %d usable replies, fewer than the minimum %d; the global "
                "adapter is unchanged",
                server_round,
                len(accepted),
                self.min_train_nodes,
            )
            record["skipped"] = True
            self._finish_round(server_round, record)
            return None, None
        updates = [ClientUpdate(r.delta, r.num_examples) for r in accepted]
        updates = self._bound_norms(server_round, updates, names, nodes, record)
        return self._apply(server_round, updates, record)

    def _cap_weights(
        self, server_round: int, accepted: list[TrainReply], nodes: list[int]
    ) -> tuple[list[TrainReply], dict[str, Any]]:
        """The replies with their example weights capped (server/bounds.py), and the record's
        fields saying which and to what."""
        weights, capped = cap_examples([r.num_examples for r in accepted], nodes, self.bounds)
        for entry in capped["weight-capped"]:
            log.warning(
                "Round %d: node %s claimed %d examples; weighed as %d (max-examples)",
                server_round,
                entry["node"],
                entry["claimed"],
                capped["max-examples"],
            )
        pairs = zip(accepted, weights, strict=True)
        replies = [dataclasses.replace(r, num_examples=w) for r, w in pairs]
        return replies, capped

    def _bound_norms(
        self,
        server_round: int,
        updates: list[ClientUpdate],
        names: list[str],
        nodes: list[int],
        record: dict[str, Any],
    ) -> list[ClientUpdate]:
        """The updates with each delta clipped to the round's norm bound (server/bounds.py);
        the record gets the bound, the clipped nodes and every site's norm."""
        updates, norms, bounded = bound_norms(updates, nodes, self.bounds)
        record.update(bounded)
        for name, norm in zip(names, norms, strict=True):
            record["sites"][name]["delta-norm"] = norm
        for entry in bounded["norm-clipped"]:
            log.warning(
                "Round %d: node %s sent a delta of L2 norm %.4g; clipped to %.4g (norm bound)",
                server_round,
                entry["node"],
                entry["norm"],
                bounded["norm-bound"],
            )
        return updates

    def _apply(
        self, server_round: int, updates: list[ClientUpdate], record: dict[str, Any]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip (optional), aggregate with the strategy, step the server optimizer.

        With DP and plain replies the server clips each delta to the DP bound, weighs every node
        equally and adds Gaussian noise of std z * C to the sum (central DP). Under secure
        aggregation the nodes did both; the server only accounts for the privacy spent.
        """
        self._record = record  # a failure from here on keeps what the round knew
        central_dp = self.dp is not None and self.secagg is None
        if central_dp:
            assert self.dp is not None
            bound = self.dp.settings.clip_norm
            updates = [ClientUpdate(clip_l2(u.delta, bound, "dp-clip-norm")[0], 1) for u in updates]
        if self.clip_norm is not None:
            clipped = [clip_l2(u.delta, self.clip_norm) for u in updates]
            record["clipped"] = sum(scale < 1.0 for _, _, scale in clipped)
            log.info(
                "Round %d: clipped %d of %d updates to L2 norm %g",
                server_round,
                record["clipped"],
                len(updates),
                self.clip_norm,
            )
            updates = [
                ClientUpdate(d, u.num_examples)
                for (d, _, _), u in zip(clipped, updates, strict=True)
            ]
        try:
            result = self.aggregator.aggregate(self.global_adapter, updates, self.scale)
        except ValueError as exc:
            log.warning(
                "Round %d: %s refused the replies (%s); the global adapter is unchanged",
                server_round,
                self.aggregator.name,
                exc,
            )
            self._finish_round(server_round, record)
            return None, None
        delta = result.delta
        if central_dp:
            assert self.dp is not None
            rng = np.random.default_rng()  # OS entropy: DP noise must not be predictable
            std = self.dp.settings.noise_std / len(updates)  # noise on the sum, of the mean
            delta = add_noise(delta, std, rng)
        if self.dp is not None and central_dp:
            record.update(self.dp.record_round(server_round).metrics())
        elif self.dp is not None:
            self._charge_secure_dp(server_round, record)
        new_global, opt_state = step(self.global_adapter, delta, self.opt_state, self.optimizer)
        residuals = add_residuals(self.residuals, result.residuals) if result.residuals else None
        bound = self.bounds.max_global_value  # beyond it the round fails (_fail_round)
        check_bounded(new_global, bound)
        check_bounded(residuals or {}, bound, "FedEx-LoRA's residuals")
        self.global_adapter = self.downlink.publish(new_global)
        self.opt_state = opt_state
        if residuals is not None:
            self.residuals = residuals
        self._finish_round(server_round, record)
        metrics = MetricRecord(
            {
                "train-loss": record["train-loss"],
                "num-examples": record["num-examples"],
                "num-replies": record["replies"],
            }
        )
        return to_array_record(self.global_adapter), metrics

    def _aggregate_secure(
        self, server_round: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One SecAgg+ round on the nodes configure_train sampled: the server sees sums only."""
        assert self.secagg is not None
        grid, nodes, content = self._secure_round or (None, [], None)
        self._secure_round = None
        down_bytes = sum(self._down_bytes.get(n, 0) for n in nodes)
        result: SecAggResult | None = None
        error = "no nodes sampled"
        rejected: dict[int, str] = {}
        settings: SecAggSettings | None = None
        if grid is not None and nodes and content is not None:
            try:
                settings = self._secagg_settings(len(nodes))
                result = secure_weighted_sum(
                    grid,
                    nodes,
                    content,
                    settings,
                    {k: v.shape for k, v in self.reply_spec.items()},
                    timeout=self.round_timeout,
                    group_id=str(server_round),
                )
            except FedloraError as exc:  # SecAggError, or any WireError from the nodes' input
                error = str(exc)
                rejected = dict(getattr(exc, "rejected", {}) or {})
        if result is None or settings is None:
            log.warning(
                "Round %d: secure aggregation failed (%s); the global adapter is unchanged",
                server_round,
                error,
            )
            for node in nodes:
                self._acknowledge(node, False)
            record = self._secure_record(server_round, None, len(nodes))
            record.update(
                {"skipped": True, "secagg-error": error, "rejected": rejected_list(rejected)}
            )
            self._finish_round(server_round, record)
            return None, None
        for node in nodes:
            self._acknowledge(node, node in result.contributors)
        record = self._secure_record(server_round, result, len(nodes))
        record["downlink-bytes"] = down_bytes
        if len(result.contributors) < max(self.min_train_nodes, 1):
            log.warning(
                "Round %d: %d contributors, fewer than the minimum %d; the global "
                "adapter is unchanged",
                server_round,
                len(result.contributors),
                self.min_train_nodes,
            )
            record["skipped"] = True
            if self.dp is not None:  # the noised sum was decoded: the server has seen it
                self._charge_secure_dp(server_round, record)
            self._finish_round(server_round, record)
            return None, None
        update, bounded = bound_secure_mean(
            as_client_update(result, self.global_adapter), settings.clip_norm, result.tolerance
        )
        record.update(bounded)
        if bounded.get("secagg-mean-clipped"):
            log.warning(
                "Round %d: the secure mean has L2 norm %.4g, beyond the clip %g every node "
                "applies: some node skipped its clip; the mean is projected back",
                server_round,
                bounded["secagg-mean-norm"],
                settings.clip_norm,
            )
        return self._apply(server_round, [update], record)

    def _charge_secure_dp(self, server_round: int, record: dict[str, Any]) -> None:
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

    def _secagg_settings(self, nodes: int) -> SecAggSettings:
        """The round's SecAgg+ settings; with DP the clip also covers each node's noise share."""
        assert self.secagg is not None
        settings = self.secagg(nodes)
        if self.dp is None:
            return settings
        dp = self.dp.settings
        values = sum(int(np.prod(v.shape)) for v in self.reply_spec.values())
        share = dp.noise_std / np.sqrt(nodes)
        # |clipped delta + noise| <= C + |noise|; |noise| concentrates at share * sqrt(values).
        needed = dp.clip_norm + share * (np.sqrt(values) + 10.0)
        if needed > settings.clip_norm:
            log.info(
                "SecAgg clip raised from %g to %.4g to hold the DP noise shares",
                settings.clip_norm,
                needed,
            )
            settings = dataclasses.replace(settings, clip_norm=float(needed))
        return settings

    def _secure_record(
        self, server_round: int, result: SecAggResult | None, asked: int
    ) -> dict[str, Any]:
        started = getattr(self, "_round_started", None)
        return secure_record(server_round, result, asked, self.site_name, started)

    def site_name(self, site_id: int, node_id: int) -> str:
        """The name of the site a node reports (an index into ``site_names``), else node-<id>."""
        if 0 <= site_id < len(self.site_names):
            return self.site_names[site_id]
        return f"node-{node_id}"

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.evaluates(server_round) or not self.federated_eval:
            return []  # aggregate_evaluate still completes the round (and the central eval)
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Complete the round with its evaluation; any exception fails the round (_fail_round)."""
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
        self, server_round: int, replies: Iterable[Message], record: dict[str, Any]
    ) -> MetricRecord | None:
        results: list[tuple[str, EvalReply]] = []
        rejected: list[dict[str, Any]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning(
                    "Round %d: node %s did not evaluate: %s", server_round, node, msg.error.reason
                )
                rejected.append(rejection(node, f"node error: {msg.error.reason}"))
                self._acknowledge(node, False)
                continue
            try:
                reply = EvalReply.from_content(msg.content)
            except WireError as exc:
                log.warning(
                    "Round %d: dropped eval reply from node %s: %s", server_round, node, exc
                )
                rejected.append(rejection(node, str(exc)))
                self._acknowledge(node, False)
                continue
            self._acknowledge(node, True)
            results.append((self.site_name(reply.site_id, node), reply))
        record["eval-dropped"] = len(rejected)
        record["eval-rejected"] = rejected
        metrics: dict[str, float] = {}
        if results:
            metrics = weighted_eval(capped_eval([r for _, r in results]))
            for name, r in results:
                site = record["sites"].setdefault(name, {})
                site.update({"eval-loss": r.loss, "eval-examples": r.num_examples})
                if r.accuracy is not None:
                    site["eval-accuracy"] = r.accuracy
            log.info(
                "Round %d | federated eval | loss %.4f | perplexity %.2f | accuracy %s | %d nodes",
                server_round,
                metrics["eval-loss"],
                metrics["eval-perplexity"],
                f"{metrics['eval-accuracy']:.4f}" if "eval-accuracy" in metrics else "n/a",
                len(results),
            )
            record.update(metrics)
        if self.central_eval is not None and self.evaluates(server_round):
            central = self.central_eval(server_round, self.global_adapter)
            record.update({f"central-{k}": v for k, v in central.items()})
            log.info(
                "Round %d | central eval | %s",
                server_round,
                ", ".join(f"{k} {v:.4f}" for k, v in central.items()),
            )
        self._complete_round(server_round, record)
        return MetricRecord(dict(metrics)) if metrics else None

    def _finish_round(self, server_round: int, record: dict[str, Any]) -> None:
        """Training is done; the round completes now, or after its evaluation."""
        if self.evaluates(server_round):
            self._pending = record
        else:
            self._complete_round(server_round, record)

    def _complete_round(self, server_round: int, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.on_round is not None:
            self.on_round(server_round, self.global_adapter, self.residuals, record)
        self._write_history(record)

    def _write_history(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl; a figure that is not finite is written as null."""
        if self.history_file is not None:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            with self.history_file.open("a") as fh:
                fh.write(json.dumps(finite(record), allow_nan=False) + "\n")

    def _snapshot(self) -> tuple[Any, ...]:
        """What a round changes, to restore when it fails (the downlink with its node table)."""
        downlink = copy.copy(self.downlink)
        downlink.acknowledged = dict(self.downlink.acknowledged)
        return self.global_adapter, self.opt_state, self.residuals, downlink, dict(self._sent)

    def _fail_round(
        self, server_round: int, exc: BaseException, record: dict[str, Any] | None = None
    ) -> None:
        """The round fails cleanly: the state it started from comes back (the previous global
        adapter), the record says why (``failed``, ``failure``), the checkpoint and report are
        written for it as for any round, and the next round runs. Nothing raised here ends the
        run: a failing checkpoint or report is logged and recorded."""
        cause = rejection(0, f"{type(exc).__name__}: {exc}")["error"]
        log.warning(
            "Round %d failed (%s); the global adapter is unchanged and the run goes on",
            server_round,
            cause,
        )
        if self._saved is not None:
            (self.global_adapter, self.opt_state, self.residuals, self.downlink, self._sent) = (
                self._saved
            )
        self._pending = None
        if self.history and self.history[-1].get("round") == server_round:
            record = self.history.pop()  # appended before saving it raised
        failed = dict(record or {"round": server_round, "sites": {}})
        failed.update({"round": server_round, "skipped": True, "failed": True, "failure": cause})
        self.history.append(failed)
        if self.on_round is not None:
            try:
                self.on_round(server_round, self.global_adapter, self.residuals, failed)
            except Exception as again:  # noqa: BLE001 -- recorded; the run goes on
                log.warning("Round %d: saving the failed round failed too: %s", server_round, again)
                failed["save-failure"] = rejection(0, f"{type(again).__name__}: {again}")["error"]
        try:
            self._write_history(failed)
        except (OSError, TypeError, ValueError) as again:
            log.warning("Round %d: metrics.jsonl not written: %s", server_round, again)
