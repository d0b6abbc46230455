"""The four server stages of SecAgg+ over a Flower Grid (Bell et al., CCS 2020; Bonawitz et al.,
CCS 2017), and the reconstruction that removes the masks.

The server keeps the running *sum* of masked vectors only. Sets of nodes follow Bonawitz et al.:
U1 answered setup (public keys), U2 shared keys, U3 sent masked vectors, U4 answered unmask.
Used by :func:`fedlora.server.secagg.secure_weighted_sum`; everything here raises
:class:`SecAggError` on failure and never returns a partial sum.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlora.errors import FedloraError
from fedlora.protocol import secagg_crypto as crypto
from fedlora.protocol.secagg import (
    MAX_CIPHERTEXT_BYTES,
    MESSAGE_TYPE,
    Key,
    SecAggProtocolError,
    SecAggSettings,
    Spec,
    Stage,
    bytes_list,
    check_metrics,
    check_share,
    config_field,
    id_list,
    reduce_mod,
    vector_length,
)
from fedlora.protocol.secagg_auth import (
    MAX_SIGNATURE_BYTES,
    MAX_SIGNER_CHARS,
    NONCE_BYTES,
    round_id,
)
from fedlora.protocol.secagg_graph import neighbour_graph

log = logging.getLogger(__name__)


class SecAggError(FedloraError, RuntimeError):
    """Secure aggregation failed this round (too few nodes, shares or valid replies).

    Nothing was aggregated: the caller keeps its global adapter unchanged. ``rejected`` names
    the nodes whose replies were invalid before the round failed (node -> reason).
    """

    rejected: dict[int, str] = {}  # noqa: RUF012 - replaced per instance by the caller


MAX_SUBSETS = 64  # share subsets tried per secret before a reconstruction fails


@dataclass
class Session:
    """What the server holds during one secure aggregation: keys, graph, and one running sum."""

    settings: SecAggSettings
    spec: Spec
    group_id: str
    session: str = field(default_factory=lambda: secrets.token_hex(16))
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (c_pk, s_pk)
    nonces: dict[int, bytes] = field(default_factory=dict)  # node -> its fresh nonce
    round_id: bytes = b""  # from the session and U1's keys and nonces (share-keys on)
    # node -> (signature of its keys, its roster name); (b"", "") from an unsigned node
    signed: dict[int, tuple[bytes, str]] = field(default_factory=dict)
    commits: dict[int, bytes] = field(default_factory=dict)  # node -> commitment to its seed
    neighbours: dict[int, set[int]] = field(default_factory=dict)  # includes the node itself
    forwards: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # dst -> (src, ct)
    u2: list[int] = field(default_factory=list)  # nodes that shared keys (U2)
    masked_with: dict[int, set[int]] = field(default_factory=dict)  # U3 node -> its pair masks
    survivors_signed: dict[int, bytes] = field(default_factory=dict)  # node -> its U3 signature
    total: np.ndarray | None = None  # Σ masked vectors mod 2**modulus_bits
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)  # node -> why its reply was invalid

    def reject(self, stage: str, node: int, reason: str) -> None:
        """Treat ``node`` as dropped from ``stage`` on: its reply was invalid."""
        log.warning("secagg %s: node %s rejected (a dropout): %s", stage, node, reason)
        self.rejected[node] = f"{stage}: {reason}"


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: serialized arrays, bytes/str values, 8 per number."""
    n = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in list(content.config_records.values()) + list(content.metric_records.values()):
        for value in rec.values():
            for v in value if isinstance(value, list) else [value]:
                n += len(v) if isinstance(v, bytes | str) else 8
    return n


def exchange(
    grid: Grid, session: Session, stage: str, contents: dict[int, RecordDict], timeout: float | None
) -> dict[int, RecordDict]:
    """Send one stage to each node; return the replies by node (errors count as none).

    A reply for this stage and session from a node that was asked is returned once; a reply
    of another stage or session rejects its node, duplicates and strangers are ignored.
    """
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
        if node not in contents or node in replies or node in session.rejected:
            log.warning("secagg %s: ignored an unexpected reply from node %s", stage, node)
            continue
        cfg = msg.content.config_records.get(Key.CONFIG)
        if cfg is None or cfg.get(Key.STAGE) != stage or cfg.get(Key.SESSION) != session.session:
            session.reject(stage, node, "the reply names another stage or session")
            continue
        replies[node] = msg.content
    session.bytes_received[stage] = received
    session.seconds[stage] = time.perf_counter() - start
    missing = sorted(set(contents) - set(replies))
    if missing:
        log.info("secagg %s: no valid reply from %d node(s): %s", stage, len(missing), missing)
    return replies


