"""``fedlora federation``: one command per role, TLS and node authentication on by default.

Coordinator: ``init`` (CA, SuperLink certificate, node folders), ``add-node``, ``superlink``
(start it, register the nodes, stay in the foreground). Hospital: ``keygen`` (its own node key
pair: only ``auth.pub`` goes to the coordinator), ``node`` (start its SuperNode with its key and
the coordinator's ``ca.crt`` and ``roster.json``).

Bring your own key (the coordinator never holds a hospital's private key)::

    hospital$    fedlora federation keygen pain-node --name pain     # send pain-node/auth.pub
    coordinator$ fedlora federation add-node FED pain --public-key auth.pub
                 # (or: fedlora federation init FED --host ... --node pain=auth.pub)
                 # hand back FED/nodes/pain/ca.crt and roster.json
    hospital$    cp ca.crt roster.json pain-node/
    hospital$    fedlora federation node pain-node --superlink HOST:9092
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer

from fedlora.deploy import federation as fed
from fedlora.deploy import launch
from fedlora.errors import ConfigError

federation = typer.Typer(
    no_args_is_help=True,
    help="Create a federation (CA, TLS certificate, node keys) and start its processes.",
)

FedArg = Annotated[Path, typer.Argument(help="the federation folder")]
TrialOpt = Annotated[
    bool,
    typer.Option(
        "--trial",
        help="make key pairs here for nodes given without a public key: whoever holds FED_DIR "
        "can then sign as those nodes (a trial on one machine, never a real federation)",
    ),
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="TLS and node authentication OFF: anyone on the network can read updates and join",
    ),
]


@federation.command()
def init(
    fed_dir: FedArg,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host", help="a name or IP address hospitals dial (repeat; localhost is added)"
        ),
    ] = None,
    node: Annotated[
        list[str] | None,
        typer.Option(
            "--node",
            help="a node (hospital): NAME=PATH/auth.pub (the hospital's own public key, from "
            "`fedlora federation keygen`), or NAME with --trial (key pair made here) (repeat)",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing federation in FED_DIR")
    ] = False,
    trial: TrialOpt = False,
) -> None:
    """Create a CA, the SuperLink's TLS certificate and a folder per node (with the node's
    public key; a key pair made here only with --trial)."""
    specs = [fed.parse_node(spec) for spec in node or []]
    public_keys = {name: path for name, path in specs if path is not None}
    names = [name for name, _ in specs]
    _check_trial([n for n in names if n not in public_keys], trial)
    roster = fed.init_federation(fed_dir, host or [], names, force=force, public_keys=public_keys)
    layout = fed.Federation(fed_dir)
    typer.echo(f"federation created in {fed_dir} (keep {layout.ca_key} private)")
    _echo_nodes(layout, roster.nodes)


@federation.command("add-node")
def add_node(
    fed_dir: FedArg,
    name: Annotated[str, typer.Argument(help="the new node's name")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="the hospital's auth.pub (from `fedlora federation keygen`): no private key "
            "is made or kept here",
        ),
    ] = None,
    trial: TrialOpt = False,
) -> None:
    """A new node and its folder (from the hospital's public key, or with --trial a key pair
    made here); every node folder's roster.json is refreshed."""
    _check_trial([] if public_key else [name], trial)
    entry = fed.add_node(fed_dir, name, public_key)
    layout = fed.Federation(fed_dir)
    _echo_nodes(layout, [entry])
    nodes = layout.root / "nodes"
    typer.echo(f"roster updated: hand every node its refreshed {nodes}/*/roster.json")


def _check_trial(keyless: list[str], trial: bool) -> None:
    """Coordinator-made keys only when asked for: whoever holds them can sign as the node."""
    if not keyless:
        return
    if not trial:
        first = keyless[0]
        raise ConfigError(
            f"node {first!r} has no public key: have the hospital run `fedlora federation "
            f"keygen NODE_DIR --name {first}` and pass --node {first}=auth.pub (or "
            f"--public-key), or add --trial to make its key pair here (whoever holds this "
            f"folder can then sign as it)"
        )
    typer.echo(
        f"--trial: key pairs for {', '.join(keyless)} are made and kept here; whoever holds this "
        f"folder can sign as them and read their secure-aggregation shares. Use public keys "
        f"from `fedlora federation keygen` for a real federation."
    )


def _echo_nodes(layout: fed.Federation, entries: Iterable[fed.RosterEntry]) -> None:
    for entry in entries:
        folder = layout.node(entry.name)
        typer.echo(f"  node {entry.name}: {entry.sha256}  -> {folder.root}")
        if not folder.auth_key.exists():
            typer.echo(
                f"    its own key: hand it {folder.ca_cert.name} and {folder.roster.name} "
                "to put next to its auth.key"
            )


