"""The federation's keys and certificates, made with ``cryptography``: pure functions, no files.

- A certificate authority (EC P-384 key and self-signed certificate) that the coordinator keeps.
- The SuperLink's TLS server certificate, signed by that CA and valid for the names and IP
  addresses that nodes and the researcher dial (SubjectAltNames). ``localhost``, ``127.0.0.1``
  and ``::1`` are always included: the SuperLink's own SuperExec dials it there.
- Each node's authentication key pair in the format Flower 1.41 reads: an EC key on a NIST curve
  (P-384 here) as an OpenSSH private key (``flower-supernode --auth-supernode-private-key``
  loads it with ``load_ssh_private_key``, unencrypted) and an OpenSSH public key line
  (``flwr supernode register`` loads it with ``load_ssh_public_key``).

A node's fingerprint is OpenSSH's (``SHA256:`` and the unpadded base64 of the key blob's
sha256), the figure ``ssh-keygen -lf auth.pub`` prints, so that people can compare it by eye.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import re
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.errors import ConfigError

CURVE = ec.SECP384R1
ALWAYS_NAMES = ("localhost", "127.0.0.1", "::1")  # the SuperLink's SuperExec dials these
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?$")


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-384 private key."""
    return ec.generate_private_key(CURVE())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clock skew
    return start, start + datetime.timedelta(days=days)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    common_name: str = "fedlora federation CA", days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate authority: its key and self-signed certificate (may sign servers only)."""
    key = new_key()
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def parse_host(host: str) -> x509.GeneralName:
    """``host`` as a SubjectAltName: an IP address, or a DNS name; anything else is refused."""
    text = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if not _DNS_NAME.match(text) or len(text) > 253:
        raise ConfigError(
            f"host {host!r} is neither an IP address nor a DNS name; give the name or address "
            "the hospitals dial (e.g. --host coordinator.example.org --host 10.0.0.5)"
        )
    return x509.DNSName(text.rstrip(".").lower())


def server_names(hosts: Iterable[str]) -> list[str]:
    """The server certificate's names: ``hosts`` (checked) and :data:`ALWAYS_NAMES`, once each."""
    names: list[str] = []
    for host in [*hosts, *ALWAYS_NAMES]:
        value = _general_name_text(parse_host(host))
        if value not in names:
            names.append(value)
    return names


def _general_name_text(name: x509.GeneralName) -> str:
    return str(name.value)


def make_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Iterable[str] = (),
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS key and certificate, signed by the CA, for ``hosts`` and localhost."""
    names = server_names(hosts)
    key = new_key()
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([parse_host(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def certificate_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses a certificate is valid for, as text."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {_general_name_text(n) for n in san}


def pem_certificate(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the file's mode 0600 protects it): what TLS servers read."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def openssh_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """OpenSSH private key, unencrypted: what ``--auth-supernode-private-key`` loads."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def openssh_public_key(key: ec.EllipticCurvePublicKey, comment: str = "") -> str:
    """One OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA... comment``)."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{line.decode('ascii')} {comment}".strip()


def fingerprint(public_key_line: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line (as ``ssh-keygen -lf`` prints it)."""
    blob = base64.b64decode(public_key_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def fingerprint_or_none(text: str) -> str | None:
    """:func:`fingerprint` of a public key line, or None when ``text`` is not one."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode("ascii"))
    except (ValueError, UnicodeError, UnsupportedAlgorithm):
        return None
    return fingerprint(
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode(
            "ascii"
        )
    )


def load_public_key(line: str, source: str) -> ec.EllipticCurvePublicKey:
    """An OpenSSH EC public key line; ``source`` names where it came from in the error."""
    try:
        key = serialization.load_ssh_public_key(line.strip().encode("ascii"))
    except (ValueError, UnicodeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{source}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{source}: not an EC public key; Flower's node authentication needs one")
    return key


def load_node_public_key(text: str, source: str) -> ec.EllipticCurvePublicKey:
    """A node's public key file (one OpenSSH EC P-384 key line, as ``auth.pub`` holds).

    ``source`` names the file in every error; a private key given by mistake is refused
    without echoing it.
    """
    if "PRIVATE KEY" in text:
        raise ConfigError(
            f"{source}: this is a private key; give the node's public key (auth.pub), and keep "
            "the private key where it was made"
        )
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ConfigError(
            f"{source}: holds {len(lines)} key lines, not one; give one node's auth.pub "
            "(made by `fedlora federation keygen`)"
        )
    key = load_public_key(lines[0], source)
    if not isinstance(key.curve, CURVE):
        raise ConfigError(
            f"{source}: an EC key on {key.curve.name}, not P-384 (secp384r1); make the node's "
            "key with `fedlora federation keygen`"
        )
    return key


def load_node_private_key(data: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    """A node's OpenSSH EC private key, as Flower's SuperNode will load it."""
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"{source}: not an unencrypted OpenSSH private key ({exc}); use the auth.key made "
            "by `fedlora federation keygen` (or by the coordinator's `fedlora federation "
            "add-node`)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"{source}: not an EC private key; Flower's node authentication needs one"
        )
    return key


def load_certificate(data: bytes, source: str) -> x509.Certificate:
    """A PEM certificate; ``source`` names the file in the error."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{source}: not a PEM certificate ({exc})") from None
