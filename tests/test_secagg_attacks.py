"""A malicious coordinator against real nodes: every message is the attacker's to write, no
honest node's private key is.

The nodes are fedlora's own handler (:func:`fedlora.client.secagg.handle_secagg`) with their
own key pairs (``fedlora federation keygen``) and the roster the coordinator made from the public
keys (``fedlora federation init FED --node NAME=auth.pub``), at the deployment settings the
server computes (:func:`fedlora.server.app.secagg_settings`: 5 shares, one colluder assumed).
The attacker drives each stage by hand. Afterwards :meth:`Attacker.recover` does what a server
could with everything it collected (every reply, and a colluder's whole state and key), and the
tests assert it cannot open the victim's masked vector. Each attack is also run against the
rules before issue 31 (a survivor set needed ``t`` signatures, a node masked with ``t - 1``
partners, ``2t > holders``, its id came from the message): there it reads the victim's update,
so the tests here can fail.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora.client import secagg as node_side
from fedlora.client.secagg import NOISE_SHARES, SecAggPolicy, SecAggProtocolError, handle_secagg
from fedlora.clipping import clip_l2
from fedlora.config import RunConfig
from fedlora.deploy.federation import Federation, NodeFolder, init_federation, keygen
from fedlora.protocol import secagg_crypto as crypto
from fedlora.protocol.secagg import (
    MESSAGE_TYPE,
    Key,
    SecAggSettings,
    Stage,
    decode_sum,
    flatten,
    reduce_mod,
)
from fedlora.protocol.secagg_auth import round_id, survivors_statement
from fedlora.protocol.secagg_graph import majority, neighbour_graph
from fedlora.server.app import secagg_settings
from fedlora.server.secagg import secure_weighted_sum
from secagg_transcript import LocalGrid

pytestmark = pytest.mark.usefixtures("task_identity")

SPEC = {"a": (3,), "b": (4,)}
NAMES = [f"hospital-{i:02d}" for i in range(20)]


def node_id(i: int) -> int:
    return 1000 + 7 * i


def update_of(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: rng.uniform(-1, 1, size=s).astype(np.float32) for k, s in SPEC.items()}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, str]]:
    """Twenty hospitals, each with its own key pair; the coordinator's roster of their public
    keys. Returns node id -> its node config (roster and private key paths)."""
    root = tmp_path_factory.mktemp("attacks")
    own = {name: root / "hospitals" / name for name in NAMES}
    for name, folder in own.items():
        keygen(folder, name)
    init_federation(
        root / "fed", nodes=NAMES, public_keys={n: NodeFolder(f).auth_pub for n, f in own.items()}
    )
    fed = Federation(root / "fed")
    return {
        node_id(i): {
            "secagg-roster": str(fed.node(name).roster),
            "secagg-identity-key": str(NodeFolder(own[name]).auth_key),
        }
        for i, name in enumerate(NAMES)
    }


def policies(federation, n: int, **override) -> dict[int, SecAggPolicy]:
    return {
        node_id(i): SecAggPolicy.from_config(federation[node_id(i)] | override) for i in range(n)
    }


def deployment_settings(n: int) -> SecAggSettings:
    return secagg_settings(RunConfig(secure_aggregation=True, min_nodes=3, secagg_clip_norm=4.0), n)


class Attacker:
    """A coordinator that writes every stage message itself and keeps everything it sees."""

    def __init__(self, pols: dict[int, SecAggPolicy], settings: SecAggSettings, noise: int = 0):
        self.policies, self.settings, self.noise = pols, settings, noise
        self.nodes = sorted(pols)
        self.colluders_planned: tuple[int, ...] = ()  # nodes working for the server
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in self.nodes
        }
        self.new_round("session-1")

    def new_round(self, session: str) -> None:
        self.session = session
        self.keys: dict[int, tuple] = {}  # node -> (c_pk, s_pk, nonce, signature, signer)
        self.refusals: dict[int, str] = {}
        self.cts: dict[tuple[int, int], bytes] = {}
        self.commits: dict[int, bytes] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.partners: dict[int, list[int]] = {}  # node -> the shares it accepted at collect
        self.signed: dict[tuple[bytes, tuple[int, ...]], dict[str, bytes]] = defaultdict(dict)
        self.b_shares: dict[int, list[bytes]] = defaultdict(list)
        self.sk_shares: dict[int, list[bytes]] = defaultdict(list)
        self.known_b: dict[int, bytes] = {}
        self.known_sk: dict[int, bytes] = {}
        self.colluders: set[int] = set()

    # ---- one message -------------------------------------------------------------------

    def send(self, node: int, stage: str, fields: dict, dst: int | None = None):
        cfg = ConfigRecord({**fields, Key.STAGE: stage, Key.SESSION: self.session})
        msg = Message(
            RecordDict({Key.CONFIG: cfg}),
            dst_node_id=node if dst is None else dst,
            message_type=MESSAGE_TYPE,
        )

        def train(content):
            return update_of(node), 5, {"train-loss": 0.5, NOISE_SHARES: self.noise}

        try:
            reply = handle_secagg(msg, self.contexts[node], train, self.policies[node])
        except SecAggProtocolError as exc:  # every refusal, in order
            self.refusals[node] = " | ".join(filter(None, [self.refusals.get(node), str(exc)]))
            return None
        return reply.content

    # ---- the stages, as the attacker chooses to run them ---------------------------------

    def setup(self, nodes=None) -> None:
        fields = {
            **self.settings.to_record(),
            Key.NAMES: sorted(SPEC),
            Key.SIZES: [int(np.prod(SPEC[k])) for k in sorted(SPEC)],
        }
        for node in nodes or self.nodes:
            content = self.send(node, Stage.SETUP, fields)
            if content is not None:
                cfg = content.config_records[Key.CONFIG]
                self.keys[node] = tuple(
                    cfg.get(k) for k in (Key.C_PK, Key.S_PK, Key.NONCE, Key.SIGNATURE, Key.SIGNER)
                )

    def listing(self, view) -> tuple[dict, bytes]:
        view = sorted(view)
        k = self.keys
        fields = {
            Key.NODES: view,
            Key.C_PK: [k[v][0] for v in view],
            Key.S_PK: [k[v][1] for v in view],
            Key.NONCE: [k[v][2] for v in view],
            Key.SIGNATURES: [k[v][3] for v in view],
            Key.SIGNERS: [k[v][4] for v in view],
        }
        entries = [(v, k[v][4], k[v][0], k[v][1], k[v][2]) for v in view]
        return fields, round_id(self.session, entries)

    def graph(self, view) -> dict[int, set[int]]:
        return neighbour_graph(self.listing(view)[1], view, self.settings.num_shares)

    def share_keys(self, node: int, view, fields: dict | None = None) -> None:
        content = self.send(node, Stage.SHARE_KEYS, fields or self.listing(view)[0])
        if content is not None:
            cfg = content.config_records[Key.CONFIG]
            self.commits[node] = cfg[Key.B_COMMIT]
            for dst, ct in zip(cfg[Key.DSTS], cfg[Key.CIPHERTEXTS], strict=True):
                self.cts[(node, dst)] = ct

    def collect(self, node: int, srcs, dst: int | None = None) -> None:
        srcs = [s for s in sorted(srcs) if (s, node) in self.cts]
        fields = {Key.SRCS: srcs, Key.CIPHERTEXTS: [self.cts[(s, node)] for s in srcs]}
        content = self.send(node, Stage.COLLECT, fields, dst)
        if content is not None:
            self.masked[node] = content.array_records[Key.MASKED][Key.VECTOR].numpy()
            self.partners[node] = srcs

    def collude(self, node: int) -> None:
        """The node works for the server: all it holds is the server's."""
        st = self.contexts[node].state.config_records["fedlora.secagg"]
        for owner, b, sk in zip(st["held-owners"], st["held-b"], st["held-sk"], strict=True):
            self.b_shares[owner].append(b)
            self.sk_shares[owner].append(sk)
        self.known_b[node], self.known_sk[node] = st["b"], st["s-sk"]
        self.colluders.add(node)

    def consistency(self, node: int, view, u3, dst: int | None = None) -> None:
        rid = self.listing(view)[1]
        content = self.send(node, Stage.CONSISTENCY, {Key.ALIVE: sorted(u3)}, dst)
        if content is not None:
            name = self.keys[node][4]
            self.signed[(rid, tuple(sorted(u3)))][name] = content.config_records[Key.CONFIG][
                Key.SIGNATURE
            ]

    def signatures(self, view, u3) -> dict[str, bytes]:
        """Every signature of ``(view's round id, u3)`` the server holds or a colluder makes."""
        rid = self.listing(view)[1]
        out = dict(self.signed[(rid, tuple(sorted(u3)))])
        for c in self.colluders:
            identity = self.policies[c].identity
            out[identity.name] = identity.sign(survivors_statement(rid, sorted(u3)))
        return out

    def unmask(self, node: int, alive, dropped, sigs: dict[str, bytes], dst=None) -> None:
        fields = {
            Key.ALIVE: sorted(alive),
            Key.DROPPED: sorted(dropped),
            Key.SIGNERS: list(sigs),
            Key.SIGNATURES: list(sigs.values()),
        }
        content = self.send(node, Stage.UNMASK, fields, dst)
        if content is not None:
            cfg = content.config_records[Key.CONFIG]
            for owner, share in zip(cfg[Key.B_OWNERS], cfg[Key.B_SHARES], strict=True):
                self.b_shares[owner].append(share)
            for owner, share in zip(cfg[Key.SK_OWNERS], cfg[Key.SK_SHARES], strict=True):
                self.sk_shares[owner].append(share)

    def held_by(self, node: int) -> set[int]:
        """Whose shares ``node`` holds (itself and the partners whose shares it accepted)."""
        return {node, *self.partners.get(node, [])}

    # ---- what the server can do with all of it ----------------------------------------------

    def _rebuild(self, shares: list[bytes], verify) -> bytes | None:
        t = self.settings.reconstruction_threshold
        distinct = list({s[:4]: s for s in shares}.values())
        for subset in itertools.combinations(distinct, t):
            try:
                secret = crypto.join_shares(list(subset))
            except Exception:  # noqa: BLE001 - a wrong subset
                continue
            if verify(secret):
                return secret
        return None

    def mask_key(self, node: int) -> bytes | None:
        if node in self.known_sk:
            return self.known_sk[node]

        def is_key(sk: bytes) -> bool:
            try:
                return crypto.public_of(sk) == self.keys[node][1]
            except Exception:  # noqa: BLE001
                return False

        return self._rebuild(self.sk_shares[node], is_key)

    def recover(self, victim: int) -> dict[str, np.ndarray] | None:
        """The victim's update if the server can open its masked vector, else None."""
        if victim not in self.masked:
            return None
        commit = self.commits.get(victim)
        b = self.known_b.get(victim) or self._rebuild(
            self.b_shares[victim], lambda s: crypto.commit(s) == commit
        )
        if b is None:
            return None
        bits = self.settings.modulus_bits
        vec = self.masked[victim].astype(np.uint64)
        crypto.add_mask(vec, b, bits, -1)
        for other in self.partners[victim]:
            seeds = [
                crypto.agree(sk, self.keys[pk_of][1])
                for owner, pk_of in ((victim, other), (other, victim))
                if (sk := self.mask_key(owner)) is not None
            ]
            if not seeds:
                return None
            crypto.add_mask(vec, seeds[0], bits, -crypto.pair_sign(victim, other))
        weighted, weight = decode_sum(reduce_mod(vec, bits), self.settings, SPEC)
        return {k: v / weight for k, v in weighted.items()} if weight else None


