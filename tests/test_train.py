"""The local training loop's options, each against the plain computation it must equal."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.client.node import get_lora_state, set_lora_state
from fedlora.client.train import TrainOptions, sample_batches, steps_for_epochs, train_lora
from fedlora.encoding import encode_examples
from fedlora.errors import ConfigError
from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
from fedlora.prompting import review_example

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)
REVIEWS = [
    ("It worked well and I feel great.", "positive"),
    ("Awful side effects.", "negative"),
    ("No change at all.", "neutral"),
    ("Better sleep, less anxiety.", "positive"),
]


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LORA.peft_config(tiny_model_dir))
    start = initial_adapter(adapter_shapes(tiny_model_dir, LORA), seed=0)
    start = {k: v + (0.01 if "lora_B" in k else 0.0) for k, v in start.items()}  # B != 0
    rows, _ = encode_examples(tok, [review_example(r, a) for r, a in REVIEWS], 128)
    return model, tok, start, rows


def _train(setup, batch_size: int, **options) -> dict[str, np.ndarray]:
    model, tok, start, rows = setup
    set_lora_state(model, start)
    opts = TrainOptions(lr=1e-2, **options)
    batches = sample_batches(
        rows, batch_size, opts.steps * opts.grad_accum, seed=(0,), pad_id=tok.pad_token_id
    )
    stats = train_lora(model, batches, opts)
    assert np.isfinite(stats.loss) and stats.scored_tokens > 0
    return get_lora_state(model)


def _max_diff(a, b) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_gradient_accumulation_equals_one_large_batch(setup):
    # Two micro-batches of 2 accumulate to the step one batch of the same 4 examples takes.
    large = _train(setup, batch_size=4, steps=1)
    accumulated = _train(setup, batch_size=2, steps=1, grad_accum=2)
    moved = _max_diff(large, setup[2])
    assert moved > 1e-3 and _max_diff(large, accumulated) < 0.01 * moved


def test_gradient_checkpointing_changes_memory_not_the_result(setup):
    plain = _train(setup, batch_size=4, steps=2)
    checkpointed = _train(setup, batch_size=4, steps=2, gradient_checkpointing=True)
    assert _max_diff(plain, checkpointed) < 1e-5
    assert not getattr(setup[0], "is_gradient_checkpointing", False)  # switched off after


def test_warmup_starts_from_zero_learning_rate(setup):
    # One step entirely in warmup has learning rate 0: the adapter does not move.
    still = _train(setup, batch_size=4, steps=1, warmup_steps=1, schedule="cosine")
    assert _max_diff(still, setup[2]) == 0.0
    moved = _train(setup, batch_size=4, steps=2, warmup_steps=1, schedule="cosine")
    assert _max_diff(moved, setup[2]) > 0.0


def test_epochs_become_steps_and_options_validate():
    assert steps_for_epochs(examples=10, epochs=1.0, batch_size=4, grad_accum=1) == 3
    assert steps_for_epochs(examples=10, epochs=2.0, batch_size=2, grad_accum=2) == 5
    assert steps_for_epochs(examples=1, epochs=0.01, batch_size=4, grad_accum=1) == 1
    for bad in ({"schedule": "step"}, {"warmup_steps": 9}, {"lr": 2.0}, {"grad_accum": 0}):
        with pytest.raises(ConfigError):
            TrainOptions(steps=5, **bad)


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_model_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, rslora=True)
    assert settings.scaling == pytest.approx(8.0 / 2.0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, settings.peft_config(tiny_model_dir))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(4.0)
    assert LoraSettings(r=4, alpha=8.0).scaling == pytest.approx(2.0)


def _lengths(batches) -> list[list[int]]:
    return [b["attention_mask"].sum(dim=1).tolist() for b in batches]


def test_length_grouping_regroups_the_same_draw_by_length(setup):
    from fedlora.prompting import Encoded

    rows = [Encoded([7] * n, [7] * n, False) for n in (3, 40, 9, 27, 5, 33, 18, 2, 11, 30)]
    plain = _lengths(sample_batches(rows, 2, 5, seed=(4,), pad_id=0))
    grouped = _lengths(sample_batches(rows, 2, 5, seed=(4,), pad_id=0, length_grouping=5))
    # The same examples (one window of 5 batches covers the same draw) ...
    assert sorted(n for b in plain for n in b) == sorted(n for b in grouped for n in b)
    # ... cut into batches of neighbouring lengths, so the padded area shrinks,
    assert sum(max(b) * 2 for b in grouped) < sum(max(b) * 2 for b in plain)
    assert sorted(sorted(b) for b in grouped) == [[2, 3], [5, 9], [11, 18], [27, 30], [33, 40]]
    # ... in a seeded order that is not simply shortest first.
    again = _lengths(sample_batches(rows, 2, 5, seed=(4,), pad_id=0, length_grouping=5))
    assert again == grouped
    # A grouping of 1 is the plain sampler; a partial last window keeps the draw too.
    assert _lengths(sample_batches(rows, 2, 5, seed=(4,), pad_id=0, length_grouping=1)) == plain
    tail = _lengths(sample_batches(rows, 2, 7, seed=(4,), pad_id=0, length_grouping=5))
    plain7 = _lengths(sample_batches(rows, 2, 7, seed=(4,), pad_id=0))
    assert sorted(n for b in tail[5:] for n in b) == sorted(n for b in plain7[5:] for n in b)
    with pytest.raises(ConfigError, match="length-grouping=0"):
        next(sample_batches(rows, 2, 1, seed=(4,), pad_id=0, length_grouping=0))


def test_cpu_training_uses_eager_attention_and_restores_sdpa(setup):
    # Eager attention trains to the same adapter as sdpa (within fp32 rounding) and the model
    # goes back to its own implementation afterwards, so evaluation keeps sdpa.
    model = setup[0]
    assert model.config._attn_implementation == "sdpa"
    seen: list[str] = []
    hook = model.register_forward_pre_hook(
        lambda *_: seen.append(model.config._attn_implementation)
    )
    try:
        eager = _train(setup, batch_size=4, steps=2)
    finally:
        hook.remove()
    assert seen == ["eager", "eager"] and model.config._attn_implementation == "sdpa"
    import fedlora.client.train as train_module

    limit = train_module.EAGER_MAX_LENGTH
    train_module.EAGER_MAX_LENGTH = 0  # every row is "too long": sdpa throughout
    try:
        sdpa = _train(setup, batch_size=4, steps=2)
    finally:
        train_module.EAGER_MAX_LENGTH = limit
    moved = _max_diff(eager, setup[2])
    assert moved > 1e-3 and _max_diff(eager, sdpa) < 1e-4 * max(1.0, moved)


def test_lora_layers_adapts_only_the_top_layers(tiny_model_dir: Path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    top = LoraSettings(r=4, alpha=8.0, layers=1)
    shapes = adapter_shapes(tiny_model_dir, top)
    assert shapes and all(".layers.1." in name for name in shapes)  # the tiny model has 2
    assert len(shapes) * 2 == len(adapter_shapes(tiny_model_dir, LORA))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, top.peft_config(tiny_model_dir))
    assert sorted(get_lora_state(model)) == sorted(shapes)  # nodes and server agree
    with pytest.raises(ConfigError, match="lora-layers=3: the model has only 2 layers"):
        LoraSettings(layers=3).peft_config(tiny_model_dir)
    with pytest.raises(ConfigError, match="lora-layers=-1"):
        LoraSettings(layers=-1)
