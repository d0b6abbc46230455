"""A node's training scalars travel inside its masked vector: the server learns only their sums.

Examples, loss, tokens, seconds and the clipped / capped / DP flags are fixed-point integers cut
into limbs small enough that no sum over the nodes a round allows can wrap the modulus; the
norm before clipping never leaves the node.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import RecordDict

from fedlora.protocol.secagg import (
    SCALAR_BITS,
    SECURE_METRICS,
    SUMMED_SCALARS,
    Key,
    SecAggSettings,
    Stage,
    decode_scalars,
    encode_scalars,
    reduce_mod,
    scalar_slots,
    vector_length,
)
from fedlora.protocol.secagg_encoding import limb_bits
from fedlora.server.secagg import secure_weighted_sum
from secagg_transcript import NODES, SETTINGS, SPEC, LocalGrid, update_of, weight_of

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("task_identity")]


def _node_scalars(rng: np.random.Generator) -> dict[str, float]:
    return {
        "num-examples": int(rng.integers(1, 5000)),
        "train-loss": float(rng.uniform(0, 12)),
        "train-tokens": int(rng.integers(0, 10**7)),
        "scored-tokens": int(rng.integers(0, 10**6)),
        "train-seconds": float(rng.uniform(0, 3600)),
        "load-seconds": float(rng.uniform(0, 60)),
        "bytes-sent": int(rng.integers(0, 10**8)),
        "bytes-received": int(rng.integers(0, 10**9)),
        "dp-noised": int(rng.integers(0, 2)),
        "secagg-clipped": int(rng.integers(0, 2)),
        "secagg-weight-capped": int(rng.integers(0, 2)),
    }


def _fixed(name: str, m: dict[str, float]) -> int:
    value = m[name] * (m["num-examples"] if name == "train-loss" else 1)
    return round(value * SUMMED_SCALARS[name])


@pytest.mark.parametrize("wire", [16, 32, 64])
@pytest.mark.parametrize("nodes", [3, 10, 100])
def test_summed_scalars_are_exact_on_every_wire(wire, nodes):
    settings = SecAggSettings.for_nodes(
        1.0, nodes, wire_bits=wire, max_weight=1 if wire == 16 else 100
    )
    rng = np.random.default_rng(wire * 1000 + nodes)
    per_node = [_node_scalars(rng) for _ in range(nodes)]
    total = np.zeros(scalar_slots(settings), dtype=np.uint64)
    for m in per_node:
        total = reduce_mod(total + encode_scalars(m, settings), settings.modulus_bits)
    sums = decode_scalars(total, settings)
    for name, scale in SUMMED_SCALARS.items():
        assert sums[name] == sum(_fixed(name, m) for m in per_node) / scale, name
    loss = sums["train-loss"] / sums["num-examples"]
    exact = sum(m["train-loss"] * m["num-examples"] for m in per_node) / sum(
        m["num-examples"] for m in per_node
    )
    assert loss == pytest.approx(exact, rel=1e-9)
    assert vector_length(SPEC, settings) == 1 + scalar_slots(settings) + 5


@pytest.mark.parametrize("wire", [16, 32, 64])
def test_the_largest_scalars_of_the_most_nodes_do_not_wrap(wire):
    settings = SecAggSettings.for_nodes(1.0, 7, wire_bits=wire, max_weight=1)
    most = settings.max_clients()
    assert most * (2 ** limb_bits(settings) - 1) < 2**settings.modulus_bits
    huge = dict.fromkeys(SUMMED_SCALARS, 1e30)  # clamped to 2**SCALAR_BITS - 1 after scaling
    limbs = encode_scalars(huge, settings)
    total = reduce_mod(limbs * np.uint64(most), settings.modulus_bits)
    sums = decode_scalars(total, settings)
    assert sums["train-tokens"] == pytest.approx(most * (2**SCALAR_BITS - 1), rel=1e-15)


def test_a_negative_or_non_finite_scalar_is_refused():
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="train-seconds"):
            encode_scalars({"train-seconds": bad}, SETTINGS)


def test_a_round_reveals_sums_and_no_node_s_loss_or_norm():
    seen: dict[int, float] = {}

    def train_fn(node):
        def train(content):
            seen[node] = 0.1 * node
            return update_of(node), weight_of(node), {"train-loss": 0.1 * node, "site-id": -1}

        return train

    grid = LocalGrid(NODES, record=True, train_fn=train_fn)
    clip = SecAggSettings(
        clip_norm=1.0,
        num_shares=4,
        reconstruction_threshold=3,
        modulus_bits=40,
        quantization_bits=16,
    )  # below most updates' norms
    result = secure_weighted_sum(grid, NODES, RecordDict(), clip, SPEC)
    # Sums only: examples, the example-weighted loss, how many clipped.
    examples = sum(weight_of(n) for n in NODES)
    assert result.scalars["num-examples"] == examples
    assert result.train_loss == pytest.approx(
        sum(weight_of(n) * seen[n] for n in NODES) / examples, rel=1e-9
    )
    norms = [np.sqrt(sum(float((v**2).sum()) for v in update_of(n).values())) for n in NODES]
    assert result.num_clipped == sum(norm > 1.0 for norm in norms) > 0
    # What each node sent in the clear: the wire version and site index, nothing else; no reply
    # of any stage carries a metric of the node's loss or its norm.
    for stage, replies in grid.replies.items():
        for node, content in replies.items():
            for record in content.metric_records.values():
                assert set(record) <= set(SECURE_METRICS), (stage, node, dict(record))
    collect = grid.replies[Stage.COLLECT]
    assert all(set(c[Key.METRICS]) == {"site-id"} for c in collect.values())
    assert not grid.errors
