"""A simulation on an existing Ray cluster: a real two-node cluster on 127.0.0.1.

``ray start --head`` and a second ``ray start --address`` on this machine (one CPU each, so each
node hosts one virtual-client actor) make a real two-node Ray cluster. A tiny federation run with
``ray_address`` places virtual clients on both nodes and ends with the global adapter of the same
run on a private Ray instance, which must not join the cluster even when ``RAY_ADDRESS`` points
at it. The cluster's processes are stopped by their process groups (never ``ray stop``, which
would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from fedlora.config import RunConfig
from fedlora.simulations.run import offline_environment, simulate

pytestmark = pytest.mark.slow  # real Ray node processes: about a minute

RAY = str(Path(sys.executable).with_name("ray"))
PORT_OPTIONS = (  # every listening port a node opens, explicit: other Rays share this machine
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)
HEAD_PORT_OPTIONS = ("--ray-client-server-port", "--dashboard-port")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class RecordingApp(ClientApp):
    """fedlora's ClientApp, writing the Ray node of every message it handles to a file."""

    def __init__(self, inner: ClientApp, out: Path) -> None:
        super().__init__()
        self.inner, self.out = inner, out

    def __call__(self, message: Message, context: Context) -> Message:
        import ray

        record = {
            "node": ray.get_runtime_context().get_node_id(),
            "partition": int(context.node_config["partition-id"]),
        }
        (self.out / f"{uuid.uuid4().hex}.json").write_text(json.dumps(record))
        time.sleep(0.5)  # both clients of a round overlap, so each takes an actor of its own
        return self.inner(message, context)


class Cluster:
    """A head and a worker node started with ``ray start --block``, each in its own session."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, []
        self.address = ""

    def start(self) -> None:
        port, *head_ports = _free_ports(1 + len(PORT_OPTIONS) + len(HEAD_PORT_OPTIONS))
        self.address = f"127.0.0.1:{port}"
        head = [
            "--head",
            "--port",
            str(port),
            "--temp-dir",
            str(self.root),
            "--include-dashboard=false",
            "--resources",
            json.dumps({"fedlora_test_head": 1}),
            *self._ports((*PORT_OPTIONS, *HEAD_PORT_OPTIONS), head_ports),
        ]
        self._launch("head", head)
        worker = [
            "--address",
            self.address,
            "--resources",
            json.dumps({"fedlora_test_worker": 1}),
            *self._ports(PORT_OPTIONS, _free_ports(len(PORT_OPTIONS))),
        ]
        self._launch("worker", worker)

    @staticmethod
    def _ports(options: tuple[str, ...], ports: list[int]) -> list[str]:
        return [x for option, p in zip(options, ports, strict=True) for x in (option, str(p))]

    def _launch(self, name: str, args: list[str]) -> None:
        common = ["--block", "--num-cpus", "1", "--object-store-memory", str(100 * 2**20)]
        log = self.root / f"{name}.log"
        with log.open("w") as f:
            self.procs.append(
                subprocess.Popen(
                    [RAY, "start", *args, *common, "--disable-usage-stats"],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stopped as one below
                )
            )
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start {args[0]} failed:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)

    def nodes(self) -> dict[str, set[str]]:
        """Alive node ids of the cluster -> their fedlora_test resources."""
        import ray

        if ray.is_initialized():  # a private Ray of an earlier test in this process
            ray.shutdown()
        ray.init(address=self.address, log_to_driver=False)
        try:
            return {
                n["NodeID"]: {k for k in n["Resources"] if k.startswith("fedlora_test")}
                for n in ray.nodes()
                if n["Alive"]
            }
        finally:
            ray.shutdown()

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.2)


def _config(model_dir: Path, out: Path) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "base-model": str(model_dir),
            "quantization": "fp32",
            "num-server-rounds": 1,
            "local-steps": 2,
            "lr": 5e-3,
            "sites": "mental,pain",
            "min-nodes": 2,
            "secure-aggregation": False,
            "evaluate-every": 0,
            "output-dir": str(out),
        }
    )


def _run(model_dir: Path, out: Path, ray_address: str = "") -> tuple[dict, list[dict]]:
    from fedlora.client.app import make_client_app

    calls = out / "calls"
    calls.mkdir(parents=True)
    defaults = {
        "base-model": str(model_dir),
        "quantization": "fp32",
        "sites": "mental,pain",
        "secagg-allow-unauthenticated": True,
        "device": "cpu",
    }
    app = RecordingApp(make_client_app(defaults), calls)
    result = simulate(_config(model_dir, out), client_app=app, ray_address=ray_address)
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    return adapter, [json.loads(f.read_text()) for f in calls.iterdir()]


def test_simulation_on_a_two_node_ray_cluster_matches_a_private_run(
    tiny_model_dir, tmp_path, monkeypatch
):
    # Prepare: a short temp dir (Ray's socket paths must stay under 108 characters)
    offline_environment()
    root = Path(tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp"))
    cluster = Cluster(root)
    try:
        cluster.start()
        ours = cluster.nodes()
        assert sorted(map(sorted, ours.values())) == [
            ["fedlora_test_head"],
            ["fedlora_test_worker"],
        ]

        # Execute: on the cluster, then privately with RAY_ADDRESS pointing at the cluster
        on_cluster, cluster_calls = _run(tiny_model_dir, tmp_path / "cluster", cluster.address)
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        private, private_calls = _run(tiny_model_dir, tmp_path / "private")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)

    # Assert: clients ran on both cluster nodes, the private run on neither, same adapter
    assert {c["node"] for c in cluster_calls} == set(ours), cluster_calls
    assert {c["partition"] for c in cluster_calls} == {0, 1}
    assert not {c["node"] for c in private_calls} & set(ours), private_calls
    assert on_cluster.keys() == private.keys()
    worst = max(float(np.abs(on_cluster[k] - private[k]).max()) for k in private)
    assert worst == 0.0, f"largest difference {worst:.3e} (tolerance: exact)"
    assert all(p.poll() is not None for p in cluster.procs)
