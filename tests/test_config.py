"""Configuration validation and the CLI's one-line errors for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.basemodel import check_model_dir
from fedlora.config import RunConfig
from fedlora.errors import ConfigError, ModelError


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


def test_pyproject_run_config_is_a_valid_run_config():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    RunConfig.from_mapping(app_config, source="pyproject")
    # `flwr run --run-config` only overrides keys declared there: declare every one.
    assert set(app_config) == set(RunConfig().to_mapping())


def test_pyproject_run_config_equals_the_run_config_defaults():
    # One source for run defaults: a deployment (`flwr run`) starts from RunConfig's, with secure
    # aggregation on (DEPLOYMENT_DEFAULTS, next to RunConfig).
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    from fedlora.config import DEPLOYMENT_DEFAULTS

    defaults = RunConfig().to_mapping() | DEPLOYMENT_DEFAULTS
    assert DEPLOYMENT_DEFAULTS == {"secure-aggregation": True, "min-nodes": 2}  # secure by default
    differ = {k: (v, defaults.get(k)) for k, v in app_config.items() if defaults.get(k) != v}
    assert not differ, f"[tool.flwr.app.config] differs from RunConfig (toml, RunConfig): {differ}"


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"lr": "fast"}, "lr='fast': expected float"),
        ({"num-server-rounds": 0}, "num-server-rounds=0: must be >= 1"),
        ({"quantization": "int3"}, "quantization='int3'"),
        ({"sites": "mars"}, "sites='mars'"),
        ({"lora-r": 0}, "lora-r=0"),
        ({"rounds": 3}, "unknown key 'rounds'"),
        ({"local-steps": True}, "local-steps=True: expected int"),
    ],
)
def test_bad_values_name_the_key(values, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        RunConfig.from_mapping(values)


def test_model_dir_checks_name_the_problem(tmp_path: Path, tiny_model_dir: Path):
    assert check_model_dir(tiny_model_dir) == tiny_model_dir
    with pytest.raises(ModelError, match="does not exist"):
        check_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        check_model_dir(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(ModelError, match="no \\*ForCausalLM"):
        check_model_dir(tmp_path / "bad")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["demo", "--base-model", "/no/such/model"],
            "base model folder /no/such/model does not exist",
        ),
        (["demo", "--config", "missing.toml"], "config file missing.toml does not exist"),
        (["demo", "--config", "bad.toml"], "bad.toml: Invalid value (at line 2, column 6)"),
        (["demo", "--config", "wrong.toml"], "wrong.toml: lr='x': expected float"),
        (["export", "--adapter", "no-adapter", "--base-model", "/no/model"], "does not exist"),
    ],
)
@pytest.mark.integration
def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path: Path, args, expected):
    (tmp_path / "bad.toml").write_text("num-server-rounds = 2\nlr = \n")
    (tmp_path / "wrong.toml").write_text('lr = "x"\n')
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("fedlora: error: ") and expected in lines[0]


def test_flower_app_components_in_pyproject_resolve():
    import importlib
    import tomllib

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    app = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"][
        "app"
    ]
    assert app["publisher"]
    kinds = {"serverapp": ServerApp, "clientapp": ClientApp}
    for key, kind in kinds.items():
        module, attr = app["components"][key].split(":")
        assert module.startswith("fedlora.")  # never a generic top-level name
        assert isinstance(getattr(importlib.import_module(module), attr), kind)
