"""The round record: what ``metrics.jsonl`` holds for a round, built from the replies.

Plain rounds list every site (its train figures, its delta's norm once bounded); secure rounds
only the sums of the scalars inside the masked vectors. Federated evaluation weighs nodes by
scored tokens (loss) and examples (accuracy), each weight capped as train weights are
(server/bounds.py). :func:`finite` makes a record strict JSON (non-finite figures as null).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.protocol.messages import EvalReply, TrainReply
from fedlora.server.aggregate import cap_weights
from fedlora.server.bounds import EXAMPLES_FACTOR
from fedlora.server.secagg import SecAggResult

log = logging.getLogger(__name__)
SITE_LINES = 10  # more replies than this: one aggregate line per round, per-site lines at debug


def plain_record(
    server_round: int,
    accepted: list[TrainReply],
    names: list[str],
    rejected: list[dict[str, Any]],
    started: float | None,
    downlink_bytes: int,
) -> dict[str, Any]:
    """The round record from the accepted plain replies: per site and aggregated."""
    n = sum(r.num_examples for r in accepted)
    sites = {}
    for name, r in zip(names, accepted, strict=True):
        sites[name] = {
            "train-loss": r.train_loss,
            "num-examples": r.num_examples,
            "train-seconds": r.train_seconds,
            "load-seconds": r.load_seconds,
            "train-tokens": r.train_tokens,
            "bytes-sent": r.bytes_sent,
            "bytes-received": r.bytes_received,
        }
        log.log(
            logging.INFO if len(accepted) <= SITE_LINES else logging.DEBUG,
            "Round %d | site %-12s | loss %.4f | examples %4d | %.1f s",
            server_round,
            name,
            r.train_loss,
            r.num_examples,
            r.train_seconds,
        )
    loss = sum(r.train_loss * r.num_examples for r in accepted) / n if n else float("nan")
    log.info(
        "Round %d | %-17s | loss %.4f | examples %4d | %d replies, %d dropped",
        server_round,
        "aggregate",
        loss,
        n,
        len(accepted),
        len(rejected),
    )
    seconds = time.monotonic() - started if started is not None else float("nan")
    return {
        "round": server_round,
        "train-loss": loss,
        "num-examples": n,
        "replies": len(accepted),
        "dropped": len(rejected),
        "rejected": rejected,
        "seconds": seconds,
        "sites": sites,
        "bytes-sent": sum(r.bytes_sent for r in accepted),
        "bytes-received": sum(r.bytes_received for r in accepted),
        "downlink-bytes": downlink_bytes,
    }


def secure_record(
    server_round: int,
    result: SecAggResult | None,
    asked: int,
    site_name: Callable[[int, int], str],
    started: float | None,
) -> dict[str, Any]:
    """The round record from the sums of the scalars inside the masked vectors.

    Per site only its participation is known (the clear site index); losses, examples,
    seconds and the clipped flags are sums over the contributors.
    """
    sites: dict[str, Any] = {}
    for node, m in (result.metrics if result else {}).items():
        sites[site_name(int(m.get("site-id", -1)), node)] = {}
    sums = result.scalars if result else {}
    n = int(sums.get("num-examples", 0))
    loss = result.train_loss if result else float("nan")
    record: dict[str, Any] = {
        "round": server_round,
        "train-loss": loss,
        "num-examples": n,
        "replies": len(result.contributors) if result else 0,
        "dropped": asked - (len(result.contributors) if result else 0),
        "seconds": time.monotonic() - started if started is not None else float("nan"),
        "sites": sites,
        "secure-aggregation": True,
        "asked": asked,
    }
    if result is not None:
        record.update(
            {
                "rejected": rejected_list(result.rejected),
                "secagg-clipped": result.num_clipped,
                "secagg-weight-capped": int(sums.get("secagg-weight-capped", 0)),
                "dp-noised": int(sums.get("dp-noised", 0)),
                "train-seconds-sum": sums.get("train-seconds", 0.0),
                "load-seconds-sum": sums.get("load-seconds", 0.0),
                "train-tokens": int(sums.get("train-tokens", 0)),
                "secagg-tolerance": result.tolerance,
                "secagg-seconds": result.seconds,
                "bytes-sent": sum(result.bytes_sent.values()),
                "bytes-received": sum(result.bytes_received.values()),
            }
        )
        log.info(
            "Round %d | secure aggregate | loss %.4f | examples %4d | %d of %d nodes, "
            "%d clipped | %.1f s",
            server_round,
            loss,
            n,
            len(result.contributors),
            asked,
            result.num_clipped,
            result.seconds.get("total", float("nan")),
        )
    return record


def capped_eval(results: list[EvalReply]) -> list[EvalReply]:
    """Eval replies with their weights (examples, tokens) capped as train weights are
    (server/bounds.py), so one node's claim cannot decide the federated figures."""
    for field in ("num_examples", "tokens"):
        claims = [getattr(r, field) for r in results]
        weights, _ = cap_weights(claims, 0, EXAMPLES_FACTOR)
        results = [
            dataclasses.replace(r, **{field: w}) for r, w in zip(results, weights, strict=True)
        ]
    return results


