"""Compression and differential privacy in simulated federations (tiny model, Ray).

The epsilon each round reports must equal dp-accounting's own figure for the same noise
multiplier, sampling rate and number of rounds; compressed replies must be smaller by the
codec's ratio and still train.
"""

import json
import math
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from fedlora.config import RunConfig

pytestmark = pytest.mark.integration  # Ray federations / tiny exports: tens of seconds

BASE = {"quantization": "auto", "local-steps": 2, "lr": 5e-3, "evaluate-every": 0}


def _epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


def test_central_dp_with_int8_ffa_lora_reports_the_accountants_epsilon(tiny_model_dir, tmp_path):
    from fedlora.simulations.run import simulate

    cfg = RunConfig.from_mapping(
        {
            **BASE,
            "base-model": str(tiny_model_dir),
            "num-server-rounds": 2,
            "sites": "mental,pain",
            "output-dir": str(tmp_path),
            "strategy": "ffa-lora",
            "codec": "int8",
            "dp-noise-multiplier": 1.3,
            "dp-clip-norm": 0.5,
            "dp-delta": 1e-4,
        }
    )
    result = simulate(cfg)
    for n, record in enumerate(result.history, start=1):
        assert record["dp-epsilon"] == pytest.approx(_epsilon(1.3, 1.0, n, 1e-4), rel=1e-9)
        for site in record["sites"].values():  # int8 B up: about a quarter of the fp32 B down
            assert 0 < site["bytes-sent"] < site["bytes-received"] / 3.5
    assert result.history[1]["dp-epsilon"] > result.history[0]["dp-epsilon"]
    meta = json.loads((result.adapter_dir / "fedlora.json").read_text())
    assert meta["privacy"]["epsilon"] == pytest.approx(result.history[-1]["dp-epsilon"])
    assert "epsilon" in (Path(cfg.output_dir) / "report.md").read_text()


def test_distributed_dp_under_secure_aggregation_reports_epsilon(tiny_model_dir, tmp_path):
    from fedlora.simulations.run import simulate

    cfg = RunConfig.from_mapping(
        {
            **BASE,
            "base-model": str(tiny_model_dir),
            "num-server-rounds": 1,
            "sites": "reproductive,mental,pain",
            "min-nodes": 2,
            "output-dir": str(tmp_path),
            "secure-aggregation": True,
            "secagg-num-shares": 3,
            "secagg-threshold": 2,
            "dp-noise-multiplier": 0.8,
            "dp-clip-norm": 0.5,
        }
    )
    record = simulate(cfg).history[0]
    assert record["secure-aggregation"] and record["replies"] == 3
    # Each node clipped its own delta and added its share of the noise before masking (the
    # flags are summed inside the masked vectors: the server learns how many, not which).
    assert record["dp-noised"] == 3
    # Every node weighs 1 under DP, but the round still reports the examples they trained on.
    assert record["num-examples"] > 3
    # Charged conservatively: the protected node may be the one missing, so only the other two
    # of the three shares count, z * sqrt(2 / 3).
    z = 0.8 * math.sqrt(2 / 3)
    assert record["dp-noise-multiplier"] == pytest.approx(z)
    assert record["dp-epsilon"] == pytest.approx(_epsilon(z, 1.0, 1, 1e-5), rel=1e-9)
