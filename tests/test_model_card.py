"""The export bundle's model card: what it reads from a run folder and how it reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedlora.export.card import (
    DEFAULT_BASE,
    DRUG_REVIEWS,
    Variant,
    build_card,
    card_markdown,
    federation_of,
)


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    adapter = run / "global-adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"adapter weights")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA"})
    )
    (adapter / "fedlora.json").write_text(
        json.dumps({"round": 3, "strategy": "fedit", "privacy": {"epsilon": 9.0, "delta": 1e-5}})
    )
    (run / "run.json").write_text(
        json.dumps(
            {"config": {"num-server-rounds": 3, "secure-aggregation": True, "dp-delta": 1e-5}}
        )
    )
    rounds = [
        {"round": 1, "sites": {"a": {}, "b": {}}, "dp-epsilon": 5.1},
        {"round": 2, "sites": {"a": {}, "c": {}}, "dp-epsilon": 9.0},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds) + "\nnot json\n")
    return adapter


def test_the_federation_comes_from_the_run_folder(tmp_path):
    fed = federation_of(_run_folder(tmp_path))
    assert fed["round"] == 3 and fed["strategy"] == "fedit"
    assert fed["num-server-rounds"] == 3 and fed["secure-aggregation"] is True
    assert fed["sites"] == 3  # a, b, c over the rounds
    assert fed["dp-epsilon"] == 9.0 and fed["privacy"]["delta"] == 1e-5


def test_an_adapter_outside_a_run_has_no_federation(tmp_path):
    assert federation_of(tmp_path) == {}


def test_the_card_hashes_weights_and_credits_the_default_base(tmp_path):
    adapter = _run_folder(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"base weights")
    (base / "config.json").write_text("{}")
    variant = Variant(
        "fp32", "onnx", 514.2, {"parity": {"passed": True, "figures": {"x": 1e-5}}}, graph="fused"
    )
    card = build_card(base, adapter, [variant], default_base=True, eval_data=DRUG_REVIEWS)
    assert card["base-model"]["sha256"] == {
        "model.safetensors": hashlib.sha256(b"base weights").hexdigest()
    }
    assert card["base-model"]["licence"] == DEFAULT_BASE["licence"] == "Apache-2.0"
    assert card["adapter"]["sha256"]["adapter_model.safetensors"] == (
        hashlib.sha256(b"adapter weights").hexdigest()
    )
    assert card["adapter"]["r"] == 8
    md = card_markdown(card)
    assert card["variants"][0]["graph"] == "fused"
    assert "| fp32 | fused | `onnx` | 514.2 |" in md and "parity: pass (x 1e-05)" in md
    assert "CC BY 4.0" in md and "secure-aggregation: True" in md
    other = build_card(base, adapter, [variant], default_base=False)
    assert "check the base model's own licence" in other["base-model"]["licence"]
