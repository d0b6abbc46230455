"""The export's parity gate: tied to the fp32 noise floor measured in the same run."""

from __future__ import annotations

import pytest

from fedlora.export.parity import ParityReport


def _report(diff: float, floor: float, same: bool = True) -> ParityReport:
    return ParityReport(
        max_abs_logits_diff=diff,
        atol=1e-4,
        torch_tokens=[1, 2],
        onnx_tokens=[1, 2] if same else [1, 3],
        same_tokens=same,
        torch_fp32_vs_fp64=floor,
    )


def test_parity_gate_follows_the_fp32_noise_floor() -> None:
    # The adapter the fixed 1e-4 gate refused: 1.7e-4 from fp64 with identical greedy tokens,
    # where PyTorch's own fp32 rounding was of the same size.
    sound = _report(1.7e-4, floor=1.5e-4)
    assert sound.tolerance == pytest.approx(4.5e-4) and sound.ok
    # The fused graph on a random-B adapter of the default model: 2.2 noise floors from fp64.
    assert _report(1.477e-4, floor=6.6e-5).ok
    assert _report(8.4e-5, floor=1e-6).tolerance == 1e-4  # a tiny noise floor: atol holds
    assert _report(8.4e-5, floor=1e-6).ok
    assert not _report(4.6e-4, floor=1.5e-4).ok  # more than three noise floors
    assert not _report(1e-2, floor=1.5e-4).ok  # a broken export
    assert not _report(1e-5, floor=1e-5, same=False).ok  # other greedy tokens
    assert _report(5e-5, floor=float("nan")).tolerance == 1e-4  # no floor measured: atol
