"""The client side of SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017).

Plug :func:`handle_secagg` into the ClientApp under the ``train.secagg`` message type::

    @app.train("secagg")
    def secagg(msg: Message, context: Context) -> Message:
        return handle_secagg(msg, context, train_fn)

Every stage arrives as its own message; secrets, the quantized update and the received shares
live in ``context.state`` between them (Flower keeps a node's state for the whole run, in
simulation and deployment alike) and are wiped after the last stage or on any error. Only
public keys, encrypted shares, the masked integer vector (the training scalars ride inside it,
so only their sums are revealed), the wire version and site index, and the shares the server
needs for reconstruction ever leave the node: never the update itself nor its norm.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlora.clipping import clip_l2
from fedlora.errors import ConfigError
from fedlora.protocol import secagg_crypto as crypto
from fedlora.protocol.secagg import (
    CLIPPED,
    MAX_CIPHERTEXT_BYTES,
    MAX_KEY_BYTES,
    SECURE_METRICS,
    SUMMED_SCALARS,
    WEIGHT_CAPPED,
    Key,
    SecAggProtocolError,
    SecAggSettings,
    Stage,
    bytes_list,
    check_share,
    config_field,
    encode_update,
    flatten,
    id_list,
    to_wire,
    weighted_vector,
)
from fedlora.protocol.secagg_auth import (
    MAX_SIGNATURE_BYTES,
    MAX_SIGNER_CHARS,
    NONCE_BYTES,
    Entry,
    Identity,
    Roster,
    key_statement,
    round_id,
    survivors_statement,
)
from fedlora.protocol.secagg_graph import least_threshold, majority, neighbour_graph

log = logging.getLogger(__name__)

# (content of the train message) -> (adapter delta by tensor name, num_examples, scalar metrics)
TrainFn = Callable[[RecordDict], tuple[Mapping[str, np.ndarray], int, Mapping[str, Any]]]

STATE = "fedlora.secagg"  # ConfigRecord: stage, session, settings, keys, seeds, shares
UPDATE = "fedlora.secagg.update"  # ArrayRecord: the quantized update until it is masked
METRICS = "fedlora.secagg.metrics"  # MetricRecord: clear metrics and the scalars to sum
SESSIONS = "fedlora.secagg.sessions"  # ConfigRecord: every session this node set up in the run
MAX_SESSION_CHARS = 256
MAX_PARTICIPANTS = 10_000  # participants listed in one round
# A train metric the node's train function sets and this module keeps (never sends): the number
# of nodes its DP noise share was sized for (each adds 1/n of the variance; 0: no DP noise).
NOISE_SHARES = "dp-noise-shares"


@dataclass(frozen=True)
class SecAggPolicy:
    """What this node accepts from a server, whatever the server's settings say.

    Node config keys (set by the node's operator, never by the server):

    - ``secagg-min-nodes`` (3): fewest share holders (this node included) in a round. With two,
      the other node and the server together learn this node's update from the sum.
    - ``secagg-min-threshold`` (2): fewest shares the server may need to rebuild a secret.
    - ``secagg-corrupt-nodes`` (1): how many other nodes of a round this node assumes may
      collude with the server. It refuses thresholds with ``2t <= holders + c`` and reveals
      shares only when more than ``(n + c) / 2`` of the round's ``n`` participants signed the
      survivor set it was told (:mod:`fedlora.protocol.secagg_graph`).
    - ``secagg-roster`` and ``secagg-identity-key``: the federation's roster (every node's
      long-term public key, from the coordinator, out of band) and this node's private key.
      The node signs its round keys and refuses neighbours whose keys are not signed by a
      roster member (:mod:`fedlora.protocol.secagg_auth`). Required for a secure round unless
      ``secagg-allow-unauthenticated = true`` (simulations, tests), which is logged loudly.

    Always enforced: this node's id is its own (Flower's context, never a message's), each
    session is new to it, and its neighbours are the ones it computes from the round id.
    """

    min_nodes: int = 3
    min_threshold: int = 2
    corrupt_nodes: int = 1
    roster: Roster | None = None  # None: neighbours' keys are not authenticated
    identity: Identity | None = None

    @classmethod
    def from_config(cls, merged: Mapping[str, Any]) -> SecAggPolicy:
        values: dict[str, Any] = {}
        for key, attr, least in (
            ("secagg-min-nodes", "min_nodes", 2),
            ("secagg-min-threshold", "min_threshold", 2),
            ("secagg-corrupt-nodes", "corrupt_nodes", 0),
        ):
            if key not in merged:
                continue
            value = merged[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"node config {key}={value!r}: use an integer >= {least}")
            values[attr] = value
        roster_path, key_path = merged.get("secagg-roster"), merged.get("secagg-identity-key")
        if roster_path:
            if not key_path:
                raise ConfigError(
                    "node config secagg-roster is set but secagg-identity-key is not: give this "
                    "node's auth.key so it can sign its round keys"
                )
            roster = Roster.load(str(roster_path))
            return cls(**values, roster=roster, identity=Identity.load(str(key_path), roster))
        if merged.get("secagg-allow-unauthenticated") is not True:
            raise ConfigError(
                "secure aggregation needs this node's secagg-roster and secagg-identity-key "
                "(from `fedlora federation init`), or secagg-allow-unauthenticated=true to take "
                "the server's word for the other nodes' keys"
            )
        return cls(**values)

    def corrupt(self, announced: int = 0) -> int:
        """The corrupt-node bound this node acts on: its own, or the server's if larger."""
        return max(self.corrupt_nodes, announced)

    def check(self, holders: int, threshold: int, announced_corrupt: int = 0) -> None:
        """Refuse (SecAggProtocolError) a share graph this node should not join."""
        what = Stage.SHARE_KEYS
        corrupt = self.corrupt(announced_corrupt)
        if holders < self.min_nodes:
            raise SecAggProtocolError(
                f"{what}: {holders} share holders, fewer than this node's secagg-min-nodes="
                f"{self.min_nodes} (the other nodes and the server could learn its update)"
            )
        if threshold < self.min_threshold:
            raise SecAggProtocolError(
                f"{what}: threshold {threshold} below this node's secagg-min-threshold="
                f"{self.min_threshold}"
            )
        if 2 * threshold <= holders + corrupt:
            raise SecAggProtocolError(
                f"{what}: threshold {threshold} with {holders} share holders and {corrupt} "
                f"corrupt nodes assumed (secagg-corrupt-nodes): the server and that many "
                f"colluders could rebuild both of this node's secrets; it needs a threshold of "
                f"at least {least_threshold(holders, corrupt)}"
            )


