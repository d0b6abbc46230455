"""``benchmarks/gpu_check.py`` (``make gpu-check``) without a GPU: its arithmetic, its one-line
skip, and its training measurement on CPU with the tiny model."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", None),  # not taken for an A10's
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_by_device_name(check, name, tflops):
    assert check.peak_tflops(name) == tflops
    assert check.peak_tflops(name, override=100.0) == 100.0


def test_model_flops_match_bench_client_and_the_models_own_linear_layers(check):
    # SmolLM2-135M's shape: the figure tests/test_bench_client.py checks for bench_client.py
    smollm2 = SimpleNamespace(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        num_hidden_layers=30,
    )
    assert check.model_flops_per_token(smollm2) == 4 * 30 * 3_538_944

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**check.LLAMA_1B, "num_hidden_layers": 1, "vocab_size": 16})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    layers = sum(
        m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
    )
    assert check.linear_params(config) == layers


def test_mfu_is_achieved_over_peak(check):
    assert check.mfu(1000.0, 1e9, 1.0) == pytest.approx(1.0)
    assert check.mfu(250.0, 4e9, 2.0) == pytest.approx(0.5)
    assert check.mfu(1000.0, 1e9, None) is None


def test_without_cuda_it_says_so_in_one_line_and_exits_77(check, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    status = check.main([])

    assert status == check.SKIPPED == 77
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["gpu-check: no CUDA GPU visible here; nothing measured (exit 77: skipped)"]


def test_training_measurement_runs_on_cpu(check, tiny_model_dir):
    row = check.measure_training(tiny_model_dir, steps=1, batch=2, seq=32, device="cpu")

    assert row["tokens_per_s"] > 0 and math.isfinite(row["loss"])
    assert row["peak_bytes"] is None  # no GPU memory figure on CPU
    assert row["lora_params"] > 0 and row["flops_per_token"] > 0


def test_planner_column_says_why_when_the_planner_is_missing(check, monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "fedlora.planner", None)  # import raises ImportError

    planned, note = check.planned_bytes(tiny_model_dir, 2, 32)

    assert planned is None and note.startswith("planner not available (")


def test_federation_config_is_a_valid_secure_run(check, tmp_path):
    from fedlora.config import RunConfig

    cfg = RunConfig.from_mapping(check.federation_config(tmp_path), source="test")

    assert cfg.secure_aggregation and cfg.num_server_rounds == 2 and cfg.min_nodes == 8