@federation.command()
def keygen(
    node_dir: Annotated[Path, typer.Argument(help="this node's folder (created, mode 0700)")],
    name: Annotated[str, typer.Option("--name", help="this node's name in the federation")],
) -> None:
    """Make this hospital's own node key pair: auth.key stays here, auth.pub goes to the
    coordinator (who never sees the private key)."""
    entry = fed.keygen(node_dir, name)
    folder = fed.NodeFolder(node_dir)
    typer.echo(f"node key for {entry.name} made in {node_dir} (keep {folder.auth_key} private)")
    typer.echo(f"  public key: {folder.auth_pub}")
    typer.echo(f"  fingerprint: {entry.sha256}")
    typer.echo(
        f"next: send {folder.auth_pub} to the coordinator (compare the fingerprint with theirs "
        f"over another channel), then put the coordinator's ca.crt and roster.json into "
        f"{node_dir}"
    )


@federation.command()
def superlink(
    fed_dir: FedArg,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port", help="port of all its APIs")] = launch.DEFAULT_PORT,
    insecure: InsecureOpt = False,
) -> None:
    """Start the SuperLink with TLS and node authentication, register the nodes; Ctrl-C stops."""
    code = launch.run_superlink(fed_dir, host, port, insecure)
    if code:
        raise SystemExit(code)  # the SuperLink's own status (typer.Exit's is lost in main())


@federation.command()
def node(
    node_dir: Annotated[
        Path,
        typer.Argument(help="this node's folder: auth.key, ca.crt and roster.json"),
    ],
    superlink: Annotated[str, typer.Option("--superlink", help="the SuperLink as HOST:PORT")],
    node_config: Annotated[
        str, typer.Option("--node-config", help="node settings: 'key=value ...'")
    ] = "",
    port: Annotated[
        int | None, typer.Option("--port", help="local Runtime API port (one per SuperNode)")
    ] = None,
    insecure: InsecureOpt = False,
    worker: Annotated[
        bool,
        typer.Option(
            "--worker/--no-worker",
            help="keep the base model loaded in a warm worker (default), or load it per message",
        ),
    ] = True,
    worker_socket: Annotated[
        Path | None, typer.Option("--worker-socket", help="the warm worker's Unix socket")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="math threads per process of this node (default: one per core); cap it when "
            "several nodes share one machine",
        ),
    ] = None,
) -> None:
    """Start this hospital's warm worker and SuperNode (TLS, its key, authenticated SecAgg+
    against its roster); Ctrl-C stops both."""
    code = launch.run_node(
        node_dir,
        superlink,
        node_config,
        port,
        insecure,
        worker=worker,
        worker_socket=worker_socket,
        threads=threads,
    )
    if code:
        raise SystemExit(code)  # the SuperNode's own status, e.g. 1 when it is refused


@federation.command()
def audit(
    node_dir: Annotated[Path, typer.Argument(help="the node's folder (or its audit.jsonl)")],
    verify: Annotated[
        list[Path] | None,
        typer.Option(
            "--verify",
            help="a captured message's serialized content: the audit line with its SHA-256 "
            "and size (repeat)",
        ),
    ] = None,
) -> None:
    """What this node sent, per run: messages, rounds, bytes, refusals, DP epsilon; whether the
    trail's chain is intact; with --verify, which line records a captured message."""
    from fedlora.deploy import audit as trail_of

    trail = trail_of.read_trail(node_dir)
    for line in trail_of.summary_lines(trail):
        typer.echo(line)
    missing = False
    for captured in verify or []:
        found = trail_of.verify(trail, captured.read_bytes())
        where = ", ".join(
            f"line {n} (run {trail.lines[n - 1]['run']}, round {trail.lines[n - 1]['round']}, "
            f"{trail.lines[n - 1]['stage']})"
            for n in found
        )
        typer.echo(f"{captured}: {'recorded at ' + where if found else 'NOT in the trail'}")
        missing = missing or not found
    if missing or trail.broken is not None:
        raise SystemExit(1)


@federation.command()
def status(
    fed_dir: FedArg,
    run_dir: Annotated[
        Path,
        typer.Option(
            "--run-dir",
            help="the run's output-dir as the ServerApp sees it (relative: to where the "
            "SuperLink was started)",
        ),
    ] = Path("runs/flwr"),
    watch: Annotated[bool, typer.Option("--watch", help="refresh until Ctrl-C")] = False,
    every: Annotated[
        float, typer.Option("--every", min=0.5, help="seconds between refreshes")
    ] = 5.0,
) -> None:
    """The roster and which nodes are connected (from the SuperLink), the run and round in
    progress, which nodes answered this stage and each node's last error; stages, never values."""
    import time

    from fedlora.deploy.status import gather, lines

    while True:
        text = "\n".join(lines(gather(fed_dir, run_dir)))
        if watch:
            typer.clear()
        typer.echo(text)
        if not watch:
            return
        try:
            time.sleep(every)
        except KeyboardInterrupt:
            return