def handle_secagg(
    msg: Message, context: Context, train_fn: TrainFn, policy: SecAggPolicy | None = None
) -> Message:
    """Answer one SecAgg+ stage message; raise (an error reply) on anything suspicious.

    Every check on the server's message raises :class:`SecAggProtocolError` (a WireError) and
    wipes this node's secrets; errors of ``train_fn`` pass through unchanged. ``policy`` is the
    node's own (default: :class:`SecAggPolicy`).
    """
    policy = policy or SecAggPolicy()
    try:
        me = _own_id(msg, context)
        cfg, stage, session = _stage_of(msg.content)
        if stage == Stage.SETUP:
            _wipe(context)
            _fresh(context, session)
            out = _setup(me, msg.content, cfg, context, train_fn)
            _sign(out, me, session, policy)
        else:
            order = Stage.SIGNED_ORDER if policy.identity is not None else Stage.ORDER
            st = _expect(context, session, stage, order)
            if stage == Stage.SHARE_KEYS:
                out = _share_keys(me, cfg, st, policy)
            elif stage == Stage.CONSISTENCY:
                out = _consistency(me, cfg, st, policy)
            elif stage == Stage.COLLECT:
                out = _collect(me, cfg, st, context)
            else:
                if policy.roster is not None:
                    _check_consistency(cfg, st, policy)  # before any share is looked up
                out = _unmask(me, cfg, st)
    except Exception:
        _wipe(context)  # a failed round leaves no secrets behind
        raise
    out.config_records[Key.CONFIG][Key.STAGE] = stage
    out.config_records[Key.CONFIG][Key.SESSION] = session
    if stage == Stage.UNMASK:
        _wipe(context)
    else:
        context.state.config_records[STATE][Key.STAGE] = stage
    return Message(content=out, reply_to=msg)


