"""The one L2 clipper (fedlora.clipping): nodes before DP noise and SecAgg+, the server for
central DP and norm-bounded robust aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.clipping import clip_l2, global_norm

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def delta(scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        A: (rng.normal(0, scale, (8, 64))).astype(np.float32),
        B: (rng.normal(0, scale, (64, 8))).astype(np.float32),
    }


def test_clip_below_the_bound_leaves_the_update_bit_identical():
    # Prepare: norm sqrt(9 + 16) = 5
    delta = {A: arr(3, 0).reshape(1, 2), B: arr(0, 4).reshape(2, 1)}
    # Execute
    clipped, norm, _ = clip_l2(delta, 5.0)
    # Assert
    assert norm == pytest.approx(5.0, abs=1e-12)
    for name in delta:
        assert clipped[name] is delta[name]
        assert clipped[name].tobytes() == delta[name].tobytes()


def test_clip_above_the_bound_scales_to_max_norm_and_keeps_the_direction():
    # Prepare
    rng = np.random.default_rng(1)
    delta = {
        A: rng.normal(size=(2, 3)).astype(np.float32),
        B: rng.normal(size=(4, 2)).astype(np.float32),
    }
    flat = np.concatenate([delta[A].ravel(), delta[B].ravel()]).astype(np.float64)
    # Execute
    clipped, norm, _ = clip_l2(delta, 0.5)
    # Assert
    out = np.concatenate([clipped[A].ravel(), clipped[B].ravel()]).astype(np.float64)
    assert norm == pytest.approx(np.linalg.norm(flat), rel=1e-12)
    assert np.linalg.norm(out) == pytest.approx(0.5, abs=1e-6)
    np.testing.assert_allclose(out, flat * (0.5 / norm), rtol=1e-6, atol=0)
    assert clipped[A].dtype == np.float32 and clipped[A].shape == (2, 3)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("inf"), float("nan")])
def test_clip_refuses_a_bad_bound(max_norm: float):
    with pytest.raises(ValueError, match="max-norm=.*set a positive, finite L2 bound"):
        clip_l2({"w": arr(1, 2)}, max_norm, "max-norm")


def test_clip_refuses_a_non_finite_update():
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_l2({"w": arr(1, np.inf)}, 1.0)


@pytest.mark.parametrize("clip", [1e-3, 0.5, 3.0, 31.0])
def test_clip_bounds_the_global_norm(clip):
    # Prepare: a delta of norm 31.14 over two tensors
    arrays = delta()
    norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.values()))
    # Execute
    clipped, before, scale = clip_l2(arrays, clip)
    # Assert: norm at most C (in float64, after the float32 cast) and within 1e-6 of it
    after = global_norm(clipped)
    assert before == pytest.approx(norm, rel=1e-12)
    assert after <= clip and after == pytest.approx(clip, rel=1e-6)
    assert scale == pytest.approx(clip / norm, rel=1e-6)
    assert all(clipped[k].dtype == np.float32 for k in arrays)
    # the direction is kept
    np.testing.assert_allclose(clipped[A] / scale, arrays[A], rtol=1e-5, atol=1e-6)


def test_clip_leaves_small_deltas_alone_and_rejects_bad_input():
    arrays = delta(scale=1e-3)
    clipped, before, scale = clip_l2(arrays, 10.0)
    assert scale == 1.0 and before < 10.0
    assert all(np.array_equal(clipped[k], arrays[k]) for k in arrays)
    assert clip_l2({A: np.zeros((2, 2), np.float32)}, 1.0)[1:] == (0.0, 1.0)
    with pytest.raises(ValueError, match="dp-clip-norm=0"):
        clip_l2(arrays, 0, "dp-clip-norm")
    arrays[A][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_l2(arrays, 1.0)
