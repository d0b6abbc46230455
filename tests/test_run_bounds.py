"""Bounded run settings (issue 37): every numeric run setting and CLI option has a range a real
run can use, checked once, with the hint that fits; nothing past it reaches a node or a loop."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
from typer.testing import CliRunner

from fedlora.cli import OPTION_RANGES, cli
from fedlora.config import RANGES, RunConfig
from fedlora.errors import ConfigError

# Numeric settings with an open bound or a set of values, checked by their own rule.
OWN_RULES = {
    "lr",
    "lora_dropout",
    "eval_fraction",
    "fraction_evaluate",
    "fraction_train",
    "secagg_wire_bits",
}


def test_every_numeric_run_setting_has_a_range():
    numeric = {
        f.name
        for f in fields(RunConfig)
        if isinstance(f.default, int | float) and not isinstance(f.default, bool)
    }
    assert numeric - OWN_RULES <= set(RANGES), sorted(numeric - OWN_RULES - set(RANGES))
    defaults = RunConfig()
    for name, (low, high) in RANGES.items():
        assert low <= getattr(defaults, name) <= high, name


@pytest.mark.parametrize(
    "key, value, expected",
    [
        (
            "num-server-rounds",
            2**63 - 1,
            "num-server-rounds=9223372036854775807: must be <= 100000",
        ),
        ("local-epochs", 1e308, "local-epochs=1e+308: must be <= 10000"),
        ("max-length", 10**8, "max-length=100000000: must be <= 1048576"),
        ("batch-size", 2**31, "must be <= 65536"),
        ("lora-r", 2**20, "lora-r=1048576: must be <= 65536"),
        ("codec-block", 2**40, "codec-block"),
        ("round-timeout", 1e12, "round-timeout"),
        ("seed", 2**64, "seed"),
        ("local-steps", 10**9, "local-steps=1000000000: must be <= 1000000"),
    ],
)
def test_run_settings_past_what_a_run_can_use_are_refused(key, value, expected):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({key: value})
    assert expected in str(e.value) and "\n" not in str(e.value)


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError), result.output
    return str(result.exception)


@pytest.mark.parametrize("alpha", ["inf", "nan", "1e300", "0"])
def test_partition_dirichlet_out_of_range_has_the_fitting_hint(alpha):
    message = _cli(
        "simulate", "--data", "x.jsonl", "--num-clients", "2", "--partition", f"dirichlet:{alpha}"
    )
    assert "alpha must be > 0 and at most" in message and "--partition iid" in message
    assert "raise alpha" not in message


@pytest.mark.parametrize(
    "args, expected",
    [
        (["simulate", "--num-clients", "1000000000"], "--num-clients 1000000000"),
        (["simulate", "--cpus-per-client", "nan"], "--cpus-per-client nan"),
        (["simulate", "--test-fraction", "inf"], "--test-fraction inf"),
        (["plan", "--memory", "nan"], "--memory nan"),
        (["compare", "--config", "x.toml", "--seeds", "0"], "--seeds 0"),
        (["plan", "--tflops", "-1"], "--tflops -1"),
        (["export", "--adapter", "x", "--atol", "nan"], "--atol nan"),
        (["export", "--adapter", "x", "--eval-samples", "0"], "--eval-samples 0"),
    ],
)
def test_cli_options_out_of_range_are_one_line(args, expected):
    message = _cli(*args)
    assert message.startswith(expected) and "use a number in" in message


def test_every_option_range_is_finite_and_ordered():
    for name, (low, high) in OPTION_RANGES.items():
        assert math.isfinite(low) and math.isfinite(high) and low < high, name


def test_demo_settings_from_a_toml_file_are_bounded_too(tmp_path):
    config = tmp_path / "demo.toml"
    config.write_text("client-cpus = nan\n")
    message = _cli("demo", "--config", str(config))
    assert message.startswith("--client-cpus nan") and "use a number in" in message
