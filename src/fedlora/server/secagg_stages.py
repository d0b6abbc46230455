"""The four server stages of SecAgg+ over a Flower Grid (Bell et al., CCS 2020; Bonawitz et al.,
CCS 2017), and the reconstruction that removes the masks.

The server keeps the running *sum* of masked vectors only. Sets of nodes follow Bonawitz et al.:
U1 answered setup (public keys), U2 shared keys, U3 sent masked vectors, U4 answered unmask.
Used by :func:`fedlora.server.secagg.secure_weighted_sum`; everything here raises
:class:`SecAggError` on failure and never returns a partial sum.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlora.errors import FedloraError
from fedlora.protocol import secagg_crypto as crypto
from fedlora.protocol.secagg import (
    MESSAGE_TYPE,
    Key,
    SecAggSettings,
    Spec,
    Stage,
    reduce_mod,
    vector_length,
)

log = logging.getLogger(__name__)


class SecAggError(FedloraError, RuntimeError):
    """Secure aggregation failed this round (too few nodes, shares or valid replies).

    Nothing was aggregated: the caller keeps its global adapter unchanged.
    """


@dataclass
class Session:
    """What the server holds during one secure aggregation: keys, graph, and one running sum."""

    settings: SecAggSettings
    spec: Spec
    group_id: str
    session: str = field(default_factory=lambda: secrets.token_hex(16))
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (c_pk, s_pk)
    neighbours: dict[int, set[int]] = field(default_factory=dict)  # includes the node itself
    forwards: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # dst -> (src, ct)
    masked_with: dict[int, set[int]] = field(default_factory=dict)  # U3 node -> its pair masks
    total: np.ndarray | None = None  # Σ masked vectors mod 2**modulus_bits
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: serialized arrays, bytes/str values, 8 per number."""
    n = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in list(content.config_records.values()) + list(content.metric_records.values()):
        for value in rec.values():
            for v in value if isinstance(value, list) else [value]:
                n += len(v) if isinstance(v, bytes | str) else 8
    return n


