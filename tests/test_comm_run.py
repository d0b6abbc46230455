"""Fewer bytes both ways in a real simulated federation: Fed-SB, a narrow secure wire and an
encoded downlink, against the same run in plain float32."""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora.config import RunConfig
from fedlora.lora import R_WEIGHT, adapter_shapes, initial_adapter

pytestmark = pytest.mark.integration  # Ray federations: tens of seconds

SITES = "reproductive,mental,pain"


def _run(tiny_model_dir: Path, out: Path, rounds: int, **extra):
    from fedlora.simulations.run import simulate

    cfg = RunConfig.from_mapping(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "auto",
            "num-server-rounds": rounds,
            "local-steps": 2,
            "lr": 1e-2,
            "lora-r": 4,
            "sites": SITES,
            "min-nodes": 3,
            "output-dir": str(out),
            "evaluate-every": 0,
            "strategy": "fed-sb",
            "secagg-num-shares": 3,
            "secagg-threshold": 2,
            "secagg-clip-norm": 5.0,
            **extra,
        }
    )
    return cfg, simulate(cfg)


def test_narrow_secure_fed_sb_round_gives_the_plain_global_adapter(tiny_model_dir, tmp_path):
    _, plain = _run(tiny_model_dir, tmp_path / "plain", 1)
    cfg, secure = _run(
        tiny_model_dir,
        tmp_path / "secure",
        1,
        **{"secure-aggregation": True, "secagg-wire-bits": 32},
    )
    record = secure.history[0]
    assert record["secure-aggregation"] and record["replies"] == 3
    shapes = adapter_shapes(tiny_model_dir, cfg.lora)
    r_values = sum(int(np.prod(s)) for n, s in shapes.items() if n.endswith(R_WEIGHT))
    # Up: one uint32 per R value (plus the weight) per node, in the collect stage's vectors.
    assert record["bytes-received"] < 3 * (4 * r_values + 4096)
    # Down: the exact R (float32) in each node's setup message, nothing else of the adapter.
    assert record["downlink-bytes"] == 3 * 4 * r_values
    a = load_file(str(plain.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(secure.adapter_dir / "adapter_model.safetensors"))
    assert not any(k.endswith(R_WEIGHT) for k in a)  # folded: a standard PEFT adapter
    init = initial_adapter(shapes, cfg.seed)
    for name in a:
        assert a[name].shape == b[name].shape
        if ".lora_B." in name:  # B stays the seeded init; R went into A
            np.testing.assert_array_equal(a[name], init[name])
    # Folding multiplies R's error by A (rows of norm ~1): allow the tolerance per R value.
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 4 * (record["secagg-tolerance"] * cfg.lora_r + 1e-6), worst


def test_encoded_downlink_sends_nothing_first_then_the_change(tiny_model_dir, tmp_path):
    cfg, run = _run(tiny_model_dir, tmp_path / "fp16", 3, **{"down-codec": "fp16"})
    shapes = adapter_shapes(tiny_model_dir, cfg.lora)
    r_values = sum(int(np.prod(s)) for n, s in shapes.items() if n.endswith(R_WEIGHT))
    down = [r["downlink-bytes"] for r in run.history]
    assert down[0] == 0  # round 1: every node derives the seeded start itself
    assert down[1] == down[2] == 3 * 2 * r_values  # then the change, in fp16
    assert all(r["replies"] == 3 and not r.get("skipped") for r in run.history)
    assert run.history[-1]["train-loss"] < run.history[0]["train-loss"]
