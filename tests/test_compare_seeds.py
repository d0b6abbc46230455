"""fedlora compare over seeds: means with Student-t intervals and paired differences."""

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from fedlora.errors import ConfigError
from fedlora.simulations.compare import CompareConfig, with_seeds
from fedlora.simulations.stats import mean_ci, paired_diff
from test_compare import toml
from test_partition import write_chat


def test_the_interval_is_student_t_over_the_seeds():
    values = [0.7203, 0.7177, 0.7282]
    got = mean_ci(values)
    low, high = scipy_stats.t.interval(
        0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values)
    )
    assert got.mean == pytest.approx(np.mean(values))
    assert got.std == pytest.approx(np.std(values, ddof=1))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))
    assert got.text() == f"{np.mean(values) * 100:.1f} +- {(high - low) / 2 * 100:.1f}"
    one = mean_ci([0.5])  # one seed says nothing about the spread
    assert one.mean == 0.5 and math.isnan(one.low) and one.text() == "50.0"
    assert one.to_json()["ci-low"] is None


def test_paired_differences_cancel_what_the_seeds_share():
    # the seeds move both methods together: each method's interval is wide, their difference's
    # is narrow and excludes zero
    a, b = [0.60, 0.70, 0.80], [0.62, 0.72, 0.83]
    diff = paired_diff(b, a)
    assert diff.mean == pytest.approx(0.0233, abs=1e-4)
    assert diff.low > 0 and diff.half_width < mean_ci(b).half_width / 5
    with pytest.raises(ValueError, match="different lengths"):
        paired_diff([1.0], [1.0, 2.0])


def test_seeds_come_from_the_file_or_the_command_line(tmp_path):
    text = '[compare]\nmethods = ["fedit"]\nseeds = [3, 4]\n[run]\nseed = 7\n'
    cc = CompareConfig.from_toml(toml(tmp_path, text))
    assert cc.seeds == (3, 4)
    assert with_seeds(cc, 3).seeds == (7, 8, 9)
    with pytest.raises(ConfigError, match="--seeds 0"):
        with_seeds(cc, 0)
    for bad in ("[1, 1]", '["a"]', "[-1]"):
        with pytest.raises(ConfigError, match="seeds"):
            CompareConfig.from_toml(toml(tmp_path, text.replace("[3, 4]", bad)))


@pytest.mark.integration
def test_compare_with_three_seeds_prints_means_with_intervals(tiny_model_dir, tmp_path, capsys):
    from fedlora.cli import main

    data = write_chat(tmp_path / "chat.jsonl", n=60)
    out = tmp_path / "cmp"
    path = toml(
        tmp_path,
        f"""
[compare]
data = "{data}"
partition = "iid"
num-clients = 2
test-fraction = 0.25
methods = ["fedit", "ffa-lora"]
output = "{out}"

[run]
base-model = "{tiny_model_dir}"
quantization = "fp32"
num-server-rounds = 1
local-steps = 2
lr = 0.005
min-nodes = 2
""",
    )
    main(["compare", "--config", str(path), "--seeds", "3"])
    printed = capsys.readouterr().out
    doc = json.loads((out / "compare.json").read_text())
    assert doc["seeds"] == [0, 1, 2] and doc["reference"] == "fedit"
    for name in ("fedit", "ffa-lora"):
        per_seed = doc["methods"][name]["accuracy-per-seed"]
        assert len(per_seed) == 3
        ci = mean_ci(per_seed)
        assert doc["methods"][name]["accuracy"] == pytest.approx(ci.mean)
        assert doc["methods"][name]["accuracy-ci"]["ci-low"] == pytest.approx(ci.low)
        assert f"| {name} | {ci.text()} |" in printed
        for seed in (0, 1, 2):  # each seed's own comparison, on its own split
            assert (out / f"seed-{seed}" / "compare.json").is_file()
    from fedlora.data import partitioned

    splits = {
        (out / f"seed-{s}" / "partition" / partitioned.INDICES).read_bytes() for s in (0, 1, 2)
    }
    assert len(splits) == 3  # the seed draws the split too
    diff = doc["methods"]["ffa-lora"]["vs-reference"]
    assert diff["n"] == 3 and diff["ci-low"] <= diff["mean"] <= diff["ci-high"]
    assert "vs fedit (paired, 95% CI)" in printed
    assert (out / "compare.png").stat().st_size > 1000
