"""Heterogeneous LoRA ranks (issue 36, part 2): zero-pad, HetLoRA and FlexLoRA, each against its
paper's formula computed here on small matrices; a node's rank mask through training; the
rules and settings that refuse what cannot work."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora import choices
from fedlora.client.ranks import rank_problem
from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.server.strategies import ClientUpdate, get_strategy

IN, OUT, R_MAX = 7, 5, 4
A, B = "m.lora_A.weight", "m.lora_B.weight"


def _pad(x: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Zero-pad a rank-``rank`` factor to R_MAX along ``axis`` (0: A's rows, 1: B's columns)."""
    out = np.zeros((R_MAX, IN) if axis == 0 else (OUT, R_MAX))
    if axis == 0:
        out[:rank] = x
    else:
        out[:, :rank] = x
    return out


def _setup(seed: int = 0):
    """A global adapter of rank 4 and two clients of ranks 2 and 4: their own (unpadded) local
    factors, their padded deltas as a node sends them, and example counts."""
    rng = np.random.default_rng(seed)
    glob = {A: rng.normal(size=(R_MAX, IN)), B: rng.normal(size=(OUT, R_MAX))}
    clients = []
    for rank, n in ((2, 30), (4, 10)):
        a_k, b_k = rng.normal(size=(rank, IN)), rng.normal(size=(OUT, rank))
        delta = {A: _pad(a_k, rank, 0) - glob[A], B: _pad(b_k, rank, 1) - glob[B]}
        clients.append((rank, a_k, b_k, n, ClientUpdate(delta, n)))
    glob32 = {k: v.astype(np.float32) for k, v in glob.items()}
    updates = [
        ClientUpdate({k: v.astype(np.float32) for k, v in c[4].delta.items()}, c[3])
        for c in clients
    ]
    return glob32, clients, updates


def _new(name: str, glob, updates) -> dict[str, np.ndarray]:
    return get_strategy(name).aggregate(glob, updates, scale=2.0).new_global


def test_zero_pad_is_the_example_weighted_mean_of_padded_factors():
    glob, clients, updates = _setup()
    total = sum(c[3] for c in clients)
    want_a = sum(c[3] / total * _pad(c[1], c[0], 0) for c in clients)
    want_b = sum(c[3] / total * _pad(c[2], c[0], 1) for c in clients)
    new = _new("zero-pad", glob, updates)
    np.testing.assert_allclose(new[A], want_a, atol=1e-5)
    np.testing.assert_allclose(new[B], want_b, atol=1e-5)


def test_hetlora_weights_padded_factors_by_the_norm_of_each_update():
    glob, clients, updates = _setup()
    norms = [np.linalg.norm(c[2] @ c[1], "fro") for c in clients]  # ||B_k A_k||_F
    p = [s / sum(norms) for s in norms]
    want_a = sum(pk * _pad(c[1], c[0], 0) for pk, c in zip(p, clients, strict=True))
    want_b = sum(pk * _pad(c[2], c[0], 1) for pk, c in zip(p, clients, strict=True))
    new = _new("hetlora", glob, updates)
    np.testing.assert_allclose(new[A], want_a, atol=1e-5)
    np.testing.assert_allclose(new[B], want_b, atol=1e-5)
    assert abs(p[0] - clients[0][3] / 40) > 0.05  # the norm weights differ from example weights


def test_flexlora_is_the_truncated_svd_of_the_weighted_mean_product():
    glob, clients, updates = _setup()
    total = sum(c[3] for c in clients)
    w = sum(c[3] / total * (c[2] @ c[1]) for c in clients)  # sum_k w_k B_k A_k, (out, in)
    u, s, vt = np.linalg.svd(w)
    best = (u[:, :R_MAX] * s[:R_MAX]) @ vt[:R_MAX]
    new = _new("flexlora", glob, updates)
    np.testing.assert_allclose(new[B] @ new[A], best, atol=1e-4)
    # each node keeps the first r components: the best rank-r approximation, rank by rank
    for r in (1, 2, 3):
        want = (u[:, :r] * s[:r]) @ vt[:r]
        np.testing.assert_allclose(new[B][:, :r] @ new[A][:r], want, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(new[A], axis=1), 1.0, atol=1e-5)  # A = V^T