def finite(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None, for strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def rejection(node: int, reason: str, limit: int = 300) -> dict[str, Any]:
    """A dropped reply in the round record: the node and why (one line, bounded)."""
    reason = " ".join(reason.split())
    return {"node": node, "error": reason if len(reason) <= limit else reason[: limit - 3] + "..."}


def rejected_list(rejected: dict[int, str]) -> list[dict[str, Any]]:
    """Nodes whose secure replies were refused (treated as dropouts), as the plain path lists
    rejected replies in the round record."""
    return [{"node": node, "error": why} for node, why in sorted(rejected.items())]


def weighted_eval(results: list[EvalReply]) -> dict[str, float]:
    """Eval loss (per scored token), perplexity, accuracy and (DPO) preference accuracy and
    reward margin over nodes, weighted.

    Loss is weighted by scored tokens (so it is the loss over all nodes' eval tokens) and
    perplexity is its exponential; accuracy is weighted by eval examples over the nodes that
    report one.
    """
    tokens = sum(r.tokens for r in results)
    if tokens > 0:
        loss = sum(r.loss * r.tokens for r in results) / tokens
    else:
        loss = sum(r.loss * r.num_examples for r in results) / sum(r.num_examples for r in results)
    out = {
        "eval-loss": loss,
        "eval-perplexity": float(np.exp(min(loss, 50.0))),
        "eval-examples": float(sum(r.num_examples for r in results)),
    }
    scored = [r for r in results if r.accuracy is not None]
    if scored:
        n = sum(r.num_examples for r in scored)
        out["eval-accuracy"] = sum(float(r.accuracy or 0.0) * r.num_examples for r in scored) / n
    pairs = [r for r in results if r.pref_accuracy is not None and r.reward_margin is not None]
    if pairs:  # DPO (client/dpo.py): weighted by held-out pairs
        n = sum(r.num_examples for r in pairs)
        for key, field in (
            ("eval-pref-accuracy", "pref_accuracy"),
            ("eval-reward-margin", "reward_margin"),
        ):
            out[key] = sum(float(getattr(r, field)) * r.num_examples for r in pairs) / n
    return out


def append_line(path: Path | None, record: dict[str, Any]) -> None:
    """One line of metrics.jsonl; a figure that is not finite is written as null."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps(finite(record), allow_nan=False) + "\n")


def failed_record(
    history: list[dict[str, Any]], server_round: int, cause: str, record: dict[str, Any] | None
) -> dict[str, Any]:
    """The record of a failed round, in place of any record of it already in ``history``."""
    if history and history[-1].get("round") == server_round:
        record = history.pop()  # appended before saving it raised
    failed = dict(record or {"round": server_round, "sites": {}})
    failed.update({"round": server_round, "skipped": True, "failed": True, "failure": cause})
    history.append(failed)
    return failed
