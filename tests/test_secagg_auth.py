"""Authenticated SecAgg+: nodes sign their round keys and check their neighbours' against the
federation's roster (made by ``fedlora federation init``), so a dishonest server cannot invent
nodes or swap keys. Each attack below is a test double of a malicious server (it edits what it
sends in place); every honest node refuses, and no masked vector leaves it."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import RecordDict

from fedlora.client.secagg import SecAggPolicy
from fedlora.deploy.federation import Federation, init_federation
from fedlora.errors import ConfigError
from fedlora.protocol import secagg_crypto as crypto
from fedlora.protocol.secagg import Key, SecAggSettings, Stage
from fedlora.protocol.secagg_auth import Identity, Roster, key_statement
from fedlora.server.secagg import SecAggError, secure_weighted_sum
from fedlora.server.secagg_stages import parse_setup_reply
from secagg_transcript import SPEC, LocalGrid, expected_mean, max_diff

NODES = (11, 22, 33, 44)
NAMES = {11: "st-marys", 22: "city-general", 33: "riverside", 44: "northgate"}
SETTINGS = SecAggSettings(clip_norm=4.0, num_shares=4, reconstruction_threshold=3)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("fed")
    init_federation(root, nodes=[*NAMES.values(), "outsider"])
    return Federation(root)


def _policy(fed: Federation, name: str) -> SecAggPolicy:
    node = fed.node(name)
    return SecAggPolicy.from_config(
        {"secagg-roster": str(node.roster), "secagg-identity-key": str(node.auth_key)}
    )


def _grid(fed: Federation, tamper=None, record: bool = True) -> LocalGrid:
    policies = {n: _policy(fed, NAMES[n]) for n in NODES}
    return LocalGrid(NODES, record=record, policies=policies, tamper=tamper)


def test_signed_keys_checked_against_the_roster_give_the_exact_mean(task_identity, federation):
    grid = _grid(federation)
    result = secure_weighted_sum(grid, NODES, RecordDict(), SETTINGS, SPEC)
    assert not grid.errors and list(result.contributors) == list(NODES)
    assert max_diff(result.mean(), expected_mean(NODES, SETTINGS)) <= result.tolerance
    for node, reply in grid.replies[Stage.SETUP].items():  # each node signed as itself
        assert reply.config_records[Key.CONFIG][Key.SIGNER] == NAMES[node]
    sent = grid.sent[Stage.SHARE_KEYS][11].config_records[Key.CONFIG]
    assert sent[Key.SIGNERS] == [NAMES[n] for n in NODES]


def _refused_by_all(grid: LocalGrid, why: str) -> None:
    """Every honest node refused at share-keys (before any share or masked vector left it)."""
    with pytest.raises(SecAggError):
        secure_weighted_sum(grid, NODES, RecordDict(), SETTINGS, SPEC)
    refused = [e for e in grid.errors if Stage.SHARE_KEYS in e]
    assert len(refused) == len(NODES) and all(why in e for e in refused), grid.errors
    assert not grid.replies.get(Stage.SHARE_KEYS) and not grid.replies.get(Stage.COLLECT)


def test_a_substituted_key_is_refused(task_identity, federation):
    """The server swaps city-general's mask key for its own in what it sends the others."""
    _, server_pk = crypto.new_key_pair()

    def swap(node: int, stage: str, content: RecordDict) -> None:
        if stage == Stage.SHARE_KEYS:
            cfg = content.config_records[Key.CONFIG]
            s_pks = list(cfg[Key.S_PK])
            s_pks[list(cfg[Key.NODES]).index(22)] = server_pk
            cfg[Key.S_PK] = s_pks

    grid = _grid(federation, swap)
    with pytest.raises(SecAggError):
        secure_weighted_sum(grid, NODES, RecordDict(), SETTINGS, SPEC)
    errors = [e for e in grid.errors if Stage.SHARE_KEYS in e]
    # 22 sees its own key changed; the others see keys city-general never signed
    assert len(errors) == 4
    assert all("not signed by 'city-general'" in e for e in errors if not e.startswith("22"))
    assert not grid.replies.get(Stage.COLLECT)