def _own_id(msg: Message, context: Context) -> int:
    """This node's id for the whole run: its own context's, never one a message names."""
    me = int(context.node_id)
    if msg.metadata.dst_node_id != me:
        raise SecAggProtocolError(
            f"a stage message addressed to node {msg.metadata.dst_node_id}, not to this node"
        )
    return me


def _fresh(context: Context, session: str) -> None:
    """Refuse a session this node has set up before in this run (a replayed round)."""
    seen = context.state.config_records.get(SESSIONS)
    sessions = list(cast(list[str], seen["seen"])) if seen is not None else []
    if session in sessions:
        raise SecAggProtocolError("setup: this session was used before; refusing a replayed round")
    context.state.config_records[SESSIONS] = ConfigRecord({"seen": [*sessions, session]})


def _stage_of(content: RecordDict) -> tuple[ConfigRecord, str, str]:
    """``(config, stage, session)`` of a stage message, checked."""
    cfg = content.config_records.get(Key.CONFIG)
    if cfg is None:
        raise SecAggProtocolError(f"stage message without the {Key.CONFIG!r} config record")
    stage = cfg.get(Key.STAGE)
    if not isinstance(stage, str) or stage not in Stage.SIGNED_ORDER:
        raise SecAggProtocolError(f"unknown secagg stage {stage!r}")
    session = cfg.get(Key.SESSION)
    if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_CHARS:
        raise SecAggProtocolError(
            f"stage {stage!r}: session {session!r} is not a string of 1..{MAX_SESSION_CHARS}"
        )
    return cfg, stage, session


def _expect(context: Context, session: str, stage: str, order: tuple[str, ...]) -> ConfigRecord:
    if STATE not in context.state.config_records:
        raise SecAggProtocolError(f"stage {stage!r} without a setup: this node holds no round")
    st = context.state.config_records[STATE]
    if st[Key.SESSION] != session:
        raise SecAggProtocolError("stage message from another secagg session")
    want = order[order.index(cast(str, st[Key.STAGE])) + 1]
    if stage != want:
        raise SecAggProtocolError(f"expected stage {want!r}, got {stage!r}")
    return st


def _wipe(context: Context) -> None:
    for records in (
        context.state.config_records,
        context.state.array_records,
        context.state.metric_records,
    ):
        for key in (STATE, UPDATE, METRICS):
            if key in records:
                del records[key]


