"""Run a federation of simulated sites on Flower's simulation engine (Ray backend).

Each site is a virtual SuperNode (partition-id i trains on the i-th name in ``sites``); the real
ServerApp and ClientApp run unchanged. The base model is resolved and the data checked in this
process first, so a bad path fails in one line before Ray starts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.basemodel import resolve_base_model
from fedlora.config import RunConfig
from fedlora.data.drugreview import load_split, split_by_site
from fedlora.errors import DataError, FedloraError

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

    from fedlora.simulations.partition import Partition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationResult:
    output_dir: Path
    adapter_dir: Path
    history: list[dict[str, Any]]
    seconds: float


def offline_environment() -> None:
    """No telemetry, no dependency installation, no hub look-ups: nothing leaves the machine."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def partitioned_config(cfg: RunConfig, part: Partition, given: set[str]) -> RunConfig:
    """``cfg`` for a run on ``part``: the server scores the partition's test split.

    Keys in ``given`` (set by the user) are kept. Otherwise: ``central-eval`` is the test split,
    scored whole; ``eval-labels`` are the labels the data shows (when its answers form a label
    set); nodes' federated evaluation on their own small splits is off, and they train on all of
    their examples.
    """
    changes: dict[str, Any] = {"central-eval": part.test}
    if "central-eval-samples" not in given:
        changes["central-eval-samples"] = max(part.test_examples, 1)
    if part.labels and "eval-labels" not in given:
        changes["eval-labels"] = ",".join(part.labels)
    if "federated-eval" not in given:
        changes["federated-eval"] = False  # clients' own splits are tiny: the server scores
        if "eval-fraction" not in given:
            changes["eval-fraction"] = 0.0  # so clients train on all of their examples
    if part.num_clients < 2 and cfg.secure_aggregation:
        changes["secure-aggregation"] = False  # one client: nothing to hide a sum among
        log.warning("One client: secure aggregation needs two or more, so it is off")
    return RunConfig.from_mapping(cfg.to_mapping() | changes, source="simulate --data")


def simulate(
    cfg: RunConfig,
    client_cpus: float = 1.0,
    client_app: ClientApp | None = None,
    partition: Partition | None = None,
) -> SimulationResult:
    """Run the federation described by ``cfg``: one virtual node per site, or per client of
    ``partition`` (written by :func:`fedlora.simulations.partition.prepare`).

    ``client_app`` replaces fedlora's ClientApp (tests use it to plant slow or failing nodes).
    """
    offline_environment()
    from flwr.simulation import run_simulation

    from fedlora.client.app import make_client_app
    from fedlora.server.app import make_server_app

    resolve_base_model(cfg.base_model)  # prepare or check once, before any node starts
    if cfg.resume:
        from fedlora.server.state import load_state

        load_state(Path(cfg.output_dir))  # a corrupted checkpoint: one line, before Ray starts
    node_defaults: dict[str, Any] = {  # what a deployed node sets in its own node config
        "base-model": cfg.base_model,
        "quantization": cfg.quantization,
        "sites": cfg.sites,
        "eval-fraction": cfg.eval_fraction,
        "eval-labels": cfg.eval_labels,
        "seed": cfg.seed,
        # one machine, one owner: simulated nodes join secure rounds of two (a deployed node
        # refuses fewer than three holders unless its operator sets this)
        "secagg-min-nodes": 2,
        # every simulated node runs in this process's Ray cluster: there is no federation
        # roster to check neighbours' keys against
        "secagg-allow-unauthenticated": True,
    }
    if partition is None:
        by_site = split_by_site(load_split("train"))
        empty = [s for s in cfg.site_names if not by_site[s]]
        if empty:
            raise DataError(f"sites {empty} have no training reviews: remove them from 'sites'")
        n = len(cfg.site_names)
    else:
        n = partition.num_clients
        node_defaults["partition-dir"] = str(partition.folder)
        node_defaults["personal-state-dir"] = str(Path(cfg.output_dir) / "personal-state")
    run_cfg = cfg.to_mapping() | {"min-available-nodes": n}  # every site joins round 1
    backend = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(os.cpu_count() or 1, 1),
            "include_dashboard": False,
            "log_to_driver": True,
        },
    }
    start = time.perf_counter()
    run_simulation(
        server_app=make_server_app(run_cfg),
        client_app=client_app or make_client_app(node_defaults),
        num_supernodes=n,
        backend_name="ray",
        backend_config=backend,
    )
    seconds = time.perf_counter() - start
    out = Path(cfg.output_dir)
    history_file = out / "metrics.jsonl"
    history = (
        [json.loads(line) for line in history_file.read_text().splitlines()]
        if history_file.is_file()
        else []
    )
    if len(history) != cfg.num_server_rounds:
        raise FedloraError(
            f"simulation ended after {len(history)} of {cfg.num_server_rounds} "
            f"rounds: see the log above"
        )
    return SimulationResult(
        output_dir=out, adapter_dir=out / "global-adapter", history=history, seconds=seconds
    )
