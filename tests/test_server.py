"""The server strategy: validation and dropping of bad replies, FedAvg of deltas, checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message

from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
from fedlora.protocol.adapter import spec_of
from fedlora.protocol.messages import TrainReply, arrays_of
from fedlora.server.build import compose
from fedlora.server.checkpoint import save_adapter
from fedlora.server.settings import StrategySettings
from fedlora.server.strategy import LoraFedAvg
from hostile import reply_metadata

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)


_meta = reply_metadata


def _reply(node: int, delta, n: int, loss: float = 1.0) -> Message:
    content = TrainReply(delta=delta, num_examples=n, train_loss=loss, site_id=node % 5)
    return Message(content=content.to_content(), metadata=_meta(node))


@pytest.fixture()
def global_adapter(tiny_model_dir: Path):
    return initial_adapter(adapter_shapes(tiny_model_dir, LORA), seed=1)


def _deltas(global_adapter, scale: float, seed: int):
    rng = np.random.default_rng(seed)
    return {
        k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in global_adapter.items()
    }


def test_bad_replies_are_dropped_and_the_round_completes(global_adapter, tmp_path):
    d1, d2 = _deltas(global_adapter, 0.1, 1), _deltas(global_adapter, 0.1, 2)
    nan = _deltas(global_adapter, 0.1, 3)
    nan[next(iter(nan))][0, 0] = np.nan
    wrong = _deltas(global_adapter, 0.1, 4)
    wrong[next(iter(wrong))] = np.zeros((3, 3), np.float32)
    failed = Message(error=Error(code=0, reason="node crashed"), metadata=_meta(9))
    history = tmp_path / "metrics.jsonl"
    strategy = LoraFedAvg(
        spec=spec_of(global_adapter),
        global_adapter=dict(global_adapter),
        settings=StrategySettings(history_file=history),
    )

    arrays, metrics = strategy.aggregate_train(
        1,
        [
            _reply(1, d1, 10, 2.0),
            _reply(2, nan, 50),
            _reply(3, d2, 30, 1.0),
            _reply(4, wrong, 50),
            failed,
        ],
    )

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
    folder = save_adapter(trained, tmp_path / "global-adapter", LORA, tiny_model_dir, {"round": 1})
    save_adapter(trained, folder, LORA, tiny_model_dir)  # replacing in place works too

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder)
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(trained)
    for k, v in trained.items():
        np.testing.assert_array_equal(loaded[k].numpy(), v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global-adapter"]  # no temp leftovers


def test_ffa_lora_strategy_takes_b_only_replies_and_leaves_a(global_adapter):
    from fedlora.server.strategies import FFALoRA

    b_only = {k: v for k, v in _deltas(global_adapter, 0.1, 5).items() if "lora_B" in k}
    strategy = LoraFedAvg(
        spec=spec_of(global_adapter), global_adapter=dict(global_adapter), aggregator=FFALoRA()
    )
    arrays, _ = strategy.aggregate_train(1, [_reply(1, b_only, 4), _reply(2, b_only, 6)])
    got = arrays_of(arrays)
    for k, v in global_adapter.items():
        expected = v + b_only[k] if "lora_B" in k else v
        np.testing.assert_allclose(got[k], expected, atol=1e-7)
    # A full (A and B) reply does not fit FFA-LoRA's wire spec: dropped, named.
    full = _deltas(global_adapter, 0.1, 6)
    assert strategy.aggregate_train(2, [_reply(3, full, 4)]) == (None, None)


def test_fedex_residuals_are_checkpointed_and_merged_exactly(
    global_adapter, tiny_model_dir, tmp_path
):
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from fedlora.export.merge import merge_adapter
    from fedlora.lora import RESIDUAL_FILE
    from fedlora.server.strategies import FedExLoRA

    scale = LORA.alpha / LORA.r
    saved = {}

    def keep(server_round, arrays, residuals, record):
        saved["folder"] = save_adapter(
            arrays, tmp_path / "adapter", LORA, tiny_model_dir, {"round": server_round}, residuals
        )

    d1, d2 = _deltas(global_adapter, 0.2, 7), _deltas(global_adapter, 0.2, 8)
    strategy = LoraFedAvg(
        spec=spec_of(global_adapter),
        global_adapter=dict(global_adapter),
        aggregator=FedExLoRA(),
        settings=StrategySettings(scale=scale),
        on_round=keep,
    )
    strategy.aggregate_train(1, [_reply(1, d1, 1), _reply(2, d2, 3)])
    residuals = load_file(str(saved["folder"] / RESIDUAL_FILE))
    assert len(residuals) == len(global_adapter) // 2

    merged = AutoModelForCausalLM.from_pretrained(
        merge_adapter(tiny_model_dir, saved["folder"], tmp_path / "merged"), dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    layer = "base_model.model.model.layers.1.mlp.down_proj"
    a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
    w0 = base.get_submodule("model.layers.1.mlp.down_proj").weight.detach().double().numpy()
    w = merged.get_submodule("model.layers.1.mlp.down_proj").weight.detach().double().numpy()
    # The merged weight is the base plus the example-weighted mean of the clients' updates.
    mean_update = sum(
        n
        / 4
        * scale
        * (
            (global_adapter[b] + d[b]).astype(np.float64)
            @ (global_adapter[a] + d[a]).astype(np.float64)
        )
        for d, n in ((d1, 1), (d2, 3))
    )
    np.testing.assert_allclose(w - w0, mean_update, atol=1e-5)


def test_untrusted_settings_clip_norms_and_take_the_median(global_adapter):
    from fedlora.server.strategies import get_strategy, make_reducer

    honest = [_deltas(global_adapter, 0.01, seed) for seed in (11, 12, 13)]
    poisoned = {k: np.full_like(v, 1e3) for k, v in global_adapter.items()}
    plain = LoraFedAvg(
        spec=spec_of(global_adapter),
        global_adapter=dict(global_adapter),
        aggregator=get_strategy("fedit", make_reducer("median")),
    )
    strategy = compose(plain, clip_norm=0.5)
    replies = [_reply(i, d, 10) for i, d in enumerate(honest)] + [_reply(9, poisoned, 1000)]
    arrays, _ = strategy.aggregate_train(1, replies)

    got = arrays_of(arrays)
    for k, v in global_adapter.items():  # the poisoned client moved nothing past the honest ones
        lo = np.min([h[k] for h in honest], axis=0)
        hi = np.max([h[k] for h in honest], axis=0)
        step = got[k] - v
        assert np.all(step >= np.minimum(lo, 0) - 1e-6) and np.all(step <= np.maximum(hi, 0) + 1e-6)
    assert strategy.history[-1]["clipped"] >= 1


def test_every_round_config_field_comes_from_a_run_config_key_or_is_derived():
    from dataclasses import fields

    from fedlora.config import RunConfig
    from fedlora.protocol.messages import RoundConfig
    from fedlora.server.app import DERIVED_ROUND_FIELDS, round_config

    run_keys = {f.name for f in fields(RunConfig)}
    for f in fields(RoundConfig):
        assert f.name in run_keys or f.name in DERIVED_ROUND_FIELDS, f.name
    cfg = RunConfig(lr=0.01, lora_r=4, lora_alpha=8, grad_accum=3, packing=True, codec="int8")
    rc = round_config(cfg)
    for f in fields(RoundConfig):
        if f.name not in DERIVED_ROUND_FIELDS and f.name != "codec":
            assert getattr(rc, f.name) == getattr(cfg, f.name), f.name
    assert isinstance(rc.lora_alpha, float) and rc.codec == "int8"
    assert rc.dp_noise_multiplier == 0.0  # noise shares are set per round, under SecAgg only
    assert round_config(RunConfig(strategy="ffa-lora")).train_factors == "B"
    # Secure aggregation masks integers: no codec applies, whatever the run config says.
    assert round_config(RunConfig(codec="int8", secure_aggregation=True, min_nodes=2)).codec == (
        "none"
    )
