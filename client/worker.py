"""A node's warm worker: one long-lived process that holds the base model across messages.

Flower 1.41's SuperNode runs every message (each train, evaluate and SecAgg+ stage) in a fresh
``flwr-clientapp`` process, so a model cached in that process is lost with it and a deployed node
loads its base model again for every message. The worker is started with the node (``fedlora
federation node`` starts it before the SuperNode) and runs fedlora's own ClientApp in one
process for the node's lifetime: the base model, the node's data and its tokenization stay
loaded across messages, rounds and runs.

The short-lived ClientApp process hands the worker each message with its context when the node
setting ``worker-socket`` names the worker's socket, and returns the worker's reply and the
updated node state (the SuperNode keeps the state, as without a worker). The channel is local
only: a Unix socket created mode 0600 in a folder of mode 0700, and the worker answers only
processes of its own user (``SO_PEERCRED``). If the worker is down the ClientApp answers the
server with an error reply and logs one line that says so.

Frames: an 8-byte big-endian length, then that many bytes. A request is ``MAGIC``, then a
Flower ``Message`` and ``Context`` as protobuf bytes (or ``MAGIC`` and ``STATUS``); a reply is
``OK`` with the reply message and the updated context, or ``FAILED`` and a one-line reason.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedlora.errors import ConfigError, FedloraError

log = logging.getLogger(__name__)

SOCKET_KEY = "worker-socket"  # node setting: the worker's socket, for the ClientApp
MAGIC = b"fedlora-worker/1"
STATUS = b"status"
OK, FAILED = b"ok", b"failed"
MAX_FRAME = 4 << 30  # a frame longer than this is refused (adapters are a few MiB to a few GiB)
CONNECT_SECONDS = 5.0
MAX_SOCKET_PATH = 107  # bytes in a Unix socket path (sun_path holds 108 with the NUL)


class WorkerDown(FedloraError):
    """The node's worker is not running (or not answering) at its socket."""


class WorkerFailed(FedloraError):
    """The worker ran the message and failed; its log has the details."""


# ---- frames ------------------------------------------------------------------------------


def send_frames(sock: socket.socket, *parts: bytes) -> None:
    for part in parts:
        sock.sendall(struct.pack(">Q", len(part)) + part)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">Q", _recv_exact(sock, 8))
    if size > MAX_FRAME:
        raise WorkerFailed(f"a frame of {size} bytes is over the {MAX_FRAME}-byte limit")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ---- the ClientApp side ------------------------------------------------------------------


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_SECONDS)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise WorkerDown(
            f"no node worker answers at {path} ({exc.strerror or exc}): start the node with "
            f"`fedlora federation node`, or remove the node setting {SOCKET_KEY!r}"
        ) from None
    sock.settimeout(None)  # a round may train for a long time
    return sock


def forward(path: str, message: Message, context: Context) -> Message:
    """Have the worker at ``path`` run ``message``; ``context.state`` becomes the worker's."""
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    with _connect(path) as sock:
        try:
            send_frames(
                sock,
                MAGIC,
                message_to_proto(message).SerializeToString(),
                context_to_proto(context).SerializeToString(),
            )
            status = recv_frame(sock)
            if status != OK:
                raise WorkerFailed(recv_frame(sock).decode(errors="replace"))
            reply = message_from_proto(ProtoMessage.FromString(recv_frame(sock)))
            updated = context_from_proto(ProtoContext.FromString(recv_frame(sock)))
        except (ConnectionError, OSError) as exc:
            raise WorkerDown(f"the node worker at {path} stopped mid-message: {exc}") from None
    context.state = updated.state
    return reply


def status(path: str) -> dict[str, Any]:
    """The worker's counters: pid, messages served, base-model loads."""
    with _connect(path) as sock:
        send_frames(sock, MAGIC, STATUS)
        if recv_frame(sock) != OK:
            raise WorkerFailed(recv_frame(sock).decode(errors="replace"))
        result: dict[str, Any] = json.loads(recv_frame(sock))
        return result


# ---- the worker --------------------------------------------------------------------------