def reply_config(
    content: RecordDict, fields: set[str], what: str, records: set[str]
) -> ConfigRecord:
    """The reply's config record after checking record names and its exact field names."""
    names = set(content.keys())
    if names != records | {Key.CONFIG}:
        raise SecAggProtocolError(
            f"{what}: records {sorted(names)[:5]}, expected {sorted(records | {Key.CONFIG})}"
        )
    cfg = content.config_records.get(Key.CONFIG)
    if cfg is None:
        raise SecAggProtocolError(f"{what}: {Key.CONFIG!r} is not a config record")
    want = fields | {Key.STAGE, Key.SESSION}
    if set(cfg.keys()) != want:
        raise SecAggProtocolError(
            f"{what}: config fields {sorted(cfg.keys())[:8]}, expected {sorted(want)}"
        )
    return cfg


def parse_setup_reply(content: RecordDict, what: str) -> tuple[bytes, bytes, bytes, bytes, str]:
    """``(c_pk, s_pk, nonce, signature, signer)``: two distinct P-384 public keys in PEM, the
    node's fresh nonce, and its signature of them with its roster name (``b""``, ``""`` from an
    unsigned node; the nodes check signatures against their own rosters, the server only relays
    them)."""
    signed = Key.SIGNATURE in content.config_records.get(Key.CONFIG, {})
    fields = {Key.C_PK, Key.S_PK, Key.NONCE} | ({Key.SIGNATURE, Key.SIGNER} if signed else set())
    cfg = reply_config(content, fields, what, set())
    c_pk = config_field(cfg, Key.C_PK, bytes, what)
    s_pk = config_field(cfg, Key.S_PK, bytes, what)
    nonce = config_field(cfg, Key.NONCE, bytes, what)
    if len(nonce) != NONCE_BYTES:
        raise SecAggProtocolError(f"{what}: a nonce of {len(nonce)} bytes, expected {NONCE_BYTES}")
    for key, value in ((Key.C_PK, c_pk), (Key.S_PK, s_pk)):
        if not crypto.is_public_key(value):
            raise SecAggProtocolError(f"{what}: {key!r} is not a P-384 public key in PEM")
    if c_pk == s_pk:
        raise SecAggProtocolError(f"{what}: the two public keys are the same")
    if not signed:
        return c_pk, s_pk, nonce, b"", ""
    signature = config_field(cfg, Key.SIGNATURE, bytes, what)
    signer = config_field(cfg, Key.SIGNER, str, what)
    if not 0 < len(signature) <= MAX_SIGNATURE_BYTES or not 0 < len(signer) <= MAX_SIGNER_CHARS:
        raise SecAggProtocolError(
            f"{what}: a signature of {len(signature)} bytes by a name of {len(signer)} "
            f"characters; expected 1..{MAX_SIGNATURE_BYTES} and 1..{MAX_SIGNER_CHARS}"
        )
    return c_pk, s_pk, nonce, signature, signer


def parse_share_keys_reply(
    content: RecordDict, what: str, neighbours: set[int]
) -> tuple[list[tuple[int, bytes]], bytes]:
    """``([(dst, ciphertext)], commitment)``: a ciphertext for each of ``neighbours``, and the
    32-byte commitment to the self-mask seed whose shares they hold."""
    cfg = reply_config(content, {Key.DSTS, Key.CIPHERTEXTS, Key.B_COMMIT}, what, set())
    commitment = config_field(cfg, Key.B_COMMIT, bytes, what)
    if len(commitment) != 32:
        raise SecAggProtocolError(
            f"{what}: {Key.B_COMMIT!r} has {len(commitment)} bytes, expected 32"
        )
    dsts = id_list(cfg, Key.DSTS, what)
    cts = bytes_list(cfg, Key.CIPHERTEXTS, what, len(dsts), MAX_CIPHERTEXT_BYTES)
    if set(dsts) != neighbours:
        raise SecAggProtocolError(
            f"{what}: shares for nodes {sorted(dsts)[:6]}, expected {sorted(neighbours)[:6]}"
        )
    return list(zip(dsts, cts, strict=True)), commitment


