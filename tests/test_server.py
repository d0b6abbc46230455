"""The server strategy: validation and dropping of bad replies, FedAvg of deltas, checkpoints."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message, Metadata

from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
from fedlora.protocol.adapter import spec_of
from fedlora.protocol.messages import TrainReply, arrays_of
from fedlora.server.checkpoint import save_adapter
from fedlora.server.strategy import LoraFedAvg

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="m", group_id="1", created_at=time.time(), ttl=60.0,
                    message_type="train")


def _reply(node: int, delta, n: int, loss: float = 1.0) -> Message:
    content = TrainReply(delta=delta, num_examples=n, train_loss=loss, site_id=node % 5)
    return Message(content=content.to_content(), metadata=_meta(node))


@pytest.fixture()
def global_adapter(tiny_model_dir: Path):
    return initial_adapter(adapter_shapes(tiny_model_dir, LORA), seed=1)


def _deltas(global_adapter, scale: float, seed: int):
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in global_adapter.items()}


def test_bad_replies_are_dropped_and_the_round_completes(global_adapter, tmp_path):
    d1, d2 = _deltas(global_adapter, 0.1, 1), _deltas(global_adapter, 0.1, 2)
    nan = _deltas(global_adapter, 0.1, 3)
    nan[next(iter(nan))][0, 0] = np.nan
    wrong = _deltas(global_adapter, 0.1, 4)
    wrong[next(iter(wrong))] = np.zeros((3, 3), np.float32)
    failed = Message(error=Error(code=0, reason="node crashed"), metadata=_meta(9))
    history = tmp_path / "metrics.jsonl"
    strategy = LoraFedAvg(spec=spec_of(global_adapter), global_adapter=dict(global_adapter),
                          history_file=history)

    arrays, metrics = strategy.aggregate_train(
        1, [_reply(1, d1, 10, 2.0), _reply(2, nan, 50), _reply(3, d2, 30, 1.0),
            _reply(4, wrong, 50), failed])

    assert arrays is not None and metrics is not None
    got = arrays_of(arrays)
    for k, v in global_adapter.items():  # global + (10*d1 + 30*d2) / 40
        np.testing.assert_allclose(got[k], v + (10 * d1[k] + 30 * d2[k]) / 40, atol=1e-6)
    record = json.loads(history.read_text())
    assert record["replies"] == 2 and record["dropped"] == 3
    assert record["train-loss"] == pytest.approx((10 * 2.0 + 30 * 1.0) / 40)


def test_identical_zero_deltas_leave_the_global_adapter_unchanged(global_adapter):
    zero = {k: np.zeros_like(v) for k, v in global_adapter.items()}
    strategy = LoraFedAvg(spec=spec_of(global_adapter), global_adapter=dict(global_adapter))
    arrays, _ = strategy.aggregate_train(1, [_reply(1, zero, 5), _reply(2, zero, 7)])
    for k, v in arrays_of(arrays).items():
        np.testing.assert_array_equal(v, global_adapter[k])


def test_no_usable_reply_keeps_the_global_adapter(global_adapter):
    strategy = LoraFedAvg(spec=spec_of(global_adapter), global_adapter=dict(global_adapter))
    failed = Message(error=Error(code=0, reason="timeout"), metadata=_meta(3))
    assert strategy.aggregate_train(1, [failed]) == (None, None)
    assert all(np.array_equal(strategy.global_adapter[k], v) for k, v in global_adapter.items())


def test_checkpoint_is_a_standard_peft_adapter(global_adapter, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    trained = {k: v + 0.01 for k, v in global_adapter.items()}
    folder = save_adapter(trained, tmp_path / "global-adapter", LORA, tiny_model_dir,
                          {"round": 1})
    save_adapter(trained, folder, LORA, tiny_model_dir)  # replacing in place works too

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder)
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(trained)
    for k, v in trained.items():
        np.testing.assert_array_equal(loaded[k].numpy(), v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global-adapter"]  # no temp leftovers