def prepare_socket(path: Path) -> None:
    """Make ``path``'s folder private (0700) and clear a stale socket; refuse a live one."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{path}: {len(os.fsencode(path))} bytes, over the {MAX_SOCKET_PATH} a Unix socket "
            f"path may have; choose a shorter path"
        )
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"{folder}: owned by another user; put the worker socket in your own")
    os.chmod(folder, 0o700)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ConfigError(f"{path}: exists and is not a socket; choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a worker that died
        else:
            raise ConfigError(f"{path}: another worker is running there; stop it first")
        finally:
            probe.close()


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class Worker:
    """Runs fedlora's ClientApp for each message handed over the socket, in this process."""

    def __init__(self) -> None:
        from fedlora.client.app import make_client_app

        self.app = make_client_app()
        self.messages = 0

    def handle(self, conn: socket.socket) -> None:
        if _peer_uid(conn) != os.getuid():
            log.warning("Refused a connection from another user (uid %d)", _peer_uid(conn))
            return
        try:
            if recv_frame(conn) != MAGIC:
                send_frames(conn, FAILED, b"not a fedlora worker request")
                return
            first = recv_frame(conn)
            if first == STATUS:
                send_frames(conn, OK, json.dumps(self.counters()).encode())
                return
            reply, context = self.run(first, recv_frame(conn))
        except (ConnectionError, WorkerFailed) as exc:
            log.warning("Dropped a request: %s", exc)
            return
        except Exception as exc:  # the worker outlives any one message
            log.exception("The ClientApp failed on a message")
            send_frames(conn, FAILED, f"{type(exc).__name__}; see the node worker's log".encode())
            return
        send_frames(conn, OK, reply, context)

    def run(self, message_bytes: bytes, context_bytes: bytes) -> tuple[bytes, bytes]:
        from flwr.common.serde import (
            context_from_proto,
            context_to_proto,
            message_from_proto,
            message_to_proto,
        )
        from flwr.proto.message_pb2 import Context as ProtoContext
        from flwr.proto.message_pb2 import Message as ProtoMessage

        message = message_from_proto(ProtoMessage.FromString(message_bytes))
        context = context_from_proto(ProtoContext.FromString(context_bytes))
        # here the app runs itself: it must not hand the message on again
        context.node_config = {k: v for k, v in context.node_config.items() if k != SOCKET_KEY}
        start = time.perf_counter()
        reply = self.app(message, context)
        self.messages += 1
        log.info(
            "Served %s in %.1f s (message %d of this worker)",
            message.metadata.message_type,
            time.perf_counter() - start,
            self.messages,
        )
        return (
            message_to_proto(reply).SerializeToString(),
            context_to_proto(context).SerializeToString(),
        )

    def counters(self) -> dict[str, Any]:
        import torch  # the worker needs it for its first message anyway

        from fedlora.client.node import loads_so_far

        return {
            "pid": os.getpid(),
            "messages": self.messages,
            "model-loads": loads_so_far(),
            "threads": torch.get_num_threads(),  # capped by OMP_NUM_THREADS (--threads)
        }


def serve(path: Path) -> None:
    """Serve messages on ``path`` until SIGTERM or SIGINT; one message at a time."""
    prepare_socket(path)
    worker = Worker()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    server.listen(8)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    log.info("Node worker %d listening on %s", os.getpid(), path)
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                worker.handle(conn)
    finally:
        server.close()
        path.unlink(missing_ok=True)


def start_worker(
    path: Path,
    log_file: Path | None = None,
    seconds: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start a worker process on ``path`` (in ``env``, default this process's environment) and
    return once it answers (or raise ConfigError)."""
    out = log_file.open("ab") if log_file else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedlora.client.worker", str(path)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log_file:  # the worker holds its own copy of the file
            out.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            where = f": see {log_file}" if log_file else ""
            raise ConfigError(f"the node worker exited with status {proc.returncode}{where}")
        try:
            status(str(path))
            return proc
        except (WorkerDown, OSError):
            time.sleep(0.2)
    proc.terminate()
    raise ConfigError(f"the node worker did not answer on {path} within {seconds:.0f} s")


def main(argv: list[str] | None = None) -> None:
    from fedlora.console import configure

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedlora.client.worker SOCKET_PATH", file=sys.stderr)
        raise SystemExit(2)
    configure(verbose=False)
    try:
        serve(Path(args[0]))
    except ConfigError as exc:
        print(f"fedlora worker: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