@functools.lru_cache(maxsize=64)
def _npy_size(length: int, dtype: str = "uint64") -> int:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(length, dtype=dtype), allow_pickle=False)
    return len(buffer.getvalue())


def parse_masked_vector(
    arr: Any, length: int, modulus_bits: int, what: str, dtype: str = "uint64"
) -> np.ndarray:
    """The masked vector: exactly ``dtype`` (the wire's: uint16, uint32 or uint64),
    ``(length,)``, below the modulus; checked before np.load."""
    size = _npy_size(length, dtype)
    if not isinstance(arr, Array):
        raise SecAggProtocolError(f"{what}: {Key.VECTOR!r} is not an array")
    if (
        arr.stype != "numpy.ndarray"
        or arr.dtype != dtype
        or not isinstance(arr.shape, list | tuple)
        or list(arr.shape) != [length]
        or not isinstance(arr.data, bytes)
        or len(arr.data) != size
    ):
        raise SecAggProtocolError(
            f"{what}: masked vector {arr.stype!r} {arr.dtype!r} {arr.shape!r} of "
            f"{len(arr.data) if isinstance(arr.data, bytes) else '?'} bytes, expected a numpy "
            f"{dtype} ({length},) of {size} bytes"
        )
    try:
        vec = arr.numpy()
    except Exception as exc:  # noqa: BLE001 - np.load of network bytes: any failure is a refusal
        raise SecAggProtocolError(f"{what}: the masked vector does not load: {exc}") from None
    if vec.dtype != np.dtype(dtype) or vec.shape != (length,):
        raise SecAggProtocolError(f"{what}: the masked vector loads as {vec.dtype} {vec.shape}")
    if modulus_bits < 8 * vec.itemsize and length and int(vec.max()) >= 2**modulus_bits:
        raise SecAggProtocolError(f"{what}: the masked vector has values >= 2**{modulus_bits}")
    return vec


def parse_collect_reply(
    content: RecordDict, what: str, length: int, modulus_bits: int, dtype: str = "uint64"
) -> tuple[np.ndarray, dict[str, int | float]]:
    """``(masked vector, whitelisted metrics)`` of a collect reply."""
    reply_config(content, set(), what, {Key.MASKED, Key.METRICS})
    arrays = content.array_records.get(Key.MASKED)
    metrics = content.metric_records.get(Key.METRICS)
    if arrays is None or metrics is None:
        raise SecAggProtocolError(
            f"{what}: {Key.MASKED!r} must be an array record and {Key.METRICS!r} a metric record"
        )
    if list(arrays.keys()) != [Key.VECTOR]:
        raise SecAggProtocolError(
            f"{what}: arrays {sorted(arrays.keys())[:5]}, expected [{Key.VECTOR!r}]"
        )
    vec = parse_masked_vector(arrays[Key.VECTOR], length, modulus_bits, what, dtype)
    return vec, check_metrics(metrics, what)


def parse_unmask_reply(
    content: RecordDict, what: str, alive: list[int], dropped: list[int]
) -> tuple[list[bytes], list[bytes]]:
    """``(b shares, s_sk shares)`` for exactly the owners the server asked about, in order."""
    cfg = reply_config(
        content, {Key.B_OWNERS, Key.B_SHARES, Key.SK_OWNERS, Key.SK_SHARES}, what, set()
    )
    if id_list(cfg, Key.B_OWNERS, what) != alive or id_list(cfg, Key.SK_OWNERS, what) != dropped:
        raise SecAggProtocolError(f"{what}: shares for other nodes than asked")
    b_shares = bytes_list(cfg, Key.B_SHARES, what, len(alive), MAX_CIPHERTEXT_BYTES)
    sk_shares = bytes_list(cfg, Key.SK_SHARES, what, len(dropped), MAX_CIPHERTEXT_BYTES)
    for share in b_shares + sk_shares:
        check_share(share, what)
    return b_shares, sk_shares


def _what(stage: str, node: int) -> str:
    return f"{stage} reply of node {node}"


