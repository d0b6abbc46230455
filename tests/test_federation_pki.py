"""The federation's keys, certificates and folders (deploy/pki.py, deploy/federation.py).

Certificates are checked with ``cryptography`` (chain, SubjectAltNames) and by a real TLS
handshake in memory; node keys with the loaders Flower itself uses.
"""

from __future__ import annotations

import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
)

from fedlora.cli import main
from fedlora.deploy import pki
from fedlora.deploy.federation import Federation, add_node, init_federation, read_roster
from fedlora.errors import ConfigError


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    root = tmp_path / "fed"
    init_federation(root, hosts=["coord.example.org", "10.0.0.5"], nodes=["pain", "derm"])
    return Federation(root)


def _handshake(fed: Federation, server_hostname: str) -> None:
    """A TLS handshake between the SuperLink's certificate and a client trusting the CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(fed.server_cert, fed.server_key)
    client_ctx = ssl.create_default_context(cafile=str(fed.node("pain").ca_cert))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def test_the_server_certificate_is_signed_by_the_ca_for_the_given_names(fed: Federation):
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(fed.server_cert.read_bytes())

    server.verify_directly_issued_by(ca)  # raises if the chain is broken
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert pki.certificate_names(server) == {
        "coord.example.org",
        "10.0.0.5",
        "localhost",
        "127.0.0.1",
        "::1",
    }
    assert fed.superlink_ca.read_bytes() == fed.ca_cert.read_bytes()
    assert fed.node("pain").ca_cert.read_bytes() == fed.ca_cert.read_bytes()


def test_a_client_that_trusts_the_ca_completes_tls_for_a_listed_name_only(fed: Federation):
    _handshake(fed, "127.0.0.1")
    _handshake(fed, "coord.example.org")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(fed, "elsewhere.example.org")


def test_private_keys_are_mode_0600_in_folders_mode_0700(fed: Federation):
    keys = [fed.ca_key, fed.server_key, fed.node("pain").auth_key, fed.node("derm").auth_key]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        for folder in (key.parent, fed.root):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_node_keys_are_in_the_formats_flower_loads(fed: Federation):
    from flwr.cli.supernode.register import try_load_public_key

    node = fed.node("pain")
    private = load_ssh_private_key(node.auth_key.read_bytes(), None)  # as flower-supernode does
    registered = try_load_public_key(node.auth_pub)  # as flwr supernode register does

    assert private.curve.name == "secp384r1"  # type: ignore[union-attr]
    spki = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    assert registered == spki  # the node's identity on the SuperLink


def test_the_roster_lists_every_node_with_its_fingerprint(fed: Federation):
    roster = read_roster(fed.roster)

    assert roster.names() == ["pain", "derm"]
    for entry in roster.nodes:
        line = fed.node(entry.name).auth_pub.read_text().strip()
        assert entry.public_key == line
        assert entry.sha256 == pki.fingerprint(line)
        assert fed.node(entry.name).roster.read_text() == fed.roster.read_text()
    if shutil.which("ssh-keygen"):  # the figure people compare by eye
        shown = subprocess.run(
            ["ssh-keygen", "-lf", str(fed.node("pain").auth_pub)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[1]
        assert shown == roster.nodes[0].sha256


def test_a_roster_whose_fingerprint_does_not_match_its_key_is_refused(fed: Federation):
    text = fed.roster.read_text()
    first = read_roster(fed.roster).nodes[0].sha256
    fed.roster.write_text(text.replace(first, "SHA256:" + "A" * 43))

    with pytest.raises(ConfigError, match="fingerprint that does not match"):
        read_roster(fed.roster)


def test_add_node_updates_the_roster_and_every_node_folders_copy(fed: Federation):
    before = read_roster(fed.roster)

    entry = add_node(fed.root, "oncology")

    roster = read_roster(fed.roster)
    assert roster.names() == ["pain", "derm", "oncology"]
    assert roster.nodes[:2] == before.nodes  # existing keys stay
    assert roster.nodes[2] == entry
    for name in roster.names():
        assert fed.node(name).roster.read_text() == fed.roster.read_text()
    assert stat.S_IMODE(fed.node("oncology").auth_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["", "a b", "../x", ".hidden", "x/y", "é", "a" * 65])
def test_bad_node_names_are_refused_with_one_line(tmp_path: Path, name: str):
    with pytest.raises(ConfigError, match="is not allowed") as info:
        init_federation(tmp_path / "fed", nodes=[name])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "fed").exists()  # nothing written


def test_duplicate_node_names_are_refused_with_one_line(fed: Federation, tmp_path: Path):
    with pytest.raises(ConfigError, match="given twice"):
        init_federation(tmp_path / "other", nodes=["a", "b", "a"])
    with pytest.raises(ConfigError, match="already in .*roster.json; pick another name"):
        add_node(fed.root, "derm")


def test_a_bad_host_is_refused_before_anything_is_written(tmp_path: Path):
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        init_federation(tmp_path / "fed", hosts=["bad host!"], nodes=["a"])
    assert not (tmp_path / "fed").exists()


def test_init_refuses_to_replace_a_ca_unless_forced(fed: Federation):
    ca = fed.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="already holds a federation"):
        init_federation(fed.root, nodes=["x"])
    assert fed.ca_cert.read_bytes() == ca

    init_federation(fed.root, nodes=["x"], force=True)

    assert fed.ca_cert.read_bytes() != ca
    assert read_roster(fed.roster).names() == ["x"]
    assert not fed.node("pain").root.exists()


def test_the_command_line_reports_a_user_error_as_one_line(tmp_path: Path, capsys):
    root = tmp_path / "fed"
    main(["federation", "init", str(root), "--node", "pain", "--host", "127.0.0.1"])
    assert "SHA256:" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main(["federation", "add-node", str(root), "pain"])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlora: error: node 'pain' is already in") and "\n" not in err
