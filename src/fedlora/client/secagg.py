"""The client side of SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017).

Plug :func:`handle_secagg` into the ClientApp under the ``train.secagg`` message type::

    @app.train("secagg")
    def secagg(msg: Message, context: Context) -> Message:
        return handle_secagg(msg, context, train_fn)

Every stage arrives as its own message; secrets, the quantized update and the received shares
live in ``context.state`` between them (Flower keeps a node's state for the whole run, in
simulation and deployment alike) and are wiped after the last stage or on any error. Only
public keys, encrypted shares, the masked integer vector, scalar metrics and the shares the
server needs for reconstruction ever leave the node: never the update itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlora.errors import WireError
from fedlora.protocol import secagg_crypto as crypto
from fedlora.protocol.secagg import (
    CLIPPED,
    NORM_BEFORE_CLIP,
    WEIGHT_CAPPED,
    Key,
    SecAggSettings,
    Stage,
    clip_l2,
    flatten,
    quantize,
    reduce_mod,
    weighted_vector,
)

log = logging.getLogger(__name__)

# (content of the train message) -> (adapter delta by tensor name, num_examples, scalar metrics)
TrainFn = Callable[[RecordDict], tuple[Mapping[str, np.ndarray], int, Mapping[str, Any]]]

STATE = "fedlora.secagg"  # ConfigRecord: stage, session, settings, keys, seeds, shares
UPDATE = "fedlora.secagg.update"  # ArrayRecord: the quantized update until it is masked
METRICS = "fedlora.secagg.metrics"  # MetricRecord: sent with the masked vector


class SecAggProtocolError(WireError, ValueError):
    """A stage message the node refuses (wrong order, session, keys or node lists)."""


def handle_secagg(msg: Message, context: Context, train_fn: TrainFn) -> Message:
    """Answer one SecAgg+ stage message; raise (an error reply) on anything suspicious."""
    cfg = msg.content.config_records[Key.CONFIG]
    stage = cfg[Key.STAGE]
    me = msg.metadata.dst_node_id
    try:
        if stage == Stage.SETUP:
            _wipe(context)
            out = _setup(msg.content, cfg, context, train_fn)
        else:
            st = _expect(context, cfg, stage)
            handler = {
                Stage.SHARE_KEYS: _share_keys,
                Stage.COLLECT: _collect,
                Stage.UNMASK: _unmask,
            }[stage]
            out = handler(me, cfg, st, context)
    except Exception:
        _wipe(context)  # a failed round leaves no secrets behind
        raise
    out.config_records[Key.CONFIG][Key.STAGE] = stage
    out.config_records[Key.CONFIG][Key.SESSION] = cfg[Key.SESSION]
    if stage == Stage.UNMASK:
        _wipe(context)
    else:
        context.state.config_records[STATE][Key.STAGE] = stage
    return Message(content=out, reply_to=msg)


def _expect(context: Context, cfg: ConfigRecord, stage: Any) -> ConfigRecord:
    if stage not in Stage.ORDER:
        raise SecAggProtocolError(f"unknown secagg stage {stage!r}")
    if STATE not in context.state.config_records:
        raise SecAggProtocolError(f"stage {stage!r} without a setup: this node holds no round")
    st = context.state.config_records[STATE]
    if st[Key.SESSION] != cfg[Key.SESSION]:
        raise SecAggProtocolError("stage message from another secagg session")
    want = Stage.ORDER[Stage.ORDER.index(cast(str, st[Key.STAGE])) + 1]
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
    content: RecordDict, cfg: ConfigRecord, context: Context, train_fn: TrainFn
) -> RecordDict:
    """Train, clip, quantize; keep the result and fresh secrets; reply the two public keys."""
    settings = SecAggSettings.from_record(cfg)
    names = cast(list[str], cfg[Key.NAMES])
    sizes = cast(list[int], cfg[Key.SIZES])
    train_content = RecordDict({k: v for k, v in content.items() if k != Key.CONFIG})
    delta, num_examples, train_metrics = train_fn(train_content)
    spec = {k: tuple(np.shape(v)) for k, v in delta.items()}
    if sorted(spec) != names or [int(np.prod(spec[n])) for n in names] != sizes:
        raise SecAggProtocolError(
            "the trained update's tensors do not match the server's spec (names or sizes differ)"
        )
    vec, norm, clipped = clip_l2(flatten(delta, spec), settings.clip_norm)
    weight = min(int(num_examples), settings.max_weight)
    if clipped:
        log.info("secagg: update norm %.4g clipped to %g", norm, settings.clip_norm)
    if weight < num_examples:
        log.warning("secagg: weight %d capped at max_weight %d", num_examples, weight)
    q = quantize(vec, settings)
    dtype = np.uint32 if settings.quantization_bits <= 32 else np.uint64
    context.state.array_records[UPDATE] = ArrayRecord({"q": Array(q.astype(dtype))})
    metrics = {
        k: float(v) if isinstance(v, float) else int(v)
        for k, v in train_metrics.items()
        if isinstance(v, int | float)
    }
    metrics |= {
        NORM_BEFORE_CLIP: norm,
        CLIPPED: int(clipped),
        WEIGHT_CAPPED: int(weight < num_examples),
    }
    context.state.metric_records[METRICS] = MetricRecord(metrics)
    c_sk, c_pk = crypto.new_key_pair()
    s_sk, s_pk = crypto.new_key_pair()
    context.state.config_records[STATE] = ConfigRecord(
        {
            Key.SESSION: cfg[Key.SESSION],
            Key.STAGE: Stage.SETUP,
            **settings.to_record(),
            "weight": weight,
            "c-sk": c_sk,
            "s-sk": s_sk,
            Key.C_PK: c_pk,
            Key.S_PK: s_pk,
            "b": crypto.new_seed(),
        }
    )
    return RecordDict({Key.CONFIG: ConfigRecord({Key.C_PK: c_pk, Key.S_PK: s_pk})})


def _share_keys(me: int, cfg: ConfigRecord, st: ConfigRecord, context: Context) -> RecordDict:
    """Check the neighbours' keys; Shamir-share ``b`` and ``s_sk``; encrypt one share each."""
    nodes = cast(list[int], cfg[Key.NODES])
    c_pks, s_pks = cast(list[bytes], cfg[Key.C_PK]), cast(list[bytes], cfg[Key.S_PK])
    settings = SecAggSettings.from_record(st)
    if not len(nodes) == len(c_pks) == len(s_pks) or len(set(nodes)) != len(nodes):
        raise SecAggProtocolError("neighbour list and key lists differ in length or repeat ids")
    if me not in nodes or (c_pks[nodes.index(me)], s_pks[nodes.index(me)]) != (
        st[Key.C_PK],
        st[Key.S_PK],
    ):
        raise SecAggProtocolError("the server did not echo this node's own public keys")
    if len(set(c_pks) | set(s_pks)) != 2 * len(nodes):
        raise SecAggProtocolError("repeated public keys among neighbours")
    if len(nodes) < settings.reconstruction_threshold:
        raise SecAggProtocolError(
            f"{len(nodes)} share holders, fewer than the threshold "
            f"{settings.reconstruction_threshold}"
        )
    t = settings.reconstruction_threshold
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
            "held-owners": [me],
            "held-b": [b_shares[own]],
            "held-sk": [sk_shares[own]],
        }
    )
    return RecordDict({Key.CONFIG: ConfigRecord({Key.DSTS: dsts, Key.CIPHERTEXTS: ciphertexts})})


