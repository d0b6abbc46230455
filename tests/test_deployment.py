"""The Flower App on Flower's deployment engine: a real SuperLink, two SuperNodes, `flwr run`.

Everything binds 127.0.0.1 on free ports; every process this test starts is stopped by its pid.
Insecure transport here: the test checks the app wiring and the nodes' warm workers, not TLS.
Each node runs a warm worker (``client/worker.py``): the SuperNode's short-lived
``flwr-clientapp`` processes hand it every message, so each node loads its base model once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedlora.client.worker import start_worker, status

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"process exited early with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def test_flwr_run_on_a_local_superlink_with_two_supernodes(tiny_model_dir: Path, tmp_path: Path):
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
    }
    (tmp_path / "flwr").mkdir()
    link_port = _free_port()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    sockets = Path(tempfile.mkdtemp(prefix="fd", dir="/tmp"))  # socket paths must be short

    def start(name: str, *args: str) -> subprocess.Popen:
        out = (logs / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    try:
        link = start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
        )
        _wait_for_port(link_port, link, logs / "superlink.log")
        workers = {}
        for site in ("pain", "dermatology"):
            workers[site] = sockets / site / "worker.sock"
            procs.append(start_worker(workers[site], log_file=logs / f"worker-{site}.log"))
            start(
                f"supernode-{site}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(_free_port()),
                "--node-config",
                f'site="{site}" base-model="{tiny_model_dir}" quantization="bf16" '
                # two hospitals: each node's operator accepts secure rounds of two
                # no federation roster in this test (tests/test_federation_deploy.py has one)
                f"secagg-min-nodes=2 secagg-allow-unauthenticated=true "
                f'worker-socket="{workers[site]}"',
            )
        out_dir = tmp_path / "run"
        run_config = (
            f'num-server-rounds=2 local-steps=2 base-model="{tiny_model_dir}" '
            f'quantization="bf16" min-nodes=2 output-dir="{out_dir}"'
        )
        done = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(REPO),
                "local-test",
                "--stream",
                "--run-config",
                run_config,
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        node_logs = "\n".join(p.read_text()[-2000:] for p in sorted(logs.iterdir()))
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + node_logs
        metrics = out_dir / "metrics.jsonl"
        assert metrics.is_file(), done.stdout[-6000:] + node_logs
        history = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["round"] for r in history] == [1, 2]
        assert all(set(r["sites"]) == {"pain", "dermatology"} for r in history)
        assert (out_dir / "global-adapter" / "adapter_model.safetensors").is_file()
        for site, path in workers.items():  # every message of the run, one base-model load
            served = status(str(path))
            assert served["model-loads"] == 1 and served["messages"] >= 4, (site, served)
    finally:
        for proc in procs:  # stop what we started, by pid (and its process group)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(sockets, ignore_errors=True)
