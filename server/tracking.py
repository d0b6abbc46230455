"""Experiment tracking: a run's settings, round records and final files in MLflow or TensorBoard.

``tracking = "mlflow"`` or ``"tensorboard"`` (run config; ``--tracking`` on simulate, compare and
demo). Both are optional extras (``pip install 'fedlora[mlflow]'``, ``'fedlora[tensorboard]'``),
imported only when a run asks for one; a missing one is a one-line ConfigError naming it.

What is logged is what the server has: the settings as parameters; per round the figures of the
round record (server/records.py: train loss, federated and central evaluation, bytes up and down,
seconds, nodes answered / dropped / rejected, DP epsilon); per site only a plain round's figures.
A secure round's record holds sums, and nothing per site is logged for it (its evaluation
figures per site included). After the last round: the global adapter, the report and its plots.

MLflow goes to ``MLFLOW_TRACKING_URI``, else to a local store in ``./mlruns`` (``mlflow.db``,
artifacts beside it); the experiment is ``MLFLOW_EXPERIMENT_NAME`` or "fedlora", the run is named
after the output folder. TensorBoard writes event files in ``<output-dir>/tensorboard``.
``tracking.json`` in the output folder says where the run went, so later steps (the demo's
export, a resumed run) add to the same run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedlora.config import TRACKERS
from fedlora.errors import ConfigError

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
DEFAULT_EXPERIMENT = "fedlora"
# What a finished run hands over: the global adapter (a folder), the report and its plots.
FINAL_FILES = ("global-adapter", "report.md", "loss.png", "accuracy.png", "metrics.jsonl")
RoundHook = Callable[[int, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]], None]


class Tracker(Protocol):
    """Where one run's parameters, metrics and files go."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_files(self, paths: list[Path]) -> None: ...
    def close(self) -> None: ...


def require(kind: str) -> None:
    """Check ``kind`` is a tracker and its library is installed; one line naming the extra."""
    if kind not in TRACKERS:
        raise ConfigError(f"tracking={kind!r}: use one of {TRACKERS}")
    if kind != "none" and importlib.util.find_spec(kind) is None:
        raise ConfigError(
            f"tracking={kind!r} needs the {kind} extra: pip install 'fedlora[{kind}]' "
            f"(or set tracking to 'none')"
        )


def round_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric figures of a round record, flat: lists count their entries (``rejected``),
    flags are 0/1, a dict of numbers is ``key/part``; per site ``site/NAME/key``, from plain
    rounds only."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("round", "sites"):
            continue
        if isinstance(value, list):
            out[key] = float(len(value))
        elif isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if _number(v)})
        elif _number(value):
            out[key] = float(value)
    if not record.get("secure-aggregation"):  # the server saw each site's figures
        for site, figures in record.get("sites", {}).items():
            out.update({f"site/{site}/{k}": v for k, v in figures.items() if _number(v)})
    return {_metric_key(k): float(v) for k, v in out.items() if math.isfinite(float(v))}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, str)


def _metric_key(key: str) -> str:
    """MLflow keys: letters, digits, ``_-. /``; anything else becomes ``_``."""
    return re.sub(r"[^\w\-. /]", "_", key)


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def run_name(out: Path) -> str:
    return out.resolve().name or "run"


class MlflowTracker:
    """One MLflow run, through MlflowClient (no global active run: safe in a Flower thread)."""

    def __init__(
        self, experiment: str, name: str, run_id: str | None = None, uri: str = ""
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri or mlflow_uri()
        self.client = MlflowClient(self.uri)
        if run_id is not None:  # a resumed run, or a later step of the same run
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            experiment_id = self.client.create_experiment(
                experiment, artifact_location=_artifact_location(self.uri)
            )
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_files(self, paths: list[Path]) -> None:
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)

    def where(self) -> dict[str, Any]:
        return {"kind": "mlflow", "tracking-uri": self.uri, "run-id": self.run_id}


