"""Hostile SecAgg+ replies: a bad reply makes its node a dropout, never the end of the run.

In process (a Grid that calls each node's handler directly, one node's replies corrupted) and
in one real Ray federation (a ClientApp wrapper corrupts one site's secure replies).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.client.secagg import SecAggPolicy
from fedlora.protocol.adapter import spec_of
from fedlora.protocol.secagg import (
    SECURE_METRICS,
    SUMMED_SCALARS,
    Key,
    SecAggSettings,
    Stage,
    vector_length,
)
from fedlora.server.secagg import SecAggError, secure_weighted_sum
from fedlora.server.secure import SecureAggregation
from fedlora.server.settings import StrategySettings
from fedlora.server.strategy import LoraFedAvg
from hostile import VALID_ROUND
from secagg_transcript import (
    NODES,
    SETTINGS,
    SPEC,
    LocalGrid,
    expected_mean,
    max_diff,
    weight_of,
)

BAD = 22


# Messages built outside a ServerApp need a task identity (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("task_identity")


def empty_masked_vector(content: RecordDict) -> None:
    arr = content.array_records[Key.MASKED][Key.VECTOR]
    content.array_records[Key.MASKED][Key.VECTOR] = Array(
        dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype, data=b""
    )


def no_b_shares(content: RecordDict) -> None:
    del content.config_records[Key.CONFIG][Key.B_SHARES]


def one_share_short(content: RecordDict) -> None:
    cfg = content.config_records[Key.CONFIG]
    cfg[Key.B_SHARES] = list(cfg[Key.B_SHARES])[:-1]


def str_ciphertexts(content: RecordDict) -> None:
    cfg = content.config_records[Key.CONFIG]
    cfg[Key.CIPHERTEXTS] = [c.decode("latin-1") for c in cfg[Key.CIPHERTEXTS]]


def extra_metric(content: RecordDict) -> None:
    content.metric_records[Key.METRICS]["update-norm-per-layer"] = 1.5


def not_a_key(content: RecordDict) -> None:
    content.config_records[Key.CONFIG][Key.C_PK] = b"-----BEGIN PUBLIC KEY-----\nnope"


def flip_seed_share(content: RecordDict) -> None:
    cfg = content.config_records[Key.CONFIG]
    shares = list(cfg[Key.B_SHARES])
    shares[0] = shares[0][:10] + bytes([shares[0][10] ^ 0x20]) + shares[0][11:]
    cfg[Key.B_SHARES] = shares


def corrupting(nodes, stage: str, corrupt):
    def apply(node: int, at: str, content: RecordDict) -> None:
        if node in nodes and at == stage:
            corrupt(content)

    return apply


# (stage, corruption, is the bad node's honest masked vector still in the sum?)
KINDS = {
    "empty masked vector": (Stage.COLLECT, empty_masked_vector, False),
    "reply without b-shares": (Stage.UNMASK, no_b_shares, True),
    "one share short": (Stage.UNMASK, one_share_short, True),
    "str ciphertexts": (Stage.SHARE_KEYS, str_ciphertexts, False),
    "non-whitelisted metric": (Stage.COLLECT, extra_metric, False),
    "unparseable public key": (Stage.SETUP, not_a_key, False),
    "flipped byte in a seed share": (Stage.UNMASK, flip_seed_share, True),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_malformed_reply_makes_its_node_a_dropout(kind, caplog):
    stage, corrupt, counted = KINDS[kind]
    grid = LocalGrid(corrupt=corrupting({BAD}, stage, corrupt))
    result = secure_weighted_sum(grid, NODES, RecordDict(), SETTINGS, SPEC)
    contributors = list(NODES) if counted else [n for n in NODES if n != BAD]
    assert list(result.contributors) == contributors
    assert result.total_weight == sum(weight_of(n) for n in contributors)
    assert max_diff(result.mean(), expected_mean(contributors)) <= result.tolerance
    if corrupt is not flip_seed_share:  # a wrong share is outvoted, not attributed
        assert set(result.rejected) == {BAD}, result.rejected
        assert any(f"node {BAD} rejected" in r.getMessage() for r in caplog.records)
    assert not grid.errors


# Three nodes that tolerate one dropout: threshold 2 of 3 holders, with no colluder assumed
# (with the default of one, a node needs 2t > 3 + 1; tests/test_secagg_attacks.py).
TOLERANT = SecAggSettings(clip_norm=4.0, num_shares=3, reconstruction_threshold=2, corrupt_nodes=0)
NO_COLLUDERS = SecAggPolicy(corrupt_nodes=0)


def test_too_few_valid_replies_fail_the_round_cleanly():
    settings = TOLERANT
    grid = LocalGrid(
        (11, 22, 33),
        corrupt=corrupting({22, 33}, Stage.COLLECT, extra_metric),
        policy=NO_COLLUDERS,
    )
    with pytest.raises(SecAggError, match="fewer than the reconstruction threshold") as info:
        secure_weighted_sum(grid, (11, 22, 33), RecordDict(), settings, SPEC)
    assert set(info.value.rejected) == {22, 33}


def test_seed_shares_no_subset_verifies_fail_the_round():
    settings = TOLERANT
    grid = LocalGrid(
        (11, 22, 33),
        corrupt=corrupting({22, 33}, Stage.UNMASK, flip_seed_share),
        policy=NO_COLLUDERS,
    )
    with pytest.raises(SecAggError, match="self-mask seed of node 11"):
        secure_weighted_sum(grid, (11, 22, 33), RecordDict(), settings, SPEC)


def test_a_wrong_sum_is_refused_before_decoding(monkeypatch):
    from fedlora.server import secagg as server

    def garbage(grid, s, u2, u3, timeout, asked=None):
        return np.full(vector_length(SPEC, SETTINGS), 2**39 + 12345, dtype=np.uint64)

    monkeypatch.setattr(server, "unmask", garbage)
    with pytest.raises(SecAggError, match="total weight"):
        secure_weighted_sum(LocalGrid(), NODES, RecordDict(), SETTINGS, SPEC)


def test_every_plain_train_metric_is_summed_or_clear_under_secure_aggregation():
    from fedlora.protocol.messages import TRAIN_METRICS

    # Only the wire version and the site index travel in the clear; the rest ride inside the
    # masked vector (only their sums are revealed).
    assert set(SECURE_METRICS) == {"wire-version", "site-id"}
    assert set(TRAIN_METRICS) <= set(SECURE_METRICS) | set(SUMMED_SCALARS)


# ---- a real strategy: a wrong seed share, then the next round ----------------------------

LORA = {"base_model.model.l.lora_A.weight": (2, 3), "base_model.model.l.lora_B.weight": (3, 2)}


def lora_train_fn(node: int):
    rng = np.random.default_rng(node)
    delta = {k: rng.uniform(-0.5, 0.5, size=s).astype(np.float32) for k, s in LORA.items()}
    metrics = {"train-loss": 0.5, "num-examples": weight_of(node)}
    return lambda content: (delta, weight_of(node), metrics)


def run_rounds(nodes, settings, corrupt, rounds: int = 2):
    glob = {k: np.zeros(s, np.float32) for k, s in LORA.items()}
    sampling = StrategySettings(
        min_available_nodes=len(nodes), min_train_nodes=2, fraction_evaluate=0.0
    )
    plain = LoraFedAvg(spec=spec_of(glob), global_adapter=dict(glob), settings=sampling)
    strategy = SecureAggregation(plain, lambda n: settings)
    adapters = []
    for rnd in range(1, rounds + 1):
        grid = LocalGrid(
            nodes,
            corrupt=corrupt if rnd == 1 else None,
            train_fn=lora_train_fn,
            policy=SecAggPolicy(corrupt_nodes=settings.corrupt_nodes),
        )
        arrays = ArrayRecord({k: Array(v) for k, v in strategy.global_adapter.items()})
        assert list(strategy.configure_train(rnd, arrays, ConfigRecord({}), grid)) == []
        strategy.aggregate_train(rnd, [])
        adapters.append({k: v.copy() for k, v in strategy.global_adapter.items()})
    return strategy, adapters


def test_a_flipped_seed_share_is_outvoted_and_the_next_round_runs():
    nodes = NODES
    _, honest = run_rounds(nodes, SETTINGS, None)
    strategy, got = run_rounds(nodes, SETTINGS, corrupting({BAD}, Stage.UNMASK, flip_seed_share))
    for a, b in zip(got, honest, strict=True):
        assert max(float(np.abs(a[k] - b[k]).max()) for k in LORA) <= 2 * SETTINGS.tolerance
    assert not any(r.get("skipped") for r in strategy.history)


def test_unrecoverable_seed_shares_keep_the_adapter_and_the_next_round_runs():
    nodes = (11, 22, 33)
    strategy, got = run_rounds(nodes, TOLERANT, corrupting({22, 33}, Stage.UNMASK, flip_seed_share))
    first, second = strategy.history
    assert first["skipped"] and "self-mask seed" in first["secagg-error"]
    assert all(not got[0][k].any() for k in LORA)  # round 1: the adapter stayed at zero
    assert not second.get("skipped") and second["replies"] == 3
    assert any(got[1][k].any() for k in LORA)


# ---- a real simulated federation with one hostile site -----------------------------------

HOSTILE_SITE = "pain"
ROUND_CORRUPTION = {"1": (Stage.COLLECT, empty_masked_vector), "2": (Stage.COLLECT, extra_metric)}


def hostile_app(defaults: dict) -> ClientApp:
    from fedlora.client.app import make_client_app
    from fedlora.client.node import NodeSettings

    inner = make_client_app(defaults)
    app = ClientApp()

    @app.train("secagg")
    def secure(msg: Message, context: Context) -> Message:
        reply = inner(msg, context)
        merged = {**defaults, **context.run_config, **context.node_config}
        stage = msg.content.config_records[Key.CONFIG][Key.STAGE]
        plan = ROUND_CORRUPTION.get(msg.metadata.group_id)
        hostile = NodeSettings.from_config(merged).site == HOSTILE_SITE
        if hostile and not reply.has_error() and plan is not None and plan[0] == stage:
            plan[1](reply.content)
        return reply

    return app


def _simulate(tiny_model_dir: Path, out: Path, sites: str, app: ClientApp | None):
    from fedlora.config import RunConfig
    from fedlora.simulations.run import simulate

    cfg = RunConfig.from_mapping(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "auto",
            "num-server-rounds": 2,
            "local-steps": 1,
            "lr": 5e-3,
            "sites": sites,
            "min-nodes": 2,
            "output-dir": str(out),
            "secure-aggregation": True,
            "evaluate-every": 0,
            "secagg-num-shares": 3,
            "secagg-threshold": 2,
            "secagg-corrupt-nodes": 0,  # 2 of 3 holders: one dropout tolerated, no colluder
            "secagg-clip-norm": 50.0,
        }
    )
    defaults = {
        "base-model": cfg.base_model,
        "quantization": cfg.quantization,
        "sites": cfg.sites,
        "secagg-allow-unauthenticated": True,  # simulated nodes: no federation roster
        "secagg-corrupt-nodes": 0,
    }
    return simulate(cfg, client_app=app(defaults) if app else None)


@pytest.mark.integration
def test_a_hostile_site_is_dropped_every_round_of_a_real_federation(
    tiny_model_dir, tmp_path, caplog
):
    from safetensors.numpy import load_file

    bad = _simulate(tiny_model_dir, tmp_path / "bad", "reproductive,mental,pain", hostile_app)
    good = _simulate(tiny_model_dir, tmp_path / "good", "reproductive,mental", None)
    records = [json.loads(x) for x in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert not record.get("skipped") and record["replies"] == 2 and record["dropped"] == 1
        assert set(record["sites"]) == {"reproductive", "mental"}
        assert len(record["rejected"]) == 1  # the hostile node, named with its reason
    assert sum("rejected (a dropout)" in r.getMessage() for r in caplog.records) >= 2
    a = load_file(str(bad.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(good.adapter_dir / "adapter_model.safetensors"))
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 2 * records[0]["secagg-tolerance"] + 1e-6, worst


# ---- DP accounting of secure rounds ---------------------------------------------------


def _dp_strategy(nodes, settings, min_train_nodes: int, z: float = 1.0):
    from fedlora.server.privacy import DpSettings, PrivacyLedger

    glob = {k: np.zeros(s, np.float32) for k, s in LORA.items()}
    ledger = PrivacyLedger(DpSettings(noise_multiplier=z, clip_norm=1.0, sampling_rate=1.0))
    sampling = StrategySettings(
        min_available_nodes=len(nodes), min_train_nodes=min_train_nodes, fraction_evaluate=0.0
    )
    plain = LoraFedAvg(spec=spec_of(glob), global_adapter=dict(glob), settings=sampling)
    return SecureAggregation(plain, lambda n: settings, ledger)


def _secure_round(strategy, nodes, vanish=None):
    grid = LocalGrid(nodes, train_fn=lora_train_fn, vanish=vanish)
    arrays = ArrayRecord({k: Array(v) for k, v in strategy.global_adapter.items()})
    config = VALID_ROUND.to_record()  # the round config the server app sends
    assert list(strategy.configure_train(1, arrays, config, grid)) == []
    strategy.aggregate_train(1, [])
    return strategy.history[-1]


def test_secure_dp_is_charged_for_the_others_shares_only():
    nodes = (11, 22, 33, 44)
    strategy = _dp_strategy(nodes, SETTINGS, min_train_nodes=2)
    record = _secure_round(strategy, nodes)
    assert not record.get("skipped") and record["replies"] == 4
    # the protected node may be the one missing: 3 of the 4 shares protect it
    assert record["dp-noise-multiplier"] == pytest.approx(np.sqrt(3 / 4))


def test_a_decoded_secure_sum_is_charged_even_when_the_round_is_skipped():
    nodes = (11, 22, 33, 44)
    strategy = _dp_strategy(nodes, SETTINGS, min_train_nodes=4)
    record = _secure_round(strategy, nodes, vanish={44: Stage.COLLECT})
    assert record["skipped"] and record["replies"] == 3
    assert all(not v.any() for v in strategy.global_adapter.values())  # nothing applied
    assert record["dp-epsilon"] > 0  # but the server saw the sum: charged
    assert record["dp-noise-multiplier"] == pytest.approx(np.sqrt(2 / 4))
    assert strategy.dp is not None and len(strategy.dp.records) == 1