def _setup(
    me: int, content: RecordDict, cfg: ConfigRecord, context: Context, train_fn: TrainFn
) -> RecordDict:
    """Train, clip, quantize; keep the result and fresh secrets; reply the two public keys and
    a fresh nonce."""
    settings = _settings(cfg)
    names, sizes = _spec_of(cfg)
    train_content = RecordDict({k: v for k, v in content.items() if k != Key.CONFIG})
    delta, num_examples, train_metrics = train_fn(train_content)
    spec = {k: tuple(np.shape(v)) for k, v in delta.items()}
    if sorted(spec) != names or [int(np.prod(spec[n])) for n in names] != sizes:
        raise SecAggProtocolError(
            "the trained update's tensors do not match the server's spec (names or sizes differ)"
        )
    clipped_update, norm, scale = clip_l2(
        {"update": flatten(delta, spec)}, settings.clip_norm, "secagg-clip-norm"
    )
    vec, clipped = clipped_update["update"], scale < 1.0
    weight = min(int(num_examples), settings.max_weight)
    # max_weight 1 is a round of equal weights (a 16-bit wire, or DP): nothing is capped there.
    capped = weight < num_examples and settings.max_weight > 1
    if clipped:
        log.info("secagg: update norm %.4g clipped to %g", norm, settings.clip_norm)
    if capped:
        log.warning("secagg: weight %d capped at max_weight %d", num_examples, weight)
    # A narrow wire rounds stochastically from a fresh 64-bit seed, kept (and wiped) with the
    # node's other secrets of the round.
    seed = os.urandom(8) if settings.narrow else b""
    q = encode_update(vec, weight, settings, int.from_bytes(seed, "little") if seed else None)
    dtype = np.uint32 if settings.quantization_bits <= 32 else np.uint64
    context.state.array_records[UPDATE] = ArrayRecord({"q": Array(q.astype(dtype))})
    # Kept on the node until the collect stage: the clear metrics (wire version, site index) and
    # the scalars summed inside the masked vector. The norm before clipping never leaves.
    metrics: dict[str, int | float | list[int] | list[float]] = {
        k: float(v) if isinstance(v, float) else int(v)
        for k, v in train_metrics.items()
        if isinstance(v, int | float) and (k in SECURE_METRICS or k in SUMMED_SCALARS)
    }
    # the node's example count as it reported it (under DP its weight is 1, not its examples)
    metrics.setdefault("num-examples", int(num_examples))
    metrics |= {CLIPPED: int(clipped), WEIGHT_CAPPED: int(capped)}
    context.state.metric_records[METRICS] = MetricRecord(metrics)
    c_sk, c_pk = crypto.new_key_pair()
    s_sk, s_pk = crypto.new_key_pair()
    nonce = os.urandom(NONCE_BYTES)
    context.state.config_records[STATE] = ConfigRecord(
        {
            Key.SESSION: cfg[Key.SESSION],
            Key.STAGE: Stage.SETUP,
            **settings.to_record(),
            "me": me,
            "weight": weight,
            "c-sk": c_sk,
            "s-sk": s_sk,
            Key.C_PK: c_pk,
            Key.S_PK: s_pk,
            Key.NONCE: nonce,
            "b": crypto.new_seed(),
            NOISE_SHARES: int(train_metrics.get(NOISE_SHARES, 0) or 0),
        }
    )
    if seed:
        context.state.config_records[STATE]["rounding-seed"] = seed
    return RecordDict(
        {Key.CONFIG: ConfigRecord({Key.C_PK: c_pk, Key.S_PK: s_pk, Key.NONCE: nonce})}
    )


@functools.cache
def _warn_unsigned() -> None:
    """Once per process: a simulation runs its nodes' rounds in a few warm processes, and the
    same warning per node and round buried the demo's output."""
    log.warning(
        "secagg: this node's round keys are unsigned and its neighbours' keys unchecked "
        "(secagg-allow-unauthenticated): a dishonest server could impersonate other nodes"
    )


def _sign(out: RecordDict, me: int, session: str, policy: SecAggPolicy) -> None:
    """Sign the round keys of a setup reply with the node's long-term key (if it has one)."""
    if policy.identity is None:
        _warn_unsigned()
        return
    cfg = out.config_records[Key.CONFIG]
    statement = key_statement(
        session,
        me,
        cast(bytes, cfg[Key.C_PK]),
        cast(bytes, cfg[Key.S_PK]),
        cast(bytes, cfg[Key.NONCE]),
    )
    cfg[Key.SIGNATURE] = policy.identity.sign(statement)
    cfg[Key.SIGNER] = policy.identity.name


