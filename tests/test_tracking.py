"""Experiment tracking (server/tracking.py): tiny federations read back with MLflow's own client
and TensorBoard's own event reader; a secure run logs nothing per node; a missing extra is one
line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.server.tracking import log_method, require, round_metrics

PLAIN_RECORD = {
    "round": 2,
    "train-loss": 1.5,
    "replies": 2,
    "dropped": 1,
    "rejected": [{"node": 7, "error": "bad shape"}],
    "eval-loss": float("nan"),
    "secagg-seconds": {"total": 3.0},
    "sites": {"pain": {"train-loss": 1.25, "bytes-sent": 100}, "mental": {}},
}


def test_a_plain_round_logs_aggregate_and_per_site_figures() -> None:
    metrics = round_metrics(PLAIN_RECORD)
    assert metrics == {
        "train-loss": 1.5,
        "replies": 2.0,
        "dropped": 1.0,
        "rejected": 1.0,  # a list counts its entries
        "secagg-seconds/total": 3.0,
        "site/pain/train-loss": 1.25,
        "site/pain/bytes-sent": 100.0,
    }  # the NaN eval-loss is left out


def test_a_secure_round_logs_no_per_site_figure_even_where_the_record_has_one() -> None:
    # a secure round's record lists its sites; evaluation replies (not masked) add figures
    record = PLAIN_RECORD | {"secure-aggregation": True}
    assert not [k for k in round_metrics(record) if k.startswith("site/")]


def test_an_unknown_tracker_and_a_missing_extra_are_one_line(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="tracking="):
        RunConfig(tracking="wandb")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'fedlora\[mlflow\]'"):
        require("mlflow")


def test_a_run_resumes_with_tracking_turned_on(tmp_path) -> None:
    from fedlora.server.state import check_resumable

    saved = RunConfig().to_mapping()
    check_resumable(saved, saved | {"tracking": "mlflow", "resume": True}, tmp_path)


@pytest.mark.integration
def test_the_cli_names_the_missing_extra_in_one_line(tmp_path) -> None:
    code = (
        "import sys; sys.modules['tensorboard'] = None; from fedlora.cli import main; "
        "sys.argv = ['fedlora', 'simulate', '--tracking', 'tensorboard', '--rounds', '1']; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "pip install 'fedlora[tensorboard]'" in lines[0], lines


def _simulate(tiny_model_dir: Path, out: Path, **settings: object):
    from fedlora.simulations.run import simulate

    cfg = RunConfig.from_mapping(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "auto",
            "num-server-rounds": 2,
            "local-steps": 1,
            "max-length": 64,
            "sites": "reproductive,mental,pain",
            "min-nodes": 2,
            "output-dir": str(out),
            "evaluate-every": 1,
            "eval-fraction": 0.1,
            **settings,
        }
    )
    return simulate(cfg)


@pytest.mark.integration
def test_a_tracked_run_reads_back_from_mlflow(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the local store: ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    _simulate(tiny_model_dir, tmp_path / "run-a", **{"tracking": "mlflow"})

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params["num-server-rounds"] == "2" and run.data.params["tracking"] == "mlflow"
    losses = client.get_metric_history(run.info.run_id, "train-loss")
    assert sorted(m.step for m in losses) == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval-loss")] != []
    assert {"bytes-sent", "replies", "dropped", "seconds"} <= set(run.data.metrics)
    assert "site/pain/train-loss" in run.data.metrics  # a plain run: the server saw each site
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"global-adapter", "report.md", "metrics.jsonl"} <= artifacts
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "global-adapter")}
    assert "global-adapter/adapter_model.safetensors" in adapter


@pytest.mark.integration
def test_a_secure_run_in_tensorboard_has_no_per_node_figure(tiny_model_dir, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "secure"
    _simulate(
        tiny_model_dir,
        out,
        **{
            "tracking": "tensorboard",
            "secure-aggregation": True,
            "secagg-num-shares": 3,
            "secagg-threshold": 2,
            "secagg-clip-norm": 50.0,
        },
    )
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train-loss")] == [1, 2]
    assert "eval-loss" in scalars and "secure-aggregation" in scalars
    assert not [t for t in scalars if t.startswith("site/")], scalars
    texts = events.Tags()["tensors"]
    assert "settings/text_summary" in texts and "report/text_summary" in texts


@pytest.mark.integration
def test_compare_logs_each_method_as_a_run_of_one_experiment(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    compare = tmp_path / "cmp"
    for method, accuracy in (("fedit", 0.75), ("local", 0.5)):
        (compare / method).mkdir(parents=True)
        (compare / method / "report.md").write_text(f"# {method}")
        result = {"accuracy": accuracy, "method": "federated", "seconds": 3.0}
        log_method("mlflow", compare, method, {"lr": 0.001}, result, compare / method)

    client = MlflowClient(f"sqlite:///{os.getcwd()}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("compare cmp")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"fedit", "local"}
    assert runs["local"].data.metrics["accuracy"] == 0.5
    assert runs["fedit"].data.params["method"] == "fedit"
    assert {a.path for a in client.list_artifacts(runs["fedit"].info.run_id)} == {"report.md"}


@pytest.mark.integration
def test_files_made_after_the_run_join_its_mlflow_run(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from fedlora.server.tracking import attach_files, open_tracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "demo"
    tracker = open_tracker("mlflow", out)
    tracker.close()
    card = out / "export" / "MODEL_CARD.md"
    card.parent.mkdir(parents=True)
    card.write_text("# model card")
    attach_files(out, [card, out / "export" / "missing.md"])
    attach_files(tmp_path / "untracked", [card])  # a run without tracking: nothing happens

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert run.info.run_id == tracker.where()["run-id"] and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"MODEL_CARD.md"}


@pytest.mark.integration
def test_fedlora_compare_tracks_each_method_once(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from fedlora.simulations.compare import CompareConfig, run_compare
    from test_partition import write_chat

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    data = write_chat(tmp_path / "chat.jsonl", n=40)
    run = {
        "base-model": str(tiny_model_dir),
        "quantization": "fp32",
        "num-server-rounds": 1,
        "local-steps": 1,
        "tracking": "mlflow",
    }
    compare = CompareConfig(
        data=str(data),
        partition="iid",
        num_clients=2,
        test_fraction=0.2,
        methods=("local", "fedit"),
        output=str(tmp_path / "cmp"),
        run=run,
    )
    run_compare(compare)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("compare cmp")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"local", "fedit"}  # one run a method, not one a simulation
    assert "accuracy" in runs["fedit"].data.metrics and "loss" in runs["local"].data.metrics
    assert client.get_experiment_by_name("fedlora") is None