def read_victim(att: Attacker, victim: int) -> bool:
    """Whether ``recover`` gives the victim's (clipped) update itself."""
    got = att.recover(victim)
    if got is None:
        return False
    clipped = clip_l2({"v": flatten(update_of(victim), SPEC)}, att.settings.clip_norm)[0]["v"]
    start, diff = 0, 0.0
    for name in sorted(SPEC):
        size = int(np.prod(SPEC[name]))
        diff = max(diff, float(np.abs(got[name].ravel() - clipped[start : start + size]).max()))
        start += size
    return diff <= att.settings.tolerance


def old_rules(monkeypatch, t: int) -> None:
    """The node's rules before issue 31 (for the control runs)."""
    monkeypatch.setattr(node_side, "majority", lambda n, c: t)
    monkeypatch.setattr(node_side, "_own_id", lambda msg, context: msg.metadata.dst_node_id)


Plan = Callable[[dict[int, set[int]]], tuple[set[int], set[int]]]


def split_views(att: Attacker, victim: int, plan: Plan) -> None:
    """Split survivor views: ``plan(graph)`` gives view A (the victim, its partners, maybe
    more) and the partners, the only neighbours whose shares the victim gets, so the only ones
    it masks with. View A is told every node survived and asked for the victim's self-mask seed;
    the rest are told the partners dropped and asked for their mask keys."""
    nodes = set(att.nodes)
    att.setup()
    for node in att.nodes:
        att.share_keys(node, nodes)
    graph = att.graph(nodes)
    view_a, partners = plan(graph)
    for node in att.nodes:
        att.collect(node, partners if node == victim else graph[node] - {node})
    for c in att.colluders_planned:
        att.collude(c)
    u3_b = nodes - partners
    for node in att.nodes:
        att.consistency(node, nodes, nodes if node in view_a else u3_b)
    for node in att.nodes:
        held = att.held_by(node)
        if node in view_a:
            att.unmask(node, held, set(), att.signatures(nodes, nodes))
        else:
            att.unmask(node, held & u3_b, held & partners, att.signatures(nodes, u3_b))