def test_hetlora_and_flexlora_refuse_secure_aggregation_and_zero_pad_composes():
    for name in ("hetlora", "flexlora"):
        assert choices.secure_aggregation_problem(name, "mean") is not None
        with pytest.raises(ConfigError, match="secure-aggregation=true"):
            RunConfig(strategy=name, secure_aggregation=True, min_nodes=2, lora_r_max=16)
    assert choices.secure_aggregation_problem("zero-pad", "mean") is None
    RunConfig(strategy="zero-pad", secure_aggregation=True, min_nodes=2, lora_r=4, lora_r_max=16)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"strategy": "fedit", "lora_r": 4, "lora_r_max": 16}, "needs one rank for all"),
        ({"strategy": "fed-sb", "lora_r": 4, "lora_r_max": 16}, "needs one rank for all"),
        ({"strategy": "zero-pad", "lora_r": 16, "lora_r_max": 8}, "exceeds lora-r-max=8"),
        ({"strategy": "zero-pad", "client_ranks": "4,16"}, "client-ranks='4,16' needs lora-r-max"),
        ({"strategy": "hetlora", "lora_r_max": 8, "client_ranks": "4,16"}, "a rank exceeds"),
        ({"strategy": "hetlora", "lora_r_max": 8, "client_ranks": "4,x"}, "positive whole ranks"),
        ({"strategy": "zero-pad", "lora_r_max": -1}, "lora-r-max=-1: must be >= 0"),
    ],
)
def test_rank_settings_are_refused_in_one_line(values, match):
    with pytest.raises(ConfigError, match=match) as info:
        RunConfig(**values)
    assert "\n" not in str(info.value)


def test_a_toml_list_of_client_ranks_is_read():
    cfg = RunConfig.from_mapping(
        {"strategy": "flexlora", "lora-r": 4, "lora-r-max": 16, "client-ranks": [4, 16]}
    )
    assert cfg.node_ranks == [4, 16] and cfg.lora.r == 16 and cfg.heterogeneous


def test_a_node_rank_beyond_the_run_is_refused():
    assert rank_problem(0, 8, 0) is None and rank_problem(4, 4, 16) is None
    assert "exceeds the run's lora-r-max=16" in (rank_problem(32, 4, 16) or "")
    assert "one rank for all" in (rank_problem(4, 8, 0) or "")


def _node_round(tiny_model_dir, node_rank: int):
    """One real training round of a node of ``node_rank`` in a run of lora-r-max 4 (the
    ClientApp as Flower calls it), from an adapter whose every component is non-zero."""
    from fedlora.client.app import make_client_app
    from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
    from fedlora.protocol.messages import ARRAYS
    from test_node_app import _call, _content

    lora = LoraSettings(r=R_MAX, alpha=8.0)
    start = initial_adapter(adapter_shapes(tiny_model_dir, lora), seed=0)
    start = {k: v + (0.01 if "lora_B" in k else 0.0) for k, v in start.items()}
    content = _content(start, local_steps=3, weight_decay=0.1, lora_r=R_MAX, lora_r_max=R_MAX)
    node = {"base-model": str(tiny_model_dir), "quantization": "auto", "site": "pain"}
    reply = _call(make_client_app(), content, "train", node | {"lora-r": node_rank})
    return start, reply, ARRAYS


@pytest.mark.integration  # a real training round of the tiny model: seconds
def test_a_node_trains_only_its_first_r_components_and_sends_them_padded(tiny_model_dir):
    start, reply, arrays = _node_round(tiny_model_dir, 2)
    assert not reply.has_error(), reply.error
    delta = {k: v.numpy() for k, v in reply.content.array_records[arrays].items()}
    for name, d in delta.items():
        local = start[name] + d
        tail = local[2:] if ".lora_A." in name else local[:, 2:]
        head = d[:2] if ".lora_A." in name else d[:, :2]
        assert np.count_nonzero(tail) == 0, name  # zero after 3 AdamW steps with decay
        assert np.abs(head).max() > 0, name  # the node's own components trained


def test_a_node_above_the_runs_rank_is_refused(tiny_model_dir):
    from fedlora.client.app import REFUSED

    _, reply, _ = _node_round(tiny_model_dir, 8)
    assert reply.has_error() and reply.error.code == REFUSED
    assert "lora-r=8 exceeds the run's lora-r-max=4" in reply.error.reason


@pytest.mark.integration  # a Ray federation of the tiny model: seconds
def test_a_federation_of_ranks_2_and_4_runs_flexlora(tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file

    from fedlora.simulations.run import simulate

    cfg = RunConfig.from_mapping(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "auto",
            "num-server-rounds": 1,
            "local-steps": 2,
            "lr": 5e-3,
            "sites": "reproductive,mental",
            "strategy": "flexlora",
            "lora-r": 2,
            "lora-r-max": 4,
            "client-ranks": [2, 4],
            "evaluate-every": 0,
            "output-dir": str(tmp_path / "run"),
        }
    )
    result = simulate(cfg)
    assert result.history[0]["replies"] == 2
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    a_names = [n for n in adapter if ".lora_A." in n]
    assert a_names and all(adapter[n].shape[0] == 4 for n in a_names)
    for name in a_names:  # FlexLoRA's A = V^T: orthonormal rows (rank 4 > 2: both nodes)
        a = adapter[name].astype(np.float64)
        np.testing.assert_allclose(a @ a.T, np.eye(4), atol=1e-4)