def _collect(me: int, cfg: ConfigRecord, st: ConfigRecord, context: Context) -> RecordDict:
    """Store the shares addressed to this node; reply ``[w, w·q]`` + self and pairwise masks."""
    settings = SecAggSettings.from_record(st)
    srcs = cast(list[int], cfg[Key.SRCS])
    ciphertexts = cast(list[bytes], cfg[Key.CIPHERTEXTS])
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
        got_src, dst, b_share, sk_share = crypto.open_shares(
            cast(bytes, st["c-sk"]), c_pks[nodes.index(src)], ciphertext
        )
        if (got_src, dst) != (src, me):
            raise SecAggProtocolError(f"shares from {got_src} to {dst} forwarded as {src}->{me}")
        owners.append(src)
        held_b.append(b_share)
        held_sk.append(sk_share)
    q = context.state.array_records[UPDATE]["q"].numpy().astype(np.uint64)
    vec = weighted_vector(q, cast(int, st["weight"]), settings)
    del q
    crypto.add_mask(vec, cast(bytes, st["b"]), settings.modulus_bits, +1)
    s_sk = cast(bytes, st["s-sk"])
    for src in srcs:
        seed = crypto.agree(s_sk, s_pks[nodes.index(src)])
        crypto.add_mask(vec, seed, settings.modulus_bits, crypto.pair_sign(me, src))
    reduce_mod(vec, settings.modulus_bits)
    metrics = context.state.metric_records[METRICS]
    del context.state.array_records[UPDATE]
    st.update({"held-owners": owners, "held-b": held_b, "held-sk": held_sk})
    return RecordDict(
        {
            Key.CONFIG: ConfigRecord({}),
            Key.MASKED: ArrayRecord({Key.VECTOR: Array(vec)}),
            Key.METRICS: MetricRecord(dict(metrics)),
        }
    )


def _unmask(me: int, cfg: ConfigRecord, st: ConfigRecord, context: Context) -> RecordDict:
    """Reveal b-shares of alive neighbours and s_sk-shares of dropped ones; never both."""
    settings = SecAggSettings.from_record(st)
    alive, dropped = cast(list[int], cfg[Key.ALIVE]), cast(list[int], cfg[Key.DROPPED])
    owners = cast(list[int], st["held-owners"])
    if (
        set(alive) & set(dropped)
        or me in dropped
        or len(set(alive)) != len(alive)
        or len(set(dropped)) != len(dropped)
    ):
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
