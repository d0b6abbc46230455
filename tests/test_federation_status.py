"""``fedlora federation status``: the ServerApp's live status file (server/live.py) and, in the
slow tier, a real TLS federation of three nodes whose status shows three connected nodes, two
after one is killed, and the round in progress."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedlora.server.live import STATUS_FILE, WatchedGrid
from local_deployment import free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class FakeGrid:
    """Replies to what is pushed: node 3 with an error, node 4 never."""

    pull_interval = 0.0

    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def push_messages(self, messages):
        self.pushed += list(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        out = []
        for m in self.pushed:
            if m.metadata.message_id not in message_ids or m.metadata.dst_node_id == 4:
                continue
            if m.metadata.dst_node_id == 3:
                out.append(Message(error=Error(code=1, reason="refused:  DP budget"), reply_to=m))
            else:
                out.append(Message(content=RecordDict(), reply_to=m))
        self.pushed = [m for m in self.pushed if m.metadata.dst_node_id == 4]
        return out


def _message(node: int, content: RecordDict, message_type: str) -> Message:
    msg = Message(content=content, dst_node_id=node, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = f"m{node}-{message_type}"
    return msg


@pytest.mark.usefixtures("task_identity")
def test_the_status_file_names_round_stage_who_answered_and_errors_never_values(tmp_path):
    grid = WatchedGrid(FakeGrid(), tmp_path)  # type: ignore[arg-type]
    setup = RecordDict(
        {
            "config": ConfigRecord({"server-round": 2, "lr": 0.001}),
            "secagg": ConfigRecord({"stage": "setup", "session": "s3cr3t-session"}),
        }
    )
    replies = grid.send_and_receive(
        [_message(n, setup, "train.secagg") for n in (2, 3, 4)], timeout=0.2
    )

    assert len(list(replies)) == 2
    status = json.loads((tmp_path / STATUS_FILE).read_text())
    assert (status["round"], status["stage"]) == (2, "train.secagg:setup")
    assert (status["asked"], status["answered"], status["failed"]) == ([2, 3, 4], [2], [3])
    assert status["errors"] == {"3": {"stage": "train.secagg:setup", "error": "refused: DP budget"}}
    text = (tmp_path / STATUS_FILE).read_text()
    assert "s3cr3t" not in text and "0.001" not in text  # stages and ids, never values


@pytest.mark.integration
def test_status_of_a_federation_whose_superlink_is_down_is_one_line(tmp_path: Path) -> None:
    from fedlora.deploy.federation import Federation, init_federation
    from fedlora.deploy.launch import write_connection

    fed = Federation(tmp_path / "fed")
    init_federation(fed.root, nodes=["pain"])
    command = [str(BIN / "fedlora"), "federation", "status", str(fed.root)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    never_started = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    write_connection(fed.flwr_home, f"127.0.0.1:{free_port()}", fed.ca_cert)
    down = subprocess.run(command, capture_output=True, text=True, env=env, check=False)

    for done, says in ((never_started, "start the SuperLink"), (down, "did not answer")):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr


def _stage(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / STATUS_FILE).read_text()).get("stage")
    except (OSError, ValueError):
        return None


def _crash(launcher: subprocess.Popen) -> None:
    """SIGKILL a ``fedlora federation node`` and the SuperNode it started (in its own process
    group), as a crash of the machine would."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()  # by pid
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()


def _showing(text: str, *parts: str) -> str | None:
    return text if all(part in text for part in parts) else None


@pytest.mark.slow
def test_status_shows_connected_nodes_a_killed_node_and_the_round_in_progress(
    tiny_model_dir: Path, tmp_path: Path
):
    from fedlora.deploy import launch
    from fedlora.deploy.federation import Federation, init_federation

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
    port, logs = free_port(), tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str, **kw) -> subprocess.Popen:
        procs[name] = subprocess.Popen(
            args,
            env=kw.get("env", env),
            cwd=tmp_path,
            stdout=(logs / f"{name}.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return procs[name]

    def fedlora(name: str, *args: str) -> subprocess.Popen:
        return start(name, str(BIN / "fedlora"), "federation", *args)

    out_dir = tmp_path / "run"

    def status() -> str:
        done = subprocess.run(
            [
                str(BIN / "fedlora"),
                "federation",
                "status",
                str(fed.root),
                "--run-dir",
                str(out_dir),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        (logs / "status.txt").write_text(done.stdout)  # the last one, for a failure's report
        return done.stdout

    try:
        link = fedlora(
            "superlink", "superlink", str(fed.root), "--host", "127.0.0.1", "--port", str(port)
        )
        wait_until(
            lambda: "3 nodes registered" in (logs / "superlink.log").read_text(), 180, "registered"
        )
        assert link.poll() is None
        config = f'base-model="{tiny_model_dir}" quantization="auto"'
        for site in sites:
            fedlora(
                site, "node", str(fed.node(site).root), "--superlink", f"127.0.0.1:{port}",
                "--port", str(free_port()), "--node-config", f'site="{site}" {config}',
                "--threads", "1", "--no-worker",
            )  # fmt: skip
        first = wait_until(lambda: _showing(status(), "3 of 3 connected"), 180, "3 up", every=3.0)
        assert all(f"{site}" in first for site in sites) and "no run in progress" in first

        # a run whose first round cannot finish: it waits for a node that will be killed
        run_config = (
            f'num-server-rounds=2 local-steps=1 {config} min-nodes=3 output-dir="{out_dir}" '
            f"round-timeout=600 secure-aggregation=true"
        )
        start(
            "flwr-run", str(BIN / "flwr"), "run", str(REPO), launch.CONNECTION,
            "--run-config", run_config, env={**env, "FLWR_HOME": str(fed.flwr_home)},
        )  # fmt: skip
        wait_until(lambda: _stage(out_dir), 300, "the first stage sent to the nodes", every=2.0)
        _crash(procs["mental"])

        gone = ("2 of 3 connected", "last error of mental")  # Flower's node-unavailable reply
        try:
            later = wait_until(lambda: _showing(status(), *gone), 300, "2 up", every=3.0)
        except TimeoutError as exc:
            raise AssertionError((logs / "status.txt").read_text()) from exc
        assert "mental" in later and "offline" in later
        assert "round 1, stage train" in later, later
        assert "running" in later, later
        # what a node that answered sent is in its own audit trail (client/audit.py)
        audit = subprocess.run(
            [str(BIN / "fedlora"), "federation", "audit", str(fed.node("pain").root)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert "rounds 1," in audit.stdout and "chain intact" in audit.stdout, audit.stdout
    finally:
        for proc in procs.values():  # stopped by pid (and process group)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
