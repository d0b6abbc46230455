"""Nodes' replies, checked: the one reply-check helper and the per-reply bounds of a round.

:func:`check_replies` passes every reply through its decoding gate (fedlora.protocol.gate via
``TrainReply.from_content`` / ``EvalReply.from_content``): an error reply or any WireError is
logged in one line naming the node, becomes a rejection for the round record, and is dropped.
The usable replies are then bounded in value (fedlora.server.bounds): example weights capped,
deltas norm-clipped, each change logged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from flwr.app import Message, RecordDict

from fedlora.errors import WireError
from fedlora.protocol.messages import EvalReply, TrainReply
from fedlora.server.bounds import ReplyBounds, bound_norms, cap_examples
from fedlora.server.records import capped_eval, rejection, weighted_eval
from fedlora.server.strategies import ClientUpdate

log = logging.getLogger(__name__)

R = TypeVar("R")


def check_replies(
    server_round: int,
    replies: Iterable[Message],
    decode: Callable[[RecordDict], R],
    acknowledge: Callable[[int, bool], None],
    what: str = "train",
) -> tuple[list[tuple[int, R]], list[dict[str, Any]]]:
    """``(node, decoded reply)`` for each usable reply, and a rejection for each other one;
    ``acknowledge(node, usable)`` is told of each reply in turn (the downlink's node table)."""
    accepted: list[tuple[int, R]] = []
    rejected: list[dict[str, Any]] = []
    failed, dropped = ("failed", "reply") if what == "train" else ("did not evaluate", "eval reply")
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            log.warning("Round %d: node %s %s: %s", server_round, node, failed, msg.error.reason)
            rejected.append(rejection(node, f"node error: {msg.error.reason}"))
            acknowledge(node, False)
            continue
        try:
            reply = decode(msg.content)
        except WireError as exc:
            log.warning("Round %d: dropped %s from node %s: %s", server_round, dropped, node, exc)
            rejected.append(rejection(node, str(exc)))
            acknowledge(node, False)
            continue
        acknowledge(node, True)
        accepted.append((node, reply))
    return accepted, rejected


def cap_weights(
    server_round: int, accepted: list[TrainReply], nodes: list[int], bounds: ReplyBounds
) -> tuple[list[TrainReply], dict[str, Any]]:
    """The replies with their example weights capped (server/bounds.py), and the record's
    fields saying which and to what."""
    weights, capped = cap_examples([r.num_examples for r in accepted], nodes, bounds)
    for entry in capped["weight-capped"]:
        log.warning(
            "Round %d: node %s claimed %d examples; weighed as %d (max-examples)",
            server_round,
            entry["node"],
            entry["claimed"],
            capped["max-examples"],
        )
    pairs = zip(accepted, weights, strict=True)
    return [dataclasses.replace(r, num_examples=w) for r, w in pairs], capped


def bound_updates(
    server_round: int,
    updates: list[ClientUpdate],
    names: list[str],
    nodes: list[int],
    bounds: ReplyBounds,
    record: dict[str, Any],
) -> list[ClientUpdate]:
    """The updates with each delta clipped to the round's norm bound (server/bounds.py);
    the record gets the bound, the clipped nodes and every site's norm."""
    updates, norms, bounded = bound_norms(updates, nodes, bounds)
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


def record_evaluation(
    server_round: int, results: list[tuple[str, EvalReply]], record: dict[str, Any]
) -> dict[str, float]:
    """The example-weighted evaluation metrics (capped weights), each site's figures added to
    the round record, and one summary line logged."""
    if not results:
        return {}
    metrics = weighted_eval(capped_eval([r for _, r in results]))
    for name, r in results:
        site = record["sites"].setdefault(name, {})
        site.update({"eval-loss": r.loss, "eval-examples": r.num_examples})
        if r.accuracy is not None:
            site["eval-accuracy"] = r.accuracy
        if r.pref_accuracy is not None:  # DPO (client/dpo.py)
            site.update(
                {"eval-pref-accuracy": r.pref_accuracy, "eval-reward-margin": r.reward_margin}
            )
    if "eval-pref-accuracy" in metrics:  # DPO: the held-out pairs' figures, not an accuracy
        scores = (
            f"preference accuracy {metrics['eval-pref-accuracy']:.4f} | "
            f"reward margin {metrics['eval-reward-margin']:+.4f}"
        )
    else:
        value = metrics.get("eval-accuracy")
        scores = f"accuracy {'n/a' if value is None else f'{value:.4f}'}"
    log.info(
        "Round %d | federated eval | loss %.4f | perplexity %.2f | %s | %d nodes",
        server_round,
        metrics["eval-loss"],
        metrics["eval-perplexity"],
        scores,
        len(results),
    )
    record.update(metrics)
    return metrics
