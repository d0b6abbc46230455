"""Checkpoint and resume, and a single-site run, on the simulation engine (tiny model, fp32)."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.server.state import check_resumable, load_state
from fedlora.simulations.run import simulate

pytestmark = pytest.mark.integration  # Ray federations / tiny exports: tens of seconds


def _cfg(model: Path, out: Path, rounds: int, **extra) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "base-model": str(model),
            "quantization": "fp32",
            "num-server-rounds": rounds,
            "local-steps": 2,
            "lr": 5e-3,
            "sites": "mental,pain",
            "server-optimizer": "adam",
            "output-dir": str(out),
            **extra,
        }
    )


def _final(out: Path) -> dict:
    return load_file(str(out / "global-adapter" / "adapter_model.safetensors"))


def test_resumed_run_ends_like_an_uninterrupted_one(tiny_model_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    simulate(_cfg(tiny_model_dir, straight, 3))
    simulate(_cfg(tiny_model_dir, resumed, 2))  # "crashes" after round 2 ...
    assert load_state(resumed).completed_round == 2
    simulate(_cfg(tiny_model_dir, resumed, 3, resume=True))  # ... and is resumed

    a, b = _final(straight), _final(resumed)
    assert set(a) == set(b)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    rounds = [json.loads(x)["round"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    state = load_state(resumed)
    assert state.completed_round == 3 and state.optimizer.num_steps == 3


def test_resume_refuses_changed_settings(tmp_path):
    with pytest.raises(ConfigError, match="lr was 0.001, now 0.002"):
        check_resumable(
            {"lr": 0.001, "num-server-rounds": 2}, {"lr": 0.002, "num-server-rounds": 3}, tmp_path
        )
    check_resumable(
        {"lr": 0.001, "num-server-rounds": 2}, {"lr": 0.001, "num-server-rounds": 5}, tmp_path
    )  # more rounds is fine


def test_single_site_run_completes(tiny_model_dir, tmp_path):
    result = simulate(
        _cfg(tiny_model_dir, tmp_path, 2, sites="dermatology", **{"server-optimizer": "sgd"})
    )
    assert [r["replies"] for r in result.history] == [1, 1]
