"""A real Flower deployment on 127.0.0.1 for tests: SuperLink, SuperNodes with warm workers.

Insecure transport (the TLS federation is ``tests/test_federation_deploy.py``'s): these tests
check what happens to runs, not the transport. Every process is started in its own session and
stopped by its pid (and process group) when the deployment closes; a test may kill a node or
the ServerApp process on purpose, with SIGKILL, as a crash would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fedlora.client.worker import start_worker
from fedlora.deploy.launch import thread_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
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


def wait_until(check, seconds: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(f"{what}: not after {seconds} s")


class LocalDeployment:
    """``with LocalDeployment(tmp_path) as dep:`` a SuperLink; ``dep.start_node(...)`` nodes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(root / "flwr"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
        }
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, tuple[subprocess.Popen, subprocess.Popen, Path]] = {}
        self.sockets = Path(tempfile.mkdtemp(prefix="fd", dir="/tmp"))  # short socket paths
        self.link: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> LocalDeployment:
        (self.root / "flwr").mkdir(exist_ok=True)
        self.port = free_port()
        (self.root / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.link = self._start(
            "superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
            str(self.port),
        )  # fmt: skip
        wait_for_port(self.port, self.link, self.logs / "superlink.log")
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:  # stop what we started, by pid (and its process group)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.sockets, ignore_errors=True)

    def _start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        out = (self.logs / f"{name}.log").open("a")
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=env or self.env,
            cwd=self.root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def start_node(self, site: str, node_config: str) -> Path:
        """A warm worker and a SuperNode for ``site``; returns the worker's socket."""
        sock = self.sockets / site / "worker.sock"
        # one math thread per node process, as `fedlora federation node --threads 1`: the nodes
        # share this machine's cores
        env = {**self.env, **thread_env(1)}
        worker = start_worker(sock, log_file=self.logs / f"worker-{site}.log", env=env)
        self.procs.append(worker)
        node = self._start(
            f"supernode-{site}", "flower-supernode", "--insecure", "--superlink",
            f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(free_port()),
            "--node-config", f'site="{site}" worker-socket="{sock}" {node_config}',
            env=env,
        )  # fmt: skip
        self.nodes[site] = (node, worker, sock)
        return sock

    def kill_node(self, site: str) -> None:
        """SIGKILL the node's SuperNode and worker (and their process groups), as a crash."""
        node, worker, _ = self.nodes.pop(site)
        for proc in (node, worker):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def serverapp_pids(self) -> list[int]:
        """Pids of the ``flwr-serverapp`` processes the SuperLink runs (a run's ServerApp)."""
        assert self.link is not None
        out = []
        for child in psutil.Process(self.link.pid).children(recursive=True):
            try:
                if any("flwr-serverapp" in part for part in child.cmdline()):
                    out.append(child.pid)
            except psutil.NoSuchProcess:
                continue
        return out

    def flwr_run(
        self, run_config: str, *, stream: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        args = [str(BIN / "flwr"), "run", str(REPO), "local-test"]
        args += ["--stream"] if stream else []
        return subprocess.run(
            [*args, "--run-config", run_config],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def tail(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.logs.iterdir())
        )
