"""Start a federation's processes: Flower's own ``flower-superlink`` and ``flower-supernode``.

The command lines have TLS and SuperNode authentication on unless ``insecure=True`` is asked
for, and then every start logs :data:`INSECURE_WARNING`. What Flower 1.41 does with them:

- ``flower-superlink`` serves its Fleet, Control and Runtime APIs over HTTPS on one port
  (``--host``/``--port``); with ``--enable-supernode-auth`` (which needs TLS) a SuperNode must
  sign every Fleet request with a key registered beforehand through the Control API
  (``flwr supernode register``, no account needed without an auth plugin). An unregistered
  node is refused at activation (``[code: 2004] Failed to activate SuperNode``) and exits;
  one without a key is refused at registration (``[code: 2001]``).
- ``flower-supernode --root-certificates ca.crt --auth-supernode-private-key auth.key`` checks
  the SuperLink's certificate against the federation's CA and signs with the node's key.

A node folder is either the one the coordinator made (``add-node`` without a public key) or one
the hospital assembled: its own ``auth.key``/``auth.pub`` from ``fedlora federation keygen``
and the coordinator's ``ca.crt`` and ``roster.json``. Before a node starts, its public key
(derived from ``auth.key``) must be in its ``roster.json``. The SuperLink side only ever reads
public keys (the roster's, through each node's ``auth.pub`` under FED).

Each role's processes run in their own session, stopped by process group when the role's
command ends (Ctrl-C or SIGTERM), whatever state they are in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from fedlora.deploy import pki
from fedlora.deploy.federation import Federation, NodeFolder, Roster, RosterEntry, read_roster
from fedlora.errors import ConfigError

logger = logging.getLogger(__name__)

INSECURE_WARNING = (
    "WARNING: TLS and node authentication are OFF (--insecure): anyone on the network can read "
    "updates and join the federation"
)
CONNECTION = "fedlora"  # the connection name in the coordinator's FLWR_HOME/config.toml
DEFAULT_PORT = 9092
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def warn_if_insecure(insecure: bool) -> None:
    """Log :data:`INSECURE_WARNING` when TLS and node authentication are off (every start)."""
    if insecure:
        logger.warning(INSECURE_WARNING)


def flower_tool(name: str) -> str:
    """The path of one of Flower's commands: next to this Python first, then on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} not found: install flwr==1.41 in this environment")
    return found


