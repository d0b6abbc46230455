"""The arithmetic of ``benchmarks/bench_client.py``'s hardware-use figures (MFU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_client.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_client", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_client"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


# SmolLM2-135M's published shape: 30 layers, hidden 576, 9 heads (3 key-value), MLP 1536.
SMOLLM2 = SimpleNamespace(
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    num_hidden_layers=30,
)


def test_model_flops_are_four_times_the_non_embedding_parameters(bench) -> None:
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536
    assert per_layer == 3_538_944
    assert bench.model_flops_per_token(SMOLLM2) == 4 * 30 * per_layer  # about 4 x 106M


def test_mfu_uses_the_peak_of_the_runs_compute_dtype(bench) -> None:
    peak = bench.Result(bench.Job("peak", "-", 0), extra={"bfloat16": 2e12, "float32": 5e11})

    def run(backend: str) -> object:
        # 100 tokens in 1 s at 1e9 FLOP per token = 1e11 FLOP/s
        return bench.Result(
            bench.Job("fedlora", backend, 1),
            tokens=100,
            seconds=1.0,
            extra={"flops_per_token": 1e9},
        )

    assert bench.mfu(run("bf16"), peak) == "5.0%"  # 1e11 / 2e12
    assert bench.mfu(run("nf4"), peak) == "5.0%"
    assert bench.mfu(run("fp32"), peak) == "20.0%"  # 1e11 / 5e11
    assert bench.mfu(run("bf16"), None) == "-"
    assert bench.mfu(run("bf16"), bench.Result(bench.Job("peak", "-", 0), error="x")) == "-"


def _rows(lengths):
    from fedlora.prompting import Encoded

    return [Encoded([1] * n, [1] * n, False) for n in lengths]


@pytest.mark.parametrize("steps,draw", [(6, 6), (3, 6), (5, 7), (9, 9)])
def test_bare_loop_trains_exactly_the_rows_fedlora_trained(bench, steps, draw) -> None:
    # Whether fedlora ran all the batches it drew or was stopped early by the budget, the bare
    # loop gets the same rows (a multiset), grouped as drawn instead of by length.
    rows = _rows([(37 * i) % 200 + 5 for i in range(60)])
    fed = bench._draw(rows, draw, bench.LENGTH_GROUPING, pad_id=0)[:steps]
    bare = bench.bare_order(rows, steps, draw, pad_id=0)
    assert len(bare) == steps and all(len(b) == bench.BATCH_SIZE for b in bare)
    assert sorted(i for b in bare for i in b) == sorted(i for b in fed for i in b)
    if steps == draw:  # a complete draw: the sampler's own batches without grouping
        assert bare == bench._draw(rows, draw, 1, pad_id=0)


def test_length_grouping_pads_less_on_the_bench_rows(bench) -> None:
    rows = _rows([(37 * i) % 200 + 5 for i in range(60)])

    def padded(batches):
        return sum(max(len(rows[i].input_ids) for i in b) * len(b) for b in batches)

    grouped = bench._draw(rows, 8, bench.LENGTH_GROUPING, pad_id=0)
    plain = bench._draw(rows, 8, 1, pad_id=0)
    assert bench.LENGTH_GROUPING > 1 and padded(grouped) < 0.8 * padded(plain)
