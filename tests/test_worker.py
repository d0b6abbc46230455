"""The node's warm worker: a long-lived process that runs the ClientApp with the model loaded.

A real worker process on a real Unix socket; the ClientApp is called as Flower calls it (the
``flwr-clientapp`` process does the same), with the node setting ``worker-socket``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from fedlora.client.adapter_state import PERSONAL
from fedlora.client.app import WORKER_DOWN, make_client_app
from fedlora.client.worker import prepare_socket, start_worker, status
from fedlora.errors import ConfigError, FedloraError
from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
from fedlora.protocol.messages import ARRAYS, CONFIG, METRICS, RoundConfig, to_array_record

pytestmark = pytest.mark.integration
LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder: a Unix socket path may have at most 107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="fw", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def worker(short_dir: Path) -> Iterator[Path]:
    path = short_dir / "node" / "worker.sock"
    proc = start_worker(path, log_file=short_dir / "worker.log")
    try:
        yield path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _message(kind: str, content: RecordDict, message_id: str = "m1") -> Message:
    meta = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=meta)


def _content(adapter, server_round: int = 1, **overrides) -> RecordDict:
    values = dict(
        server_round=server_round,
        local_steps=2,
        batch_size=2,
        lr=5e-3,
        max_length=128,
        seed=0,
        lora_r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=LORA.dropout,
        target_modules=LORA.target_modules,
    )
    values.update(overrides)
    return RecordDict({ARRAYS: to_array_record(adapter), CONFIG: RoundConfig(**values).to_record()})


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_the_worker_serves_rounds_with_one_model_load_and_keeps_node_state(
    worker: Path, tiny_model_dir: Path
) -> None:
    node = {"site": "pain", "base-model": str(tiny_model_dir), "quantization": "auto"}
    app = make_client_app()
    adapter = initial_adapter(adapter_shapes(tiny_model_dir, LORA), seed=0)
    context = _context({**node, "worker-socket": str(worker)})
    # FedSA-LoRA: the node trains A and B, sends A, keeps B in its state between rounds
    fedsa = {"train_factors": "AB", "send_factors": "A"}
    replies = []
    for rnd in (1, 2):
        reply = app(_message("train", _content(adapter, rnd, **fedsa), f"m{rnd}"), context)
        assert not reply.has_error(), reply.error
        replies.append(reply)
        assert PERSONAL in context.state.array_records  # the worker's state came back
    evaluated = app(_message("evaluate", _content(adapter, 2), "m3"), context)
    assert not evaluated.has_error(), evaluated.error
    assert status(str(worker))["model-loads"] == 1  # three messages, one base-model load
    assert status(str(worker))["messages"] == 3
    sent = replies[0].content.array_records[ARRAYS]
    assert sent and all(".lora_A." in name for name in sent)  # only A leaves the node
    assert replies[0].metadata.reply_to_message_id == "m1"

    # the same message without the worker: the same reply, computed in this process
    local = app(_message("train", _content(adapter, 1, **fedsa)), _context(node))
    for name, array in local.content.array_records[ARRAYS].items():
        np.testing.assert_allclose(sent[name].numpy(), array.numpy(), atol=1e-6)
    worked, here = replies[0].content.metric_records[METRICS], local.content.metric_records[METRICS]
    assert set(worked) == set(here)
    assert {k: worked[k] for k in here if not k.endswith("-seconds")} == pytest.approx(
        {k: here[k] for k in here if not k.endswith("-seconds")}
    )


def test_a_node_whose_worker_is_down_answers_with_an_error_and_one_line(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = short_dir / "nobody.sock"
    context = _context({"site": "pain", "worker-socket": str(missing)})
    with caplog.at_level(logging.ERROR, logger="fedlora"):
        reply = make_client_app()(_message("train", RecordDict()), context)
    assert reply.has_error() and reply.error.code == WORKER_DOWN
    assert "worker is not running" in reply.error.reason
    assert str(missing) not in reply.error.reason  # the node's paths stay in its own log
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and str(missing) in lines[0] and "fedlora federation node" in lines[0]


def test_the_socket_is_private_and_a_second_worker_is_refused(worker: Path) -> None:
    assert stat.S_IMODE(worker.stat().st_mode) == 0o600
    assert stat.S_IMODE(worker.parent.stat().st_mode) == 0o700
    with pytest.raises(ConfigError, match="another worker is running"):
        prepare_socket(worker)


def test_a_stale_socket_is_cleared_and_other_files_are_refused(short_dir: Path) -> None:
    stale = short_dir / "s" / "w.sock"
    stale.parent.mkdir()
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(stale))  # bound, never listening: what a killed worker leaves
    left.close()
    prepare_socket(stale)
    assert not stale.exists()
    plain = short_dir / "s" / "file"
    plain.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        prepare_socket(plain)
    with pytest.raises(ConfigError, match="shorter path"):
        prepare_socket(short_dir / ("x" * 120))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_the_worker_answers_only_its_own_user(worker: Path) -> None:
    # Open the socket, its folder and the temporary folder above it to everyone, so that only the
    # worker's own check (SO_PEERCRED) can refuse the other user: the child first proves it can
    # connect at all (exit 2 if not, which would test the folders' modes instead).
    for folder in (worker.parent, worker.parent.parent):
        os.chmod(folder, 0o755)
    os.chmod(worker, 0o666)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            os.setuid(65534)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(worker))
            except OSError:
                os._exit(2)
            probe.close()
            status(str(worker))
        except (OSError, FedloraError):
            code = 0  # refused: the worker closed the connection without an answer
        os._exit(code)
    _, result = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(result) != 2, "the other user could not connect: nothing was tested"
    assert os.WEXITSTATUS(result) == 0, "the worker answered another user"
    assert status(str(worker))["pid"] > 0  # and still serves its own
