"""Starting a federation with deploy/launch.py: the command lines, and a real TLS federation.

The unit tests check the commands fedlora builds for Flower's ``flower-superlink`` and
``flower-supernode`` (TLS and node authentication on unless asked otherwise) and the
connection file Flower reads. The slow test makes a federation with the tooling, starts it
with ``fedlora federation superlink`` / ``node`` on 127.0.0.1, runs two rounds with ``flwr run``
over TLS, and checks that a node whose key was never registered is refused by the SuperLink.
Every process the test starts is stopped by its pid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.client.worker import status
from fedlora.deploy import launch, pki
from fedlora.deploy.federation import (
    Federation,
    RosterEntry,
    init_federation,
    read_roster,
    write_file,
)
from fedlora.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    root = tmp_path / "fed"
    init_federation(root, hosts=["10.0.0.5"], nodes=["pain", "derm"])
    return Federation(root)


def _after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_superlink_starts_with_tls_and_node_authentication_by_default(fed: Federation):
    command = launch.superlink_command(fed.root, "0.0.0.0", 9092)

    assert Path(command[0]).name == "flower-superlink"
    assert _after(command, "--ssl-certfile") == str(fed.server_cert.resolve())
    assert _after(command, "--ssl-keyfile") == str(fed.server_key.resolve())
    assert _after(command, "--ssl-ca-certfile") == str(fed.superlink_ca.resolve())
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert _after(command, "--port") == "9092"


def test_the_superlink_refuses_a_host_its_certificate_does_not_name(fed: Federation):
    launch.superlink_command(fed.root, "10.0.0.5")  # named at init

    with pytest.raises(ConfigError, match="not valid for 'coord.example.org'.*--host"):
        launch.superlink_command(fed.root, "coord.example.org")


def test_insecure_is_explicit_and_turns_both_tls_and_authentication_off(fed: Federation):
    link = launch.superlink_command(fed.root, insecure=True)
    node = launch.supernode_command(fed.node("pain").root, "127.0.0.1:9092", insecure=True)

    for command in (link, node):
        assert "--insecure" in command
        assert not {"--enable-supernode-auth", "--ssl-certfile", "--root-certificates"} & set(
            command
        )
        assert "--auth-supernode-private-key" not in command


def test_every_insecure_start_warns_loudly(fed: Federation, caplog, monkeypatch):
    def refuse(*args, **kwargs):
        raise ConfigError("not started in this test")

    monkeypatch.setattr(launch, "superlink_command", refuse)
    monkeypatch.setattr(launch, "supernode_command", refuse)
    caplog.set_level(logging.WARNING, logger="fedlora.deploy")

    for start in (
        lambda: launch.run_superlink(fed.root, insecure=True),
        lambda: launch.run_node(fed.node("pain").root, "127.0.0.1:9092", insecure=True),
        lambda: launch.run_node(fed.node("pain").root, "127.0.0.1:9092", insecure=True),
    ):
        with pytest.raises(ConfigError):
            start()

    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [launch.INSECURE_WARNING] * 3
    assert "anyone on the network can read updates and join" in launch.INSECURE_WARNING


def test_the_node_starts_with_tls_its_key_and_its_node_config(fed: Federation):
    node = fed.node("pain")
    config = 'site="pain" base-model="/models/x" quantization="bf16"'

    command = launch.supernode_command(node.root, "coord.example.org:9092", config, port=9400)

    assert Path(command[0]).name == "flower-supernode"
    assert _after(command, "--superlink") == "coord.example.org:9092"
    assert _after(command, "--root-certificates") == str(node.ca_cert.resolve())
    assert _after(command, "--auth-supernode-private-key") == str(node.auth_key.resolve())
    assert _after(command, "--node-config") == config
    assert _after(command, "--port") == "9400"
    assert "--insecure" not in command


@pytest.mark.integration  # a subprocess that imports torch (2-9 s)
def test_a_node_thread_cap_reaches_the_math_libraries_of_its_processes():
    assert launch.thread_env(None) == {}  # no cap: torch uses every core
    assert launch.thread_env(1) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with pytest.raises(ConfigError, match="--threads 0: give at least 1"):
        launch.thread_env(0)
    code = "import torch; print(torch.get_num_threads())"
    env = {**os.environ, **launch.thread_env(1)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.stdout.strip() == "1", done.stderr  # what a worker or flwr-clientapp sees


def test_node_folder_problems_name_the_file_and_what_to_do(fed: Federation, tmp_path: Path):
    node = fed.node("pain")
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        launch.supernode_command(node.root, "coord.example.org")
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        launch.supernode_command(node.root, "bad host:9092")

    node.auth_key.write_text("not a key")
    with pytest.raises(ConfigError, match=f"{node.auth_key.resolve()}: not an unencrypted"):
        launch.supernode_command(node.root, "127.0.0.1:9092")

    with pytest.raises(ConfigError, match="auth.key is missing .*ask the coordinator"):
        launch.supernode_command(tmp_path / "elsewhere", "127.0.0.1:9092")

    fed.server_key.unlink()
    with pytest.raises(ConfigError, match="server.key is missing"):
        launch.superlink_command(fed.root)


def test_the_connection_file_is_what_flower_reads(tmp_path: Path, monkeypatch, fed: Federation):
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "flwr-home"
    launch.write_connection(home, "127.0.0.1:9092", fed.ca_cert)
    monkeypatch.setenv("FLWR_HOME", str(home))

    connection = read_superlink_connection()

    assert connection.name == launch.CONNECTION
    assert connection.address == "127.0.0.1:9092"
    assert connection.root_certificates == str(fed.ca_cert.resolve())
    assert connection.insecure is False


def test_processes_are_stopped_with_their_process_group():
    with launch.Processes(grace=5) as procs:
        shell = procs.start(["sh", "-c", "sleep 300 & echo $!; wait"])
        time.sleep(0.5)
    assert shell.poll() is not None
    deadline = time.monotonic() + 10  # the orphaned `sleep` is reaped by init, soon
    with pytest.raises(ProcessLookupError):  # nothing of its group is left
        while time.monotonic() < deadline:
            os.killpg(shell.pid, 0)
            time.sleep(0.1)


# ---- real processes --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"no {text!r} in {log} after {seconds} s:\n{log.read_text()[-4000:]}")


def _intruder_folder(fed: Federation, target: Path) -> Path:
    """A node folder with the federation's CA but a key the SuperLink never registered (its
    roster copy forged to list that key, so that the node's own start-up check lets it dial)."""
    shutil.copytree(fed.node("pain").root, target)
    key = pki.new_key()
    write_file(target / "auth.key", pki.openssh_private_key(key), private=True)
    line = pki.openssh_public_key(key.public_key(), comment="intruder")
    forged = read_roster(target / "roster.json").with_node(
        RosterEntry("intruder", line, pki.fingerprint(line))
    )
    write_file(target / "roster.json", forged.to_json().encode("utf-8"))
    return target