def best_split(att: Attacker, victim: int, pad_to: int = 0) -> Plan:
    """The attacker's best plan for the graph it sees: as few partners as the victim accepts,
    whose mask-key holders mostly sit outside view A; view A as small as it can be (or
    ``pad_to`` nodes)."""

    def plan(graph: dict[int, set[int]]) -> tuple[set[int], set[int]]:
        nodes = set(att.nodes)
        fewest = att.settings.reconstruction_threshold - 1
        best: tuple[int, set[int], set[int]] | None = None
        for partners in itertools.combinations(sorted(graph[victim] - {victim}), fewest):
            view_a = {victim, *partners}
            view_a |= set(sorted(nodes - view_a)[: max(0, pad_to - len(view_a))])
            score = min(len(graph[p] & (nodes - view_a)) for p in partners)
            if best is None or score > best[0]:
                best = (score, view_a, set(partners))
        assert best is not None
        return best[1], best[2]

    return plan


# ---- 1. split survivor views ---------------------------------------------------------------


@pytest.mark.parametrize("n", [6, 10, 20])
def test_split_survivor_views_reveal_nothing(federation, n):
    settings = deployment_settings(n)
    assert (settings.num_shares, settings.reconstruction_threshold) == (5, 4)
    victim = node_id(0)
    for pad in (0, majority(n, settings.corrupt_nodes)):  # view A minimal, or a majority
        att = Attacker(policies(federation, n), settings)
        split_views(att, victim, best_split(att, victim, pad_to=pad))
        assert att.recover(victim) is None
        assert any(
            "no split view can also gather" in r or "refusing to go on" in r
            for r in att.refusals.values()
        ), att.refusals
    # the same nodes and settings with a server that behaves: the round completes
    grid = LocalGrid(
        [node_id(i) for i in range(n)],
        policies=att.policies,
        train_fn=lambda node: lambda content: (update_of(node), 5, {"train-loss": 0.5}),
    )
    result = secure_weighted_sum(grid, grid.get_node_ids(), RecordDict(), settings, SPEC)
    assert len(result.contributors) == n and not grid.errors