def _signers(
    cfg: ConfigRecord,
    entries: list[tuple[int, bytes, bytes, bytes]],
    session: str,
    policy: SecAggPolicy,
) -> list[str]:
    """Every participant's round keys signed by a distinct member of this node's roster: their
    names, in the order of ``entries`` (``""`` each when this node authenticates no one)."""
    what = Stage.SHARE_KEYS
    roster, identity = policy.roster, policy.identity
    if roster is None or identity is None:
        return [""] * len(entries)
    if Key.SIGNATURES not in cfg or Key.SIGNERS not in cfg:
        raise SecAggProtocolError(
            f"{what}: the participants' keys come unsigned; this node accepts only keys signed "
            f"by members of its roster"
        )
    signatures = bytes_list(cfg, Key.SIGNATURES, what, len(entries), MAX_SIGNATURE_BYTES)
    signers = config_field(cfg, Key.SIGNERS, list, what)
    if len(signers) != len(entries) or not all(
        isinstance(n, str) and 0 < len(n) <= MAX_SIGNER_CHARS for n in signers
    ):
        raise SecAggProtocolError(f"{what}: {Key.SIGNERS!r} must name one roster member per node")
    if len(set(signers)) != len(signers):
        raise SecAggProtocolError(f"{what}: one roster member is listed as several nodes")
    for (node, c_pk, s_pk, nonce), signer, signature in zip(
        entries, signers, signatures, strict=True
    ):
        if signer not in roster.keys:
            raise SecAggProtocolError(
                f"{what}: node {node} names {signer!r}, not in this node's roster"
            )
        if not roster.verify(signer, signature, key_statement(session, node, c_pk, s_pk, nonce)):
            raise SecAggProtocolError(
                f"{what}: node {node}'s keys are not signed by {signer!r}'s key in this "
                f"node's roster"
            )
    return list(signers)


def _settings(cfg: ConfigRecord) -> SecAggSettings:
    try:
        return SecAggSettings.from_record(cfg)
    except ConfigError as exc:
        raise SecAggProtocolError(f"setup: {exc}") from None


def _spec_of(cfg: ConfigRecord) -> tuple[list[str], list[int]]:
    """The tensor names and sizes the server expects, checked."""
    names = config_field(cfg, Key.NAMES, list, "setup")
    sizes = config_field(cfg, Key.SIZES, list, "setup")
    if (
        len(names) != len(sizes)
        or not all(isinstance(n, str) for n in names)
        or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in sizes)
    ):
        raise SecAggProtocolError(
            f"setup: {Key.NAMES!r} and {Key.SIZES!r} must be equally long lists of names and "
            f"non-negative sizes"
        )
    return names, sizes


def _participants(
    me: int, cfg: ConfigRecord, st: ConfigRecord, policy: SecAggPolicy
) -> list[Entry]:
    """The round's participants (U1) as the server lists them, checked: this node's own keys
    and nonce echoed, distinct valid keys, every entry signed by a distinct roster member."""
    what = Stage.SHARE_KEYS
    nodes = id_list(cfg, Key.NODES, what)
    if len(nodes) > MAX_PARTICIPANTS:
        raise SecAggProtocolError(
            f"{what}: {len(nodes)} participants, more than {MAX_PARTICIPANTS}"
        )
    c_pks = bytes_list(cfg, Key.C_PK, what, len(nodes), MAX_KEY_BYTES)
    s_pks = bytes_list(cfg, Key.S_PK, what, len(nodes), MAX_KEY_BYTES)
    nonces = bytes_list(cfg, Key.NONCE, what, len(nodes), NONCE_BYTES)
    if any(len(n) != NONCE_BYTES for n in nonces):
        raise SecAggProtocolError(f"{what}: a nonce is not {NONCE_BYTES} bytes")
    bad = [n for n, c, k in zip(nodes, c_pks, s_pks, strict=True) if not _keys_ok(c, k)]
    if bad:
        raise SecAggProtocolError(f"{what}: node {bad[0]}'s keys are not P-384 public keys")
    if me not in nodes or (
        c_pks[nodes.index(me)],
        s_pks[nodes.index(me)],
        nonces[nodes.index(me)],
    ) != (st[Key.C_PK], st[Key.S_PK], st[Key.NONCE]):
        raise SecAggProtocolError("the server did not echo this node's own public keys and nonce")
    if len(set(c_pks) | set(s_pks)) != 2 * len(nodes):
        raise SecAggProtocolError("repeated public keys among participants")
    entries = list(zip(nodes, c_pks, s_pks, nonces, strict=True))
    names = _signers(cfg, entries, cast(str, st[Key.SESSION]), policy)
    if policy.identity is not None and names[nodes.index(me)] != policy.identity.name:
        raise SecAggProtocolError("the server did not echo this node's own roster name")
    return [(n, name, c, s, x) for (n, c, s, x), name in zip(entries, names, strict=True)]


