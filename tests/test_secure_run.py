"""Secure aggregation in a real simulated federation: same result as the plain run.

Three sites train the tiny model for one round, once with plain replies and once with SecAgg+.
Training is seeded per (seed, site, round), so both runs see the same client updates; the global
adapters must agree within SecAgg's stated quantization tolerance (plus float32 rounding).
"""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.server.app import secagg_settings

pytestmark = pytest.mark.integration  # Ray federations / tiny exports: tens of seconds


def _run(tiny_model_dir: Path, out: Path, secure: bool):
    from fedlora.simulations.run import simulate

    cfg = RunConfig.from_mapping(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "auto",
            "num-server-rounds": 1,
            "local-steps": 2,
            "lr": 5e-3,
            "sites": "reproductive,mental,pain",
            "min-nodes": 2,
            "output-dir": str(out),
            "secure-aggregation": secure,
            "evaluate-every": 0,
            "secagg-num-shares": 3,
            "secagg-threshold": 2,
            "secagg-clip-norm": 50.0,
        }
    )
    return simulate(cfg)


def test_secure_round_gives_the_plain_global_adapter(tiny_model_dir, tmp_path):
    plain = _run(tiny_model_dir, tmp_path / "plain", secure=False)
    secure = _run(tiny_model_dir, tmp_path / "secure", secure=True)
    record = secure.history[0]
    assert record["secure-aggregation"] and record["replies"] == 3
    assert record["secagg-clipped"] == 0  # the clip is above these updates' norms
    assert set(record["sites"]) == {"reproductive", "mental", "pain"}
    a = load_file(str(plain.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(secure.adapter_dir / "adapter_model.safetensors"))
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= record["secagg-tolerance"] + 1e-6, worst
    assert record["train-loss"] == pytest.approx(plain.history[0]["train-loss"], rel=1e-6)


def test_secure_aggregation_refuses_strategies_that_need_each_update():
    for extra in (
        {"strategy": "fedex-lora"},
        {"aggregation": "median"},
        {"clip-norm": 1.0},
        {"min-nodes": 1},
    ):
        with pytest.raises(ConfigError, match="secure-aggregation|secure aggregation"):
            RunConfig.from_mapping({"secure-aggregation": True, "min-nodes": 2, **extra})


def test_secagg_settings_fit_the_nodes_of_the_round():
    cfg = RunConfig.from_mapping({"secure-aggregation": True, "min-nodes": 2})
    for nodes in (2, 3, 5, 40):
        settings = secagg_settings(cfg, nodes)
        assert settings.reconstruction_threshold <= nodes
        assert settings.reconstruction_threshold > settings.num_shares // 2
    assert secagg_settings(cfg, 40).num_shares == 5


def test_report_survives_a_round_whose_training_was_skipped(tmp_path):
    from fedlora.server.report import write_report

    history = [
        {
            "round": 1,
            "skipped": True,
            "num-examples": 0,
            "replies": 0,
            "dropped": 2,
            "sites": {"pain": {"eval-loss": 1.0, "eval-accuracy": 0.5}},
            "eval-loss": 1.0,
            "eval-accuracy": 0.5,
        }
    ]
    text = write_report(tmp_path, history, {"strategy": "fedit"}).read_text()
    assert "skipped" in text and (tmp_path / "accuracy.png").is_file()


def test_the_threshold_is_raised_to_hold_against_the_assumed_colluders():
    cfg = RunConfig.from_mapping(
        {"secure-aggregation": True, "min-nodes": 2, "secagg-threshold": 3}
    )
    # five holders and one colluder: 2t > 5 + 1
    assert secagg_settings(cfg, 10).reconstruction_threshold == 4
    assert secagg_settings(cfg, 3).reconstruction_threshold == 3  # 2t > 3 + 1
    none = RunConfig.from_mapping(
        {
            "secure-aggregation": True,
            "min-nodes": 2,
            "secagg-threshold": 3,
            "secagg-corrupt-nodes": 0,
        }
    )
    assert secagg_settings(none, 10).reconstruction_threshold == 3
    assert secagg_settings(none, 10).corrupt_nodes == 0
    with pytest.raises(ConfigError, match="secagg-corrupt-nodes=5"):
        RunConfig.from_mapping(
            {"secure-aggregation": True, "min-nodes": 2, "secagg-corrupt-nodes": 5}
        )
