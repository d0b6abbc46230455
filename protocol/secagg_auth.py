"""Authenticated SecAgg+ keys: a node signs its round keys; its neighbours check its roster entry.

Without this, the nodes of a secure round accept whatever node ids and public keys the server
relays: a server that invents nodes (or swaps a real node's keys for its own) holds enough
shares to rebuild a node's masks and read its update. Bonawitz et al. (CCS 2017, section 4,
the active-adversary variant) answer with a PKI; here it is the federation's roster
(``fedlora federation init``): every node's long-term public key, handed to each node out of
band, never by the server.

Consistency check (authenticated rounds): before unmasking, the server tells each survivor the
set U3 of nodes whose masked vectors it summed; each signs ``(round id, U3)``; the unmask
request carries the survivors' signatures, and a node reveals shares only if more than
``(n + c) / 2`` of the round's ``n`` participants signed the very U3 it was told
(:func:`fedlora.protocol.secagg_graph.majority`), and only b-shares for nodes in U3 (never the
mask-key share of a node that is in the sum). So the server cannot tell some nodes that a node
dropped and others that it survived, and collect both of its secrets.

In the setup stage a node signs the statement ``(session, its node id, c_pk, s_pk, nonce)`` with
its long-term key (its SuperNode authentication key: EC P-384, ECDSA with SHA-384; the statement
is domain-separated, so the signature means nothing elsewhere) and names itself as the roster
entry that holds its public key; the nonce is fresh. The server relays every participant's
keys, nonce, signature and name to every participant; each node checks every one against its
own copy of the roster and refuses the round on an unknown name, a bad signature, or two node
ids claiming one name. The round id (:func:`round_id`) hashes the session and all of it, so it
never repeats (each honest node's nonce is new) and the share graph derived from it is no one's
choice.

Needs ``cryptography`` only; never torch or Flower.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fedlora.errors import ConfigError

DOMAIN = b"fedlora secagg+ round keys v2"
SURVIVORS_DOMAIN = b"fedlora secagg+ survivors v2"
ROUND_DOMAIN = b"fedlora secagg+ round v2"
MAX_SIGNATURE_BYTES = 128  # a DER ECDSA P-384 signature has at most 104
MAX_SIGNER_CHARS = 128
NONCE_BYTES = 16  # each node's fresh contribution to the round id


def _digest(*parts: bytes) -> hashlib._Hash:
    digest = hashlib.sha384()
    for part in parts:
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest


def key_statement(session: str, node_id: int, c_pk: bytes, s_pk: bytes, nonce: bytes) -> bytes:
    """The SHA-384 digest a node signs: its round's keys and fresh nonce, bound to the session
    and its id."""
    return _digest(DOMAIN, session.encode(), node_id.to_bytes(8, "big"), c_pk, s_pk, nonce).digest()


# One participant of a round as every node sees it: (node id, roster name or "", c_pk, s_pk,
# nonce).
Entry = tuple[int, str, bytes, bytes, bytes]


def round_id(session: str, entries: list[Entry]) -> bytes:
    """The round's id: the session and every participant's keys and nonce (in node order).

    Each honest node's nonce is fresh, so no id (and no signature over one) repeats across
    rounds, and two nodes share an id only if they were shown the same participants. The share
    graph (:mod:`fedlora.protocol.secagg_graph`) and the survivor signatures derive from it.
    """
    digest = _digest(ROUND_DOMAIN, session.encode(), len(entries).to_bytes(4, "big"))
    for node, name, c_pk, s_pk, nonce in sorted(entries):
        digest.update(_digest(node.to_bytes(8, "big"), name.encode(), c_pk, s_pk, nonce).digest())
    return digest.digest()


def survivors_statement(round_id: bytes, survivors: list[int]) -> bytes:
    """The SHA-384 digest a node signs in the consistency check: the round's survivors (U3),
    the nodes whose masked vectors are in the sum (Bonawitz et al., 2017, section 4), bound to
    the round id (so it cannot be replayed into another round or another participant list)."""
    digest = _digest(SURVIVORS_DOMAIN, round_id, len(survivors).to_bytes(4, "big"))
    for node in sorted(survivors):
        digest.update(node.to_bytes(8, "big"))
    return digest.digest()


def _public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class Roster:
    """Node name -> long-term public key, from the node's own copy of the roster."""

    keys: Mapping[str, ec.EllipticCurvePublicKey]
    source: str = "roster"

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        """A roster file (``roster.json`` of ``fedlora federation init``), every key checked."""
        source = str(path)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            entries = [(str(n["name"]), str(n["public_key"])) for n in data["nodes"]]
        except FileNotFoundError:
            raise ConfigError(f"secagg-roster={source}: no such file") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"secagg-roster={source}: not a fedlora roster ({exc}); get the roster.json of "
                f"your node folder from the coordinator"
            ) from None
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for name, line in entries:
            try:
                key = serialization.load_ssh_public_key(line.encode("ascii"))
            except (ValueError, UnicodeError, UnsupportedAlgorithm) as exc:
                raise ConfigError(f"{source}: node {name!r}: not a public key ({exc})") from None
            if not isinstance(key, ec.EllipticCurvePublicKey) or name in keys:
                raise ConfigError(f"{source}: node {name!r}: not an EC key, or listed twice")
            keys[name] = key
        if not keys:
            raise ConfigError(f"{source}: the roster lists no nodes")
        return cls(keys, source)

    def name_of(self, key: ec.EllipticCurvePublicKey) -> str | None:
        own = _public_bytes(key)
        return next((n for n, k in self.keys.items() if _public_bytes(k) == own), None)

    def verify(self, signer: str, signature: bytes, statement: bytes) -> bool:
        key = self.keys.get(signer)
        if key is None:
            return False
        try:
            key.verify(signature, statement, ec.ECDSA(Prehashed(hashes.SHA384())))
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Identity:
    """This node's long-term key and its name in the roster."""

    name: str
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, path: str | Path, roster: Roster) -> Identity:
        """The node's OpenSSH (or PEM) private key; its public key must be in ``roster``."""
        source = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"secagg-identity-key={source}: {exc.strerror or exc}") from None
        key = None
        for loader in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
            try:
                key = loader(data, password=None)
                break
            except (ValueError, TypeError, UnsupportedAlgorithm):
                continue
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(
                f"secagg-identity-key={source}: not an unencrypted EC private key (use the "
                f"auth.key of your node folder)"
            )
        name = roster.name_of(key.public_key())
        if name is None:
            raise ConfigError(
                f"secagg-identity-key={source}: its public key is not in {roster.source}; get "
                f"the current roster from the coordinator"
            )
        return cls(name, key)

    def sign(self, statement: bytes) -> bytes:
        return self.key.sign(statement, ec.ECDSA(Prehashed(hashes.SHA384())))
