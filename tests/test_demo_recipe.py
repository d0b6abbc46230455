"""The demo's choices per machine: every site trains at once, and a lighter recipe in fp32."""

import math

import pytest

from fedlora.cli import _demo_defaults
from fedlora.config import RunConfig
from fedlora.simulations.demo import FP32_RECIPE, DemoOptions, packed_cpus


@pytest.mark.parametrize(("sites", "cpus"), [(5, 2), (3, 2), (7, 3), (5, 16), (1, 2), (2, 2)])
def test_packed_cpus_lets_every_site_run_at_once_without_overbooking(sites: int, cpus: int):
    share = packed_cpus(sites, cpus)
    assert 0 < share <= 1.0
    # Flower's actor pool is int(node CPUs / share) actors; Ray books shares at 1e-4
    assert int(cpus / share) >= min(sites, cpus * int(1 / share))
    assert min(sites, int(cpus / share)) * math.ceil(share * 1e4) <= cpus * 1e4
    if sites > cpus:
        assert int(cpus / share) >= sites  # no second wave


def test_demo_packs_sites_by_default_and_takes_an_explicit_share():
    assert DemoOptions().client_cpus == 0.0
    assert DemoOptions(client_cpus=1.0).client_cpus == 1.0


def test_fp32_machines_get_the_lighter_demo_recipe(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FEDLORA_CPU_BF16", "0")  # what an AVX2-only CPU answers
    light = _demo_defaults()
    assert {k: light[k] for k in FP32_RECIPE} == FP32_RECIPE
    cfg = RunConfig.from_mapping(light)
    assert cfg.lora.layers == 15 and cfg.max_length == 160
    assert cfg.secure_aggregation and cfg.num_server_rounds == RunConfig.num_server_rounds