def test_split_views_read_the_victim_under_the_old_rules(federation, monkeypatch):
    """Control: six nodes, threshold 3 of 5 holders, a survivor set needing t signatures."""
    settings = SecAggSettings(
        clip_norm=4.0, num_shares=5, reconstruction_threshold=3, corrupt_nodes=0
    )
    old_rules(monkeypatch, 3)
    att = Attacker(policies(federation, 6, **{"secagg-corrupt-nodes": 0}), settings)
    victim = node_id(0)
    split_views(att, victim, best_split(att, victim))
    assert read_victim(att, victim), att.refusals


def isolate(att: Attacker, victim: int, count: int) -> None:
    """One consistent view: the victim gets only ``count`` neighbours' shares (so masks with
    them alone), and every node is told those neighbours dropped; all who signed reveal."""
    nodes = set(att.nodes)
    att.setup()
    for node in att.nodes:
        att.share_keys(node, nodes)
    graph = att.graph(nodes)
    partners = set(sorted(graph[victim] - {victim})[:count])
    for node in att.nodes:
        att.collect(node, partners if node == victim else graph[node] - {node})
    u3 = nodes - partners
    for node in sorted(u3):
        att.consistency(node, nodes, u3)
    for node in sorted(u3):
        held = att.held_by(node)
        att.unmask(node, held & u3, held & partners, att.signatures(nodes, u3))