def thread_env(threads: int | None) -> dict[str, str]:
    """Environment variables that cap the math library threads of a node's processes (its
    worker and every ``flwr-clientapp`` its SuperNode starts): torch, OpenMP and MKL read them
    at start. None: no cap (torch uses one thread per core)."""
    if threads is None:
        return {}
    if threads < 1:
        raise ConfigError(f"--threads {threads}: give at least 1 (or leave it out for all cores)")
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def flower_env(**extra: str) -> dict[str, str]:
    """This environment with Flower's commands on PATH (the SuperLink starts flower-superexec)."""
    bin_dir = str(Path(flower_tool("flower-superlink")).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{path}", **extra}


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as host and port; anything else is refused."""
    host, sep, port_text = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{address!r} is not HOST:PORT (e.g. coordinator.example.org:9092)")
    pki.parse_host(host)
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _readable(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{path} is missing ({what}); {_folder_hint(path)}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path} cannot be read ({exc.strerror}); check its owner and mode"
        ) from None


def _folder_hint(path: Path) -> str:
    if path.parent.name == "superlink":
        return "create the federation with `fedlora federation init`"
    if path.name == "auth.key":
        return (
            "make this node's own key here with `fedlora federation keygen`, or ask the "
            "coordinator for this node's folder (`fedlora federation add-node`)"
        )
    return (
        f"put the coordinator's {path.name} for this node here (from its "
        "`fedlora federation add-node`)"
    )


def node_identity(node_dir: Path) -> RosterEntry:
    """This node's roster entry: its public key, derived from ``auth.key``, must be in its
    ``roster.json`` (the coordinator's, handed over out of band); refused in one line if not."""
    node = NodeFolder(node_dir.resolve())
    key = pki.load_node_private_key(_readable(node.auth_key, "node key"), str(node.auth_key))
    roster = Roster.from_json(
        _readable(node.roster, "roster").decode("utf-8", "replace"), str(node.roster)
    )
    line = pki.openssh_public_key(key.public_key())
    own = pki.fingerprint(line)
    entry = next((e for e in roster.nodes if e.sha256 == own), None)
    if entry is None:
        raise ConfigError(
            f"{node.roster} does not list this node's key {own} (from {node.auth_key}): the "
            "roster from the coordinator must include this node's key; send auth.pub to the "
            "coordinator (`fedlora federation add-node FED NAME --public-key auth.pub`) and "
            "put the roster.json it hands back here"
        )
    return entry


def superlink_command(
    fed_dir: Path, host: str = "0.0.0.0", port: int = DEFAULT_PORT, insecure: bool = False
) -> list[str]:
    """``flower-superlink`` on ``host:port``, with TLS and SuperNode authentication on."""
    command = [flower_tool("flower-superlink"), "--host", host, "--port", str(port)]
    if insecure:
        return [*command, "--insecure"]
    fed = Federation(fed_dir.resolve())
    cert = pki.load_certificate(_readable(fed.server_cert, "TLS certificate"), str(fed.server_cert))
    _readable(fed.server_key, "TLS key")
    _readable(fed.superlink_ca, "CA certificate")
    names = pki.certificate_names(cert)
    if host not in _WILDCARDS and pki.server_names([host])[0] not in names:
        raise ConfigError(
            f"{fed.server_cert} is not valid for {host!r} (it names {', '.join(sorted(names))}); "
            f"listen on 0.0.0.0 or re-create the federation with --host {host}"
        )
    return [
        *command,
        "--ssl-ca-certfile",
        str(fed.superlink_ca),
        "--ssl-certfile",
        str(fed.server_cert),
        "--ssl-keyfile",
        str(fed.server_key),
        "--enable-supernode-auth",
    ]


def supernode_command(
    node_dir: Path,
    superlink: str,
    node_config: str = "",
    port: int | None = None,
    insecure: bool = False,
) -> list[str]:
    """``flower-supernode`` dialling ``superlink`` with TLS and this node's key.

    ``port`` is the node's local Runtime API port (every SuperNode on one machine needs its own;
    Flower's default is 9094); ``node_config`` is passed through as ``--node-config``.
    """
    parse_address(superlink)
    command = [flower_tool("flower-supernode"), "--superlink", superlink]
    if port is not None:
        command += ["--port", str(port)]
    if node_config.strip():
        command += ["--node-config", node_config]
    if insecure:
        return [*command, "--insecure"]
    node = NodeFolder(node_dir.resolve())
    pki.load_node_private_key(_readable(node.auth_key, "node key"), str(node.auth_key))
    pki.load_certificate(_readable(node.ca_cert, "CA certificate"), str(node.ca_cert))
    node_identity(node.root)
    return [
        *command,
        "--root-certificates",
        str(node.ca_cert),
        "--auth-supernode-private-key",
        str(node.auth_key),
    ]


def write_connection(
    flwr_home: Path, address: str, root_certificates: Path | None, name: str = CONNECTION
) -> Path:
    """``flwr_home/config.toml`` with one SuperLink connection, the default (a fedlora folder)."""
    if root_certificates is None:
        security = "insecure = true\n"
    else:
        security = f"root-certificates = {json.dumps(str(root_certificates.resolve()))}\n"
    text = (
        f"[superlink]\ndefault = {json.dumps(name)}\n\n"
        f"[superlink.{name}]\naddress = {json.dumps(address)}\n{security}"
    )
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def register_nodes(fed_dir: Path, address: str) -> dict[str, int | None]:
    """Register every roster node's public key with the SuperLink at ``address``.

    Runs ``flwr supernode register`` against the connection written to the federation's own
    FLWR_HOME (the CA as root certificate). A key the SuperLink already holds (a persistent
    ``--database``) counts as registered (its node id is then None).
    """
    fed = Federation(fed_dir.resolve())
    roster = read_roster(fed.roster)
    write_connection(fed.flwr_home, address, fed.ca_cert)
    env = flower_env(FLWR_HOME=str(fed.flwr_home))
    registered: dict[str, int | None] = {}
    for entry in roster.nodes:  # public keys only: a node's auth.key need not be here
        public_key = fed.node(entry.name).auth_pub
        line = _readable(public_key, "node public key").decode("ascii", "replace")
        if pki.fingerprint_or_none(line) != entry.sha256:
            raise ConfigError(
                f"{public_key} is not the key {fed.roster} lists for node {entry.name!r} "
                f"({entry.sha256}); restore it from the roster or re-add the node"
            )
        command = [flower_tool("flwr"), "supernode", "register", str(public_key), CONNECTION]
        command += ["--name", entry.name, "--format", "json"]
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        registered[entry.name] = _registered_id(done, entry.name)
        logger.info(
            "node %s (%s) registered: SuperNode %s",
            entry.name,
            entry.sha256,
            registered[entry.name] or "(already known)",
        )
    return registered


def _registered_id(done: subprocess.CompletedProcess[str], name: str) -> int | None:
    try:
        reply = json.loads(done.stdout)
    except ValueError:
        reply = {"success": False, "error-message": (done.stderr or done.stdout).strip()}
    if reply.get("success"):
        return int(reply["node-id"])
    message = str(reply.get("error-message", "")).strip()
    if "Public key already in use" in message:
        return None
    last = message.splitlines()[-1] if message else f"exit status {done.returncode}"
    raise ConfigError(f"flwr supernode register refused node {name!r}: {last}")


def wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], seconds: float) -> None:
    """Return once something accepts on ``host:port``; fail if ``proc`` exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"{_program(proc)} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise ConfigError(f"nothing listens on {format_address(host, port)} after {seconds:.0f} s")


class Processes:
    """The processes of one role, each in its own session; all stopped when the block ends.

    Inside the block SIGTERM becomes KeyboardInterrupt (in the main thread), so that stopping
    the role's command stops what it started. Stopping sends SIGTERM to each process group, in
    reverse start order, then SIGKILL to any still running after ``grace`` seconds.
    """

    def __init__(self, grace: float = 20.0) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.grace = grace
        self._previous: Any = None

    def start(self, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        return self.adopt(proc)

    def adopt(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Take charge of a process started elsewhere (in its own session) to stop it too."""
        self.started.append(proc)
        return proc

    def wait_any(self, poll: float = 0.5) -> int:
        """Block until one of the processes exits; its exit status."""
        while True:
            for proc in self.started:
                code = proc.poll()
                if code is not None:
                    logger.info("%s exited with %s", _program(proc), code)
                    return code
            time.sleep(poll)

    def stop(self) -> None:
        for proc in reversed(self.started):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for proc in reversed(self.started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            _signal_group(proc, signal.SIGKILL)  # anything its process left behind

    def __enter__(self) -> Processes:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        main = threading.current_thread() is threading.main_thread()
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.stop()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous_int)
                signal.signal(signal.SIGTERM, self._previous)


