"""A node's training round: what it sends, that it learns, and that it stays warm."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict

from fedlora.client import node as node_mod
from fedlora.client.adapter_state import PERSONAL
from fedlora.client.app import run_round
from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
from fedlora.protocol.adapter import is_lora_name
from fedlora.protocol.messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    TRAIN_METRICS,
    RoundConfig,
    to_array_record,
)

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)


def _message(global_adapter, server_round=1, lr=5e-3, steps=4, train="AB", send="AB") -> RecordDict:
    rc = RoundConfig(
        server_round=server_round,
        local_steps=steps,
        batch_size=4,
        lr=lr,
        max_length=192,
        seed=0,
        lora_r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=LORA.dropout,
        target_modules=LORA.target_modules,
        train_factors=train,
        send_factors=send,
    )
    return RecordDict({ARRAYS: to_array_record(global_adapter), CONFIG: rc.to_record()})


@pytest.fixture(scope="module")
def start_adapter(tiny_model_dir: Path):
    return initial_adapter(adapter_shapes(tiny_model_dir, LORA), seed=0)


# nf4 runs bitsandbytes' CPU kernels (5-15 s here): integration tier; fp32 and bf16 stay unit
@pytest.mark.parametrize(
    "quantization", [pytest.param("nf4", marks=pytest.mark.integration), "bf16", "fp32"]
)
def test_round_trains_and_reply_holds_only_the_adapter_delta(
    tiny_model_dir, start_adapter, quantization
):
    node = {"base-model": str(tiny_model_dir), "quantization": quantization, "site": "pain"}
    reply = run_round(_message(start_adapter), node)
    content = reply.to_content()

    # Privacy guard: one ArrayRecord of LoRA tensors with the server's names and shapes, and
    # whitelisted scalar metrics. No text, no token ids, no base weights.
    assert set(content.keys()) == {ARRAYS, METRICS}
    arrays = {k: v.numpy() for k, v in content.array_records[ARRAYS].items()}
    assert set(arrays) == set(start_adapter) and all(is_lora_name(k) for k in arrays)
    assert all(
        a.dtype == np.float32 and a.shape == start_adapter[k].shape for k, a in arrays.items()
    )
    assert set(content.metric_records[METRICS]) <= TRAIN_METRICS
    assert all(isinstance(v, int | float) for v in content.metric_records[METRICS].values())
    assert reply.num_examples == 81 and np.isfinite(reply.train_loss)
    assert any(np.abs(d).max() > 0 for d in reply.delta.values())  # it trained


@pytest.mark.integration  # three rounds of training until the loss falls (5-16 s)
def test_second_round_reuses_the_loaded_model_and_loss_falls(tiny_model_dir, start_adapter):
    node = {"base-model": str(tiny_model_dir), "quantization": "auto", "site": "mental"}
    adapter = dict(start_adapter)
    losses = []
    for server_round in (1, 2, 3):
        loads_before = node_mod.loads_so_far()
        reply = run_round(_message(adapter, server_round, lr=1e-2, steps=6), node)
        if server_round > 1:
            assert node_mod.loads_so_far() == loads_before, "base model was reloaded"
            assert reply.load_seconds == 0.0
        adapter = {k: adapter[k] + reply.delta[k] for k in adapter}
        losses.append(reply.train_loss)
    assert losses[-1] < losses[0], losses


def test_switching_site_keeps_the_model(tiny_model_dir, start_adapter):
    common = {"base-model": str(tiny_model_dir), "quantization": "auto"}
    run_round(_message(start_adapter), {**common, "site": "pain"})
    loads = node_mod.loads_so_far()
    reply = run_round(_message(start_adapter), {**common, "site": "dermatology"})
    assert node_mod.loads_so_far() == loads and reply.num_examples == 29


def test_node_rejects_a_global_adapter_of_the_wrong_shape(tiny_model_dir, start_adapter):
    bad = dict(start_adapter)
    name = next(iter(bad))
    bad[name] = np.zeros((1, 1), np.float32)
    with pytest.raises(ValueError, match="shape"):
        run_round(
            _message(bad),
            {"base-model": str(tiny_model_dir), "quantization": "auto", "site": "pain"},
        )


def test_ffa_lora_round_freezes_a_and_sends_only_b(tiny_model_dir, start_adapter):
    node = {"base-model": str(tiny_model_dir), "quantization": "auto", "site": "pain"}
    reply = run_round(_message(start_adapter, train="B", send="B"), node)
    assert reply.delta and all(k.endswith("lora_B.weight") for k in reply.delta)
    assert len(reply.delta) == len(start_adapter) // 2
    assert any(np.abs(d).max() > 0 for d in reply.delta.values())
    from fedlora.client.node import get_lora_state

    warm = next(iter(node_mod._MODELS.values()))
    local = get_lora_state(warm.model)
    for k, v in start_adapter.items():  # A still equals the shared init
        if "lora_A" in k:
            np.testing.assert_array_equal(local[k], v)


def test_fedsa_lora_keeps_b_on_the_node_across_rounds(tiny_model_dir, start_adapter):
    node = {"base-model": str(tiny_model_dir), "quantization": "auto", "site": "pain"}
    state = RecordDict()
    first = run_round(_message(start_adapter, train="AB", send="A"), node, state)
    assert all(k.endswith("lora_A.weight") for k in first.delta)  # B never leaves
    personal = {k: v.numpy() for k, v in state.array_records[PERSONAL].items()}
    assert set(personal) == {k for k in start_adapter if "lora_B" in k}
    assert any(np.abs(v).max() > 0 for v in personal.values())  # B trained from zero
    # Round 2: the server's B is still zero, yet training starts from the node's own B.
    global_2 = {k: start_adapter[k] + first.delta.get(k, 0) for k in start_adapter}
    second = run_round(_message(global_2, server_round=2, train="AB", send="A"), node, state)
    assert np.isfinite(second.train_loss)
    warm = next(iter(node_mod._MODELS.values()))
    from fedlora.client.node import get_lora_state

    moved = get_lora_state(warm.model)
    assert any(not np.array_equal(moved[k], personal[k]) for k in personal)
    assert any(np.abs(moved[k]).max() > 0 for k in personal)