@pytest.mark.parametrize(("n", "corrupt"), [(10, 0), (10, 1), (20, 1)])
def test_a_node_the_server_isolates_stays_masked(federation, n, corrupt):
    """The server forwards the victim only t - 1 neighbours' shares and tells every node,
    consistently, that those dropped: everyone signs and reveals what the view allows. The
    victim refuses to unmask (none of its partners survived), and its seed keeps
    holders - t + c < t other holders (2t > holders + c), so its vector stays masked."""
    settings = SecAggSettings(
        clip_norm=4.0,
        num_shares=5,
        reconstruction_threshold=3 + corrupt,
        corrupt_nodes=corrupt,
    )
    att = Attacker(policies(federation, n, **{"secagg-corrupt-nodes": corrupt}), settings)
    victim = node_id(0)
    isolate(att, victim, settings.reconstruction_threshold - 1)
    assert "fewer than the threshold" in att.refusals[victim]
    assert len(att.b_shares[victim]) < settings.reconstruction_threshold
    assert att.recover(victim) is None


# ---- 2. node ids taken from messages -------------------------------------------------------


def test_a_node_answers_only_to_its_own_id(federation):
    """Five nodes: the server addresses two of them with each other's ids at the consistency
    and unmask stages (and at collect in a second round). Both refuse; nothing opens."""
    n, victim = 5, node_id(0)
    att = Attacker(policies(federation, n), deployment_settings(n))
    nodes = set(att.nodes)
    n1, n2 = node_id(1), node_id(2)
    att.setup()
    for node in att.nodes:
        att.share_keys(node, nodes)
    for node in att.nodes:
        att.collect(node, nodes - {node})
    swap = {n1: n2, n2: n1}
    for node in att.nodes:
        att.consistency(node, nodes, nodes, dst=swap.get(node))
    for node in att.nodes:
        held = att.held_by(node)
        att.unmask(node, held & {victim}, held & {n1, n2}, att.signatures(nodes, nodes))
    assert {n1, n2} <= set(att.refusals)
    assert all("not to this node" in att.refusals[n] for n in (n1, n2)), att.refusals
    assert att.recover(victim) is None
    att.new_round("session-2")
    att.setup()
    for node in att.nodes:
        att.share_keys(node, nodes)
    att.collect(n1, nodes - {n1}, dst=n2)
    assert "not to this node" in att.refusals[n1] and n1 not in att.masked


# ---- 3. the server and c colluders -----------------------------------------------------------