def mlflow_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else a local SQLite store in ./mlruns (MLflow's file store is in
    maintenance mode since 3.7 and refuses new runs)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """The local store keeps artifacts in mlruns/artifacts; a server chooses its own."""
    if uri.startswith("sqlite:///") and uri.endswith("/mlflow.db"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


class TensorBoardTracker:
    """Event files in ``folder``: scalars per round, the settings and text files as text."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    def log_params(self, params: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
        self.writer.add_text("settings", "| setting | value |\n|---|---|\n" + rows, 0)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_files(self, paths: list[Path]) -> None:
        """Markdown files as text (the report, the model card); other files stay where they
        are (TensorBoard has no artifact store): their paths are listed."""
        listed = []
        for path in paths:
            if path.is_file() and path.suffix == ".md":
                self.writer.add_text(path.stem, path.read_text(errors="replace"), 0)
            elif path.exists():
                listed.append(f"- {path.resolve()}")
        if listed:
            self.writer.add_text("files", "\n".join(listed), 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def where(self) -> dict[str, Any]:
        return {"kind": "tensorboard", "log-dir": str(self.folder.resolve())}


def open_tracker(kind: str, out: Path, resume: bool = False) -> MlflowTracker | TensorBoardTracker:
    """The tracker of the run in ``out``: its earlier run when ``resume`` (and for later steps),
    else a new one; where it went is written to ``out/tracking.json``."""
    require(kind)
    saved = _saved(out) if resume else {}
    saved = saved if saved.get("kind") == kind else {}
    tracker: MlflowTracker | TensorBoardTracker
    if kind == "mlflow":
        tracker = MlflowTracker(
            experiment_name(),
            run_name(out),
            run_id=saved.get("run-id"),
            uri=str(saved.get("tracking-uri", "")),
        )
    else:
        tracker = TensorBoardTracker(out / "tensorboard")
    out.mkdir(parents=True, exist_ok=True)
    (out / TRACKING_FILE).write_text(json.dumps(tracker.where(), indent=2))
    return tracker


def _saved(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def track_rounds(
    kind: str, out: Path, settings: Mapping[str, Any], rounds: int, on_round: RoundHook
) -> RoundHook:
    """``on_round``, then the round's record to the tracker; after round ``rounds`` the final
    files too, and the run is closed. ``kind`` "none": ``on_round`` itself. A tracker that fails
    mid-run is logged and the run goes on."""
    if kind == "none":
        return on_round
    tracker = open_tracker(kind, out, resume=bool(settings.get("resume")))
    tracker.log_params(settings)
    log.info("Tracking the run with %s: %s", kind, tracker.where())

    def hook(
        server_round: int,
        arrays: dict[str, np.ndarray],
        residuals: dict[str, np.ndarray],
        record: dict[str, Any],
    ) -> None:
        on_round(server_round, arrays, residuals, record)
        try:
            tracker.log_metrics(round_metrics(record), server_round)
            if server_round >= rounds:
                tracker.log_files([out / name for name in FINAL_FILES])
                tracker.close()
        except Exception as exc:  # noqa: BLE001 -- the tracker is a bystander: the run goes on
            log.warning("Round %d: %s tracking failed: %s", server_round, kind, exc)

    return hook


def attach_files(out: Path, paths: list[Path]) -> None:
    """Add files made after the run (the demo's model card) to the run ``out`` was tracked in;
    nothing when it was not tracked."""
    saved = _saved(out)
    if saved.get("kind") not in ("mlflow", "tensorboard"):
        return
    tracker = open_tracker(str(saved["kind"]), out, resume=True)
    tracker.log_files(paths)
    tracker.close()


def log_method(
    kind: str,
    compare_dir: Path,
    method: str,
    params: Mapping[str, Any],
    result: Mapping[str, Any],
    folder: Path,
) -> None:
    """``fedlora compare``: one method's settings and figures as a run of the comparison's
    experiment (MLflow: "compare NAME" after its output folder, or MLFLOW_EXPERIMENT_NAME; the
    run is the method, with its seed folder when there are several), or as event files in the
    method's ``folder``/tensorboard; its report attached where it has one."""
    if kind == "none":
        return
    require(kind)
    tracker: MlflowTracker | TensorBoardTracker
    if kind == "mlflow":
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"compare {run_name(compare_dir)}"
        seed = folder.parent.resolve() != compare_dir.resolve()
        tracker = MlflowTracker(experiment, f"{method} ({folder.parent.name})" if seed else method)
    else:
        tracker = TensorBoardTracker(folder / "tensorboard")
    tracker.log_params({"method": method, **params})
    tracker.log_metrics(round_metrics(result), 0)
    tracker.log_files([folder / "report.md"])
    tracker.close()