def _share_keys(me: int, cfg: ConfigRecord, st: ConfigRecord, policy: SecAggPolicy) -> RecordDict:
    """Check the round's participants; compute the round id and this node's neighbours from
    them (never the server's choice); Shamir-share ``b`` and ``s_sk``; encrypt one share each."""
    what = Stage.SHARE_KEYS
    settings = SecAggSettings.from_record(st)
    entries = _participants(me, cfg, st, policy)
    rid = round_id(cast(str, st[Key.SESSION]), entries)
    by_id = {e[0]: e for e in entries}
    nodes = sorted(neighbour_graph(rid, by_id, settings.num_shares)[me])
    t = settings.reconstruction_threshold
    policy.check(len(nodes), t, settings.corrupt_nodes)
    if len(nodes) < t:
        raise SecAggProtocolError(f"{len(nodes)} share holders, fewer than the threshold {t}")
    shares = cast(int, st[NOISE_SHARES])
    if shares > len(entries):
        raise SecAggProtocolError(
            f"{what}: this node's DP noise share was sized for {shares} nodes, but only "
            f"{len(entries)} take part in the round: the sum would carry too little noise"
        )
    c_pks = [by_id[n][2] for n in nodes]
    s_pks = [by_id[n][3] for n in nodes]
    b_shares = crypto.split_secret(cast(bytes, st["b"]), t, len(nodes))
    sk_shares = crypto.split_secret(cast(bytes, st["s-sk"]), t, len(nodes))
    dsts, ciphertexts = [], []
    for i, node in enumerate(nodes):
        if node == me:
            continue
        dsts.append(node)
        ciphertexts.append(
            crypto.seal_shares(
                cast(bytes, st["c-sk"]), c_pks[i], me, node, b_shares[i], sk_shares[i]
            )
        )
    own = nodes.index(me)
    st.update(
        {
            Key.NODES: nodes,
            "nb-c-pk": c_pks,
            "nb-s-pk": s_pks,
            "round-id": rid,
            "participants": sorted(by_id),
            "participant-names": [by_id[n][1] for n in sorted(by_id)],
            "held-owners": [me],
            "held-b": [b_shares[own]],
            "held-sk": [sk_shares[own]],
        }
    )
    reply = ConfigRecord({Key.DSTS: dsts, Key.CIPHERTEXTS: ciphertexts})
    reply[Key.B_COMMIT] = crypto.commit(cast(bytes, st["b"]))  # checked against the rebuilt b
    return RecordDict({Key.CONFIG: reply})


def _consistency(me: int, cfg: ConfigRecord, st: ConfigRecord, policy: SecAggPolicy) -> RecordDict:
    """Sign the survivors U3 the server says it summed, bound to the round id (kept to check
    the unmask request)."""
    what = Stage.CONSISTENCY
    survivors = id_list(cfg, Key.ALIVE, what)
    settings = SecAggSettings.from_record(st)
    if me not in survivors or len(survivors) < settings.reconstruction_threshold:
        raise SecAggProtocolError(
            f"{what}: {len(survivors)} survivors {'with' if me in survivors else 'without'} "
            f"this node, which sent its masked vector; refusing to go on"
        )
    if not set(survivors) <= set(cast(list[int], st["participants"])):
        raise SecAggProtocolError(f"{what}: survivors that are not participants of the round")
    assert policy.identity is not None
    st["survivors"] = sorted(survivors)
    statement = survivors_statement(cast(bytes, st["round-id"]), survivors)
    return RecordDict({Key.CONFIG: ConfigRecord({Key.SIGNATURE: policy.identity.sign(statement)})})