def test_the_server_and_one_colluder_get_no_honest_update(federation):
    n, victim, colluder = 5, node_id(0), node_id(4)
    pols = policies(federation, n)
    # the old default threshold 3 of 5: every honest node refuses before sharing anything
    att = Attacker(pols, SecAggSettings(clip_norm=4.0, num_shares=5, reconstruction_threshold=3))
    att.setup()
    for node in att.nodes:
        att.share_keys(node, set(att.nodes))
    assert set(att.refusals) == set(att.nodes) and not att.cts
    assert all("at least 4" in r for r in att.refusals.values())
    # at the deployment threshold, with the colluder's signature in both views
    att = Attacker(pols, deployment_settings(n))
    att.colluders_planned = (colluder,)
    partners = {colluder, node_id(1), node_id(2)}
    split_views(att, victim, lambda graph: ({victim, *partners}, partners))
    assert att.recover(victim) is None
    for honest in set(att.nodes) - {colluder}:
        assert att.recover(honest) is None


def test_one_colluder_reads_the_victim_under_the_old_rules(federation, monkeypatch):
    """Control: 2t > holders (t = 3 of 5) and t signatures; the colluder signs both views."""
    settings = SecAggSettings(
        clip_norm=4.0, num_shares=5, reconstruction_threshold=3, corrupt_nodes=0
    )
    old_rules(monkeypatch, 3)
    victim, colluder = node_id(0), node_id(4)
    att = Attacker(policies(federation, 5, **{"secagg-corrupt-nodes": 0}), settings)
    att.colluders_planned = (colluder,)
    partners = {colluder, node_id(1)}
    split_views(att, victim, lambda graph: ({victim, *partners}, partners))
    assert read_victim(att, victim), att.refusals


# ---- 4. replayed sessions and signatures -----------------------------------------------------


def _honest_round(att: Attacker) -> None:
    nodes = set(att.nodes)
    att.setup()
    for node in att.nodes:
        att.share_keys(node, nodes)
    for node in att.nodes:
        att.collect(node, nodes - {node})
    for node in att.nodes:
        att.consistency(node, nodes, nodes)
    sigs = att.signatures(nodes, nodes)
    for node in att.nodes:
        att.unmask(node, att.held_by(node), set(), sigs)


def test_replayed_sessions_keys_and_signatures_are_refused(federation):
    n = 5
    att = Attacker(policies(federation, n), deployment_settings(n))
    _honest_round(att)
    assert not att.refusals and all(att.recover(v) is None for v in att.nodes)
    old_keys, old_sigs = dict(att.keys), att.signatures(set(att.nodes), set(att.nodes))
    # the same session again: every node refuses at setup, before training
    att.new_round("session-1")
    att.setup()
    assert set(att.refusals) == set(att.nodes)
    assert all("used before" in r for r in att.refusals.values())
    # a fresh session, with last round's signed keys of one node relayed to the others
    att.new_round("session-2")
    att.setup()
    nodes, stale = set(att.nodes), node_id(3)
    att.keys[stale] = old_keys[stale]
    for node in sorted(nodes - {stale}):
        att.share_keys(node, nodes)
    assert set(att.refusals) == nodes - {stale}
    assert all("not signed by" in r for r in att.refusals.values())
    # a fresh session, with last round's survivor signatures relayed at unmask
    att.new_round("session-3")
    att.setup()
    for node in att.nodes:
        att.share_keys(node, nodes)
    for node in att.nodes:
        att.collect(node, nodes - {node})
    for node in att.nodes:
        att.consistency(node, nodes, nodes)  # this round's signatures, kept by the server
    for node in att.nodes:
        att.unmask(node, att.held_by(node), set(), old_sigs)
    assert set(att.refusals) == nodes, att.refusals
    assert all("0 of the round's 5 participants signed" in r for r in att.refusals.values())
    assert not any(att.recover(v) is not None for v in att.nodes)


# ---- 5. a graph chosen by the server ---------------------------------------------------------