def _program(proc: subprocess.Popen) -> str:
    """The name of the program ``proc`` runs (for messages)."""
    args = proc.args
    first = args[0] if isinstance(args, list | tuple) else args
    return Path(str(first)).name


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # in its own session: pgid == pid
        os.killpg(proc.pid, signum)


def run_superlink(
    fed_dir: Path, host: str = "0.0.0.0", port: int = DEFAULT_PORT, insecure: bool = False
) -> int:
    """Start the SuperLink, register the roster's nodes, and stay until Ctrl-C; exit status."""
    warn_if_insecure(insecure)
    command = superlink_command(fed_dir, host, port, insecure)
    local = _WILDCARDS.get(host, host)
    fed = Federation(fed_dir.resolve())
    try:
        with Processes() as procs:
            link = procs.start(command, env=flower_env())
            wait_for_port(local, port, link, seconds=120)
            if insecure:
                write_connection(fed.flwr_home, format_address(local, port), None)
            else:
                registered = register_nodes(fed_dir, format_address(local, port))
                logger.info("%d nodes registered", len(registered))
            logger.info(
                "SuperLink ready on %s; the researcher here: FLWR_HOME=%s flwr run . %s --stream",
                format_address(host, port),
                fed.flwr_home,
                CONNECTION,
            )
            return procs.wait_any()
    except KeyboardInterrupt:
        logger.info("SuperLink stopped")
        return 0


