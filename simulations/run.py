"""Run a federation of simulated sites on Flower's simulation engine (Ray backend).

Each site is a virtual SuperNode (partition-id i trains on the i-th name in ``sites``); the real
ServerApp and ClientApp run unchanged. The base model is resolved and the data checked in this
process first, so a bad path fails in one line before Ray starts.

Ray is private by default: ``ray.init(address="local")`` starts a fresh instance in this process
and never joins a cluster that ``ray start`` left on the machine (nor ``RAY_ADDRESS``). With
``ray_address`` the run goes to that existing cluster instead; every Ray node must then see the
base model and the data at the same paths, and run the same installation (docs/gpu-and-clusters.md).
Virtual clients get ``client_gpus`` of a GPU each (Ray packs 1/F of them on one GPU) and then run
on it; with 0 they run on CPU even where a GPU is visible. By default (None) a private run shares
this machine's GPUs among its clients, and runs them on CPU where there is none.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.basemodel import resolve_base_model
from fedlora.config import RunConfig
from fedlora.data.drugreview import load_split, split_by_site
from fedlora.errors import ConfigError, DataError, FedloraError

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


def backend_config(
    client_cpus: float = 1.0, client_gpus: float = 0.0, ray_address: str = ""
) -> dict[str, Any]:
    """Flower's Ray backend config: resources per virtual client, and ``ray.init`` arguments.

    Flower passes ``init_args`` to ``ray.init`` only when Ray is not yet initialised in this
    process (:func:`simulate` shuts down a Ray left initialised here first).
    """
    if client_cpus <= 0:
        raise ConfigError(f"cpus-per-client={client_cpus}: must be > 0")
    if client_gpus < 0:
        raise ConfigError(f"gpus-per-client={client_gpus}: must be >= 0 (e.g. 0.125: 8 per GPU)")
    init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if ray_address:  # an existing cluster brings its own CPUs and GPUs
        init["address"] = ray_address
    else:  # a private instance: never a `ray start` cluster on this machine
        init |= {"address": "local", "num_cpus": max(os.cpu_count() or 1, 1)}
    return {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
        "init_args": init,
    }


def simulate(
    cfg: RunConfig,
    client_cpus: float = 1.0,
    client_app: ClientApp | None = None,
    partition: Partition | None = None,
    client_gpus: float | None = None,
    ray_address: str = "",
) -> SimulationResult:
    """Run the federation described by ``cfg``: one virtual node per site, or per client of
    ``partition`` (written by :func:`fedlora.simulations.partition.prepare`).

    ``client_app`` replaces fedlora's ClientApp (tests use it to plant slow or failing nodes).
    ``client_cpus`` / ``client_gpus``: Ray resources per virtual client (0 GPUs: clients run on
    CPU; None: :func:`default_gpus_per_client`). ``ray_address``: run on that existing Ray
    cluster instead of a private one.
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
        "client-ranks": cfg.client_ranks,  # heterogeneous ranks: each node's, by partition-id
        # one machine, one owner: simulated nodes join secure rounds of two (a deployed node
        # refuses fewer than three holders unless its operator sets this)
        "secagg-min-nodes": 2,
        # ... and assume the run's colluder bound (a deployed node sets its own, default 1)
        "secagg-corrupt-nodes": cfg.secagg_corrupt_nodes,
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
    if client_gpus is None:
        client_gpus = default_gpus_per_client(n, ray_address)
    node_defaults["device"] = "cuda" if client_gpus > 0 else "cpu"
    backend = backend_config(client_cpus, client_gpus, ray_address)
    _note_idle_gpu(client_gpus)
    start = time.perf_counter()
    _fresh_ray()
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


def _fresh_ray() -> None:
    """Shut down a Ray that other code left initialised in this process: Flower passes
    ``init_args`` (the private instance or the cluster asked for) to ``ray.init`` only when Ray
    is not initialised, and shuts Ray down itself when a run ends. Ray not imported yet: none
    is running (importing it costs seconds)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def visible_gpus() -> int:
    """CUDA GPUs this process sees; 0 without NVIDIA's driver (then torch is not imported)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if not (gpus.is_dir() and any(gpus.iterdir())):
        return 0
    import torch

    return int(torch.cuda.device_count())


def default_gpus_per_client(clients: int, ray_address: str = "") -> float:
    """A private run's clients share this machine's GPUs (1/F clients per GPU, at most one GPU
    each); 0 (CPU) without a GPU, and on a cluster, whose GPUs this process cannot see."""
    gpus = 0 if ray_address else visible_gpus()
    share = min(1.0, gpus / max(clients, 1))
    if share:
        log.info("%d virtual clients share %d GPU(s): %.3g GPU each", clients, gpus, share)
    return share


def _note_idle_gpu(client_gpus: float) -> None:
    """One line when this machine has a GPU the virtual clients will not use."""
    if client_gpus == 0 and visible_gpus():
        log.info(
            "A CUDA GPU is visible but gpus-per-client is 0: virtual clients train on CPU "
            "(give each a share with --gpus-per-client, e.g. 0.25 for four per GPU)"
        )
