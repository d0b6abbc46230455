"""A tiny in-process SecAgg+ federation for hostile and fuzz tests (no Ray, no torch).

:class:`LocalGrid` hands each stage message straight to :func:`handle_secagg` on one of a few
nodes, optionally lets a test corrupt a node's reply, and records, per stage, what the server
sent, each node's state before handling it and each reply. :func:`honest_transcript` runs one
honest round with a fixed session and the complete graph, so a test can replay any stage from
its recorded state with one message changed.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedlora.client.secagg import SecAggPolicy, handle_secagg
from fedlora.clipping import clip_l2
from fedlora.protocol import secagg_crypto as crypto
from fedlora.protocol.secagg import MESSAGE_TYPE, Key, SecAggSettings, Stage, flatten
from fedlora.server.secagg import SecAggResult, checked_decode
from fedlora.server.secagg_stages import Session, collect, setup, share_keys, unmask

NODES = (11, 22, 33, 44)
SPEC = {"a": (2,), "b": (3,)}  # vectors of 1 + scalar limbs + 5 values
# Hostile-reply and fuzz rounds of four nodes that tolerate one dropout: no colluder assumed
# (corrupt nodes 0); tests/test_secagg_attacks.py plays a malicious server at the defaults.
SETTINGS = SecAggSettings(
    clip_norm=4.0,
    num_shares=4,
    reconstruction_threshold=3,
    quantization_bits=16,
    modulus_bits=40,
    corrupt_nodes=0,
)
SESSION = "fuzz-session"

Corrupt = Callable[[int, str, RecordDict], None]  # (node, stage, reply content): edit in place


def update_of(node: int, spec: Mapping[str, tuple[int, ...]] = SPEC) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: rng.uniform(-1, 1, size=s).astype(np.float32) for k, s in spec.items()}


def weight_of(node: int) -> int:
    return 5 + node % 17


def train_fn_for(node: int, spec: Mapping[str, tuple[int, ...]] = SPEC) -> Callable:
    return lambda content: (update_of(node, spec), weight_of(node), {"train-loss": 0.25})


def expected_mean(nodes, settings: SecAggSettings = SETTINGS) -> dict[str, np.ndarray]:
    """The example-weighted mean of the nodes' clipped updates, in float64."""
    total = sum(
        weight_of(n) * clip_l2({"v": flatten(update_of(n), SPEC)}, settings.clip_norm)[0]["v"]
        for n in nodes
    )
    vec = np.asarray(total) / sum(weight_of(n) for n in nodes)
    out, start = {}, 0
    for name in sorted(SPEC):
        size = int(np.prod(SPEC[name]))
        out[name] = vec[start : start + size].reshape(SPEC[name])
        start += size
    return out


def max_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return max(float(np.abs(np.asarray(a[k], np.float64) - b[k]).max()) for k in b)


class LocalGrid(Grid):
    """A Grid that runs each node's SecAgg+ handler in process (replies may be corrupted)."""

    def __init__(
        self,
        nodes=NODES,
        corrupt: Corrupt | None = None,
        record: bool = False,
        train_fn: Callable[[int], Callable] = train_fn_for,
        vanish: Mapping[int, str] | None = None,
        policy: SecAggPolicy | None = None,
        policies: Mapping[int, SecAggPolicy] | None = None,
        tamper: Corrupt | None = None,
    ) -> None:
        self.policy = policy or SecAggPolicy(corrupt_nodes=0)
        self.policies = dict(policies or {})  # node -> its own policy (default: ``policy``)
        self.tamper = tamper  # a dishonest server: edits what it sends a node, in place
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in nodes
        }
        self.corrupt = corrupt
        self.record = record
        self.train_fn = train_fn
        self.vanish = dict(vanish or {})  # node -> the stage it fails at (an error reply)
        self.sent: dict[str, dict[int, RecordDict]] = {}
        self.states: dict[str, dict[int, Context]] = {}
        self.replies: dict[str, dict[int, RecordDict]] = {}
        self.errors: list[str] = []

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        ctx = self.contexts[node]
        stage = msg.content.config_records[Key.CONFIG][Key.STAGE]
        if self.tamper is not None:
            self.tamper(node, stage, msg.content)
        if self.record:
            self.sent.setdefault(stage, {})[node] = copy.deepcopy(msg.content)
            self.states.setdefault(stage, {})[node] = copy.deepcopy(ctx)
        try:
            if self.vanish.get(node) == stage:
                raise RuntimeError(f"node {node} vanishes at {stage}")
            policy = self.policies.get(node, self.policy)
            reply = handle_secagg(msg, ctx, self.train_fn(node), policy)
        except Exception as exc:  # noqa: BLE001 - an error reply, as Flower sends one
            self.errors.append(f"{node} {stage}: {exc!r}")
            return Message(Error(code=0, reason=repr(exc)), reply_to=msg)
        if self.corrupt is not None:
            self.corrupt(node, stage, reply.content)
        if self.record:
            self.replies.setdefault(stage, {})[node] = copy.deepcopy(reply.content)
        return reply

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            replies.append(self.answer(msg))
        return replies


@dataclass
class Transcript:
    """One honest round: the grid's records and the server's session before each stage."""

    grid: LocalGrid
    sessions: dict[str, Session] = field(default_factory=dict)
    survivors: dict[str, list[int]] = field(default_factory=dict)  # after each stage
    result: Any = None
    nodes: tuple[int, ...] = NODES
    live: dict = field(default_factory=dict)  # (node, stage, message fingerprint) -> reply