def setup(
    grid: Grid,
    s: Session,
    nodes: list[int],
    train_content: RecordDict | Mapping[int, RecordDict],
    timeout: float | None,
) -> list[int]:
    """Stage 0: the train content and settings out; two public keys back from each node (U1).

    ``train_content`` is one RecordDict for every node, or one per node id.
    """
    cfg = ConfigRecord(
        {
            **s.settings.to_record(),
            Key.NAMES: sorted(s.spec),
            Key.SIZES: [int(np.prod(s.spec[k])) for k in sorted(s.spec)],
        }
    )
    single = train_content if isinstance(train_content, RecordDict) else None

    def content_of(node: int) -> RecordDict:
        if single is not None:
            return single
        assert not isinstance(train_content, RecordDict)
        return train_content[node]

    contents = {
        n: RecordDict({**content_of(n), Key.CONFIG: ConfigRecord(dict(cfg))}) for n in nodes
    }
    for node, content in exchange(grid, s, Stage.SETUP, contents, timeout).items():
        try:
            c_pk, s_pk, nonce, signature, signer = parse_setup_reply(
                content, _what(Stage.SETUP, node)
            )
            s.keys[node], s.signed[node] = (c_pk, s_pk), (signature, signer)
            s.nonces[node] = nonce
        except SecAggProtocolError as exc:
            s.reject(Stage.SETUP, node, str(exc))
    shown: dict[bytes, int] = {}
    for pair in s.keys.values():
        for key in set(pair):
            shown[key] = shown.get(key, 0) + 1
    for node in sorted(s.keys):  # a key shown twice is dropped with every node showing it
        if any(shown[k] > 1 for k in s.keys[node]):
            s.reject(Stage.SETUP, node, "reused a public key of another node")
            del s.keys[node], s.nonces[node]
    return sorted(s.keys)


def share_keys(grid: Grid, s: Session, u1: list[int], timeout: float | None) -> list[int]:
    """Stage 1: every node gets every participant's keys and nonce (and signatures), computes
    the round id and its own neighbours from them, and returns one encrypted share per
    neighbour. The server computes the same graph; it chooses neither."""
    entries = [(v, s.signed[v][1], *s.keys[v], s.nonces[v]) for v in u1]
    s.round_id = round_id(s.session, entries)
    s.neighbours = neighbour_graph(s.round_id, u1, s.settings.num_shares)
    listed: dict[str, list[int] | list[bytes] | list[str]] = {
        Key.NODES: list(u1),
        Key.C_PK: [s.keys[v][0] for v in u1],
        Key.S_PK: [s.keys[v][1] for v in u1],
        Key.NONCE: [s.nonces[v] for v in u1],
    }
    if all(s.signed[v][1] for v in u1):  # relayed only when every participant signed
        listed[Key.SIGNATURES] = [s.signed[v][0] for v in u1]
        listed[Key.SIGNERS] = [s.signed[v][1] for v in u1]
    contents = {node: RecordDict({Key.CONFIG: ConfigRecord(dict(listed))}) for node in u1}
    s.forwards = {n: [] for n in u1}
    u2 = []
    for node, content in exchange(grid, s, Stage.SHARE_KEYS, contents, timeout).items():
        what = _what(Stage.SHARE_KEYS, node)
        try:
            shares, s.commits[node] = parse_share_keys_reply(
                content, what, s.neighbours[node] - {node}
            )
        except SecAggProtocolError as exc:
            s.reject(Stage.SHARE_KEYS, node, str(exc))
            continue
        u2.append(node)
        for dst, ct in shares:
            s.forwards[dst].append((node, ct))
    return sorted(u2)


def collect(grid: Grid, s: Session, u2: list[int], timeout: float | None) -> list[int]:
    """Stage 2: shares forwarded (from U2 only); masked vectors (of the wire dtype) summed as
    they come, in uint64 (U3)."""
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
    length = vector_length(s.spec, s.settings)
    total = np.zeros(length, dtype=np.uint64)
    for node, content in exchange(grid, s, Stage.COLLECT, contents, timeout).items():
        what = _what(Stage.COLLECT, node)
        try:
            vec, metrics = parse_collect_reply(
                content, what, length, s.settings.modulus_bits, s.settings.wire_dtype.name
            )
        except SecAggProtocolError as exc:
            s.reject(Stage.COLLECT, node, str(exc))
            continue
        np.add(total, vec, out=total)
        s.masked_with[node] = srcs_of[node]
        s.metrics[node] = metrics
    s.total = reduce_mod(total, s.settings.modulus_bits)
    return sorted(s.masked_with)