def _invent(cfg, signer: str, signature: bytes | None = None, node: int = 99) -> None:
    """Add a node the server made up: its own keys, the given name and signature."""
    c_pk, s_pk = crypto.new_key_pair()[1], crypto.new_key_pair()[1]
    cfg[Key.NODES] = [*cfg[Key.NODES], node]
    cfg[Key.C_PK] = [*cfg[Key.C_PK], c_pk]
    cfg[Key.S_PK] = [*cfg[Key.S_PK], s_pk]
    cfg[Key.NONCE] = [*cfg[Key.NONCE], b"\x01" * 16]
    cfg[Key.SIGNERS] = [*cfg[Key.SIGNERS], signer]
    cfg[Key.SIGNATURES] = [*cfg[Key.SIGNATURES], signature or b"\x30" * 70]


def test_an_invented_node_is_refused_whatever_name_it_claims(task_identity, federation, tmp_path):
    settings = SecAggSettings(clip_norm=4.0, num_shares=5, reconstruction_threshold=3)
    # the server's own key pair, signed properly, but not in anyone's roster
    stranger = tmp_path / "stranger"
    init_federation(stranger, nodes=["mallory"])
    mallory_roster = Roster.load(Federation(stranger).node("mallory").roster)
    mallory = Identity.load(Federation(stranger).node("mallory").auth_key, mallory_roster)
    cases = {
        "not in this node's roster": lambda cfg, session: _invent(
            cfg, "mallory", mallory.sign(key_statement(session, 99, b"", b"", b""))
        ),
        "listed as several nodes": lambda cfg, session: _invent(cfg, "riverside"),
        "not signed by 'outsider'": lambda cfg, session: _invent(cfg, "outsider"),
    }
    for why, invent in cases.items():

        def inflate(node, stage, content, invent=invent):
            if stage == Stage.SHARE_KEYS:
                cfg = content.config_records[Key.CONFIG]
                invent(cfg, cfg[Key.SESSION])

        grid = _grid(federation, inflate)
        with pytest.raises(SecAggError):
            secure_weighted_sum(grid, NODES, RecordDict(), settings, SPEC)
        refused = [e for e in grid.errors if Stage.SHARE_KEYS in e]
        assert len(refused) == 4 and all(why in e for e in refused), (why, grid.errors)
        assert not grid.replies.get(Stage.COLLECT)


def test_a_replayed_signature_under_another_node_id_is_refused(task_identity, federation):
    """The server relays riverside's genuine keys and signature, but under a node id it made
    up: the signature binds the keys to riverside's own node id and session."""

    def replay(node: int, stage: str, content: RecordDict) -> None:
        if stage == Stage.SHARE_KEYS:
            cfg = content.config_records[Key.CONFIG]
            nodes = list(cfg[Key.NODES])
            nodes[nodes.index(33)] = 99
            cfg[Key.NODES] = nodes

    grid = _grid(federation, replay)
    with pytest.raises(SecAggError):
        secure_weighted_sum(grid, NODES, RecordDict(), SETTINGS, SPEC)
    assert any("node 99's keys are not signed by 'riverside'" in e for e in grid.errors)
    assert not grid.replies.get(Stage.COLLECT)


def test_unsigned_keys_are_refused_by_an_authenticated_node(task_identity, federation):
    def strip(node: int, stage: str, content: RecordDict) -> None:
        if stage == Stage.SHARE_KEYS:
            cfg = content.config_records[Key.CONFIG]
            del cfg[Key.SIGNERS], cfg[Key.SIGNATURES]

    _refused_by_all(_grid(federation, strip), "come unsigned")


