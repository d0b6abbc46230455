"""A federation folder: what the coordinator keeps and what each hospital is handed.

::

    FED/ca/ca.key, ca.crt                 the certificate authority (ca.key never leaves)
    FED/superlink/server.pem, server.key, ca.crt
                                          the SuperLink's TLS files
    FED/superlink/flwr/config.toml        the Flower connection the coordinator's tools use
    FED/nodes/<name>/auth.key, auth.pub, ca.crt, roster.json
                                          one hospital's folder, handed over out of band
    FED/roster.json                       every node: name, OpenSSH public key, fingerprint

A node's key is also its long-term identity in authenticated SecAgg+ (it signs its round keys
with it), so a coordinator holding it could impersonate the node. Hence the bring-your-own-key
flow: the hospital runs ``fedlora federation keygen NODE_DIR --name NAME`` (:func:`keygen`),
sends only ``auth.pub``, and the coordinator adds it with ``add-node NAME --public-key`` (or
``init --node NAME=PATH``): that node's folder under FED then has no ``auth.key``, only
``auth.pub``, ``ca.crt`` and ``roster.json``, which the hospital copies next to its own key.
Without a public key the coordinator makes the key pair itself, for trials only (the CLI needs
``--trial``: whoever holds the federation folder can then sign as that node).

Every node folder holds its own copy of the roster: nodes will check their SecAgg+ neighbours'
keys against it, so it must reach them out of band, never from the server. Private keys are
written with mode 0600 in folders with mode 0700.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

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


def write_file(path: Path, data: bytes, *, private: bool = False, exclusive: bool = False) -> Path:
    """Write ``data``; a private file gets mode 0600 before any byte is written.

    ``exclusive``: fail (FileExistsError) rather than replace an existing file.
    """
    make_private_dir(path.parent)
    mode = 0o600 if private else 0o644
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)  # an existing file keeps its old mode otherwise
        out.write(data)
    return path


def _entry(name: str, key: ec.EllipticCurvePublicKey) -> RosterEntry:
    line = pki.openssh_public_key(key, comment=name)
    return RosterEntry(name, line, pki.fingerprint(line))


def keygen(node_dir: Path, name: str) -> RosterEntry:
    """A hospital's own node key pair: ``node_dir/auth.key`` (0600) and ``auth.pub``.

    Run where the node runs; only ``auth.pub`` goes to the coordinator. An existing
    ``auth.key`` is never replaced. The entry returned is what the roster will hold.
    """
    check_node_name(name)
    node = NodeFolder(node_dir)
    if node.auth_key.exists():
        raise ConfigError(_key_exists(node))
    if node_dir.exists() and not node_dir.is_dir():
        raise ConfigError(f"{node_dir} exists and is not a folder; pick another node folder")
    make_private_dir(node_dir)
    if node_dir.stat().st_mode & 0o077:
        node_dir.chmod(0o700)  # it holds a private key
    key = pki.new_key()
    entry = _entry(name, key.public_key())
    try:
        write_file(node.auth_key, pki.openssh_private_key(key), private=True, exclusive=True)
    except FileExistsError:
        raise ConfigError(_key_exists(node)) from None
    write_file(node.auth_pub, (entry.public_key + "\n").encode("ascii"))
    return entry


def _key_exists(node: NodeFolder) -> str:
    return (
        f"{node.auth_key} exists: this node already has a key; send its {node.auth_pub.name} "
        "to the coordinator, or move both files away to make a new key"
    )


def read_public_key(path: Path, name: str) -> RosterEntry:
    """The roster entry of node ``name`` from a hospital's public key file (``auth.pub``)."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; give the auth.pub the hospital made with "
            "`fedlora federation keygen`"
        ) from None
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not an OpenSSH public key"
        raise ConfigError(f"{path}: cannot be read ({reason})") from None
    return _entry(name, pki.load_node_public_key(text, str(path)))


def _check_new_keys(
    entries: Iterable[RosterEntry], sources: Mapping[str, Path], roster: Roster
) -> None:
    """Refuse a key that is already some node's (in ``roster`` or earlier in ``entries``)."""
    holders = {e.sha256: e.name for e in roster.nodes}
    for entry in entries:
        holder = holders.get(entry.sha256)
        if holder is not None:
            raise ConfigError(
                f"{sources[entry.name]}: this public key is already in the roster as node "
                f"{holder!r}; every node needs its own key (the hospital makes one with "
                "`fedlora federation keygen`)"
            )
        holders[entry.sha256] = entry.name


def _node_folder(fed: Federation, name: str, entry: RosterEntry | None = None) -> RosterEntry:
    """A node folder with the CA certificate (its roster comes after) and either the public key
    ``entry`` the hospital sent (no private key here), or a fresh key pair made here."""
    folder = fed.node(name)
    if entry is None:
        key = pki.new_key()
        entry = _entry(name, key.public_key())
        write_file(folder.auth_key, pki.openssh_private_key(key), private=True)
    write_file(folder.auth_pub, (entry.public_key + "\n").encode("ascii"))
    shutil.copyfile(fed.ca_cert, folder.ca_cert)
    return entry


def parse_node(spec: str) -> tuple[str, Path | None]:
    """``NAME`` or ``NAME=PATH`` (the node's public key file): the name and the path, if any."""
    name, sep, path = spec.partition("=")
    if sep and not path.strip():
        raise ConfigError(f"--node {spec!r}: give NAME or NAME=PATH/auth.pub")
    return check_node_name(name), Path(path) if sep else None


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
    root: Path,
    hosts: Sequence[str] = (),
    nodes: Sequence[str] = (),
    force: bool = False,
    public_keys: Mapping[str, Path] | None = None,
) -> Roster:
    """Create the CA, the SuperLink's certificate for ``hosts`` and a folder per node.

    A node named in ``public_keys`` is added with that public key file (the hospital keeps its
    private key); the others get a key pair made here.
    """
    fed = Federation(root)
    names = _unique_names(nodes)
    public_keys = dict(public_keys or {})
    unknown = sorted(set(public_keys) - set(names))
    if unknown:
        raise ConfigError(f"public keys given for {', '.join(unknown)}, not among the nodes")
    pki.server_names(hosts)  # refuse a bad host before anything is written
    given = {n: read_public_key(p, n) for n, p in public_keys.items()}
    _check_new_keys(given.values(), public_keys, Roster())
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
    roster = Roster(tuple(_node_folder(fed, name, given.get(name)) for name in names))
    _publish_roster(fed, roster)
    return roster


def add_node(root: Path, name: str, public_key: Path | None = None) -> RosterEntry:
    """A new node and its folder; the roster and every node's copy of it are updated.

    With ``public_key`` (the hospital's ``auth.pub``) the node's folder gets that key and no
    private key; without it a key pair is made here.
    """
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
    given = None
    if public_key is not None:
        given = read_public_key(public_key, name)
        _check_new_keys([given], {name: public_key}, roster)
    entry = _node_folder(fed, name, given)
    _publish_roster(fed, roster.with_node(entry))
    return entry