def signed_round(s: Session, u1: list[int]) -> bool:
    """Whether every node of the round signed its keys (then the consistency check runs)."""
    return bool(u1) and all(s.signed.get(n, (b"", ""))[1] for n in u1)


def consistency_check(grid: Grid, s: Session, u3: list[int], timeout: float | None) -> list[int]:
    """Authenticated rounds: each survivor signs U3; the nodes that did (U4) are returned and
    their signatures relayed with the unmask request (the server cannot check them: the nodes
    check them against their own rosters)."""
    contents = {n: RecordDict({Key.CONFIG: ConfigRecord({Key.ALIVE: list(u3)})}) for n in u3}
    for node, content in exchange(grid, s, Stage.CONSISTENCY, contents, timeout).items():
        what = _what(Stage.CONSISTENCY, node)
        try:
            cfg = reply_config(content, {Key.SIGNATURE}, what, set())
            signature = config_field(cfg, Key.SIGNATURE, bytes, what)
            if not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
                raise SecAggProtocolError(f"{what}: a signature of {len(signature)} bytes")
        except SecAggProtocolError as exc:
            s.reject(Stage.CONSISTENCY, node, str(exc))
            continue
        s.survivors_signed[node] = signature
    return sorted(s.survivors_signed)


def short_neighbourhoods(
    asked: Mapping[int, tuple[list[int], list[int]]],
    alive: Iterable[int],
    gone: Iterable[int],
    threshold: int,
) -> list[str]:
    """Secrets the asked holders cannot rebuild: each survivor's self-mask seed and the mask
    key of each dropped node that a survivor masked with need ``threshold`` holders among
    those asked (``asked``: node -> the owners it would be asked about, alive and dropped). On
    a sparse share graph (SecAgg+) this depends on *which* nodes dropped, not only how many,
    so it is checked per neighbourhood before any share is asked for."""
    holders = {("self-mask seed", n): 0 for n in alive} | {("mask key", n): 0 for n in gone}
    for b_owners, sk_owners in asked.values():
        for key in [("self-mask seed", n) for n in b_owners] + [("mask key", n) for n in sk_owners]:
            holders[key] = holders.get(key, 0) + 1
    return [
        f"{count} holders of node {owner}'s {kind} remain, fewer than the threshold {threshold}"
        for (kind, owner), count in sorted(holders.items(), key=lambda x: x[0][1])
        if count < threshold
    ]


def unmask(
    grid: Grid,
    s: Session,
    u2: list[int],
    u3: list[int],
    timeout: float | None,
    asked_nodes: list[int] | None = None,
) -> np.ndarray:
    """Stage 3: b-shares of U3 and s_sk-shares of U2 \\ U3 in (from ``asked_nodes``, default
    U3; after a consistency check, U4 with the survivors' signatures); the unmasked sum out."""
    alive, gone = set(u3), set(u2) - set(u3)
    asked = {
        n: (sorted((s.masked_with[n] | {n}) & alive), sorted(s.masked_with[n] & gone))
        for n in (u3 if asked_nodes is None else asked_nodes)
    }
    partners_gone = {d for n in alive for d in s.masked_with[n] & gone}  # masks to remove
    short = short_neighbourhoods(asked, alive, partners_gone, s.settings.reconstruction_threshold)
    if short:
        raise SecAggError(
            f"before unmasking: {'; '.join(short[:3])}: the round fails with nothing revealed"
        )
    contents = {}
    for n, (a, d) in asked.items():
        cfg = ConfigRecord({Key.ALIVE: a, Key.DROPPED: d})
        if s.survivors_signed:
            signed = sorted(s.survivors_signed)
            cfg[Key.SIGNERS] = [s.signed[v][1] for v in signed]
            cfg[Key.SIGNATURES] = [s.survivors_signed[v] for v in signed]
        contents[n] = RecordDict({Key.CONFIG: cfg})
    b_shares: dict[int, list[bytes]] = {n: [] for n in alive}
    sk_shares: dict[int, list[bytes]] = {n: [] for n in gone}
    for node, content in exchange(grid, s, Stage.UNMASK, contents, timeout).items():
        try:
            bs, sks = parse_unmask_reply(content, _what(Stage.UNMASK, node), *asked[node])
        except SecAggProtocolError as exc:
            s.reject(Stage.UNMASK, node, str(exc))
            continue
        for owner, share in zip(asked[node][0], bs, strict=True):
            b_shares[owner].append(share)
        for owner, share in zip(asked[node][1], sks, strict=True):
            sk_shares[owner].append(share)
    start = time.perf_counter()
    try:
        total = reconstruct(s, b_shares, sk_shares)
    except SecAggError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the shares did, the round fails cleanly
        raise SecAggError(f"reconstruction failed: {type(exc).__name__}: {exc}") from None
    s.seconds["reconstruct"] = time.perf_counter() - start
    return total


