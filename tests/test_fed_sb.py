"""Fed-SB: only R travels, the aggregate is exact, the node trains only R, the export folds it."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from fedlora.client.app import run_round
from fedlora.lora import R_WEIGHT, LoraSettings, adapter_shapes, fold_sb, initial_adapter
from fedlora.protocol.messages import ARRAYS, CONFIG, RoundConfig, to_array_record
from fedlora.server.strategies import ClientUpdate, get_strategy, layer_pairs

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0, sb=True)


def _sb_adapter(rng: np.random.Generator, layers: int = 3, r: int = 4) -> dict[str, np.ndarray]:
    shapes = {}
    for i in range(layers):
        prefix = f"base_model.model.model.layers.{i}.mlp.up_proj"
        shapes |= {
            f"{prefix}.lora_A.weight": (r, 12 + i),
            f"{prefix}.lora_B.weight": (10 + 2 * i, r),
            f"{prefix}{R_WEIGHT}": (r, r),
        }
    adapter = initial_adapter(shapes, seed=3)
    for name in adapter:
        if name.endswith(R_WEIGHT):
            adapter[name] = rng.normal(size=adapter[name].shape).astype(np.float32)
    return adapter


def _dense(adapter: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Each layer's weight update scale * B @ R @ A in float64."""
    out = {}
    for prefix, (a, b) in layer_pairs(adapter).items():
        r = adapter[prefix + R_WEIGHT].astype(np.float64)
        out[prefix] = scale * adapter[b].astype(np.float64) @ r @ adapter[a].astype(np.float64)
    return out


def test_aggregate_is_the_weighted_mean_of_the_nodes_b_r_a():
    rng = np.random.default_rng(0)
    glob = _sb_adapter(rng)
    r_names = [n for n in glob if n.endswith(R_WEIGHT)]
    updates, weights = [], [3, 17, 8, 1]
    for w in weights:
        updates.append(
            ClientUpdate({n: rng.normal(size=glob[n].shape).astype(np.float32) for n in r_names}, w)
        )
    result = get_strategy("fed-sb").aggregate(glob, updates, scale=2.0)
    got = _dense(result.new_global, 2.0)
    total = sum(weights)
    for prefix, value in got.items():
        nodes = [
            _dense({**glob, **{n: glob[n] + u.delta[n] for n in r_names}}, 2.0)[prefix]
            for u in updates
        ]
        want = sum(w * d for w, d in zip(weights, nodes, strict=True)) / total
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-6)
    assert not result.residuals
    for name in glob:  # A and B never move
        if not name.endswith(R_WEIGHT):
            np.testing.assert_array_equal(result.new_global[name], glob[name])


def test_a_node_that_moved_a_frozen_factor_is_refused():
    rng = np.random.default_rng(1)
    glob = _sb_adapter(rng)
    a_name = next(n for n in glob if n.endswith(".lora_A.weight"))
    delta = {n: np.zeros_like(v) for n, v in glob.items() if n.endswith(R_WEIGHT)}
    delta[a_name] = np.full_like(glob[a_name], 1e-3)
    with pytest.raises(ValueError, match="keeps A and B frozen.*lora_A"):
        get_strategy("fed-sb").aggregate(glob, [ClientUpdate(delta, 1)])


def test_fed_sb_needs_a_lora_sb_adapter():
    rng = np.random.default_rng(2)
    plain = {k: v for k, v in _sb_adapter(rng).items() if not k.endswith(R_WEIGHT)}
    b = next(n for n in plain if n.endswith(".lora_B.weight"))
    with pytest.raises(ValueError, match="LoRA-SB adapter"):
        get_strategy("fed-sb").aggregate(plain, [ClientUpdate({b: plain[b]}, 1)])


def test_fold_is_exact_and_standard():
    rng = np.random.default_rng(3)
    adapter = _sb_adapter(rng)
    folded = fold_sb(adapter)
    assert not any(n.endswith(R_WEIGHT) for n in folded)
    for prefix, (a, b) in layer_pairs(folded).items():
        want = _dense(adapter, 1.0)[prefix]
        np.testing.assert_allclose(folded[b] @ folded[a], want, rtol=1e-5, atol=1e-6)


def test_initial_sb_adapter_is_seeded_and_starts_at_the_base():
    shapes = {"x.lora_A.weight": (4, 64), "x.lora_B.weight": (32, 4), "x.lora_R.weight": (4, 4)}
    one, two = initial_adapter(shapes, 7), initial_adapter(shapes, 7)
    assert all(np.array_equal(one[k], two[k]) for k in shapes)
    assert not np.any(one["x.lora_R.weight"])  # B @ 0 @ A: the model starts at the base
    assert np.all(np.abs(np.linalg.norm(one["x.lora_A.weight"], axis=1) - 1) < 0.5)
    assert np.all(np.abs(np.linalg.norm(one["x.lora_B.weight"], axis=0) - 1) < 0.5)


def _message(adapter: dict[str, np.ndarray], lr: float = 1e-2) -> RecordDict:
    rc = RoundConfig(
        server_round=1,
        local_steps=4,
        batch_size=4,
        lr=lr,
        max_length=192,
        seed=0,
        lora_r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=LORA.dropout,
        target_modules=LORA.target_modules,
        train_factors="R",
        send_factors="R",
    )
    return RecordDict({ARRAYS: to_array_record(adapter), CONFIG: rc.to_record()})


def test_a_node_trains_only_r_and_sends_only_r(tiny_model_dir: Path):
    shapes = adapter_shapes(tiny_model_dir, LORA)
    assert sum(n.endswith(R_WEIGHT) for n in shapes) == sum(
        n.endswith(".lora_A.weight") for n in shapes
    )
    start = initial_adapter(shapes, seed=0)
    node = {"base-model": str(tiny_model_dir), "quantization": "fp32", "site": "pain"}
    reply = run_round(_message(start), node)
    assert set(reply.delta) == {n for n in shapes if n.endswith(R_WEIGHT)}
    assert all(v.shape == (LORA.r, LORA.r) for v in reply.delta.values())
    assert any(np.abs(v).max() > 0 for v in reply.delta.values())  # R trained
    # The reply is what the server aggregates: a Fed-SB round on it keeps A and B.
    result = get_strategy("fed-sb").aggregate(
        start, [ClientUpdate(reply.delta, reply.num_examples)], LORA.scaling
    )
    for name in shapes:
        if not name.endswith(R_WEIGHT):
            np.testing.assert_array_equal(result.new_global[name], start[name])