def _check_consistency(cfg: ConfigRecord, st: ConfigRecord, policy: SecAggPolicy) -> None:
    """Reveal shares only if more than ``(n + c) / 2`` of the round's ``n`` participants signed
    this node's U3 (and, under DP, at least as many survivors as its noise was sized for), and
    never the mask-key share of a node in U3."""
    what = Stage.UNMASK
    assert policy.roster is not None
    survivors = cast(list[int], st["survivors"])
    participants = cast(list[int], st["participants"])
    names = cast(list[str], st["participant-names"])
    survivor_names = {names[participants.index(n)] for n in survivors}
    signers = config_field(cfg, Key.SIGNERS, list, what) if Key.SIGNERS in cfg else []
    signatures = (
        bytes_list(cfg, Key.SIGNATURES, what, len(signers), MAX_SIGNATURE_BYTES)
        if (Key.SIGNATURES in cfg)
        else []
    )
    statement = survivors_statement(cast(bytes, st["round-id"]), survivors)
    valid = {
        name
        for name, signature in zip(signers, signatures, strict=False)
        if isinstance(name, str)
        and name in names
        and policy.roster.verify(name, signature, statement)
    }
    corrupt = policy.corrupt(cast(int, st["corrupt-nodes"]))
    need = majority(len(participants), corrupt)
    if len(valid) < need:
        raise SecAggProtocolError(
            f"{what}: {len(valid)} of the round's {len(participants)} participants signed the "
            f"survivors this node was told, fewer than the {need} that no split view can also "
            f"gather ({corrupt} corrupt nodes assumed): refusing to unmask"
        )
    noise_shares = cast(int, st[NOISE_SHARES])
    if len(valid & survivor_names) < noise_shares:
        raise SecAggProtocolError(
            f"{what}: {len(valid & survivor_names)} survivors confirmed the sum, fewer than the "
            f"{noise_shares} this node's DP noise share was sized for: refusing to unmask a sum "
            f"with too little noise"
        )
    alive, dropped = id_list(cfg, Key.ALIVE, what), id_list(cfg, Key.DROPPED, what)
    if set(dropped) & set(survivors):
        raise SecAggProtocolError(
            f"{what}: asked for the mask-key share of a node in the signed survivors: refusing"
        )
    if not set(alive) <= set(survivors):
        raise SecAggProtocolError(f"{what}: asked for self-mask shares of nodes not in the sum")


def _keys_ok(c_pk: bytes, s_pk: bytes) -> bool:
    return crypto.is_public_key(c_pk) and crypto.is_public_key(s_pk)


