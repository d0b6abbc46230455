"""Robust aggregation (norm clipping, coordinate-wise median, trimmed mean) on tiny arrays.

Expected values are computed by hand from the definitions (Yin et al., 2018; Sun et al.,
2019); tolerances are stated per test.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedlora.server.strategies import ClientUpdate, FedIT
from fedlora.server.strategies.base import mean_delta
from fedlora.server.strategies.robust import (
    REDUCERS,
    Reducer,
    coordinate_median,
    make_reducer,
    trimmed_mean,
)

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def deltas_of(rows: list[list[float]]) -> list[dict[str, np.ndarray]]:
    """One single-tensor delta ("w", four numbers) per row."""
    return [{"w": arr(*row)} for row in rows]


# ---- coordinate-wise median and trimmed mean -----------------------------------------------


def test_median_matches_hand_computation_odd_and_even():
    # Prepare
    odd = deltas_of([[1, 5, -2, 0], [3, 4, -1, 0], [2, 6, -3, 9]])
    even = deltas_of([[1, 5, -2, 0], [3, 4, -1, 0], [2, 6, -3, 9], [10, 0, 0, 1]])
    # Execute
    med_odd = coordinate_median(odd)
    med_even = coordinate_median(even)
    # Assert: odd n takes the middle value, even n the mean of the two middle values
    np.testing.assert_array_equal(med_odd["w"], [2, 5, -2, 0])
    np.testing.assert_array_equal(med_even["w"], [2.5, 4.5, -1.5, 0.5])
    assert med_odd["w"].dtype == np.float32


def test_trimmed_mean_matches_hand_computation():
    # Prepare: n = 5, trim_fraction 0.2 -> k = 1 value cut at each end of each coordinate
    deltas = deltas_of(
        [[1, 10, 0, -4], [2, 20, 0, -1], [3, 30, 0, -2], [4, 40, 0, -3], [100, -50, 7, -5]]
    )
    # Execute
    out = trimmed_mean(deltas, 0.2)
    # Assert: mean of the middle three values per coordinate
    np.testing.assert_allclose(out["w"], [3, 20, 0, -3], rtol=0, atol=1e-7)
    assert out["w"].dtype == np.float32


def test_trimmed_mean_keeps_tensor_shapes_and_names():
    # Prepare: 2-D tensors, k = floor(0.25 * 4) = 1
    deltas = [
        {A: np.full((2, 3), v, np.float32), B: np.full((4, 2), -v, np.float32)}
        for v in (1.0, 2.0, 3.0, 10.0)
    ]
    # Execute
    out = trimmed_mean(deltas, 0.25)
    # Assert: middle two of (1, 2, 3, 10) average to 2.5
    assert set(out) == {A, B}
    assert out[A].shape == (2, 3) and out[B].shape == (4, 2)
    np.testing.assert_array_equal(out[A], np.full((2, 3), 2.5))
    np.testing.assert_array_equal(out[B], np.full((4, 2), -2.5))


def test_zero_trim_fraction_is_the_unweighted_mean():
    deltas = deltas_of([[1, 2, 3, 4], [3, 2, 1, 0], [5, 5, 5, 5]])
    out = trimmed_mean(deltas, 0.0)
    np.testing.assert_allclose(out["w"], [3, 3, 3, 3], rtol=0, atol=1e-7)


def test_one_poisoned_client_moves_the_mean_but_not_the_robust_statistics():
    # Prepare: four honest clients near 1, one sending huge values
    honest = deltas_of(
        [
            [0.9, -1.0, 1.1, 0.0],
            [1.0, -1.1, 0.9, 0.1],
            [1.1, -0.9, 1.0, -0.1],
            [1.05, -1.05, 0.95, 0.05],
        ]
    )
    poisoned = {"w": arr(1e6, -1e6, 1e6, 1e6)}
    deltas = [*honest, poisoned]
    low = np.min([d["w"] for d in honest], axis=0)
    high = np.max([d["w"] for d in honest], axis=0)
    updates = [ClientUpdate(d, 10) for d in deltas]
    # Execute
    mean = make_reducer("mean")(updates, ["w"])["w"]
    median = make_reducer("median")(updates, ["w"])["w"]
    trimmed = make_reducer("trimmed-mean", trim_fraction=0.2)(updates, ["w"])["w"]
    # Assert
    assert np.all(np.abs(mean) > 1e5)
    for robust in (median, trimmed):
        assert np.all(robust >= low) and np.all(robust <= high), robust


def test_identical_updates_give_that_update_under_every_reducer():
    # Prepare
    update = {
        A: np.array([[0.1, -0.2, 0.3], [1e-8, 4.0, -5.5]], np.float32),
        B: np.array([[0.25], [-0.75]], np.float32),
    }
    updates = [ClientUpdate(update, n) for n in (3, 1, 7, 2, 5)]
    # Execute
    results = {kind: make_reducer(kind, trim_fraction=0.2)(updates, [A, B]) for kind in REDUCERS}
    # Assert: robust statistics exactly, the weighted mean within float64 rounding
    for name in (A, B):
        np.testing.assert_array_equal(results["median"][name], update[name])
        np.testing.assert_array_equal(results["trimmed-mean"][name], update[name])
        np.testing.assert_allclose(results["mean"][name], update[name], rtol=0, atol=1e-9)


def test_mean_reducer_is_the_current_example_weighted_mean():
    # Prepare
    rng = np.random.default_rng(0)
    updates = [
        ClientUpdate(
            {
                A: rng.normal(size=(2, 3)).astype(np.float32),
                B: rng.normal(size=(4, 2)).astype(np.float32),
            },
            n,
        )
        for n in (10, 30, 60)
    ]
    # Execute
    out = make_reducer("mean")(updates, [B, A])
    # Assert: bit for bit what the strategies compute today
    expected = mean_delta(updates, [A, B])
    for name in (A, B):
        np.testing.assert_array_equal(out[name], expected[name])


def test_robust_reducers_ignore_claimed_example_counts():
    deltas = deltas_of([[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]])
    few = [ClientUpdate(d, 1) for d in deltas]
    liar = [ClientUpdate(d, n) for d, n in zip(deltas, (1, 1, 10**6), strict=True)]
    for kind in ("median", "trimmed-mean"):
        reducer = make_reducer(kind, trim_fraction=0.34)
        np.testing.assert_array_equal(reducer(few, ["w"])["w"], reducer(liar, ["w"])["w"])


def test_only_robust_reducers_need_individual_updates():
    assert not make_reducer("mean").needs_individual_updates
    assert make_reducer("median").needs_individual_updates
    assert make_reducer("trimmed-mean").needs_individual_updates


def test_a_reducer_plugs_into_a_strategy_through_aggregate():
    # Prepare: FedIT with its mean swapped for the median, as a strategy with a reducer would do
    class MedianFedIT(FedIT):
        def combine(self, global_adapter, pairs, updates, scale):
            return make_reducer("median")(updates, global_adapter), {}

    glob = {A: np.zeros((1, 2), np.float32), B: np.ones((2, 1), np.float32)}
    updates = [
        ClientUpdate({A: arr(v, -v).reshape(1, 2), B: arr(v, v).reshape(2, 1)}, 1)
        for v in (1.0, 2.0, 1e6)
    ]
    # Execute
    result = MedianFedIT().aggregate(glob, updates)
    # Assert
    np.testing.assert_array_equal(result.new_global[A], [[2.0, -2.0]])
    np.testing.assert_array_equal(result.new_global[B], [[3.0], [3.0]])


def test_trimmed_mean_that_cuts_nothing_warns(caplog: pytest.LogCaptureFixture):
    updates = [ClientUpdate({"w": arr(1, 2, 3, 4)}, 1) for _ in range(3)]
    with caplog.at_level(logging.WARNING):
        make_reducer("trimmed-mean", trim_fraction=0.1)(updates, ["w"])
    assert "cuts nothing" in caplog.text and ">= 10 updates" in caplog.text


# ---- invalid parameters and inputs ---------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.5, 0.7, -0.1, float("nan")])
def test_trimmed_mean_refuses_a_bad_fraction(fraction: float):
    deltas = deltas_of([[1, 2, 3, 4]] * 4)
    with pytest.raises(ValueError, match=r"trim_fraction is .*set it in \[0, 0.5\)"):
        trimmed_mean(deltas, fraction)
    with pytest.raises(ValueError, match="trim_fraction"):
        make_reducer("trimmed-mean", trim_fraction=fraction)


def test_unknown_reducer_names_the_choices():
    with pytest.raises(ValueError, match="unknown reducer 'mode': choose one of mean, median"):
        Reducer("mode")


@pytest.mark.parametrize(
    "deltas, match",
    [
        ([], "no updates"),
        ([{"w": arr(1, 2)}, {"v": arr(1, 2)}], "other tensor names"),
        ([{"w": arr(1, 2)}, {"w": arr(1, 2, 3)}], r"w has shape \(3,\), update 0 \(2,\)"),
    ],
)
def test_inconsistent_updates_raise(deltas: list[dict[str, np.ndarray]], match: str):
    with pytest.raises(ValueError, match=match):
        coordinate_median(deltas)
    with pytest.raises(ValueError, match=match):
        trimmed_mean(deltas, 0.1)
