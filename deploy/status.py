"""``fedlora federation status FED``: who is connected, and where the run in progress stands.

The roster is the federation folder's; which nodes are connected comes from the SuperLink through
Flower's Control API, as ``flwr supernode list`` and ``flwr ls`` ask it (the connection the
``superlink`` command wrote to FED's FLWR_HOME; a node is matched to its roster name by the public
key it was registered with). The round and stage in progress, the nodes asked and those that
answered, and each node's last error come from the ServerApp's ``status.json`` in the run's
output folder (fedlora.server.live): stage names and node ids, never a value.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.deploy import federation as fed
from fedlora.deploy import pki
from fedlora.deploy.launch import CONNECTION
from fedlora.errors import ConfigError

STATUS_FILE = "status.json"  # as fedlora.server.live writes it (deploy does not import server)


@dataclass
class NodeState:
    name: str
    node_id: int | None = None
    status: str = "not registered"  # online | offline | registered | unregistered (Flower's)


@dataclass
class Status:
    nodes: list[NodeState]
    runs: list[dict[str, Any]] = field(default_factory=list)  # run id, status, app
    progress: dict[str, Any] | None = None  # the ServerApp's status.json


@contextlib.contextmanager
def _flwr_home(path: Path) -> Iterator[None]:
    saved = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = saved


def superlink_view(layout: fed.Federation) -> tuple[list[Any], list[Any]]:
    """Flower's NodeInfo and Run records, from the SuperLink's Control API."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest

    if not (layout.flwr_home / "config.toml").is_file():
        raise ConfigError(
            f"{layout.flwr_home}/config.toml is missing: start the SuperLink with "
            f"`fedlora federation superlink {layout.root}` first"
        )
    client = None
    with _flwr_home(layout.flwr_home):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # Flower's "Using SuperLink" line
                client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
            nodes = list(client.ListNodes(ListNodesRequest()).nodes_info)
            runs = list(client.ListRuns(ListRunsRequest()).run_dict.values())
        except (Exception, SystemExit) as exc:  # noqa: BLE001 -- Flower's errors: one line
            raise ConfigError(
                f"the SuperLink of {layout.root} did not answer ({type(exc).__name__}); is "
                f"`fedlora federation superlink {layout.root}` running?"
            ) from None
        finally:
            if client is not None:
                client.close()
    return nodes, runs


def registered_key(public_key_line: str, name: str) -> bytes:
    """A roster key as Flower holds it for a registered node (its public_key_to_bytes)."""
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    return bytes(public_key_to_bytes(pki.load_public_key(public_key_line, name)))


def gather(fed_dir: Path, run_dir: Path | None) -> Status:
    layout = fed.Federation(fed_dir)
    roster = fed.read_roster(layout.roster)
    infos, runs = superlink_view(layout)
    by_key = {bytes(i.public_key): i for i in infos}
    nodes = []
    for entry in roster.nodes:
        info = by_key.get(registered_key(entry.public_key, entry.name))
        state = NodeState(entry.name)
        if info is not None:
            state.node_id, state.status = int(info.node_id), str(info.status)
        nodes.append(state)
    run_list = [
        {"run": int(r.run_id), "status": _run_status(r), "app": f"{r.fab_id} {r.fab_version}"}
        for r in sorted(runs, key=lambda r: r.run_id)
    ]
    progress = None
    if run_dir is not None and (run_dir / STATUS_FILE).is_file():
        with contextlib.suppress(OSError, ValueError):
            progress = json.loads((run_dir / STATUS_FILE).read_text())
    return Status(nodes, run_list, progress if isinstance(progress, dict) else None)


def _run_status(run: Any) -> str:
    status = run.status
    return "/".join(s for s in (status.status, status.sub_status) if s) or "unknown"


def lines(status: Status) -> list[str]:
    """What ``fedlora federation status`` prints."""
    online = [n for n in status.nodes if n.status == "online"]
    out = [f"nodes: {len(online)} of {len(status.nodes)} connected"]
    names = {n.node_id: n.name for n in status.nodes if n.node_id is not None}
    for n in status.nodes:
        ident = f"node {n.node_id}" if n.node_id is not None else "no node id"
        out.append(f"  {n.name:<16} {n.status:<14} {ident}")
    running = [r for r in status.runs if r["status"].startswith("running")]
    for r in status.runs[-3:]:
        out.append(f"run {r['run']}: {r['status']} ({r['app'].strip()})")
    if not running:
        out.append("no run in progress")
    p = status.progress
    if p is not None:

        def who(key: str) -> str:
            return ", ".join(names.get(n, f"node {n}") for n in p.get(key, [])) or "-"

        failed = f"; failed: {who('failed')}" if p.get("failed") else ""
        answered, asked = len(p.get("answered", [])), len(p.get("asked", []))
        updated = time.strftime("%H:%M:%S", time.localtime(p.get("updated", 0)))
        out.append(
            ("" if running else "last recorded: ")
            + f"round {p.get('round')}, stage {p.get('stage')}: {answered} of {asked} answered "
            f"({who('answered')}){failed}; updated {updated}"
        )
        for node, err in sorted(p.get("errors", {}).items()):
            label = names.get(int(node), f"node {node}")
            out.append(f"  last error of {label} ({err.get('stage')}): {err.get('error')}")
    return out