def node_settings(node_dir: Path, node_config: str, worker_socket: Path | None) -> str:
    """``node_config`` plus what the node folder gives: the roster and key that authenticate
    SecAgg+ neighbours, the node's own DP ledger (``dp-ledger.json``) and the warm worker's
    socket (keys the operator set are kept)."""
    node = NodeFolder(node_dir.resolve())
    extra = {"dp-ledger": str(node.root / "dp-ledger.json")}
    if node.roster.is_file() and node.auth_key.is_file():
        node_identity(node.root)  # the key must be in the roster, or SecAgg+ would fail later
        extra["secagg-roster"] = str(node.roster)
        extra["secagg-identity-key"] = str(node.auth_key)
    if worker_socket is not None:
        extra["worker-socket"] = str(worker_socket)
    given = node_config.strip()
    added = [f'{k}="{v}"' for k, v in extra.items() if f"{k}=" not in given]
    return " ".join([given, *added]).strip()


def default_worker_socket(node_dir: Path) -> Path:
    """The worker's socket: in the node folder, or (a Unix socket path has at most 107 bytes)
    in a private folder of this user under the system's temporary folder."""
    here = node_dir.resolve() / "worker.sock"
    if len(os.fsencode(here)) <= 100:
        return here
    digest = hashlib.sha256(os.fsencode(node_dir.resolve())).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fedlora-{os.getuid()}" / f"{digest}.sock"


def run_node(
    node_dir: Path,
    superlink: str,
    node_config: str = "",
    port: int | None = None,
    insecure: bool = False,
    worker: bool = True,
    worker_socket: Path | None = None,
    threads: int | None = None,
) -> int:
    """Start this hospital's warm worker and SuperNode; stay until one exits or Ctrl-C.

    The worker (``fedlora.client.worker``) keeps the base model loaded for the node's lifetime;
    the SuperNode's short-lived ClientApp processes hand it every message. ``worker=False``
    runs each message in its own process, loading the model each time (Flower's default).
    ``threads`` caps the math threads of both (several nodes sharing one machine's cores).
    """
    warn_if_insecure(insecure)
    capped = thread_env(threads)
    socket_path = (worker_socket or default_worker_socket(node_dir)) if worker else None
    settings = node_settings(node_dir, node_config, socket_path)
    command = supernode_command(node_dir, superlink, settings, port, insecure)
    try:
        with Processes() as procs:
            if socket_path is not None:
                from fedlora.client.worker import start_worker

                log_file = node_dir.resolve() / "worker.log"
                env = {**os.environ, **capped}
                procs.adopt(start_worker(socket_path, log_file=log_file, env=env))
                logger.info("Node worker ready on %s (its log: %s)", socket_path, log_file)
            procs.start(command, env=flower_env(**capped))
            try:
                return procs.wait_any()
            finally:
                _report_worker(socket_path)
    except KeyboardInterrupt:
        logger.info("SuperNode stopped")
        return 0


def _report_worker(socket_path: Path | None) -> None:
    """One line: the messages the worker served and the base-model loads it needed."""
    if socket_path is None:
        return
    from fedlora.client.worker import WorkerDown, status

    with contextlib.suppress(WorkerDown, OSError):
        served = status(str(socket_path))
        logger.info(
            "Node worker served %d messages with %d base-model loads (%d math threads)",
            served["messages"],
            served["model-loads"],
            served["threads"],
        )
