"""A federation folder: what the coordinator keeps and what each hospital is handed.

::

    FED/ca/ca.key, ca.crt                 the certificate authority (ca.key never leaves)
    FED/superlink/server.pem, server.key, ca.crt
                                          the SuperLink's TLS files
    FED/superlink/flwr/config.toml        the Flower connection the coordinator's tools use
    FED/nodes/<name>/auth.key, auth.pub, ca.crt, roster.json
                                          one hospital's folder, handed over out of band
    FED/roster.json                       every node: name, OpenSSH public key, fingerprint

Every node folder holds its own copy of the roster: nodes will check their SecAgg+ neighbours'
keys against it, so it must reach them out of band, never from the server. Private keys are
written with mode 0600 in folders with mode 0700.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlora.deploy import pki
from fedlora.errors import ConfigError

ROSTER_VERSION = 1
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class NodeFolder:
    """One hospital's folder (``FED/nodes/<name>``), as handed to it."""

    root: Path

    @property
    def auth_key(self) -> Path:  # OpenSSH private key, for flower-supernode
        return self.root / "auth.key"

    @property
    def auth_pub(self) -> Path:  # OpenSSH public key line, for flwr supernode register
        return self.root / "auth.pub"

    @property
    def ca_cert(self) -> Path:  # verifies the SuperLink's TLS certificate
        return self.root / "ca.crt"

    @property
    def roster(self) -> Path:  # every node's public key: this node's copy
        return self.root / "roster.json"


@dataclass(frozen=True)
class Federation:
    """The coordinator's federation folder."""

    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    @property
    def superlink_ca(self) -> Path:
        return self.root / "superlink" / "ca.crt"

    @property
    def flwr_home(self) -> Path:  # FLWR_HOME of the coordinator's flwr commands
        return self.root / "superlink" / "flwr"

    @property
    def roster(self) -> Path:
        return self.root / "roster.json"

    def node(self, name: str) -> NodeFolder:
        return NodeFolder(self.root / "nodes" / name)


@dataclass(frozen=True)
class RosterEntry:
    """One node: its name, OpenSSH public key line and that key's SHA256 fingerprint."""

    name: str
    public_key: str
    sha256: str


@dataclass(frozen=True)
class Roster:
    """Every node of the federation, in the order they were added."""

    nodes: tuple[RosterEntry, ...] = ()

    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def with_node(self, entry: RosterEntry) -> Roster:
        return Roster((*self.nodes, entry))

    def to_json(self) -> str:
        nodes = [vars(n) for n in self.nodes]
        return json.dumps({"version": ROSTER_VERSION, "nodes": nodes}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Roster:
        try:
            data = json.loads(text)
            entries = tuple(RosterEntry(**n) for n in data["nodes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{source}: not a fedlora roster ({exc})") from None
        for entry in entries:
            key_line = pki.openssh_public_key(pki.load_public_key(entry.public_key, source))
            if pki.fingerprint(key_line) != entry.sha256:
                raise ConfigError(
                    f"{source}: node {entry.name!r} has a fingerprint that does not match its "
                    "key; get a fresh copy from the coordinator"
                )
        return cls(entries)


def check_node_name(name: str) -> str:
    """``name`` if it is a usable node name (letters, digits, ``-``, ``_``, ``.``)."""
    if not _NODE_NAME.match(name):
        raise ConfigError(
            f"node name {name!r} is not allowed: use 1-64 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return name


def read_roster(path: Path) -> Roster:
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: create the federation with `fedlora federation init`"
        )
    return Roster.from_json(path.read_text(encoding="utf-8"), str(path))


def make_private_dir(path: Path) -> Path:
    """``path`` and its missing parents, each new one with mode 0700."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700)
        folder.chmod(0o700)  # mkdir's mode is reduced by the umask
    return path


def write_file(path: Path, data: bytes, *, private: bool = False) -> Path:
    """Write ``data``; a private file gets mode 0600 before any byte is written."""
    make_private_dir(path.parent)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)  # an existing file keeps its old mode otherwise
        out.write(data)
    return path


def _new_node(fed: Federation, name: str) -> RosterEntry:
    """A node folder with a fresh key pair and the CA certificate (its roster comes after)."""
    folder = fed.node(name)
    key = pki.new_key()
    public_line = pki.openssh_public_key(key.public_key(), comment=name)
    write_file(folder.auth_key, pki.openssh_private_key(key), private=True)
    write_file(folder.auth_pub, (public_line + "\n").encode("ascii"))
    shutil.copyfile(fed.ca_cert, folder.ca_cert)
    return RosterEntry(name, public_line, pki.fingerprint(public_line))


def _publish_roster(fed: Federation, roster: Roster) -> None:
    """Write the roster to FED/roster.json and to every node folder's roster.json."""
    text = roster.to_json().encode("utf-8")
    write_file(fed.roster, text)
    for name in roster.names():
        write_file(fed.node(name).roster, text)


def _unique_names(names: Sequence[str], existing: Iterable[str] = ()) -> list[str]:
    seen = set(existing)
    for name in names:
        check_node_name(name)
        if name in seen:
            raise ConfigError(f"node name {name!r} is given twice; every node needs its own name")
        seen.add(name)
    return list(names)


def init_federation(
    root: Path, hosts: Sequence[str] = (), nodes: Sequence[str] = (), force: bool = False
) -> Roster:
    """Create the CA, the SuperLink's certificate for ``hosts`` and a folder per node."""
    fed = Federation(root)
    names = _unique_names(nodes)
    pki.server_names(hosts)  # refuse a bad host before anything is written
    if fed.ca_key.exists() and not force:
        raise ConfigError(
            f"{fed.ca_key} exists: this folder already holds a federation; use "
            "`fedlora federation add-node` to add nodes, or --force to replace everything"
        )
    for part in ("ca", "superlink", "nodes", "roster.json"):
        target = root / part
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    make_private_dir(root)
    ca_key, ca_cert = pki.make_ca()
    write_file(fed.ca_key, pki.pem_private_key(ca_key), private=True)
    write_file(fed.ca_cert, pki.pem_certificate(ca_cert))
    server_key, server_cert = pki.make_server_certificate(ca_key, ca_cert, hosts)
    write_file(fed.server_key, pki.pem_private_key(server_key), private=True)
    write_file(fed.server_cert, pki.pem_certificate(server_cert))
    shutil.copyfile(fed.ca_cert, fed.superlink_ca)
    roster = Roster(tuple(_new_node(fed, name) for name in names))
    _publish_roster(fed, roster)
    return roster


def add_node(root: Path, name: str) -> RosterEntry:
    """A new node: key pair and folder; the roster and every node's copy of it are updated."""
    fed = Federation(root)
    roster = read_roster(fed.roster)
    check_node_name(name)
    if name in roster.names():
        raise ConfigError(f"node {name!r} is already in {fed.roster}; pick another name")
    if fed.node(name).root.exists():
        raise ConfigError(
            f"{fed.node(name).root} exists but is not in {fed.roster}; remove it or pick "
            "another name"
        )
    if not fed.ca_cert.is_file():
        raise ConfigError(f"{fed.ca_cert} is missing: the federation folder is incomplete")
    entry = _new_node(fed, name)
    _publish_roster(fed, roster.with_node(entry))
    return entry