def _collect(me: int, cfg: ConfigRecord, st: ConfigRecord, context: Context) -> RecordDict:
    """Store the shares addressed to this node; reply ``[w, w·q]`` (narrow: ``[w, q]``) + self
    and pairwise masks, in the wire dtype."""
    what = Stage.COLLECT
    settings = SecAggSettings.from_record(st)
    srcs = id_list(cfg, Key.SRCS, what)
    ciphertexts = bytes_list(cfg, Key.CIPHERTEXTS, what, len(srcs), MAX_CIPHERTEXT_BYTES)
    nodes = cast(list[int], st[Key.NODES])
    if (
        len(srcs) != len(ciphertexts)
        or len(set(srcs)) != len(srcs)
        or me in srcs
        or not set(srcs) <= set(nodes)
    ):
        raise SecAggProtocolError("share sources are not distinct neighbours of this node")
    if len(srcs) + 1 < settings.reconstruction_threshold:
        raise SecAggProtocolError(f"{len(srcs) + 1} share holders, fewer than the threshold")
    c_pks, s_pks = cast(list[bytes], st["nb-c-pk"]), cast(list[bytes], st["nb-s-pk"])
    owners, held_b, held_sk = (
        list(cast(list[Any], st[k])) for k in ("held-owners", "held-b", "held-sk")
    )
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        got_src, dst, b_share, sk_share = _open(st, c_pks[nodes.index(src)], src, ciphertext)
        if (got_src, dst) != (src, me):
            raise SecAggProtocolError(f"shares from {got_src} to {dst} forwarded as {src}->{me}")
        owners.append(src)
        held_b.append(b_share)
        held_sk.append(sk_share)
    q = context.state.array_records[UPDATE]["q"].numpy().astype(np.uint64)
    kept = context.state.metric_records[METRICS]
    scalars = {k: float(cast(float, v)) for k, v in kept.items() if k in SUMMED_SCALARS}
    vec = weighted_vector(q, cast(int, st["weight"]), settings, scalars)
    del q
    crypto.add_mask(vec, cast(bytes, st["b"]), settings.modulus_bits, +1)
    s_sk = cast(bytes, st["s-sk"])
    for src in srcs:
        seed = crypto.agree(s_sk, s_pks[nodes.index(src)])
        crypto.add_mask(vec, seed, settings.modulus_bits, crypto.pair_sign(me, src))
    masked = to_wire(vec, settings)
    clear = MetricRecord({k: v for k, v in kept.items() if k in SECURE_METRICS})
    del context.state.array_records[UPDATE]
    st.update({"held-owners": owners, "held-b": held_b, "held-sk": held_sk})
    return RecordDict(
        {
            Key.CONFIG: ConfigRecord({}),
            Key.MASKED: ArrayRecord({Key.VECTOR: Array(masked)}),
            Key.METRICS: clear,
        }
    )


def _open(
    st: ConfigRecord, src_c_pk: bytes, src: int, ciphertext: bytes
) -> tuple[int, int, bytes, bytes]:
    """Decrypt and check the shares ``src`` sealed for this node (SecAggProtocolError if not)."""
    what = f"{Stage.COLLECT}: shares from node {src}"
    try:
        got_src, dst, b_share, sk_share = crypto.open_shares(
            cast(bytes, st["c-sk"]), src_c_pk, ciphertext
        )
    except Exception as exc:  # noqa: BLE001 - any failure to open network bytes is a refusal
        raise SecAggProtocolError(f"{what} do not decrypt: {type(exc).__name__}") from None
    return got_src, dst, check_share(b_share, what), check_share(sk_share, what)


def _unmask(me: int, cfg: ConfigRecord, st: ConfigRecord) -> RecordDict:
    """Reveal b-shares of alive neighbours and s_sk-shares of dropped ones; never both."""
    settings = SecAggSettings.from_record(st)
    alive, dropped = id_list(cfg, Key.ALIVE, Stage.UNMASK), id_list(cfg, Key.DROPPED, Stage.UNMASK)
    owners = cast(list[int], st["held-owners"])
    if set(alive) & set(dropped) or me in dropped:
        raise SecAggProtocolError("a node listed both alive and dropped (or this node dropped)")
    if not (set(alive) | set(dropped)) <= set(owners):
        raise SecAggProtocolError("shares asked for nodes this node holds none of")
    if len(alive) < settings.reconstruction_threshold:
        raise SecAggProtocolError(
            f"{len(alive)} alive neighbours, fewer than the threshold "
            f"{settings.reconstruction_threshold}: refusing to unmask"
        )
    held_b, held_sk = cast(list[bytes], st["held-b"]), cast(list[bytes], st["held-sk"])
    return RecordDict(
        {
            Key.CONFIG: ConfigRecord(
                {
                    Key.B_OWNERS: list(alive),
                    Key.B_SHARES: [held_b[owners.index(n)] for n in alive],
                    Key.SK_OWNERS: list(dropped),
                    Key.SK_SHARES: [held_sk[owners.index(n)] for n in dropped],
                }
            )
        }
    )


__all__ = ["SecAggProtocolError", "TrainFn", "handle_secagg"]