def test_a_node_without_a_roster_must_say_so_explicitly(federation, tmp_path):
    with pytest.raises(ConfigError, match="secagg-roster and secagg-identity-key"):
        SecAggPolicy.from_config({})
    assert SecAggPolicy.from_config({"secagg-allow-unauthenticated": True}).roster is None
    node = federation.node("st-marys")
    with pytest.raises(ConfigError, match="secagg-identity-key is not"):
        SecAggPolicy.from_config({"secagg-roster": str(node.roster)})
    other = tmp_path / "other"
    init_federation(other, nodes=["elsewhere"])
    with pytest.raises(ConfigError, match="is not in"):
        SecAggPolicy.from_config(
            {
                "secagg-roster": str(node.roster),
                "secagg-identity-key": str(Federation(other).node("elsewhere").auth_key),
            }
        )
    broken = tmp_path / "roster.json"
    broken.write_text('{"nodes": [{"name": "x"}]}')
    with pytest.raises(ConfigError, match="not a fedlora roster"):
        Roster.load(broken)
    policy = _policy(federation, "riverside")
    assert policy.identity is not None and policy.identity.name == "riverside"


def test_the_server_checks_the_size_of_what_it_relays():
    c_pk, s_pk = crypto.new_key_pair()[1], crypto.new_key_pair()[1]
    from flwr.app import ConfigRecord

    def reply(**extra) -> RecordDict:
        cfg = {
            Key.C_PK: c_pk,
            Key.S_PK: s_pk,
            Key.NONCE: b"n" * 16,
            Key.STAGE: Stage.SETUP,
            Key.SESSION: "s",
        }
        return RecordDict({Key.CONFIG: ConfigRecord(cfg | extra)})

    assert parse_setup_reply(reply(), "setup")[2:] == (b"n" * 16, b"", "")
    got = parse_setup_reply(reply(**{Key.SIGNATURE: b"sig", Key.SIGNER: "a"}), "setup")
    assert got[2:] == (b"n" * 16, b"sig", "a")
    from fedlora.protocol.secagg import SecAggProtocolError

    with pytest.raises(SecAggProtocolError, match="signature of 500 bytes"):
        parse_setup_reply(reply(**{Key.SIGNATURE: b"x" * 500, Key.SIGNER: "a"}), "setup")
    with pytest.raises(SecAggProtocolError, match="config fields"):
        parse_setup_reply(reply(**{Key.SIGNATURE: b"sig"}), "setup")  # no signer
    with pytest.raises(SecAggProtocolError, match="a nonce of 3 bytes"):
        parse_setup_reply(reply(**{Key.NONCE: b"old"}), "setup")


def test_the_signature_covers_session_node_both_keys_and_the_nonce(federation):
    node = federation.node("northgate")
    roster = Roster.load(node.roster)
    me = Identity.load(node.auth_key, roster)
    c, s, n = crypto.new_key_pair()[1], crypto.new_key_pair()[1], b"\x07" * 16
    signature = me.sign(key_statement("sess", 44, c, s, n))
    assert roster.verify("northgate", signature, key_statement("sess", 44, c, s, n))
    for changed in (
        ("other", 44, c, s, n),
        ("sess", 45, c, s, n),
        ("sess", 44, s, c, n),
        ("sess", 44, c, s, b"\x08" * 16),
    ):
        assert not roster.verify("northgate", signature, key_statement(*changed))
    assert not roster.verify("st-marys", signature, key_statement("sess", 44, c, s, n))


def test_a_path_in_the_policy_that_does_not_exist_names_the_setting(tmp_path: Path):
    with pytest.raises(ConfigError, match="secagg-roster=.*no such file"):
        Roster.load(tmp_path / "missing.json")


# ---- the consistency check (Bonawitz et al., 2017, section 4) -----------------------------


def test_survivors_sign_the_survivor_set_before_anyone_unmasks(task_identity, federation):
    grid = _grid(federation)
    secure_weighted_sum(grid, NODES, RecordDict(), SETTINGS, SPEC)
    told = grid.sent[Stage.CONSISTENCY]
    assert set(told) == set(NODES)
    assert all(list(c.config_records[Key.CONFIG][Key.ALIVE]) == list(NODES) for c in told.values())
    unmask = grid.sent[Stage.UNMASK][11].config_records[Key.CONFIG]
    assert unmask[Key.SIGNERS] == [NAMES[n] for n in NODES] and len(unmask[Key.SIGNATURES]) == 4


