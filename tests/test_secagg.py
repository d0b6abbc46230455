"""SecAgg+ on the Message API: encoding, crypto, the protocol with dropouts, and an oracle.

Fast tests run the protocol in process (a Grid that calls the ClientApp directly). One Ray
simulation (module fixture) runs the same updates through Flower's legacy SecAggPlusWorkflow +
secaggplus_mod and through fedlora's secure aggregation, with a spy on the Grid, and the n=5,
threshold-3 dropout cases.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid

from fedlora.client.secagg import SecAggPolicy, SecAggProtocolError, handle_secagg
from fedlora.clipping import clip_l2
from fedlora.errors import ConfigError
from fedlora.protocol import secagg_crypto as crypto
from fedlora.protocol.secagg import (
    Key,
    SecAggSettings,
    Stage,
    decode_sum,
    flatten,
    quantize,
    scalar_slots,
    unflatten,
    vector_length,
    weighted_vector,
)
from fedlora.protocol.secagg_graph import neighbour_graph
from fedlora.server import secagg_stages
from fedlora.server.secagg import (
    SecAggError,
    SecAggResult,
    as_client_update,
    check_composable,
    secure_weighted_sum,
)
from fedlora.server.strategies import ClientUpdate, FedExLoRA, FedIT, FFALoRA, Reducer

SPEC = {"layer.a": (4, 30), "layer.b": (50, 4), "head": (60,)}  # 380 values
WEIGHTS = [12, 25, 31, 47, 58, 9, 70, 33]  # num_examples of partition 0, 1, ...
# The dropout mechanics at threshold 3 of 5 holders need no colluder assumed (corrupt nodes 0);
# with the default of 1 a node refuses them (tests/test_secagg_attacks.py plays the colluders).
SETTINGS = SecAggSettings(clip_norm=80.0, num_shares=5, reconstruction_threshold=3, corrupt_nodes=0)
NO_COLLUDERS = SecAggPolicy(corrupt_nodes=0)


# Messages built outside a ServerApp need a task identity (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("task_identity")


def client_update(pid: int) -> dict[str, np.ndarray]:
    """Partition ``pid``'s fixed update: float32, every value within +-4 (legacy clips at 8)."""
    rng = np.random.default_rng(1000 + pid)
    return {k: rng.uniform(-4, 4, size=s).astype(np.float32) for k, s in SPEC.items()}


def plain_mean(pids: list[int], clip_norm: float | None = None) -> dict[str, np.ndarray]:
    """The reference: example-weighted mean in float64 (of the clipped updates if asked)."""
    ups = []
    for p in pids:
        vec = flatten(client_update(p), SPEC)
        if clip_norm is not None:
            vec = clip_l2({"v": vec}, clip_norm)[0]["v"]
        ups.append(vec)
    w = np.array([WEIGHTS[p] for p in pids], dtype=np.float64)
    return unflatten((w[:, None] * np.stack(ups)).sum(0) / w.sum(), SPEC)


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(
        float(np.abs(np.asarray(a[k], np.float64).ravel() - b[k].ravel()).max()) for k in SPEC
    )


def train_fn_for(pid: int) -> Callable[[RecordDict], tuple]:
    return lambda content: (client_update(pid), WEIGHTS[pid], {"train-loss": 0.5})