def test_the_server_cannot_choose_a_node_s_neighbours(federation):
    """Ten nodes: the server wants the victim to share with two nodes of its choice. Each node
    computes its neighbours from the participant list; shares forwarded between nodes that are
    not neighbours in the receiver's own graph are refused."""
    n, victim = 10, node_id(0)
    att = Attacker(policies(federation, n), deployment_settings(n))
    nodes = set(att.nodes)
    att.setup()
    graph = att.graph(nodes)
    chosen = sorted(nodes - graph[victim])[:2]  # two nodes the graph does not join to it
    for node in att.nodes:
        att.share_keys(node, nodes)
    assert {dst for (src, dst) in att.cts if src == victim} == graph[victim] - {victim}
    for node in chosen:  # the server forwards the victim's shares to its chosen nodes anyway
        att.cts[(victim, node)] = att.cts[(victim, sorted(graph[victim] - {victim})[0])]
        att.collect(node, {victim} | (graph[node] - {node}))
        assert "not distinct neighbours" in att.refusals[node]


# ---- 6. DP noise sized for contributors the node cannot verify -------------------------------


def test_noise_sized_for_more_nodes_than_take_part_is_refused(federation):
    n = 5
    # a node told 10**6 nodes share the noise (and not bounding it): five take part
    att = Attacker(policies(federation, n), deployment_settings(n), noise=10**6)
    att.setup()
    for node in att.nodes:
        att.share_keys(node, set(att.nodes))
    assert set(att.refusals) == set(att.nodes) and not att.cts
    assert all("sized for 1000000 nodes" in r for r in att.refusals.values())
    # noise for five, but the server lists four participants
    att = Attacker(policies(federation, n), deployment_settings(n), noise=5)
    att.setup()
    four = set(att.nodes[:4])
    for node in sorted(four):
        att.share_keys(node, four)
    assert set(att.refusals) == four
    # noise for five, five take part, one vanishes before confirming the sum: four signatures
    att = Attacker(policies(federation, n), deployment_settings(n), noise=5)
    nodes = set(att.nodes)
    att.setup()
    for node in att.nodes:
        att.share_keys(node, nodes)
    for node in att.nodes:
        att.collect(node, nodes - {node})
    for node in att.nodes[:4]:
        att.consistency(node, nodes, nodes)
    for node in att.nodes[:4]:
        att.unmask(node, att.held_by(node), set(), att.signatures(nodes, nodes))
    assert set(att.refusals) == set(att.nodes[:4])
    assert all("the 5 this node's DP noise share was sized for" in r for r in att.refusals.values())


def test_fixture_keys_are_the_hospitals_own(federation):
    """The coordinator's folder holds no hospital's private key (keygen on each node)."""
    for config in federation.values():
        assert "hospitals" in config["secagg-identity-key"]
        fed_nodes = Path(config["secagg-roster"]).parent
        assert not (fed_nodes / "auth.key").exists()


def test_a_node_with_a_roster_bounds_its_noise_by_the_roster_size(federation):
    from fedlora.client.node import NodeSettings
    from fedlora.client.privacy import noise_shares

    settings = NodeSettings.from_config({"site": "pain", **federation[node_id(0)]})
    assert settings.dp_max_contributors == len(NAMES)
    assert noise_shares(10**6, settings.dp_max_contributors) == len(NAMES)
    assert noise_shares(5, settings.dp_max_contributors) == 5  # announcements can only lower it
    explicit = NodeSettings.from_config({"site": "pain", "dp-max-contributors": 3})
    assert noise_shares(10**6, explicit.dp_max_contributors) == 3
    assert noise_shares(10**6, NodeSettings.from_config({"site": "pain"}).dp_max_contributors) == (
        10**6
    )


def test_every_test_the_threat_model_cites_exists():
    import re

    root = Path(__file__).parents[1]
    page = (root / "docs" / "privacy.md").read_text()
    cited = re.findall(r"`(tests/\w+\.py)?(?:::(\w+))?`", page)
    last = ""
    for path, name in cited:  # `::name` alone: the file last named
        last = path or last
        text = (root / last).read_text() if last else ""
        assert last and (not name or f"def {name}(" in text), f"{last}::{name}"
    assert len([c for c in cited if c[1]]) >= 20