def new_session(settings: SecAggSettings = SETTINGS) -> Session:
    return Session(settings=settings, spec=dict(SPEC), group_id="", session=SESSION)


def honest_transcript(
    nodes=NODES, settings: SecAggSettings = SETTINGS, vanish: Mapping[int, str] | None = None
) -> Transcript:
    """One round with a fixed session; ``vanish`` nodes fail at a stage (the rest are honest)."""
    grid = LocalGrid(nodes, record=True, vanish=vanish)
    tr = Transcript(grid, nodes=tuple(nodes))
    s = new_session(settings)
    tr.sessions[Stage.SETUP] = copy.deepcopy(s)
    u1 = setup(grid, s, list(nodes), RecordDict(), None)
    tr.sessions[Stage.SHARE_KEYS] = copy.deepcopy(s)
    s.u2 = share_keys(grid, s, u1, None)
    tr.sessions[Stage.COLLECT] = copy.deepcopy(s)
    u3 = collect(grid, s, s.u2, None)
    tr.sessions[Stage.UNMASK] = copy.deepcopy(s)
    tr.survivors = {Stage.SETUP: u1, Stage.SHARE_KEYS: s.u2, Stage.COLLECT: u3}
    tr.result = finish(grid, s, u3)
    assert len(grid.errors) == len(vanish or {}) and not s.rejected, (grid.errors, s.rejected)
    return tr


def finish(grid: Grid, s: Session, u3: list[int]) -> SecAggResult:
    """The unmask stage and the checked decoding, as secure_weighted_sum ends a round."""
    total = unmask(grid, s, s.u2, u3, None)
    weighted, weight, scalars = checked_decode(total, s.settings, s.spec, len(u3))
    return SecAggResult(
        weighted_sum=weighted,
        total_weight=weight,
        contributors=tuple(u3),
        dropped=(),
        metrics=s.metrics,
        seconds={},
        rejected=dict(s.rejected),
        tolerance=s.settings.tolerance,
        scalars=scalars,
    )


def run_from(tr: Transcript, stage: str, grid: Grid) -> SecAggResult:
    """Replay the honest round from ``stage`` on: the server state before it, ``grid`` after."""
    s = copy.deepcopy(tr.sessions[stage])
    t = s.settings.reconstruction_threshold
    u1 = tr.survivors[Stage.SETUP] if stage != Stage.SETUP else None
    if stage == Stage.SETUP:
        u1 = setup(grid, s, list(tr.nodes), RecordDict(), None)
    assert u1 is not None
    _enough(u1, t)
    if stage in (Stage.SETUP, Stage.SHARE_KEYS):
        s.u2 = share_keys(grid, s, u1, None)
    _enough(s.u2, t)
    u3 = tr.survivors[Stage.COLLECT] if stage == Stage.UNMASK else collect(grid, s, s.u2, None)
    _enough(u3, t)
    return finish(grid, s, u3)


def _enough(nodes: list[int], t: int) -> None:
    from fedlora.server.secagg import _enough as enough

    enough(nodes, t, "replay")


class ReplayGrid(LocalGrid):
    """Replies of one stage come from the transcript (one changed); later stages run live on
    copies of the nodes' recorded states."""

    def __init__(self, tr: Transcript, stage: str, edit: Callable[[int, RecordDict], None]):
        super().__init__(tr.nodes, vanish=tr.grid.vanish)
        self.tr, self.stage, self.edit = tr, stage, edit

    def answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        stage = msg.content.config_records[Key.CONFIG][Key.STAGE]
        if stage == self.stage:
            if node not in self.tr.grid.replies[stage]:
                return super().answer(msg)  # a node that vanished at this stage
            content = copy.deepcopy(self.tr.grid.replies[stage][node])
            self.edit(node, content)
            return Message(content, reply_to=msg)
        # Later stages run live; a node's answer depends only on its recorded state and the
        # message, so equal messages get the cached reply (deterministic and cheap replays).
        key = (node, stage, fingerprint(msg.content))
        if key not in self.tr.live:
            self.contexts[node] = copy.deepcopy(self.tr.grid.states[stage][node])
            reply = super().answer(msg)
            self.tr.live[key] = reply.error if reply.has_error() else reply.content
        cached = self.tr.live[key]
        return Message(cached, reply_to=msg)


def fingerprint(content: RecordDict) -> str:
    return repr(
        sorted((name, type(rec).__name__, sorted(rec.items())) for name, rec in content.items())
    )


def stage_message(content: RecordDict, node: int) -> Message:
    return Message(content, dst_node_id=node, message_type=MESSAGE_TYPE)


def memoized_crypto(monkeypatch) -> None:
    """Cache the slow, deterministic crypto of repeated inputs (Shamir, ECDH, key parsing)."""
    for name in ("agree", "join_shares", "public_of", "is_public_key"):
        original = getattr(crypto, name)
        monkeypatch.setattr(crypto, name, _memo(original))
    split = crypto.split_secret
    cache: dict = {}

    def split_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
        key = (secret, threshold, num)
        if key not in cache:
            cache[key] = split(secret, threshold, num)
        return list(cache[key])

    monkeypatch.setattr(crypto, "split_secret", split_secret)


def _memo(fn: Callable) -> Callable:
    cache: dict = {}

    def wrapped(*args):
        key = tuple(tuple(a) if isinstance(a, list) else a for a in args)
        if key not in cache:
            try:
                cache[key] = (True, fn(*args))
            except Exception as exc:  # noqa: BLE001 - remember failures too
                cache[key] = (False, exc)
        ok, value = cache[key]
        if not ok:
            raise value
        return value

    return wrapped