def neighbour_graph(
    nodes: Iterable[int], num_shares: int, rng: random.Random | None = None
) -> dict[int, set[int]]:
    """SecAgg+'s sparse graph: a random ring, each node joined to ``num_shares - 1`` others.

    Nodes sit on a ring in random order and each is joined to the ``h = (num_shares - 1) // 2``
    nearest on either side (a Harary graph, Bell et al. §3); with ``num_shares - 1`` odd and an
    even ring, also to the opposite node. ``num_shares >= len(nodes)`` gives the complete graph
    (classic SecAgg). Each set includes the node itself (it keeps one share).
    """
    order = sorted(nodes)
    (rng or random.SystemRandom()).shuffle(order)
    n = len(order)
    if num_shares >= n:
        return {u: set(order) for u in order}
    h = (num_shares - 1) // 2
    graph = {u: {order[(i + d) % n] for d in range(-h, h + 1)} for i, u in enumerate(order)}
    if (num_shares - 1) % 2 == 1:
        if n % 2 == 0:
            for i, u in enumerate(order):
                graph[u].add(order[(i + n // 2) % n])
        else:  # an odd ring cannot take one more edge each: one more on each side instead
            log.info(
                "secagg: num_shares %d on %d nodes: each node gets %d shares",
                num_shares,
                n,
                num_shares + 1,
            )
            graph = {
                u: {order[(i + d) % n] for d in range(-h - 1, h + 2)} for i, u in enumerate(order)
            }
    return graph


def exchange(
    grid: Grid, session: Session, stage: str, contents: dict[int, RecordDict], timeout: float | None
) -> dict[int, RecordDict]:
    """Send one stage to each node; return the valid replies by node (errors count as none)."""
    start = time.perf_counter()
    messages = []
    for node, content in contents.items():
        content.config_records[Key.CONFIG][Key.STAGE] = stage
        content.config_records[Key.CONFIG][Key.SESSION] = session.session
        messages.append(
            Message(
                content=content,
                dst_node_id=node,
                message_type=MESSAGE_TYPE,
                group_id=session.group_id,
            )
        )
    session.bytes_sent[stage] = sum(record_bytes(c) for c in contents.values())
    replies: dict[int, RecordDict] = {}
    received = 0
    for msg in grid.send_and_receive(messages, timeout=timeout):
        node = msg.metadata.src_node_id
        if msg.has_error():
            log.warning("secagg %s: node %s failed: %s", stage, node, msg.error.reason)
            continue
        received += record_bytes(msg.content)
        cfg = msg.content.config_records.get(Key.CONFIG)
        if (
            node not in contents
            or cfg is None
            or cfg.get(Key.STAGE) != stage
            or cfg.get(Key.SESSION) != session.session
        ):
            log.warning(
                "secagg %s: ignored a reply from node %s (wrong stage or session)", stage, node
            )
            continue
        replies[node] = msg.content
    session.bytes_received[stage] = received
    session.seconds[stage] = time.perf_counter() - start
    missing = sorted(set(contents) - set(replies))
    if missing:
        log.info("secagg %s: no valid reply from %d node(s): %s", stage, len(missing), missing)
    return replies


def setup(
    grid: Grid, s: Session, nodes: list[int], train_content: RecordDict, timeout: float | None
) -> list[int]:
    """Stage 0: the train content and settings out; two public keys back from each node (U1)."""
    cfg = ConfigRecord(
        {
            **s.settings.to_record(),
            Key.NAMES: sorted(s.spec),
            Key.SIZES: [int(np.prod(s.spec[k])) for k in sorted(s.spec)],
        }
    )
    contents = {
        n: RecordDict({**train_content, Key.CONFIG: ConfigRecord(dict(cfg))}) for n in nodes
    }
    for node, content in exchange(grid, s, Stage.SETUP, contents, timeout).items():
        cfg_in = content.config_records[Key.CONFIG]
        c_pk, s_pk = cfg_in.get(Key.C_PK), cfg_in.get(Key.S_PK)
        if isinstance(c_pk, bytes) and isinstance(s_pk, bytes):
            s.keys[node] = (c_pk, s_pk)
    shown: dict[bytes, int] = {}
    for pair in s.keys.values():
        for key in set(pair):
            shown[key] = shown.get(key, 0) + 1
    for node in sorted(s.keys):  # a key shown twice is dropped with every node showing it
        if s.keys[node][0] == s.keys[node][1] or any(shown[k] > 1 for k in s.keys[node]):
            log.warning("secagg %s: node %s reused a public key; left out", Stage.SETUP, node)
            del s.keys[node]
    return sorted(s.keys)


def share_keys(grid: Grid, s: Session, u1: list[int], timeout: float | None) -> list[int]:
    """Stage 1: each node gets its neighbours' keys, returns one encrypted share per neighbour."""
    s.neighbours = neighbour_graph(u1, s.settings.num_shares)
    contents = {}
    for node in u1:
        nb = sorted(s.neighbours[node])
        contents[node] = RecordDict(
            {
                Key.CONFIG: ConfigRecord(
                    {
                        Key.NODES: nb,
                        Key.C_PK: [s.keys[v][0] for v in nb],
                        Key.S_PK: [s.keys[v][1] for v in nb],
                    }
                )
            }
        )
    s.forwards = {n: [] for n in u1}
    u2 = []
    for node, content in exchange(grid, s, Stage.SHARE_KEYS, contents, timeout).items():
        cfg = content.config_records[Key.CONFIG]
        dsts, cts = cast(list[int], cfg.get(Key.DSTS)), cast(list[bytes], cfg.get(Key.CIPHERTEXTS))
        if (
            not isinstance(dsts, list)
            or not isinstance(cts, list)
            or len(dsts) != len(cts)
            or sorted(dsts) != sorted(s.neighbours[node] - {node})
        ):
            log.warning(
                "secagg %s: node %s sent shares for the wrong nodes", Stage.SHARE_KEYS, node
            )
            continue
        u2.append(node)
        for dst, ct in zip(dsts, cts, strict=True):
            s.forwards[dst].append((node, ct))
    return sorted(u2)


def collect(grid: Grid, s: Session, u2: list[int], timeout: float | None) -> list[int]:
    """Stage 2: shares forwarded (from U2 only); masked vectors summed as they come (U3)."""
    ok = set(u2)
    contents, srcs_of = {}, {}
    for node in u2:
        fwd = [(src, ct) for src, ct in s.forwards[node] if src in ok]
        srcs_of[node] = {src for src, _ in fwd}
        contents[node] = RecordDict(
            {
                Key.CONFIG: ConfigRecord(
                    {Key.SRCS: [src for src, _ in fwd], Key.CIPHERTEXTS: [ct for _, ct in fwd]}
                )
            }
        )
    s.forwards = {}
    length = vector_length(s.spec)
    total = np.zeros(length, dtype=np.uint64)
    for node, content in exchange(grid, s, Stage.COLLECT, contents, timeout).items():
        try:
            vec = content.array_records[Key.MASKED][Key.VECTOR].numpy()
        except KeyError:
            vec = None
        if vec is None or vec.dtype != np.uint64 or vec.shape != (length,):
            log.warning("secagg %s: node %s sent no valid masked vector", Stage.COLLECT, node)
            continue
        np.add(total, vec, out=total)
        s.masked_with[node] = srcs_of[node]
        metrics = content.metric_records.get(Key.METRICS)
        s.metrics[node] = dict(metrics) if metrics is not None else {}
    s.total = reduce_mod(total, s.settings.modulus_bits)
    return sorted(s.masked_with)


def unmask(
    grid: Grid, s: Session, u2: list[int], u3: list[int], timeout: float | None
) -> np.ndarray:
    """Stage 3: b-shares of U3 and s_sk-shares of U2 \\ U3 in; the unmasked sum out."""
    t, bits = s.settings.reconstruction_threshold, s.settings.modulus_bits
    alive, gone = set(u3), set(u2) - set(u3)
    contents = {
        n: RecordDict(
            {
                Key.CONFIG: ConfigRecord(
                    {
                        Key.ALIVE: sorted((s.masked_with[n] | {n}) & alive),
                        Key.DROPPED: sorted(s.masked_with[n] & gone),
                    }
                )
            }
        )
        for n in u3
    }
    b_shares: dict[int, list[bytes]] = {n: [] for n in alive}
    sk_shares: dict[int, list[bytes]] = {n: [] for n in gone}
    for node, content in exchange(grid, s, Stage.UNMASK, contents, timeout).items():
        cfg = content.config_records[Key.CONFIG]
        want = contents[node].config_records[Key.CONFIG]
        if cfg.get(Key.B_OWNERS) != want[Key.ALIVE] or cfg.get(Key.SK_OWNERS) != want[Key.DROPPED]:
            log.warning("secagg %s: node %s answered for other nodes", Stage.UNMASK, node)
            continue
        for owner, share in zip(want[Key.ALIVE], cast(list[bytes], cfg[Key.B_SHARES]), strict=True):
            b_shares[cast(int, owner)].append(share)
        for owner, share in zip(
            want[Key.DROPPED], cast(list[bytes], cfg[Key.SK_SHARES]), strict=True
        ):
            sk_shares[cast(int, owner)].append(share)
    start = time.perf_counter()
    total = cast(np.ndarray, s.total)
    for node in sorted(alive):  # remove each contributor's self mask
        seed = _rebuild(b_shares[node], t, f"self-mask seed of node {node}")
        if len(seed) != crypto.SEED_BYTES:
            raise SecAggError(f"rebuilt self-mask seed of node {node} has the wrong length")
        crypto.add_mask(total, seed, bits, -1)
    for node in sorted(gone):  # remove pair masks that contributors share with dropped nodes
        partners = [u for u in sorted(alive) if node in s.masked_with[u]]
        if not partners:
            continue
        s_sk = _rebuild(sk_shares[node], t, f"mask key of dropped node {node}")
        try:
            ok = crypto.public_of(s_sk) == s.keys[node][1]
        except ValueError:
            ok = False
        if not ok:
            raise SecAggError(
                f"rebuilt mask key of dropped node {node} does not match its "
                f"public key: a share was wrong"
            )
        for u in partners:
            crypto.add_mask(
                total, crypto.agree(s_sk, s.keys[u][1]), bits, -crypto.pair_sign(u, node)
            )
    s.seconds["reconstruct"] = time.perf_counter() - start
    return reduce_mod(total, bits)


def _rebuild(shares: list[bytes], threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise SecAggError(
            f"{len(shares)} shares of the {what}, fewer than the threshold "
            f"{threshold}: too few nodes survived to unmask"
        )
    try:
        return crypto.join_shares(shares[:threshold])
    except ValueError as exc:
        raise SecAggError(f"could not rebuild the {what}: {exc}") from None