def secagg_client_app(drop_at: dict[int, str] | None = None) -> ClientApp:
    """fedlora's client handler; partition ``p`` fails at stage ``drop_at[p]`` (no reply)."""
    drop_at = drop_at or {}
    app = ClientApp()

    @app.train("secagg")
    def secagg(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        stage = msg.content.config_records[Key.CONFIG][Key.STAGE]
        plan = msg.content.config_records.get("test-drop")  # set by the Ray ServerApp
        if stage == Stage.SETUP:
            at = drop_at.get(pid, "")
            if plan is not None and pid in plan["pids"]:
                at = plan["at"][plan["pids"].index(pid)]
            context.state["test-drop"] = ConfigRecord({"at": at})
        if context.state.config_records["test-drop"]["at"] == stage:
            raise RuntimeError(f"partition {pid} vanishes at {stage}")
        return handle_secagg(msg, context, train_fn_for(pid), NO_COLLUDERS)

    return app


class InProcessGrid(Grid):
    """A Grid that hands each message straight to a ClientApp; records every reply."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        self.app = app
        self.contexts = {
            100 + 7 * p: Context(
                run_id=1,
                node_id=100 + 7 * p,
                node_config={"partition-id": p},
                state=RecordDict(),
                run_config={},
            )
            for p in range(num_nodes)
        }
        self.received: list[Message] = []

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

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - an error reply, as Flower sends one
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            self.received.append(reply)
            replies.append(reply)
        return replies

    def pid(self, node: int) -> int:
        return int(self.contexts[node].node_config["partition-id"])


def run_in_process(
    num_nodes: int, settings: SecAggSettings = SETTINGS, drop_at: dict[int, str] | None = None
):
    grid = InProcessGrid(secagg_client_app(drop_at), num_nodes)
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    result = secure_weighted_sum(grid, grid.get_node_ids(), content, settings, SPEC, timeout=5)
    return grid, result


# ---- settings, encoding, crypto (pure) ---------------------------------------------------


def test_settings_refuse_what_would_break_privacy_or_precision():
    with pytest.raises(ConfigError, match="exceed half"):
        SecAggSettings(clip_norm=1.0, num_shares=6, reconstruction_threshold=3)
    with pytest.raises(ConfigError, match="clip_norm"):
        SecAggSettings(clip_norm=0.0)
    with pytest.raises(ConfigError, match="below modulus_bits"):
        SecAggSettings(clip_norm=1.0, quantization_bits=40, modulus_bits=32)
    record = SETTINGS.to_record()
    assert SecAggSettings.from_record(record) == SETTINGS


def test_overflow_is_checked_for_the_number_of_clients():
    s = SecAggSettings(clip_norm=1.0, quantization_bits=20, modulus_bits=32, max_weight=100)
    n = s.max_clients()
    assert n * s.max_weight * s.levels < 2**32 <= (n + 1) * s.max_weight * s.levels
    s.check_overflow(n)
    with pytest.raises(ConfigError, match="lower quantization_bits to 19"):
        s.check_overflow(n + 1)
    with pytest.raises(ConfigError, match="overflow"):  # caught before any message is sent
        secure_weighted_sum(
            InProcessGrid(ClientApp(), 2), list(range(n + 1)), RecordDict(), s, SPEC
        )


def test_quantized_weighted_mean_is_within_the_stated_tolerance():
    # Prepare: coarse quantization, so the bound is tested where it binds
    s = SecAggSettings(clip_norm=80.0, quantization_bits=12, modulus_bits=40, max_weight=100)
    pids = [0, 1, 2, 3]
    # Execute: encode each update, add them as the server would (mod 2**bits), decode
    total = (
        sum(
            weighted_vector(
                quantize(clip_l2({"v": flatten(client_update(p), SPEC)}, 80.0)[0]["v"], s),
                WEIGHTS[p],
                s,
            )
            for p in pids
        )
        % 2**40
    )
    summed, weight = decode_sum(np.asarray(total, dtype=np.uint64), s, SPEC)
    # Assert: exact weights, mean within C / (2**bits - 1); deterministic rounding
    assert weight == sum(WEIGHTS[p] for p in pids)
    err = max_diff({k: v / weight for k, v in summed.items()}, plain_mean(pids))
    assert err <= s.tolerance, (err, s.tolerance)
    assert err > s.tolerance / 20  # the bound is not vacuous at 12 bits
    v = flatten(client_update(0), SPEC)
    assert np.array_equal(quantize(v, s), quantize(v, s))


def test_clipping_is_explicit_and_quantize_refuses_unclipped_values():
    vec = flatten(client_update(0), SPEC)
    norm = float(np.linalg.norm(vec))
    clipped, before, scale = clip_l2({"v": vec}, norm / 2)
    assert scale < 1 and before == pytest.approx(norm)
    assert np.linalg.norm(clipped["v"]) == pytest.approx(norm / 2)
    assert clip_l2({"v": vec}, norm * 2)[2] == 1.0
    with pytest.raises(ValueError, match="clip"):
        quantize(vec, SecAggSettings(clip_norm=1.0))


def test_masks_use_the_whole_seed_unlike_flowers_32_bit_fold():
    a = bytes(range(32))
    b = bytes([a[0] ^ 1, *a[1:4], a[4] ^ 1, *a[5:]])  # the same 32-bit XOR fold as ``a``
    flower = pseudo_rand_gen(a, 2**32, [(8,)])[0], pseudo_rand_gen(b, 2**32, [(8,)])[0]
    assert np.array_equal(*flower)  # Flower's PRG: different seeds, the same mask
    ours = crypto.mask(a, 1000, 64), crypto.mask(b, 1000, 64)
    assert not np.array_equal(*ours)
    assert np.array_equal(crypto.mask(a, 1000, 64), ours[0])  # deterministic per seed
    assert crypto.mask(a, 1000, 20).max() < 2**20


def test_pair_masks_cancel_and_shares_rebuild_keys():
    (sk1, pk1), (sk2, pk2) = crypto.new_key_pair(), crypto.new_key_pair()
    assert crypto.agree(sk1, pk2) == crypto.agree(sk2, pk1)
    acc = np.arange(10, dtype=np.uint64)
    crypto.add_mask(acc, crypto.agree(sk1, pk2), 64, crypto.pair_sign(1, 2))
    crypto.add_mask(acc, crypto.agree(sk2, pk1), 64, crypto.pair_sign(2, 1))
    assert np.array_equal(acc, np.arange(10, dtype=np.uint64))
    shares = crypto.split_secret(sk1, 3, 5)
    assert crypto.join_shares([shares[4], shares[1], shares[2]]) == sk1


def test_neighbour_graph_is_regular_symmetric_and_complete_for_classic_secagg():
    nodes = list(range(10, 20))
    rid = b"round"
    assert all(nb == set(nodes) for nb in neighbour_graph(rid, nodes, 10).values())
    for k in (3, 4, 5):
        graph = neighbour_graph(rid, nodes, k)
        assert all(len(nb) == k and u in nb for u, nb in graph.items())
        assert all(u in graph[v] for u, nb in graph.items() for v in nb)
    # the round id decides the graph, the same for everyone who computes it
    assert neighbour_graph(b"other", nodes, 3) != neighbour_graph(rid, nodes, 3)
    assert neighbour_graph(rid, reversed(nodes), 3) == neighbour_graph(rid, nodes, 3)


def test_only_strategies_that_need_the_weighted_mean_compose():
    check_composable(FedIT())
    check_composable(FFALoRA())
    with pytest.raises(SecAggError, match="fedex-lora"):
        check_composable(FedExLoRA())
    with pytest.raises(SecAggError, match="median"):
        check_composable(FedIT(Reducer("median")))


def test_a_mean_strategy_on_the_secure_mean_equals_it_on_the_individual_updates():
    # Prepare: one LoRA layer, three clients' deltas, and the secure result they would give
    rng = np.random.default_rng(0)
    names = {"base_model.model.l.lora_A.weight": (2, 6), "base_model.model.l.lora_B.weight": (5, 2)}
    glob = {k: rng.normal(size=s).astype(np.float32) for k, s in names.items()}
    ups = [
        ClientUpdate({k: rng.normal(size=s).astype(np.float32) for k, s in names.items()}, w)
        for w in (3, 5, 8)
    ]
    result = SecAggResult(
        weighted_sum={
            k: sum(u.num_examples * u.delta[k].astype(np.float64) for u in ups) for k in names
        },
        total_weight=16,
        contributors=(1, 2, 3),
        dropped=(),
        metrics={},
        seconds={},
    )
    # Execute
    secure = FedIT().aggregate(glob, [as_client_update(result, glob)]).new_global
    plain = FedIT().aggregate(glob, ups).new_global
    # Assert
    assert max(float(np.abs(secure[k] - plain[k]).max()) for k in names) < 1e-6


# ---- the protocol in process ------------------------------------------------------------


def test_secure_mean_matches_the_plain_mean_and_reports_clipping():
    _grid, result = run_in_process(5)
    assert result.dropped == () and result.total_weight == sum(WEIGHTS[:5])
    assert max_diff(result.mean(), plain_mean(list(range(5)))) <= result.tolerance
    assert result.num_clipped == 0
    # The training scalars travel inside the masked vectors: only their sums are revealed.
    assert result.train_loss == pytest.approx(0.5, abs=1e-12)
    assert result.scalars["num-examples"] == sum(WEIGHTS[:5])
    assert all(set(m) <= {"wire-version", "site-id"} for m in result.metrics.values())
    # Clip below the updates' norms (about 45): every node clips, says so, and the mean is that
    # of the clipped updates.
    s = SecAggSettings(clip_norm=30.0, num_shares=5, reconstruction_threshold=3, corrupt_nodes=0)
    _, clipped = run_in_process(5, s)
    assert clipped.num_clipped == 5
    assert all(set(m) <= {"wire-version", "site-id"} for m in clipped.metrics.values())
    assert max_diff(clipped.mean(), plain_mean(list(range(5)), 30.0)) <= s.tolerance


def test_two_of_five_vanishing_after_masking_are_recovered():
    _grid, result = run_in_process(5, drop_at={1: Stage.UNMASK, 3: Stage.UNMASK})
    assert len(result.contributors) == 5  # their masked vectors count: recovered from shares
    assert max_diff(result.mean(), plain_mean(list(range(5)))) <= result.tolerance


def test_three_of_five_vanishing_fails_the_round_with_nothing_aggregated():
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):
        run_in_process(5, drop_at={0: Stage.UNMASK, 2: Stage.UNMASK, 4: Stage.UNMASK})
    with pytest.raises(SecAggError, match="fewer than the reconstruction threshold"):
        run_in_process(5, drop_at={p: Stage.COLLECT for p in (0, 2, 4)})


def test_nodes_dropping_before_masking_are_left_out_and_their_pair_masks_removed():
    grid, result = run_in_process(5, drop_at={0: Stage.COLLECT, 4: Stage.SHARE_KEYS})
    assert [grid.pid(n) for n in result.dropped] == [0, 4]
    assert max_diff(result.mean(), plain_mean([1, 2, 3])) <= result.tolerance


def test_sparse_secagg_plus_graph_with_dropouts_at_every_stage():
    # Each node shares with 4 random neighbours (threshold 3): any node may lose two holders.
    drop = {0: Stage.SETUP, 2: Stage.COLLECT, 5: Stage.UNMASK}
    grid, result = run_in_process(8, drop_at=drop)
    assert sorted(grid.pid(n) for n in result.dropped) == [0, 2]
    assert max_diff(result.mean(), plain_mean([1, 3, 4, 5, 6, 7])) <= result.tolerance
    assert all(len(nb) == 5 for nb in neighbour_graph(b"r", range(7), 5).values())


def test_server_never_holds_an_individual_update(monkeypatch):
    sessions: list[secagg_stages.Session] = []
    original = secagg_stages.Session

    def spy_session(*args, **kwargs):
        sessions.append(original(*args, **kwargs))
        return sessions[-1]

    monkeypatch.setattr("fedlora.server.secagg.Session", spy_session)
    grid, result = run_in_process(5, drop_at={2: Stage.COLLECT, 4: Stage.UNMASK})
    received = [a for m in grid.received if not m.has_error() for a in arrays_in(m.content)]
    # the masked vectors, all inspected
    assert sum(a.size == vector_length(SPEC, SETTINGS) for a in received) == 4
    assert_no_individual_update(received, range(5), uncorrelated=True)
    stored = [v for v in vars(sessions[0]).values() if isinstance(v, np.ndarray)]
    assert_no_individual_update([*stored, flatten(result.weighted_sum, SPEC)], range(5))


def test_client_refuses_out_of_order_stages():
    grid = InProcessGrid(secagg_client_app(), 1)
    node, ctx = next(iter(grid.contexts.items()))

    def stage_msg(stage: str, **fields) -> Message:
        cfg = ConfigRecord({Key.STAGE: stage, Key.SESSION: "s1", **fields})
        return Message(RecordDict({Key.CONFIG: cfg}), dst_node_id=node, message_type="train.secagg")

    with pytest.raises(SecAggProtocolError, match="without a setup"):
        handle_secagg(
            stage_msg(Stage.UNMASK, **{Key.ALIVE: [node], Key.DROPPED: []}), ctx, train_fn_for(0)
        )
    setup = stage_msg(
        Stage.SETUP,
        **SETTINGS.to_record(),
        **{Key.NAMES: sorted(SPEC), Key.SIZES: [math.prod(SPEC[k]) for k in sorted(SPEC)]},
    )
    reply = handle_secagg(setup, ctx, train_fn_for(0))
    assert set(reply.content.config_records[Key.CONFIG]) == {
        Key.C_PK,
        Key.S_PK,
        Key.NONCE,
        Key.STAGE,
        Key.SESSION,
    }
    assert not reply.content.array_records  # nothing but public keys leaves at setup
    with pytest.raises(SecAggProtocolError, match="expected stage 'share-keys'"):
        handle_secagg(
            stage_msg(Stage.COLLECT, **{Key.SRCS: [], Key.CIPHERTEXTS: []}), ctx, train_fn_for(0)
        )
    assert "fedlora.secagg" not in ctx.state.config_records  # secrets wiped on refusal


def test_a_server_asking_for_both_shares_of_a_node_gets_none(monkeypatch):
    exchange = secagg_stages.exchange

    def lying_exchange(grid, session, stage, contents, timeout):
        if stage == Stage.UNMASK:  # claim every alive neighbour dropped, too
            for content in contents.values():
                cfg = content.config_records[Key.CONFIG]
                cfg[Key.DROPPED] = list(cfg[Key.ALIVE])
        return exchange(grid, session, stage, contents, timeout)

    monkeypatch.setattr(secagg_stages, "exchange", lying_exchange)
    grid = InProcessGrid(secagg_client_app(), 5)
    with pytest.raises(SecAggError):
        secure_weighted_sum(grid, grid.get_node_ids(), RecordDict(), SETTINGS, SPEC)
    refusals = [m.error.reason for m in grid.received if m.has_error()]
    assert len(refusals) == 5 and all("both alive and dropped" in r for r in refusals)


# ---- helpers for the spy ----------------------------------------------------------------


def arrays_in(content: RecordDict) -> list[np.ndarray]:
    out = [a.numpy() for rec in content.array_records.values() for a in rec.values()]
    for rec in list(content.config_records.values()) + list(content.metric_records.values()):
        out += [
            np.asarray(v)
            for v in rec.values()
            if isinstance(v, list) and v and isinstance(v[0], int | float)
        ]
    return out


def assert_no_individual_update(
    held: list[np.ndarray],
    pids,
    uncorrelated: bool = False,
) -> None:
    """No array the server held is one client's update in any encoding (nor correlates with it,
    for what came over the wire: a sum of several updates does correlate with each of them)."""
    forms = []
    for p in pids:
        x = flatten(client_update(p), SPEC)
        q = quantize(x, SETTINGS).astype(np.float64)
        forms += [x, WEIGHTS[p] * x, q, WEIGHTS[p] * q]
    assert held
    for arr in held:
        a = np.asarray(arr, dtype=np.float64).ravel()
        for form in forms:
            # with and without the leading weight and the scalar limbs
            for part in (a, a[1:], a[1 + scalar_slots(SETTINGS) :]):
                if part.size != form.size:
                    continue
                assert not np.allclose(part, form, rtol=1e-3, atol=1e-3)
                if uncorrelated:
                    assert abs(np.corrcoef(part, form)[0, 1]) < 0.3


# ---- one Ray simulation: the oracle (Flower's legacy SecAgg+), the spy, dropouts --------

NUM_RAY_NODES = 5
LEGACY_MAX_WEIGHT = 100.0
STAGE_TIMEOUT = 60.0


def legacy_bound(pids: list[int]) -> float:
    """Error bound of Flower's legacy path against the plain weighted mean.

    Each node sends ``quantize(dq_i · x_i)`` (clip ±8, 2**22 levels, stochastic rounding: error
    below one step ``16 / 2**22``) with ``dq_i = round(2**22 · w_i / max_weight) / 2**22`` (off
    by at most 2**-23 from ``w_i / max_weight``); the server divides by ``Σ dq_i``.
    """
    step = 16 / 2**22
    dq = sum(WEIGHTS[p] / LEGACY_MAX_WEIGHT for p in pids)
    return len(pids) * (step + 2**-22 * 4.0) / (dq - len(pids) * 2**-23) * 1.01


def oracle_client_app() -> ClientApp:
    from flwr.client import NumPyClient
    from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
    from flwr.client.mod import secaggplus_mod

    class FixedClient(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):
            update = client_update(self.pid)
            return [update[k] for k in sorted(SPEC)], WEIGHTS[self.pid], {}

    def client_fn(context: Context):
        return FixedClient(int(context.node_config["partition-id"])).to_client()

    app = secagg_client_app()

    @app.train(mods=[secaggplus_mod])  # Flower's legacy SecAgg+ path (message type "train")
    def legacy(msg: Message, context: Context) -> Message:
        return handle_legacy_message_from_msgtype(client_fn, msg, context)

    @app.query("plain")  # a plain round, for timing only
    def plain(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in client_update(pid).items()}),
                    "metrics": MetricRecord({"num-examples": WEIGHTS[pid]}),
                }
            ),
            reply_to=msg,
        )

    return app


def oracle_server_app(out: dict):
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import ServerApp

    class CapturingFedAvg(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            params, metrics = super().aggregate_fit(server_round, results, failures)
            out["legacy"] = parameters_to_ndarrays(params)
            return params, metrics

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            _oracle_main(grid, context)
        except BaseException as exc:  # noqa: BLE001 - reported to the test, not lost in a thread
            out["error"] = repr(exc)

    def _oracle_main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < NUM_RAY_NODES:
            time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
        # 1. A plain round (timing reference; warms every node up).
        for _ in range(2):  # the second one is timed
            start = time.perf_counter()
            replies = grid.send_and_receive(
                [Message(RecordDict(), dst_node_id=n, message_type="query.plain") for n in nodes],
                timeout=STAGE_TIMEOUT,
            )
            assert len([r for r in replies if not r.has_error()]) == NUM_RAY_NODES
            out["plain-seconds"] = time.perf_counter() - start
        # 2. Flower's legacy SecAgg+.
        strategy = CapturingFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=NUM_RAY_NODES,
            min_available_clients=NUM_RAY_NODES,
            initial_parameters=ndarrays_to_parameters(
                [np.zeros(SPEC[k], np.float32) for k in sorted(SPEC)]
            ),
        )
        start = time.perf_counter()
        DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=NUM_RAY_NODES,
                reconstruction_threshold=3,
                max_weight=LEGACY_MAX_WEIGHT,
                timeout=STAGE_TIMEOUT,
            )
        )(
            grid,
            LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy),
        )
        out["legacy-seconds"] = time.perf_counter() - start
        # 3. fedlora's SecAgg+, every reply to the server recorded.
        received: list[Message] = []
        send_and_receive = grid.send_and_receive

        def spy(messages, *, timeout=None):
            replies = list(send_and_receive(messages, timeout=timeout))
            received.extend(replies)
            return replies

        grid.send_and_receive = spy  # type: ignore[method-assign]
        train = RecordDict({"config": ConfigRecord({"server-round": 1})})
        out["secure"] = secure_weighted_sum(
            grid, nodes, train, SETTINGS, SPEC, timeout=STAGE_TIMEOUT
        )
        grid.send_and_receive = send_and_receive  # type: ignore[method-assign]
        out["received"] = [a for m in received if not m.has_error() for a in arrays_in(m.content)]
        # 4. Dropouts after masking (n=5, threshold 3): two are recovered, three fail the round.
        for name, pids in (("two-drop", [1, 3]), ("three-drop", [0, 2, 4])):
            plan = ConfigRecord({"pids": pids, "at": [Stage.UNMASK] * len(pids)})
            content = RecordDict({"config": ConfigRecord({"server-round": 2}), "test-drop": plan})
            try:
                out[name] = secure_weighted_sum(
                    grid, nodes, content, SETTINGS, SPEC, timeout=STAGE_TIMEOUT
                )
            except SecAggError as exc:
                out[name] = exc

    return app


@pytest.fixture(scope="module")
def federation() -> dict:
    from fedlora.simulations.run import offline_environment

    offline_environment()
    from flwr.simulation import run_simulation

    out: dict = {}
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": True},
    }
    start = time.perf_counter()
    run_simulation(
        server_app=oracle_server_app(out),
        client_app=oracle_client_app(),
        num_supernodes=NUM_RAY_NODES,
        backend_name="ray",
        backend_config=backend,
    )
    out["simulation-seconds"] = time.perf_counter() - start
    assert "error" not in out, out["error"]
    return out


@pytest.mark.integration  # a Ray federation
def test_oracle_legacy_secaggplus_and_fedlora_agree_with_the_plain_mean(federation):
    pids = list(range(NUM_RAY_NODES))
    plain = plain_mean(pids)
    legacy = dict(zip(sorted(SPEC), federation["legacy"], strict=True))
    secure = federation["secure"].mean()
    assert secure.keys() == plain.keys()
    assert max_diff(secure, plain) <= SETTINGS.tolerance
    assert max_diff(legacy, plain) <= legacy_bound(pids)
    assert max_diff(secure, legacy) <= SETTINGS.tolerance + legacy_bound(pids)
    assert federation["secure"].total_weight == sum(WEIGHTS[:NUM_RAY_NODES])
    print(
        f"\nsecure {federation['secure'].seconds['total']:.2f} s, legacy SecAgg+ "
        f"{federation['legacy-seconds']:.2f} s, plain round {federation['plain-seconds']:.2f} s"
        f"; max error secure {max_diff(secure, plain):.2e} (bound {SETTINGS.tolerance:.2e}), "
        f"legacy {max_diff(legacy, plain):.2e} (bound {legacy_bound(pids):.2e})"
    )


@pytest.mark.integration  # the module's Ray federation (14.8 s of the unit tier's setup)
def test_server_receives_only_masked_vectors_in_simulation(federation):
    received = federation["received"]
    assert sum(a.size == vector_length(SPEC, SETTINGS) for a in received) == NUM_RAY_NODES
    assert_no_individual_update(received, range(NUM_RAY_NODES), uncorrelated=True)


@pytest.mark.integration  # a Ray federation
def test_dropouts_after_masking_in_simulation(federation):
    two = federation["two-drop"]
    assert not isinstance(two, Exception), two
    assert len(two.contributors) == NUM_RAY_NODES
    assert max_diff(two.mean(), plain_mean(list(range(NUM_RAY_NODES)))) <= SETTINGS.tolerance
    three = federation["three-drop"]
    assert isinstance(three, SecAggError) and "fewer than the threshold 3" in str(three)