def test_a_node_that_vanishes_at_the_check_is_still_in_the_sum(task_identity, federation):
    policies = {n: _policy(federation, NAMES[n]) for n in NODES}
    grid = LocalGrid(NODES, record=True, policies=policies, vanish={44: Stage.CONSISTENCY})
    result = secure_weighted_sum(grid, NODES, RecordDict(), SETTINGS, SPEC)
    assert list(result.contributors) == list(NODES)  # its masked vector is in the sum
    assert max_diff(result.mean(), expected_mean(NODES, SETTINGS)) <= result.tolerance
    assert set(grid.sent[Stage.UNMASK]) == {11, 22, 33}


def _no_shares_revealed(grid: LocalGrid, why: str, refusing=NODES) -> None:
    """The round fails and no node in ``refusing`` sent an unmask reply."""
    with pytest.raises(SecAggError):
        secure_weighted_sum(grid, NODES, RecordDict(), SETTINGS, SPEC)
    refused = [e for e in grid.errors if Stage.UNMASK in e]
    assert {int(e.split()[0]) for e in refused} == set(refusing), grid.errors
    assert all(why in e for e in refused), grid.errors
    assert not set(grid.replies.get(Stage.UNMASK, {})) & set(refusing)


def test_different_survivor_sets_for_different_nodes_are_refused(task_identity, federation):
    """The server tells two nodes that riverside (33) dropped and the other two that it
    survived: neither set gathers the 3 signatures of a majority beyond one colluder
    ((4 + 1) // 2 + 1), so nobody reveals a share."""

    def split(node: int, stage: str, content: RecordDict) -> None:
        if stage == Stage.CONSISTENCY and node in (11, 22):
            content.config_records[Key.CONFIG][Key.ALIVE] = [11, 22, 44]

    _no_shares_revealed(_grid(federation, split), "no split view can also gather")


def test_a_request_for_the_mask_key_of_a_survivor_is_refused(task_identity, federation):
    """After the check, the server asks st-marys for riverside's mask-key share as if it had
    dropped: riverside is in the signed survivors, so st-marys refuses."""

    def claim_dropped(node: int, stage: str, content: RecordDict) -> None:
        if stage == Stage.UNMASK and node == 11:
            cfg = content.config_records[Key.CONFIG]
            cfg[Key.ALIVE] = [n for n in cfg[Key.ALIVE] if n != 33]
            cfg[Key.DROPPED] = [33]

    grid = _grid(federation, claim_dropped)
    result = secure_weighted_sum(grid, NODES, RecordDict(), SETTINGS, SPEC)  # the others suffice
    assert [e.split()[0] for e in grid.errors] == ["11"] and "mask-key share" in grid.errors[0]
    assert 11 not in grid.replies[Stage.UNMASK]  # no share left st-marys
    assert max_diff(result.mean(), expected_mean(NODES, SETTINGS)) <= result.tolerance


def test_an_unmask_request_without_enough_signatures_is_refused(task_identity, federation):
    def strip(node: int, stage: str, content: RecordDict) -> None:
        if stage == Stage.UNMASK:
            cfg = content.config_records[Key.CONFIG]
            cfg[Key.SIGNERS] = list(cfg[Key.SIGNERS])[:2]
            cfg[Key.SIGNATURES] = list(cfg[Key.SIGNATURES])[:2]

    _no_shares_revealed(_grid(federation, strip), "2 of the round's 4 participants signed")


def test_a_server_that_skips_the_check_is_refused(task_identity, federation, monkeypatch):
    from fedlora.server import secagg as server

    monkeypatch.setattr(server, "signed_round", lambda s, u1: False)
    _no_shares_revealed(_grid(federation), "expected stage 'consistency-check'")
