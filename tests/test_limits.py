"""A node's sanity limits as pure functions (client/limits.py): a tiny Llama-style shape, a
budget in bytes, and the round settings each limit refuses or lets through."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fedlora.client.limits import ModelLimits, NodeBudget, limit_problem, machine_bytes
from fedlora.plan import GIB, ModelShape
from fedlora.protocol.messages import RoundConfig

SHAPE = ModelShape(
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=16,
    intermediate=128,
    vocab=512,
    tied=True,
    file_bytes_per_param=4,
)
MODEL = ModelLimits(context=1024, hidden=64, layers=2, shape=SHAPE)
BUDGET = NodeBudget(
    dev="cpu",
    quantization="fp32",
    compute="fp32",
    memory_bytes=4 * GIB,
    max_batch_size=0,
    max_local_steps=100,
)
RC = RoundConfig(
    server_round=1,
    local_steps=5,
    batch_size=4,
    lr=1e-3,
    max_length=256,
    seed=0,
    lora_r=8,
    lora_alpha=16.0,
    lora_dropout=0.0,
    target_modules="all-linear",
)
# the adapter's values at r=8: 8 x (in + out) of every linear layer, 2 layers
ADAPTER = 8 * sum(a + b for a, b in SHAPE.linear_shapes().values()) * 2


def test_a_round_within_every_limit_passes():
    assert limit_problem(RC, MODEL, BUDGET) == ""
    edge = replace(RC, max_length=1024, lora_r=64, lora_layers=2, codec_block=ADAPTER)
    assert limit_problem(edge, MODEL, BUDGET) == ""


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"max_length": 1025}, "max-length=1025 exceeds the model's context of 1024"),
        ({"lora_r": 65}, "lora-r=65 exceeds the model's hidden size 64"),
        ({"lora_layers": 3}, "lora-layers=3 exceeds the model's 2 layers"),
        ({"codec_block": ADAPTER + 1}, f"exceeds the adapter's {ADAPTER} values"),
        ({"local_steps": 51, "grad_accum": 2}, "exceeds this node's max-local-steps=100"),
        ({"batch_size": 4096, "max_length": 1024}, "does not fit this node's 4.0 GiB"),
    ],
)
def test_each_limit_names_the_setting_and_the_bound(change, expected):
    assert expected in limit_problem(replace(RC, **change), MODEL, BUDGET)


def test_epochs_are_bounded_once_the_data_is_known():
    # local-epochs rounds are checked against max-local-steps after the data gives the steps
    assert limit_problem(replace(RC, local_epochs=1e4, local_steps=10**6), MODEL, BUDGET) == ""


def test_node_settings_tighten_the_limits():
    tight = replace(BUDGET, max_batch_size=2, memory_bytes=GIB // 4)
    assert "max-batch-size=2" in limit_problem(RC, MODEL, tight)
    found = limit_problem(replace(RC, batch_size=2, max_length=1024), MODEL, tight)
    assert "at most batch" in found


def test_a_model_the_planner_does_not_know_bounds_the_batch_tokens():
    unknown = replace(MODEL, shape=None)
    assert limit_problem(RC, unknown, BUDGET) == ""
    assert "tokens" in limit_problem(replace(RC, batch_size=2048, max_length=1024), unknown, BUDGET)


def test_the_machine_memory_is_the_default_budget():
    assert machine_bytes("cpu", 0.5) == GIB // 2
    assert machine_bytes("cpu", 0.0) > GIB // 2  # the machine's RAM