def reconstruct(
    s: Session, b_shares: dict[int, list[bytes]], sk_shares: dict[int, list[bytes]]
) -> np.ndarray:
    """Remove every contributor's self mask and the pair masks shared with dropped nodes."""
    t, bits = s.settings.reconstruction_threshold, s.settings.modulus_bits
    if s.total is None:
        raise SecAggError("no masked vectors were summed")
    total = s.total.copy()
    for node in sorted(b_shares):  # remove each contributor's self mask
        seed = rebuild(
            b_shares[node],
            t,
            functools.partial(_is_committed_seed, s.commits[node]),
            f"self-mask seed of node {node}",
        )
        crypto.add_mask(total, seed, bits, -1)
    for node in sorted(sk_shares):  # remove pair masks that contributors share with dropped nodes
        partners = [u for u in sorted(b_shares) if node in s.masked_with[u]]
        if not partners:
            continue
        s_sk = rebuild(
            sk_shares[node],
            t,
            functools.partial(_is_key_of, s.keys[node][1]),
            f"mask key of dropped node {node}",
        )
        for u in partners:
            crypto.add_mask(
                total, crypto.agree(s_sk, s.keys[u][1]), bits, -crypto.pair_sign(u, node)
            )
    return reduce_mod(total, bits)


def _is_committed_seed(commitment: bytes, seed: bytes) -> bool:
    return len(seed) == crypto.SEED_BYTES and crypto.commit(seed) == commitment


def _is_key_of(public_pem: bytes, private_pem: bytes) -> bool:
    """Whether a rebuilt private key is the one behind the public key the node published."""
    try:
        return crypto.public_of(private_pem) == public_pem
    except Exception:  # noqa: BLE001 - a wrong rebuilt key is any bytes at all
        return False


def rebuild(
    shares: list[bytes], threshold: int, verify: Callable[[bytes], bool], what: str
) -> bytes:
    """The secret ``threshold`` of ``shares`` rebuild and ``verify`` accepts (else SecAggError).

    Shares of an odd length are set aside; subsets of distinct share indices are tried in order
    (at most :data:`MAX_SUBSETS`), so a wrong share is outvoted while enough good ones remain.
    """
    usable = _same_length(shares)
    if len({x[:4] for x in usable}) < threshold:
        raise SecAggError(
            f"{len(usable)} usable shares of the {what}, fewer than the threshold "
            f"{threshold}: too few nodes survived to unmask"
        )
    subsets = (
        c for c in itertools.combinations(usable, threshold) if len({x[:4] for x in c}) == threshold
    )
    for tried, subset in enumerate(itertools.islice(subsets, MAX_SUBSETS)):
        try:
            secret = crypto.join_shares(list(subset))
        except Exception:  # noqa: BLE001 - malformed shares: try the next subset
            continue
        if verify(secret):
            if tried:
                log.warning(
                    "secagg: the %s took %d share subsets: a share is wrong", what, tried + 1
                )
            return secret
    raise SecAggError(
        f"no {threshold} of the {len(usable)} shares of the {what} rebuild the committed "
        f"secret: some shares are wrong"
    )


def _same_length(shares: list[bytes]) -> list[bytes]:
    """The shares of the most common length (a secret's shares all have one length)."""
    if not shares:
        return []
    lengths = [len(x) for x in shares]
    length = max(sorted(set(lengths)), key=lengths.count)
    return [x for x in shares if len(x) == length]
