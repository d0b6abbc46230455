"""A node turns gradient checkpointing on for a round that fits its memory only with it."""

from dataclasses import replace
from pathlib import Path

import pytest

from fedlora.client import app as app_mod
from fedlora.client.memory_plan import GIB, round_checkpointing
from fedlora.client.node import NodeSettings, warm_model
from fedlora.lora import LoraSettings
from fedlora.plan import ModelShape, StepSettings, memory
from fedlora.protocol.messages import RoundConfig

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)
RC = RoundConfig(
    server_round=1,
    local_steps=1,
    batch_size=4,
    lr=1e-3,
    max_length=128,
    seed=0,
    lora_r=LORA.r,
    lora_alpha=LORA.alpha,
    lora_dropout=LORA.dropout,
    target_modules=LORA.target_modules,
)


@pytest.fixture(scope="module")
def node(tiny_model_dir: Path):
    settings = NodeSettings.from_config(
        {"base-model": str(tiny_model_dir), "quantization": "fp32", "site": "pain"}
    )
    return warm_model(settings, LORA)


def _peaks(node) -> tuple[int, int]:
    """The planned training peak of RC's step without and with checkpointing."""
    shape = ModelShape.from_config(node.model.config.to_dict())
    step = StepSettings(
        compute="fp32",
        batch_size=RC.batch_size,
        length=RC.max_length,
        scored=RC.max_length,
        lora_r=LORA.r,
        targets=tuple(sorted({n.split(".lora_")[0].rsplit(".", 1)[1] for n in node.spec})),
    )
    n = sum(s.shape[0] * s.shape[1] for s in node.spec.values())
    off = memory(shape, step, "auto", n, n).train_peak
    on = memory(shape, replace(step, checkpointing=True), "auto", n, n).train_peak
    return off, on


def test_checkpointing_only_where_the_plan_says_the_step_fits_only_with_it(node):
    off, on = _peaks(node)
    assert on < off
    between = (off + on) / 2 / GIB
    assert round_checkpointing(node.model, node.spec, RC, LORA, between)
    assert not round_checkpointing(node.model, node.spec, RC, LORA, 2 * off / GIB)  # fits
    assert not round_checkpointing(node.model, node.spec, RC, LORA, on / 2 / GIB)  # no cure
    assert not round_checkpointing(node.model, node.spec, RC, LORA, 0.0)  # check off
    asked = replace(RC, gradient_checkpointing=True)
    assert round_checkpointing(node.model, node.spec, asked, LORA, 0.0)  # the server's word


def test_a_round_trains_checkpointed_under_the_nodes_memory_gib(
    node, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    from flwr.app import RecordDict

    from fedlora.lora import adapter_shapes, initial_adapter
    from fedlora.protocol.messages import ARRAYS, CONFIG, to_array_record

    seen: list[bool] = []
    real = app_mod.train_lora

    def spy(model, batches, options):
        seen.append(options.gradient_checkpointing)
        return real(model, batches, options)

    monkeypatch.setattr(app_mod, "train_lora", spy)
    off, on = _peaks(node)
    start = initial_adapter(adapter_shapes(tiny_model_dir, LORA), seed=0)
    message = RecordDict({ARRAYS: to_array_record(start), CONFIG: RC.to_record()})
    base = {"base-model": str(tiny_model_dir), "quantization": "fp32", "site": "pain"}
    app_mod.run_round(message, base | {"memory-gib": (off + on) / 2 / GIB})
    app_mod.run_round(message, base)
    assert seen == [True, False]


def test_memory_gib_must_not_be_negative():
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="memory-gib=-1.0"):
        NodeSettings.from_config({"site": "pain", "memory-gib": -1})
