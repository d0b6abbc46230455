"""Deployment benchmark: a warm node worker vs a base-model reload per message, plain and secure.

Usage (``make bench-deploy``)::

    .venv/bin/python benchmarks/bench_deploy.py                  # default model, 2 rounds
    .venv/bin/python benchmarks/bench_deploy.py --rounds 3 --local-steps 10
    .venv/bin/python benchmarks/bench_deploy.py --model /models/x   # a model folder
    .venv/bin/python benchmarks/bench_deploy.py --quick --rounds 1 --local-steps 1  # smoke test

Four rows, each a real deployment made by fedlora's own tooling on 127.0.0.1, in a fresh
federation folder: ``fedlora federation init`` (CA, TLS certificate, a key per node),
``fedlora federation superlink`` (TLS, SuperNode authentication, the roster registered), three
``fedlora federation node`` (the packaged drug-review sites pain, dermatology and mental; "auto"
base: bf16 where native, else fp32; SecAgg+ keys signed and checked against each node's
roster), then ``flwr run`` over TLS:

- **warm** (``--worker``, the default): the node's worker process keeps the base model loaded;
  Flower's short-lived ``flwr-clientapp`` processes hand it every message.
- **reload** (``--no-worker``): every message (train, evaluate, each SecAgg+ stage) runs in a
  fresh ``flwr-clientapp`` process, which loads the base model again when the message needs it.

times plain and secure (SecAgg+) aggregation. Federated evaluation stays on as the run config
has it (every round, on each node's held-out split); central evaluation is off.

Per row: seconds per round (the server's round timer in ``metrics.jsonl``: from sending the
train messages to having the replies, or the secure sum; the federated evaluation after it is
not included), the ``flwr run`` wall time (FAB build, every round with its evaluation, the
final checkpoint), base-model loads per node, ``flwr-clientapp`` processes per node, and the
messages the worker served (its status, warm rows only).

How loads are counted: fedlora logs one line per base-model load (``Base ... + LoRA r=...
ready in ...``, ``fedlora.client.node._load_model``). Without a worker that line is logged in a
``flwr-clientapp`` process, where nothing configures fedlora's loggers, so it is dropped and
never reaches the node's log (the report counts those lines in the node logs too). The bench
therefore gives every node's processes a ``sitecustomize`` (on PYTHONPATH, in the temporary
folder) that appends one line per load record, and one per ``flwr-clientapp`` process start,
to a counter file of that node; it leaves what reaches the console unchanged. With a worker,
the count is checked against the worker's own ``model-loads``.

The last line is ``reload / warm seconds per round (secure) = X.XX``; the table also goes to
``runs/bench-deploy.json``. Every process the bench starts runs in its own session and is
stopped by process group when its row ends (also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ("pain", "dermatology", "mental")
MARKER = "FEDLORA_BENCH_DEPLOY"  # in every process of a row: finds anything left behind
COUNTER = "FEDLORA_BENCH_LOADS"  # a node's counter file (read by the sitecustomize below)
LOAD_LINE = ("+ LoRA r=", "ready in")  # both in fedlora's one line per base-model load
GRACE_S = 60.0  # SIGTERM -> SIGKILL; each fedlora command stops its own children in 20 s
TAIL_LINES = 40

# Imported at start by every Python process of a node (fedlora's node command, its worker,
# flower-supernode, flower-superexec, each flwr-clientapp). Counts base-model loads through a
# filter on fedlora.client.node's logger that passes on exactly what the logger would have
# passed without it (the level of its parent), so what reaches the console does not change.
SITECUSTOMIZE = '''\
"""bench-deploy: count base-model loads and flwr-clientapp processes of one node."""
import logging
import os
import sys

_PATH = os.environ.get("FEDLORA_BENCH_LOADS")


def _count(line):
    with open(_PATH, "a", encoding="utf-8") as fh:  # one short append per event
        fh.write(line + "\\n")


if _PATH:
    _logger = logging.getLogger("fedlora.client.node")

    def _filter(record):
        message = record.getMessage()
        if "+ LoRA r=" in message and "ready in" in message:
            _count(f"load {os.getpid()} {message}")
        parent = _logger.parent
        return record.levelno >= (parent.getEffectiveLevel() if parent else logging.WARNING)

    _logger.setLevel(1)  # every record reaches the filter, which applies the natural level
    _logger.addFilter(_filter)
    if os.path.basename(sys.argv[0] if sys.argv else "") == "flwr-clientapp":
        _count(f"clientapp {os.getpid()}")
'''


def note(msg: str) -> None:
    print(f"[bench-deploy] {msg}", file=sys.stderr, flush=True)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class RowFailed(Exception):
    """A row did not complete; the message says where, the logs say why."""


@dataclass
class Row:
    name: str  # "warm plain", "reload secure", ...
    worker: bool
    secure: bool
    round_seconds: list[float] = field(default_factory=list)
    flwr_run_seconds: float = float("nan")
    loads: dict[str, int] = field(default_factory=dict)  # per node, from its counter file
    log_load_lines: dict[str, int] = field(default_factory=dict)  # load lines in node logs
    worker_log_load_lines: dict[str, int] = field(default_factory=dict)  # in worker.log
    clientapps: dict[str, int] = field(default_factory=dict)  # flwr-clientapp processes
    messages: dict[str, int] = field(default_factory=dict)  # worker status (warm rows)
    worker_loads: dict[str, int] = field(default_factory=dict)  # worker status (warm rows)
    load_seconds: list[float] = field(default_factory=list)  # per site and round (secure: sums)
    replies: list[int] = field(default_factory=list)
    left_behind: list[str] = field(default_factory=list)  # killed by the bench after the row
    error: str = ""

    @property
    def mean(self) -> float:
        return statistics.mean(self.round_seconds) if self.round_seconds else float("nan")


# ---- one row ---------------------------------------------------------------------------------


class Deployment:
    """One row's federation: its folder, its processes, their logs."""

    def __init__(self, workdir: Path, model: str, worker: bool, procs: Any, threads: int) -> None:
        from fedlora.deploy.federation import Federation

        self.dir = workdir
        self.fed = Federation(workdir / "fed")
        self.logs = workdir / "logs"
        self.counts = workdir / "counts"
        self.out = workdir / "run"
        self.model = model
        self.worker = worker
        self.threads = threads
        self.procs = procs  # fedlora.deploy.launch.Processes
        self.named: dict[str, subprocess.Popen] = {}
        self.link_port = free_port()
        self.env = {
            **os.environ,
            "FLWR_HOME": str(workdir / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            MARKER: str(workdir),
        }
        for folder in (self.logs, self.counts):
            folder.mkdir(parents=True)

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Any:
        out = (self.logs / f"{name}.log").open("wb")
        try:
            proc = subprocess.Popen(
                command,
                env=env or self.env,
                cwd=self.dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as one
            )
        finally:
            out.close()
        self.procs.adopt(proc)
        self.named[name] = proc
        return proc

    def wait_for_line(self, name: str, text: str, seconds: float) -> None:
        log, proc = self.logs / f"{name}.log", self.named[name]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if text in log.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                raise RowFailed(f"{name} exited with {proc.returncode} before {text!r}")
            time.sleep(0.5)
        raise RowFailed(f"no {text!r} in {name}'s log after {seconds:.0f} s")

    def node_env(self, site: str) -> dict[str, str]:
        hook = str(self.dir.parent / "hook")
        path = os.pathsep.join(p for p in (hook, self.env.get("PYTHONPATH", "")) if p)
        return {**self.env, "PYTHONPATH": path, COUNTER: str(self.counts / f"{site}.log")}

    def up(self) -> None:
        fedlora = str(BIN / "fedlora")
        init = [fedlora, "federation", "init", str(self.fed.root), "--trial"]
        for site in SITES:
            init += ["--node", site]
        done = subprocess.run(
            init, env=self.env, capture_output=True, text=True, timeout=120, check=False
        )
        (self.logs / "init.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            raise RowFailed(f"fedlora federation init exited with {done.returncode}")
        link = [fedlora, "federation", "superlink", str(self.fed.root), "--host", "127.0.0.1"]
        self.start("superlink", [*link, "--port", str(self.link_port)])
        self.wait_for_line("superlink", f"{len(SITES)} nodes registered", seconds=180)
        for site in SITES:
            config = f'site="{site}" base-model="{self.model}" quantization="auto"'
            command = [fedlora, "federation", "node", str(self.fed.node(site).root)]
            command += ["--superlink", f"127.0.0.1:{self.link_port}"]
            command += ["--port", str(free_port()), "--node-config", config]
            command.append("--worker" if self.worker else "--no-worker")
            command += ["--threads", str(self.threads)]
            self.start(site, command, self.node_env(site))
        if self.worker:  # the workers are up before their SuperNodes start
            for site in SITES:
                self.wait_for_line(site, "Node worker ready", seconds=300)
        self.wait_online(seconds=300)

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env={**self.env, "FLWR_HOME": str(self.fed.flwr_home)},
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def wait_online(self, seconds: float) -> None:
        """Until the SuperLink lists every node online (so no row times node start-up)."""
        from fedlora.deploy.launch import CONNECTION

        deadline = time.monotonic() + seconds
        online = 0
        while time.monotonic() < deadline:
            for site in SITES:
                if self.named[site].poll() is not None:
                    raise RowFailed(f"node {site} exited with {self.named[site].returncode}")
            done = self.flwr("supernode", "list", CONNECTION, "--format", "json", timeout=120)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                nodes = json.loads(done.stdout)["nodes"]
                online = sum(1 for n in nodes if n.get("status") == "online")
                if online >= len(SITES):
                    return
            time.sleep(1.0)
        raise RowFailed(f"{online} of {len(SITES)} nodes online after {seconds:.0f} s")

    def run(self, rounds: int, local_steps: int, secure: bool, timeout: float) -> float:
        """``flwr run`` in its own session (stopped with the row); its wall time."""
        from fedlora.deploy.launch import CONNECTION

        run_config = (
            f"num-server-rounds={rounds} local-steps={local_steps} min-nodes={len(SITES)} "
            f'base-model="{self.model}" quantization="auto" central-eval="" '
            f'output-dir="{self.out}" secure-aggregation={"true" if secure else "false"}'
        )
        command = [str(BIN / "flwr"), "run", str(ROOT), CONNECTION, "--stream"]
        env = {**self.env, "FLWR_HOME": str(self.fed.flwr_home)}
        start = time.perf_counter()
        proc = self.start("flwr-run", [*command, "--run-config", run_config], env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RowFailed(f"flwr run did not finish in {timeout:.0f} s") from None
        seconds = time.perf_counter() - start
        if code:
            raise RowFailed(f"flwr run exited with {code}")
        return seconds

    def history(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            raise RowFailed(f"{path} is missing")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def counted(self, site: str) -> tuple[int, int]:
        """``(base-model loads, flwr-clientapp processes)`` in the node's counter file."""
        path = self.counts / f"{site}.log"
        lines = path.read_text().splitlines() if path.is_file() else []
        return (
            sum(1 for x in lines if x.startswith("load ")),
            sum(1 for x in lines if x.startswith("clientapp ")),
        )

    def load_lines_in_log(self, site: str) -> tuple[int, int]:
        """The load lines that reached the node's own log (its stdout and stderr), and its
        worker's log."""
        counts = []
        for path in (self.logs / f"{site}.log", self.fed.node(site).root / "worker.log"):
            text = path.read_text(errors="replace") if path.is_file() else ""
            counts.append(sum(1 for x in text.splitlines() if all(t in x for t in LOAD_LINE)))
        return counts[0], counts[1]

    def worker_status(self, site: str) -> dict[str, Any]:
        from fedlora.client.worker import WorkerDown, status
        from fedlora.deploy.launch import default_worker_socket

        try:
            return status(str(default_worker_socket(self.fed.node(site).root)))
        except (WorkerDown, OSError) as exc:
            raise RowFailed(f"node {site}: no worker status ({exc})") from None

    def tails(self) -> str:
        """The last lines of every log of this row (for a failed row)."""
        files = sorted(self.logs.glob("*.log"))
        files += [self.fed.node(s).root / "worker.log" for s in SITES]
        parts = []
        for path in files:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
                parts.append(f"---- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)


def leftovers(marker: str) -> dict[int, str]:
    """Live processes (not zombies) that carry this row's marker: started, directly or not, by
    the row; their command lines."""
    found = {}
    needle = f"{MARKER}={marker}".encode() + b"\0"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle not in (entry / "environ").read_bytes() + b"\0":
                continue
            if (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            found[int(entry.name)] = " ".join(a.decode(errors="replace") for a in argv[:3])
    return found


def stop_leftovers(marker: str, seconds: float = 10.0) -> dict[int, str]:
    """Give processes the fedlora commands already killed time to go, then SIGKILL (by pid)
    any of the row's processes still alive; those."""
    deadline = time.monotonic() + seconds
    left = leftovers(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = leftovers(marker)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def measure(row: Row, workdir: Path, args: argparse.Namespace) -> None:
    """Run one row in ``workdir``; fill ``row`` (``row.error`` and the logs' tails on failure)."""
    from fedlora.deploy.launch import Processes

    workdir.mkdir(parents=True)
    deployment = None
    try:
        with Processes(grace=GRACE_S) as procs:  # SIGTERM -> KeyboardInterrupt inside
            deployment = Deployment(workdir, args.model_path, row.worker, procs, args.threads)
            note(f"{row.name}: starting the federation in {workdir}")
            deployment.up()
            note(f"{row.name}: flwr run, {args.rounds} round(s) of {args.local_steps} steps")
            row.flwr_run_seconds = deployment.run(
                args.rounds, args.local_steps, row.secure, args.timeout
            )
            history = deployment.history()
            if [r.get("round") for r in history] != list(range(1, args.rounds + 1)):
                raise RowFailed(f"metrics.jsonl has rounds {[r.get('round') for r in history]}")
            row.round_seconds = [float(r["seconds"]) for r in history]
            row.replies = [int(r.get("replies", 0)) for r in history]
            row.load_seconds = [  # secure rounds reveal only the sum over their sites
                float(s["load-seconds"])
                for r in history
                for s in r.get("sites", {}).values()
                if "load-seconds" in s
            ] + [float(r["load-seconds-sum"]) for r in history if "load-seconds-sum" in r]
            if any(n != len(SITES) for n in row.replies):
                raise RowFailed(f"replies per round {row.replies}, not {len(SITES)}")
            for site in SITES:
                if row.worker:  # while the worker runs
                    served = deployment.worker_status(site)
                    row.messages[site] = int(served["messages"])
                    row.worker_loads[site] = int(served["model-loads"])
        # the row's processes are stopped: every counter file is complete
        for site in SITES:
            row.loads[site], row.clientapps[site] = deployment.counted(site)
            row.log_load_lines[site], row.worker_log_load_lines[site] = (
                deployment.load_lines_in_log(site)
            )
        if row.worker and row.worker_loads != row.loads:
            raise RowFailed(f"worker model-loads {row.worker_loads} != counted {row.loads}")
    except (RowFailed, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        row.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RowFailed) else str(exc)
        note(f"{row.name} FAILED: {row.error}")
        if deployment is not None:
            print(deployment.tails(), file=sys.stderr, flush=True)
    finally:
        left = stop_leftovers(str(workdir))  # what a fedlora command failed to stop
        if left:
            row.left_behind = sorted(left.values())
            note(f"{row.name}: killed {len(left)} process(es) left behind: {left}")
        if deployment is not None and listening(deployment.link_port):
            note(f"{row.name}: something still listens on the SuperLink's port")


# ---- report ------------------------------------------------------------------------------


def per_node(values: dict[str, int]) -> str:
    return "/".join(str(values[s]) for s in SITES) if values else "-"


def ratio(rows: list[Row], secure: bool) -> float:
    by = {r.worker: r for r in rows if r.secure == secure and not r.error}
    if len(by) < 2 or not by[True].mean > 0:
        return float("nan")
    return by[False].mean / by[True].mean


def nan_to_none(x: float) -> float | None:
    return None if x != x else x  # JSON has no NaN


def fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"  # NaN: a failed row


def _dtype() -> str:
    from fedlora.precision import compute_dtype

    return str(compute_dtype()).removeprefix("torch.")


def report(rows: list[Row], args: argparse.Namespace, loads: list[str], command: str) -> dict:
    print(
        f"\nDeployment on 127.0.0.1: 3 nodes ({', '.join(SITES)}), TLS + node authentication, "
        f"SecAgg+ keys signed against each node's roster; model {args.model_label}, "
        f'{_dtype()} base (quantization "auto"); '
        f"{args.rounds} round(s) of {args.local_steps} local steps x batch 4; "
        f"{args.threads} math thread(s) per node; federated "
        f"evaluation every round (run config default), central evaluation off.\n"
    )
    print(
        "| row | node | aggregation | s/round (each) | mean s/round | flwr run s | "
        "loads per node | clientapp processes per node | worker messages per node |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        each = ", ".join(f"{s:.1f}" for s in r.round_seconds) or "-"
        print(
            f"| {r.name} | {'--worker' if r.worker else '--no-worker'} | "
            f"{'secure' if r.secure else 'plain'} | {each} | {fmt(r.mean)} | "
            f"{fmt(r.flwr_run_seconds)} | {per_node(r.loads)} | {per_node(r.clientapps)} | "
            f"{per_node(r.messages)} |" + (f" FAILED: {r.error}" if r.error else "")
        )
    plain, secure = ratio(rows, False), ratio(rows, True)
    print(
        f"\nPer node: {'/'.join(SITES)}. s/round: the server's round timer (metrics.jsonl "
        f"`seconds`: train messages out -> replies or the secure sum; evaluation not included). "
        f"flwr run s: the whole command. Loads: base-model loads counted per node (a "
        f"sitecustomize in the node's processes counts fedlora's load log records; with a "
        f"worker it equals the worker's model-loads). fedlora's load lines found in the node "
        f"logs (the node command's output) / in worker.log: "
        + ", ".join(
            f"{r.name} {per_node(r.log_load_lines)} / {per_node(r.worker_log_load_lines)}"
            for r in rows
        )
        + "."
    )
    left = [f"{r.name}: {', '.join(r.left_behind)}" for r in rows if r.left_behind]
    if left:
        print(f"Left behind by the fedlora commands (killed by the bench): {'; '.join(left)}")
    print(f"\nreload / warm seconds per round (plain) = {fmt(plain)}")
    print(f"Load average: {'; '.join(loads)}.")
    print(f"Command: {command}")
    doc = {
        "command": command,
        "model": args.model_label,
        "rounds": args.rounds,
        "local-steps": args.local_steps,
        "threads-per-node": args.threads,
        "sites": list(SITES),
        "load-average": loads,
        "ratios": {
            "reload/warm s per round plain": nan_to_none(plain),
            "reload/warm s per round secure": nan_to_none(secure),
        },
        "rows": [
            {
                **{k.replace("_", "-"): v for k, v in asdict(r).items()},
                "flwr-run-seconds": nan_to_none(r.flwr_run_seconds),
                "mean-round-seconds": nan_to_none(r.mean),
            }
            for r in rows
        ],
    }
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs" / "bench-deploy.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"Table as JSON: {ROOT / 'runs' / 'bench-deploy.json'}")
    print(f"reload / warm seconds per round (secure) = {fmt(secure)}", flush=True)
    return doc


# ---- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per row (default 2)")
    parser.add_argument(
        "--local-steps", type=int, default=5, help="local steps per round (default 5)"
    )
    parser.add_argument(
        "--model", default="default", help="'default' (packaged SmolLM2-135M) or a model folder"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny config-built model (tests/tiny.py) instead: a smoke test",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds per flwr run (default 3600)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) // len(SITES)),
        help="math threads per node (fedlora federation node --threads; default: this "
        "machine's cores shared among the 3 nodes, at least 1)",
    )
    parser.add_argument(
        "--aggregation",
        choices=("both", "plain", "secure"),
        default="both",
        help="which rows: plain and secure (default), or one of them",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.local_steps < 1 or args.timeout <= 0 or args.threads < 1:
        parser.error("--rounds, --local-steps, --threads and --timeout must be positive")
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):  # as typed in the repository: .venv/bin/python
        python = python.relative_to(Path.cwd())
    command = shlex.join([str(python), *sys.argv])

    from fedlora.simulations.run import offline_environment

    offline_environment()
    loads = [f"start {load_average()}"]
    rows = [
        Row("warm plain", worker=True, secure=False),
        Row("reload plain", worker=False, secure=False),
        Row("warm secure", worker=True, secure=True),
        Row("reload secure", worker=False, secure=True),
    ]
    if args.aggregation != "both":
        rows = [r for r in rows if r.secure == (args.aggregation == "secure")]
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        work = Path(tmp)
        (work / "hook").mkdir()
        (work / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        if args.quick:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny import make_tiny_model

            args.model_path = str(make_tiny_model(work / "tiny-model"))
            args.model_label = "tiny (tests/tiny.py: Llama, 2 layers, hidden 64)"
        else:
            from fedlora.basemodel import resolve_base_model

            resolve_base_model(args.model)  # prepared once, before any row starts
            args.model_path = args.model
            args.model_label = (
                "default (SmolLM2-135M-Instruct)" if args.model == "default" else args.model
            )
        try:
            for i, row in enumerate(rows):
                measure(row, work / f"row{i}", args)
        except KeyboardInterrupt:
            note("interrupted: the row's processes are stopped")
            return 130
    loads.append(f"end {load_average()}")
    report(rows, args, loads, command)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
