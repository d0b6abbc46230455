"""Client-level DP: epsilon equals dp-accounting's own figure; clipping; distributed noise.

Reference values come from dp-accounting used directly in each test (the library is the
reference implementation); tolerance 1e-9 absolute on epsilon.
"""

import itertools
import json
import logging
import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedlora.client.privacy import noise_share_std
from fedlora.clipping import add_noise
from fedlora.errors import ConfigError
from fedlora.server.privacy import DpSettings, PrivacyLedger, effective_noise_multiplier

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def reference_rdp(z: float, q: float, rounds: int, delta: float) -> tuple[float, float]:
    accountant = RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
    return float(epsilon), float(order)


# ---- the ledger --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "z, q, rounds, delta",
    [
        (1.0, 0.5, 5, 1e-5),  # the case where dp-accounting's series fail for fractional orders
        (1.1, 0.1, 20, 1e-5),
        (0.8, 1.0, 3, 1e-6),  # every client every round: no subsampling
        (2.0, 0.01, 50, 1e-5),
    ],
)
def test_epsilon_matches_rdp_accountant(z, q, rounds, delta):
    # Prepare
    ledger = PrivacyLedger(
        DpSettings(noise_multiplier=z, clip_norm=1.0, sampling_rate=q, delta=delta)
    )
    # Execute
    records = [ledger.record_round(r) for r in range(1, rounds + 1)]
    # Assert: cumulative after each round and the round alone, as the library computes them
    for rounds_so_far in (1, rounds // 2 or 1, rounds):
        epsilon, order = reference_rdp(z, q, rounds_so_far, delta)
        assert records[rounds_so_far - 1].epsilon == pytest.approx(epsilon, abs=1e-9)
        assert records[rounds_so_far - 1].order == order
    single = reference_rdp(z, q, 1, delta)[0]
    assert all(r.epsilon_round == pytest.approx(single, abs=1e-9) for r in records)
    assert records[-1].accountant == "rdp" and records[-1].delta == delta


@pytest.mark.integration
def test_epsilon_matches_pld_accountant():
    ledger = PrivacyLedger(DpSettings(1.0, 1.0, sampling_rate=0.2), accountant="pld")
    records = [ledger.record_round(r) for r in (1, 2)]
    reference = PLDAccountant()
    for _ in range(2):
        reference.compose(dp_event.PoissonSampledDpEvent(0.2, dp_event.GaussianDpEvent(1.0)))
    assert records[-1].epsilon == pytest.approx(reference.get_epsilon(1e-5), abs=1e-9)
    assert records[-1].order is None and "dp-rdp-order" not in records[-1].metrics()
    # PLD is tighter than RDP for the same events
    assert records[-1].epsilon < reference_rdp(1.0, 0.2, 2, 1e-5)[0]


def test_cumulative_epsilon_grows_and_round_epsilon_follows_the_noise():
    ledger = PrivacyLedger(DpSettings(1.2, 0.5, sampling_rate=0.3))
    zs = [1.2, 1.2, 0.9, 1.2, 2.0, 1.2]  # e.g. fewer contributors in round 3
    records = [ledger.record_round(r, noise_multiplier=z) for r, z in enumerate(zs, start=1)]
    cumulative = [r.epsilon for r in records]
    assert all(b > a for a, b in itertools.pairwise(cumulative))
    assert records[2].epsilon_round > records[0].epsilon_round > records[4].epsilon_round
    assert ledger.epsilon == cumulative[-1]
    # the mixed sequence is accounted as exactly these events
    reference = RdpAccountant()
    for z in zs:
        reference.compose(dp_event.PoissonSampledDpEvent(0.3, dp_event.GaussianDpEvent(z)))
    assert ledger.epsilon == pytest.approx(reference.get_epsilon(1e-5), abs=1e-9)


def test_rounds_are_recorded_once_in_order_and_need_noise():
    ledger = PrivacyLedger(DpSettings(1.0, 1.0, sampling_rate=0.5))
    ledger.record_round(2)
    with pytest.raises(ValueError, match="round 2 recorded after round 2"):
        ledger.record_round(2)
    with pytest.raises(ValueError, match="give no DP guarantee"):
        ledger.record_round(3, noise_multiplier=0.0)


@pytest.mark.integration
@pytest.mark.parametrize("accountant, rounds", [("rdp", 4), ("pld", 2)])
def test_ledger_round_trips_through_json_and_resumes(accountant, rounds):
    # Prepare: an uninterrupted run, and one checkpointed after its first half
    settings = DpSettings(1.0, 0.7, sampling_rate=0.25, delta=1e-6)
    whole = PrivacyLedger(settings, accountant)
    for r in range(1, rounds + 1):
        whole.record_round(r)
    first = PrivacyLedger(settings, accountant)
    for r in range(1, rounds // 2 + 1):
        first.record_round(r, noise_multiplier=1.0)
    # Execute
    resumed = PrivacyLedger.from_dict(json.loads(json.dumps(first.to_dict())))
    for r in range(rounds // 2 + 1, rounds + 1):
        resumed.record_round(r)
    # Assert: the same records, and the same epsilon as the uninterrupted run (the replay
    # composes equal rounds at once: PLD agrees to ~1e-9, RDP to ~1e-15)
    assert resumed.settings == settings and resumed.accountant == accountant
    assert resumed.records[: rounds // 2] == first.records
    assert resumed.epsilon == pytest.approx(whole.epsilon, rel=1e-8)
    assert [r.epsilon_round for r in resumed.records] == [r.epsilon_round for r in whole.records]
    assert PrivacyLedger.from_dict(resumed.to_dict()).to_dict() == resumed.to_dict()


def test_ledger_refuses_another_version():
    data = PrivacyLedger(DpSettings(1.0, 1.0, sampling_rate=0.5)).to_dict()
    data["version"] = 99
    with pytest.raises(ValueError, match="ledger version 99"):
        PrivacyLedger.from_dict(data)


def test_metrics_and_summary():
    ledger = PrivacyLedger(DpSettings(1.0, 2.0, sampling_rate=0.5))
    record = ledger.record_round(1)
    metrics = record.metrics()
    assert set(metrics) == {
        "dp-epsilon",
        "dp-epsilon-round",
        "dp-delta",
        "dp-noise-multiplier",
        "dp-sampling-rate",
        "dp-rdp-order",
    }
    assert all(isinstance(v, float) for v in metrics.values())
    summary = ledger.summary()
    assert summary["epsilon"] == record.epsilon and summary["rounds"] == 1
    assert summary["clip_norm"] == 2.0 and "client-level" in summary["dp"]
    json.dumps(summary)
    assert DpSettings(1.5, 2.0, sampling_rate=0.5).noise_std == 3.0


def test_convergence_warnings_of_the_library_are_silenced(caplog):
    with caplog.at_level(logging.WARNING):
        PrivacyLedger(DpSettings(1.0, 1.0, sampling_rate=0.5)).record_round(1)
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
    assert not logging.getLogger("absl").filters  # the filter is removed afterwards


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"noise_multiplier": 0.0}, "dp-noise-multiplier"),
        ({"noise_multiplier": -1.0}, "dp-noise-multiplier"),
        ({"noise_multiplier": float("nan")}, "dp-noise-multiplier"),
        ({"clip_norm": 0.0}, "dp-clip-norm"),
        ({"clip_norm": True}, "dp-clip-norm"),
        ({"sampling_rate": 0.0}, "dp-sampling-rate"),
        ({"sampling_rate": 1.5}, "dp-sampling-rate"),
        ({"delta": 0.0}, "dp-delta"),
        ({"delta": 1.0}, "dp-delta"),
        ({"delta": "1e-5"}, "dp-delta"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    values = {"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling_rate": 0.5} | kwargs
    with pytest.raises(ConfigError, match=f"^{field}="):
        DpSettings(**values)
    with pytest.raises(ConfigError, match="dp-accountant='moments'"):
        PrivacyLedger(DpSettings(1.0, 1.0, sampling_rate=0.5), accountant="moments")


# ---- clipping and noise ------------------------------------------------------------------------


def delta(scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        A: (rng.normal(0, scale, (8, 64))).astype(np.float32),
        B: (rng.normal(0, scale, (64, 8))).astype(np.float32),
    }


def test_sum_of_noise_shares_has_std_z_times_c():
    # Prepare: n clients, each adds its share to a zero delta (200k values)
    z, clip, n = 1.1, 0.5, 10
    std = noise_share_std(z, clip, n)
    rng = np.random.default_rng(2026)
    zero = {A: np.zeros((1000, 100), np.float32), B: np.zeros((100, 1000), np.float32)}
    # Execute
    total = {k: np.zeros(v.shape) for k, v in zero.items()}
    for _ in range(n):
        share = add_noise(zero, std, rng)
        for k in total:
            total[k] += share[k]
    values = np.concatenate([v.reshape(-1) for v in total.values()])
    # Assert: std z*C (sampling error of the std estimate ~0.16% here; 2% allowed), mean ~0
    assert std == pytest.approx(z * clip / math.sqrt(n))
    assert values.std() == pytest.approx(z * clip, rel=0.02)
    assert abs(values.mean()) < 5 * z * clip / math.sqrt(values.size)


def test_add_noise_keeps_dtype_is_seeded_and_zero_std_is_identity():
    arrays = delta()
    a = add_noise(arrays, 0.1, np.random.default_rng(5))
    b = add_noise(arrays, 0.1, np.random.default_rng(5))
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float32 for k in arrays)
    same = add_noise(arrays, 0.0, np.random.default_rng(5))
    assert all(np.array_equal(same[k], arrays[k]) for k in arrays)
    with pytest.raises(ValueError, match="std=-1"):
        add_noise(arrays, -1.0, np.random.default_rng(0))


def test_effective_noise_multiplier_when_fewer_answer():
    assert effective_noise_multiplier(1.0, 10, 10) == 1.0
    assert effective_noise_multiplier(1.0, 16, 4) == pytest.approx(0.5)
    assert effective_noise_multiplier(1.0, 4, 0) == 0.0
    # the shares of 4 of 16 clients really sum to std z * C / 2
    share = noise_share_std(1.0, 2.0, 16)
    rng = np.random.default_rng(0)
    total = sum(rng.standard_normal(100_000) * share for _ in range(4))
    assert total.std() == pytest.approx(effective_noise_multiplier(1.0, 16, 4) * 2.0, rel=0.02)
    with pytest.raises(ValueError, match="expected=0"):
        effective_noise_multiplier(1.0, 0, 0)
