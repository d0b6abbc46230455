"""The federation's keys, certificates and folders (deploy/pki.py, deploy/federation.py).

Certificates are checked with ``cryptography`` (chain, SubjectAltNames) and by a real TLS
handshake in memory; node keys with the loaders Flower itself uses. A hospital may bring its
own key (``keygen``, then ``add-node --public-key``): the coordinator never holds it.
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
from fedlora.deploy import launch, pki
from fedlora.deploy.federation import (
    Federation,
    NodeFolder,
    add_node,
    init_federation,
    keygen,
    read_roster,
)
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
    main(["federation", "init", str(root), "--node", "pain", "--host", "127.0.0.1", "--trial"])
    assert "SHA256:" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main(["federation", "add-node", str(root), "pain", "--trial"])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlora: error: node 'pain' is already in") and "\n" not in err


# ---- bring your own key: the hospital makes its key pair, the coordinator gets auth.pub --------


def _all_files(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file()}


def _hospital_folder(fed: Federation, name: str, tmp_path: Path) -> NodeFolder:
    """What a hospital assembles: its own keygen output, then the coordinator's ca.crt and
    roster.json (its own auth.key never went to the coordinator)."""
    node = NodeFolder(tmp_path / f"{name}-site")
    keygen(node.root, name)
    add_node(fed.root, name, public_key=node.auth_pub)
    for part in ("ca.crt", "roster.json"):
        shutil.copyfile(fed.node(name).root / part, node.root / part)
    return node


def test_keygen_makes_a_private_key_and_a_public_key_with_its_fingerprint(tmp_path: Path, capsys):
    node = NodeFolder(tmp_path / "site" / "pain")

    main(["federation", "keygen", str(node.root), "--name", "pain"])

    out = capsys.readouterr().out
    assert stat.S_IMODE(node.auth_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(node.root.stat().st_mode) == 0o700
    private = load_ssh_private_key(node.auth_key.read_bytes(), None)  # as flower-supernode does
    assert private.curve.name == "secp384r1"  # type: ignore[union-attr]
    line = node.auth_pub.read_text().strip()
    assert line.split()[2] == "pain"  # the comment is the node's name
    expected = pki.openssh_public_key(private.public_key(), "pain")  # type: ignore[arg-type]
    assert line == expected
    assert pki.fingerprint(line) in out and str(node.auth_pub) in out
    assert "send" in out and "ca.crt and roster.json" in out
    if shutil.which("ssh-keygen"):
        shown = subprocess.run(
            ["ssh-keygen", "-lf", str(node.auth_pub)], capture_output=True, text=True, check=True
        ).stdout.split()[1]
        assert shown == pki.fingerprint(line)


def test_keygen_never_replaces_a_key(tmp_path: Path, capsys):
    node = NodeFolder(tmp_path / "pain")
    keygen(node.root, "pain")
    key = node.auth_key.read_bytes()

    with pytest.raises(SystemExit) as exit_info:
        main(["federation", "keygen", str(node.root), "--name", "pain"])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "auth.key exists" in err and "move both files away" in err and "\n" not in err
    assert node.auth_key.read_bytes() == key
    with pytest.raises(ConfigError, match="is not allowed"):
        keygen(tmp_path / "other", "a b")


def test_add_node_with_a_public_key_keeps_no_private_key(fed: Federation, tmp_path: Path):
    site = NodeFolder(tmp_path / "oncology-site")
    made = keygen(site.root, "oncology")

    entry = add_node(fed.root, "oncology", public_key=site.auth_pub)

    assert entry == made
    roster = read_roster(fed.roster)
    assert roster.nodes[-1] == entry and entry.sha256 == pki.fingerprint(site.auth_pub.read_text())
    folder = fed.node("oncology")
    assert _all_files(folder.root) == {"auth.pub", "ca.crt", "roster.json"}
    assert folder.auth_pub.read_text().strip() == entry.public_key
    assert folder.roster.read_text() == fed.roster.read_text()
    assert fed.node("pain").roster.read_text() == fed.roster.read_text()  # everyone's copy


def test_init_takes_nodes_by_public_key_next_to_plain_names(tmp_path: Path, capsys):
    site = NodeFolder(tmp_path / "pain-site")
    keygen(site.root, "pain")
    root = tmp_path / "fed"

    main(
        [
            "federation",
            "init",
            str(root),
            "--node",
            f"pain={site.auth_pub}",
            "--node",
            "derm",
            "--trial",
        ]
    )

    fed = Federation(root)
    roster = read_roster(fed.roster)
    assert roster.names() == ["pain", "derm"]
    assert roster.nodes[0].sha256 == pki.fingerprint(site.auth_pub.read_text())
    assert not fed.node("pain").auth_key.exists() and fed.node("derm").auth_key.exists()
    assert "auth.key" not in {p.name for p in fed.node("pain").root.iterdir()}
    assert "hand it ca.crt and roster.json" in capsys.readouterr().out


def test_a_public_key_already_in_the_roster_is_refused_naming_its_node(
    fed: Federation, tmp_path: Path, capsys
):
    before = fed.roster.read_text()
    with pytest.raises(ConfigError, match="already in the roster as node 'pain'") as info:
        add_node(fed.root, "copycat", public_key=fed.node("pain").auth_pub)
    assert "\n" not in str(info.value)
    assert fed.roster.read_text() == before and not fed.node("copycat").root.exists()

    site = NodeFolder(tmp_path / "site")
    keygen(site.root, "a")
    with pytest.raises(ConfigError, match="already in the roster as node 'a'"):
        init_federation(
            tmp_path / "other", nodes=["a", "b"], public_keys=dict.fromkeys("ab", site.auth_pub)
        )
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("not a key\n", "not an OpenSSH public key"),
        ("", "holds 0 key lines"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "this is a private key"),
        (
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMd3UL0pu2UVrXTXD8A/0pGWjl3Yv8k9C4LQyY+DQEuN x\n",
            "not an EC public key",
        ),
        ("P256", "secp256r1, not P-384"),
    ],
)
def test_a_bad_public_key_file_is_refused_naming_the_file(
    fed: Federation, tmp_path: Path, content: str | None, message: str
):
    path = tmp_path / "their.pub"
    if content == "P256":
        from cryptography.hazmat.primitives.asymmetric import ec

        content = pki.openssh_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    if content is not None:
        path.write_text(content)
    before = fed.roster.read_text()

    with pytest.raises(ConfigError, match=message) as info:
        add_node(fed.root, "oncology", public_key=path)

    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    assert fed.roster.read_text() == before and not fed.node("oncology").root.exists()


def test_a_node_folder_assembled_by_the_hospital_starts_with_its_own_key(
    fed: Federation, tmp_path: Path
):
    from fedlora.protocol.secagg_auth import Identity, Roster

    node = _hospital_folder(fed, "oncology", tmp_path)

    command = launch.supernode_command(node.root, "127.0.0.1:9092")
    settings = launch.node_settings(node.root, 'site="oncology"', None)

    key_flag = command.index("--auth-supernode-private-key")
    assert command[key_flag + 1] == str(node.auth_key.resolve())
    assert command[command.index("--root-certificates") + 1] == str(node.ca_cert.resolve())
    assert f'secagg-roster="{node.roster.resolve()}"' in settings
    assert f'secagg-identity-key="{node.auth_key.resolve()}"' in settings
    assert f'dp-ledger="{node.root.resolve() / "dp-ledger.json"}"' in settings
    assert launch.node_identity(node.root).name == "oncology"
    identity = Identity.load(node.root / "auth.key", Roster.load(node.root / "roster.json"))
    assert identity.name == "oncology"
    assert "auth.key" not in _all_files(fed.root / "nodes" / "oncology")


def test_a_node_whose_key_is_not_in_its_roster_is_refused_with_its_fingerprint(
    fed: Federation, tmp_path: Path
):
    node = NodeFolder(tmp_path / "stray")
    entry = keygen(node.root, "stray")
    for part in ("ca.crt", "roster.json"):  # another node's copies: this key is not listed
        shutil.copyfile(fed.node("pain").root / part, node.root / part)

    for start in (
        lambda: launch.supernode_command(node.root, "127.0.0.1:9092"),
        lambda: launch.node_settings(node.root, "", None),
    ):
        with pytest.raises(ConfigError) as info:
            start()
        message = str(info.value)
        assert message.startswith(f"{node.roster.resolve()} does not list this node's key")
        assert entry.sha256 in message and "must include this node's key" in message
        assert "\n" not in message

    node.roster.unlink()
    with pytest.raises(ConfigError, match="roster.json is missing .*coordinator's roster.json"):
        launch.supernode_command(node.root, "127.0.0.1:9092")


def test_the_superlink_registers_public_keys_only(fed: Federation, tmp_path: Path, monkeypatch):
    _hospital_folder(fed, "oncology", tmp_path)
    for name in ("pain", "derm"):  # as if every hospital brought its own key
        fed.node(name).auth_key.unlink()
    registered: list[str] = []

    def register(command, **kwargs):
        registered.append(Path(command[3]).read_text().strip())
        return subprocess.CompletedProcess(command, 0, '{"success": true, "node-id": 7}', "")

    monkeypatch.setattr(launch, "flower_tool", lambda name: name)
    monkeypatch.setattr(launch.subprocess, "run", register)

    ids = launch.register_nodes(fed.root, "127.0.0.1:9092")

    assert ids == {"pain": 7, "derm": 7, "oncology": 7}
    assert registered == [e.public_key for e in read_roster(fed.roster).nodes]
    fed.node("derm").auth_pub.write_text(fed.node("pain").auth_pub.read_text())
    with pytest.raises(ConfigError, match="is not the key .*lists for node 'derm'"):
        launch.register_nodes(fed.root, "127.0.0.1:9092")


def test_coordinator_made_keys_need_trial_and_say_what_it_gives_away(tmp_path: Path, capsys):
    root = tmp_path / "fed"
    with pytest.raises(SystemExit) as exit_info:
        main(["federation", "init", str(root), "--node", "pain"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "fedlora federation keygen NODE_DIR --name pain" in err and "--trial" in err
    assert "\n" not in err and not (root / "nodes").exists()
    site = NodeFolder(tmp_path / "derm-site")
    keygen(site.root, "derm")
    main(["federation", "init", str(root), "--node", f"derm={site.auth_pub}"])
    with pytest.raises(SystemExit):
        main(["federation", "add-node", str(root), "pain"])
    assert "--trial" in capsys.readouterr().err
    main(["federation", "add-node", str(root), "pain", "--trial"])
    out = capsys.readouterr().out
    assert "whoever holds this folder can sign as them" in out
    assert Federation(root).node("pain").auth_key.exists()
