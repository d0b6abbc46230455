"""fedlora compare: its config, the baselines' step budgets and the files it writes."""

import json
from pathlib import Path

import pytest

from fedlora.errors import ConfigError
from fedlora.simulations.compare import CompareConfig, method_kind, method_overrides
from test_partition import write_chat


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "compare.toml"
    path.write_text(text)
    return path


def test_methods_are_strategies_optimizers_or_named_overrides():
    assert method_overrides("centralized", {}) == {}
    assert method_overrides("ffa-lora", {}) == {"strategy": "ffa-lora"}
    assert method_overrides("fedit+adam", {}) == {"strategy": "fedit", "server-optimizer": "adam"}
    custom = {"fedit-dp": {"dp-noise-multiplier": 0.5}}
    assert method_overrides("fedit-dp", custom) == {"dp-noise-multiplier": 0.5}
    assert method_kind("fedit-dp", custom) == "federated"
    assert method_kind("local", {}) == "local"
    custom = {"central-lr": {"method": "centralized", "lr": 1e-3}}
    assert method_kind("central-lr", custom) == "centralized"
    assert method_overrides("central-lr", custom) == {"lr": 1e-3}


def test_a_method_may_trade_rounds_for_local_steps(tmp_path):
    text = (
        '[compare]\nmethods = ["fedit", "often"]\n[run]\nnum-server-rounds = 3\n'
        "local-steps = 10\n[methods.often]\nnum-server-rounds = 6\nlocal-steps = 5\n"
    )
    assert CompareConfig.from_toml(toml(tmp_path, text)).methods == ("fedit", "often")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[compare]\nmethods = ["fedavg"]\n', "unknown method 'fedavg'"),
        ('[compare]\nmethods = ["fedit+sgd2"]\n', "unknown method 'fedit\\+sgd2'"),
        ('[compare]\nmethods = ["fedit", "fedit"]\n', "lists a method twice"),
        ("[compare]\nmethods = []\n", "list at least one method"),
        ('[compare]\npartition = "dirichlet:0"\n', "alpha must be > 0"),
        ("[compare]\nclients = 3\n", "unknown keys \\['clients'\\]"),
        ("[run]\nlocal-stepz = 3\n", "unknown key 'local-stepz'"),
        ("[runs]\n", "unknown tables"),
        ("[compare\n", "fix the TOML syntax"),
        (
            '[compare]\nmethods = ["short"]\n[methods.short]\nlocal-steps = 1\n',
            "same total client steps",
        ),
        (
            '[compare]\nmethods = ["big"]\n[methods.big]\nbatch-size = 8\n',
            "batch-size 8, but \\[run\\] has",
        ),
        ('[compare]\nmethods = ["bad"]\n[methods.bad]\nlr = 2.0\n', "lr=2.0: must be in"),
        (
            '[compare]\nmethods = ["c2"]\n[methods.c2]\nmethod = "pooled"\n',
            "method = 'pooled': use centralized, local or federated",
        ),
    ],
)
def test_bad_compare_files_fail_before_any_run(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as err:
        CompareConfig.from_toml(toml(tmp_path, text))
    assert str(tmp_path) in str(err.value) or "[run]" in str(err.value)


@pytest.mark.integration
def test_compare_runs_baselines_and_a_strategy_at_equal_steps(tiny_model_dir, tmp_path):
    from fedlora.simulations.compare import run_compare

    data = write_chat(tmp_path / "chat.jsonl", n=80)
    out = tmp_path / "cmp"
    path = toml(
        tmp_path,
        f"""
[compare]
data = "{data}"
partition = "iid"
num-clients = 2
test-fraction = 0.2
methods = ["centralized", "local", "fedit", "central-slow"]
output = "{out}"

[methods.central-slow]
method = "centralized"
lr = 0.0005

[run]
base-model = "{tiny_model_dir}"
quantization = "fp32"
num-server-rounds = 2
local-steps = 2
lr = 0.005
secure-aggregation = true
min-nodes = 2
""",
    )
    doc = run_compare(CompareConfig.from_toml(path))
    methods = doc["methods"]
    assert doc["total-client-steps"] == 2 * 2 * 2
    assert methods["centralized"]["steps"] == methods["fedit"]["steps"] == 8
    assert methods["local"]["steps"] == 8  # 2 clients x 2 rounds x 2 steps, each alone
    assert methods["fedit"]["secure-aggregation"] is True
    for r in methods.values():
        assert 0 <= r["accuracy"] <= 1 and r["loss"] > 0
    # % of centralized is against the best centralized row, whichever learning rate it used
    best = max(methods["centralized"]["accuracy"], methods["central-slow"]["accuracy"])
    assert doc["centralized-accuracy"] == best
    assert methods["fedit"]["of-centralized"] == pytest.approx(methods["fedit"]["accuracy"] / best)
    assert methods["central-slow"]["method"] == "centralized"
    assert (methods["central-slow"]["lr"], methods["centralized"]["lr"]) == (0.0005, 0.005)
    assert methods["central-slow"]["steps"] == 8
    # the centralized run trained one node for all 8 steps on the pooled training data
    lines = (out / "centralized" / "metrics.jsonl").read_text().splitlines()
    central = [json.loads(x) for x in lines]
    assert len(central) == 1 and central[0]["replies"] == 1
    assert central[0]["num-examples"] == 64  # 80 - 16 test examples, none held out on the node
    md = (out / "compare.md").read_text()
    assert "| centralized |" in md and "| local |" in md and "| fedit |" in md
    # baselines move no adapter over a network: no bytes; the federated row counts its own
    assert methods["centralized"]["bytes-per-client-round"] == 0
    assert methods["fedit"]["bytes-per-client-round"] > 0
    rows = {line.split("|")[1].strip(): line.split("|") for line in md.splitlines()[6:]}
    assert rows["centralized"][6].strip() == rows["local"][6].strip() == "-"
    assert rows["fedit"][6].strip() == f"{methods['fedit']['bytes-per-client-round']:,.0f}"
    assert (out / "compare.png").stat().st_size > 1000
