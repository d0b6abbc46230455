"""Aggregation maths on four-number arrays, against values computed by hand."""

import numpy as np
import pytest

from fedlora.server.aggregate import apply_delta, weighted_mean


def test_weighted_mean_matches_hand_computation():
    u1 = {"w": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
    u2 = {"w": np.array([5.0, 6.0, 7.0, 8.0], np.float32)}
    out = weighted_mean([u1, u2], [1, 3])
    np.testing.assert_allclose(out["w"], [4.0, 5.0, 6.0, 7.0], atol=1e-7)
    assert out["w"].dtype == np.float32


def test_identical_updates_average_to_themselves():
    u = {"a": np.array([0.1, -0.2, 0.3, 1e-8], np.float32)}
    out = weighted_mean([u, u, u], [5, 1, 7])
    np.testing.assert_allclose(out["a"], u["a"], rtol=0, atol=1e-9)


def test_apply_delta_adds_in_place_of_names():
    base = {"a": np.array([1.0, 1.0], np.float32)}
    out = apply_delta(base, {"a": np.array([0.5, -1.0], np.float32)})
    np.testing.assert_array_equal(out["a"], [1.5, 0.0])


@pytest.mark.parametrize(
    "updates, weights",
    [
        ([], []),
        ([{"a": np.zeros(2)}], [0]),
        ([{"a": np.zeros(2)}, {"b": np.zeros(2)}], [1, 1]),
        ([{"a": np.zeros(2)}], [1, 2]),
    ],
)
def test_inconsistent_inputs_raise(updates, weights):
    with pytest.raises(ValueError):
        weighted_mean(updates, weights)
