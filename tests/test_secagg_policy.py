"""A node's own SecAgg+ policy: what it refuses whatever the server's settings say."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedlora.client.app import RoundRefused, _once_per_round
from fedlora.client.secagg import SecAggPolicy
from fedlora.errors import ConfigError
from fedlora.protocol.messages import CONFIG
from fedlora.protocol.secagg import SecAggProtocolError, SecAggSettings, Stage
from fedlora.server.secagg import SecAggError, secure_weighted_sum
from hostile import VALID_ROUND
from secagg_transcript import SPEC, LocalGrid, expected_mean, max_diff

PAIR = SecAggSettings(clip_norm=4.0, num_shares=3, reconstruction_threshold=2, corrupt_nodes=0)
# three holders and one colluder assumed (the default): 2t > 3 + 1 needs t = 3
THREE = SecAggSettings(clip_norm=4.0, num_shares=3, reconstruction_threshold=3)


def test_a_node_refuses_a_round_of_two_unless_its_operator_allows_it(task_identity):
    grid = LocalGrid((11, 22))
    with pytest.raises(SecAggError):
        secure_weighted_sum(grid, (11, 22), RecordDict(), PAIR, SPEC)
    assert len(grid.errors) == 2 and all("secagg-min-nodes=3" in e for e in grid.errors)

    # (one colluder would be the other node: a round of two assumes none)
    grid = LocalGrid((11, 22), policy=SecAggPolicy(min_nodes=2, corrupt_nodes=0))
    result = secure_weighted_sum(grid, (11, 22), RecordDict(), PAIR, SPEC)
    assert max_diff(result.mean(), expected_mean((11, 22), PAIR)) <= result.tolerance
    assert not grid.errors


def test_three_nodes_join_by_default(task_identity):
    grid = LocalGrid((11, 22, 33), policy=SecAggPolicy())
    result = secure_weighted_sum(grid, (11, 22, 33), RecordDict(), THREE, SPEC)
    assert list(result.contributors) == [11, 22, 33] and not grid.errors
    # threshold 2 of 3 holders: the server and one colluder would hold 2 + 2 shares (the
    # settings assume no colluder; the node's own default of one stands)
    grid = LocalGrid((11, 22, 33), policy=SecAggPolicy())
    with pytest.raises(SecAggError):
        secure_weighted_sum(grid, (11, 22, 33), RecordDict(), PAIR, SPEC)
    assert len(grid.errors) == 3 and all("at least 3" in e for e in grid.errors)


@pytest.mark.parametrize(
    ("holders", "threshold", "policy", "message"),
    [
        (2, 2, SecAggPolicy(), "fewer than this node's secagg-min-nodes=3"),
        (6, 3, SecAggPolicy(corrupt_nodes=0), "needs a threshold of at least 4"),
        (7, 3, SecAggPolicy(corrupt_nodes=0), "needs a threshold of at least 4"),
        (5, 3, SecAggPolicy(), "1 corrupt nodes assumed .* at least 4"),
        (6, 4, SecAggPolicy(corrupt_nodes=2), "2 corrupt nodes assumed .* at least 5"),
        (5, 4, SecAggPolicy(min_threshold=5), "below this node's secagg-min-threshold=5"),
    ],
)
def test_share_graphs_a_node_refuses(holders, threshold, policy, message):
    with pytest.raises(SecAggProtocolError, match=message):
        policy.check(holders, threshold)


def test_the_server_can_only_raise_the_corrupt_bound():
    SecAggPolicy().check(5, 4)
    with pytest.raises(SecAggProtocolError, match="3 corrupt nodes assumed"):
        SecAggPolicy().check(5, 4, announced_corrupt=3)
    with pytest.raises(SecAggProtocolError, match="1 corrupt nodes assumed"):
        SecAggPolicy().check(5, 3, announced_corrupt=0)  # the node's own bound stands


def test_share_graphs_a_node_joins():
    SecAggPolicy().check(5, 4)  # 5 holders, t = 4: the deployment defaults on five nodes
    SecAggPolicy().check(6, 4)
    SecAggPolicy().check(3, 3)
    SecAggPolicy(corrupt_nodes=0).check(5, 3)
    SecAggPolicy(min_nodes=2).check(2, 2)


def test_policy_comes_from_node_config_keys():
    plain = {"secagg-allow-unauthenticated": True}  # tests/test_secagg_auth.py: rosters
    assert SecAggPolicy.from_config(plain) == SecAggPolicy(
        min_nodes=3, min_threshold=2, corrupt_nodes=1
    )
    got = SecAggPolicy.from_config(
        plain
        | {"secagg-min-nodes": 5, "secagg-min-threshold": 3, "secagg-corrupt-nodes": 2, "lr": 1}
    )
    assert got == SecAggPolicy(min_nodes=5, min_threshold=3, corrupt_nodes=2)
    for key, value in (
        ("secagg-min-nodes", 1),
        ("secagg-min-threshold", "3"),
        ("secagg-corrupt-nodes", -1),
    ):
        with pytest.raises(ConfigError, match=f"node config {key}="):
            SecAggPolicy.from_config({key: value})


def _content(server_round: int) -> RecordDict:
    rc = dataclasses.replace(VALID_ROUND, server_round=server_round)
    return RecordDict({CONFIG: rc.to_record()})


def test_a_node_trains_once_per_secure_round():
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    _once_per_round(_content(1), ctx)
    with pytest.raises(RoundRefused, match="secure round 1 asked after round 1"):
        _once_per_round(_content(1), ctx)  # a second setup in the same round
    _once_per_round(_content(2), ctx)
    with pytest.raises(RoundRefused, match="secure round 1 asked after round 2"):
        _once_per_round(_content(1), ctx)
    with pytest.raises(RoundRefused, match="round config cannot be used"):
        _once_per_round(RecordDict(), ctx)
    assert np.isscalar(ctx.state.config_records["fedlora.secagg.rounds"]["last-round"])


def test_a_node_refuses_less_dp_noise_than_its_minimum():
    from fedlora.client.app import round_settings
    from fedlora.client.node import NodeSettings

    merged = {"site": "pain", "dp-min-noise-multiplier": 0.8}
    settings = NodeSettings.from_config(merged)
    assert settings.dp_min_noise_multiplier == 0.8
    for z in (0.0, 0.5):
        rc = dataclasses.replace(VALID_ROUND, dp_noise_multiplier=z, dp_clip_norm=1.0)
        with pytest.raises(RoundRefused, match="below this node's dp-min-noise-multiplier=0.8"):
            round_settings(RecordDict({CONFIG: rc.to_record()}), settings)
    rc = dataclasses.replace(VALID_ROUND, dp_noise_multiplier=1.0, dp_clip_norm=1.0)
    got, _ = round_settings(RecordDict({CONFIG: rc.to_record()}), settings)
    assert got.dp_noise_multiplier == 1.0
    with pytest.raises(ConfigError, match="dp-min-noise-multiplier=-1.0"):
        NodeSettings.from_config({"site": "pain", "dp-min-noise-multiplier": -1})


def test_dropouts_are_checked_per_neighbourhood_before_unmasking(task_identity):
    """Ten nodes on a sparse graph (num_shares 4, t = 3): three dropouts, all neighbours of one
    survivor, leave 7 survivors (plenty in number) but too few holders of that survivor's
    self-mask seed. The server fails the round before asking anyone for a share."""
    from fedlora.server.secagg_stages import Session, collect, setup, share_keys, unmask

    nodes = list(range(101, 111))
    settings = SecAggSettings(clip_norm=4.0, num_shares=4, reconstruction_threshold=3)
    grid = LocalGrid(nodes, record=True)
    s = Session(settings=settings, spec=dict(SPEC), group_id="")
    s.u2 = share_keys(grid, s, setup(grid, s, nodes, RecordDict(), None), None)
    victim = nodes[0]
    gone = sorted(s.neighbours[victim] - {victim})[:3]
    grid.vanish = {n: Stage.COLLECT for n in gone}
    u3 = collect(grid, s, s.u2, None)
    assert len(u3) == 7
    with pytest.raises(SecAggError, match=f"holders of node {victim}'s self-mask seed remain"):
        unmask(grid, s, s.u2, u3, None)
    assert Stage.UNMASK not in grid.sent  # nothing was asked, so nothing was revealed


def test_the_neighbourhood_check_counts_holders_per_secret():
    from fedlora.server.secagg_stages import short_neighbourhoods

    asked = {1: ([1, 2], [9]), 2: ([1, 2], [9]), 3: ([2, 3], [])}
    assert short_neighbourhoods(asked, [1, 2, 3], [9], 2) == [
        "1 holders of node 3's self-mask seed remain, fewer than the threshold 2"
    ]
    assert short_neighbourhoods(asked, [1, 2, 3], [9], 1) == []
    assert "node 7's mask key" in short_neighbourhoods(asked, [1, 2], [7], 1)[0]


def test_unsigned_round_keys_are_warned_about_once_per_process(task_identity, caplog):
    from fedlora.client import secagg

    secagg._warn_unsigned.cache_clear()
    grid = LocalGrid((11, 22, 33))  # no roster: round keys travel unsigned
    with caplog.at_level("WARNING", logger=secagg.log.name):
        for _ in range(2):
            secure_weighted_sum(grid, (11, 22, 33), RecordDict(), THREE, SPEC)
    warnings = [r for r in caplog.records if "round keys are unsigned" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