@pytest.mark.slow
def test_a_tls_federation_with_node_authentication_runs_and_refuses_unregistered_nodes(
    tiny_model_dir: Path, tmp_path: Path
):
    """Three hospitals (TLS, node authentication, SecAgg+ with keys signed and checked against
    each node's roster, warm workers) complete two secure rounds, each loading its base model
    once; an unregistered node is refused by the SuperLink."""
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
    }
    fed = Federation(tmp_path / "fed")
    sites = ["pain", "dermatology", "mental"]
    init_federation(fed.root, nodes=sites)
    intruder = _intruder_folder(fed, tmp_path / "intruder")
    link_port = _free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> subprocess.Popen:
        out = (logs / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(
            [str(BIN / "fedlora"), "federation", *args],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return procs[name]

    def node(name: str, folder: Path) -> subprocess.Popen:
        config = f'site="{name}" base-model="{tiny_model_dir}" quantization="auto"'
        return start(
            name,
            "node",
            str(folder),
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--port",
            str(_free_port()),
            "--node-config",
            config,
            "--threads",
            "1",  # three nodes share two cores
        )

    try:
        link = start(
            "superlink", "superlink", str(fed.root), "--host", "127.0.0.1", "--port", str(link_port)
        )
        _wait_for_line(logs / "superlink.log", "3 nodes registered", link, seconds=180)
        for site in sites:
            node(site, fed.node(site).root)
        refused = node("intruder", intruder)
        connection = (fed.flwr_home / "config.toml").read_text()  # written by the superlink command
        assert "root-certificates" in connection and "insecure" not in connection
        out_dir = tmp_path / "run"
        run_config = (
            f'num-server-rounds=2 local-steps=2 base-model="{tiny_model_dir}" '
            f'quantization="auto" min-nodes=3 output-dir="{out_dir}" secure-aggregation=true'
        )
        for site in sites:  # the workers are up before their SuperNodes start
            _wait_for_line(logs / f"{site}.log", "Node worker ready", procs[site], seconds=180)
        flwr_run = [str(BIN / "flwr"), "run", str(REPO), launch.CONNECTION, "--stream"]
        done = subprocess.run(
            [*flwr_run, "--run-config", run_config],
            env={**env, "FLWR_HOME": str(fed.flwr_home)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,  # five exchanges per secure round, each a fresh flwr-clientapp process
            check=False,
        )
        node_logs = "\n".join(p.read_text()[-2000:] for p in sorted(logs.iterdir()))
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + node_logs
        streamed = done.stdout + done.stderr  # the ServerApp's own lines reach the researcher
        assert "Round 2 | secure aggregate" in streamed and "Federation finished" in streamed
        history = [
            json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["round"] for r in history] == [1, 2]
        assert all(set(r["sites"]) == set(sites) for r in history)
        assert all("secagg-tolerance" in r and r["replies"] == 3 for r in history)
        for site in sites:
            served = status(str(launch.default_worker_socket(fed.node(site).root)))
            assert served["model-loads"] == 1 and served["messages"] >= 8, (site, served)
            assert served["threads"] == 1, served  # --threads reached torch in the worker
            node_log = (logs / f"{site}.log").read_text() + (
                fed.node(site).root / "worker.log"
            ).read_text()
            assert "unsigned" not in node_log and "Refusing" not in node_log, node_log[-3000:]

        # The unregistered node: Flower's SuperLink refused its activation; it exited.
        assert refused.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in (logs / "intruder.log").read_text()
        link_log = (logs / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in link_log
        assert "https://127.0.0.1" in link_log and "authentication is disabled" not in link_log
    finally:
        for proc in procs.values():  # SIGTERM to each fedlora command: it stops what it started
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert not _listening(link_port), "the SuperLink outlived `fedlora federation superlink`"
