"""A node's audit trail (client/audit.py, deploy/audit.py): one line per message it sends, the
chain that shows an edit, ``fedlora federation audit`` and its --verify; a two-round secure run
with DP compared message by message with its nodes' trails and ledgers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from typer.testing import CliRunner

from fedlora.client.audit import content_bytes, make_audit_mod
from fedlora.deploy.audit import read_trail, summarise, verify


def _node(trail: Path) -> ClientApp:
    """A node whose train handler answers with a metric, or refuses round 3."""
    app = ClientApp(mods=[make_audit_mod({"audit-log": str(trail)})])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        server_round = msg.content.config_records["config"]["server-round"]
        if server_round == 3:
            return Message(error=Error(code=1, reason="refused"), reply_to=msg)
        reply = RecordDict({"metrics": MetricRecord({"train-loss": 0.5 * server_round})})
        return Message(content=reply, reply_to=msg)

    return app


def _ask(app: ClientApp, server_round: int) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    msg = Message(content=content, dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return app(msg, context)


@pytest.mark.usefixtures("task_identity")
def test_every_reply_is_one_line_with_its_size_and_hash_and_the_chain_shows_an_edit(
    tmp_path,
) -> None:
    trail = tmp_path / "audit.jsonl"
    replies = [_ask(_node(trail), r) for r in (1, 2)]
    replies.append(_ask(_node(trail), 3))  # a restarted node appends to the same trail

    lines = [json.loads(t) for t in trail.read_text().splitlines()]
    assert len(lines) == 3
    for line, reply in zip(lines, replies, strict=True):
        data = content_bytes(reply)
        assert (line["bytes"], line["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert [line["refused"] for line in lines] == [False, False, True]
    assert lines[2]["reason"] == "refused" and lines[0]["stage"] == "train"
    assert read_trail(tmp_path).broken is None
    assert verify(read_trail(tmp_path), content_bytes(replies[1])) == [2]
    (run,) = summarise(read_trail(tmp_path))
    assert (run.messages, run.rounds, run.refused) == (3, {1, 2, 3}, 1)

    text = trail.read_text().splitlines()
    edited = json.loads(text[0]) | {"bytes": 1}
    trail.write_text("\n".join([json.dumps(edited), *text[1:]]) + "\n")
    assert read_trail(tmp_path).broken == 2  # the line after the edited one


@pytest.mark.usefixtures("task_identity")
def test_the_audit_command_summarises_and_verifies(tmp_path) -> None:
    from fedlora.cli import cli

    trail = tmp_path / "audit.jsonl"
    reply = _ask(_node(trail), 1)
    captured, other = tmp_path / "sent.bin", tmp_path / "other.bin"
    captured.write_bytes(content_bytes(reply))
    other.write_bytes(b"not sent")

    ok = CliRunner().invoke(cli, ["federation", "audit", str(tmp_path), "--verify", str(captured)])
    assert ok.exit_code == 0, ok.output
    assert "run 1: 1 messages, rounds 1" in ok.output and "chain intact" in ok.output
    assert "recorded at line 1 (run 1, round 1, train)" in ok.output
    bad = CliRunner().invoke(cli, ["federation", "audit", str(tmp_path), "--verify", str(other)])
    assert bad.exit_code == 1 and "NOT in the trail" in bad.output


def _capturing(inner: ClientApp, folder: Path) -> ClientApp:
    """Each simulated node gets its own folder (its DP ledger, hence its trail) and keeps the
    serialized content of every reply it sends."""
    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        node = folder / f"node-{context.node_config['partition-id']}"
        context.node_config["dp-ledger"] = str(node / "dp-ledger.json")
        reply = inner(msg, context)
        sent = node / "sent"
        sent.mkdir(parents=True, exist_ok=True)
        (sent / f"{len(list(sent.iterdir())):04d}.bin").write_bytes(content_bytes(reply))
        return reply

    app.train()(handle)
    app.train("secagg")(handle)
    app.evaluate()(handle)
    return app


@pytest.mark.integration
def test_a_secure_runs_messages_match_each_nodes_trail_and_ledger(tiny_model_dir, tmp_path):
    from fedlora.client.app import make_client_app
    from fedlora.config import RunConfig
    from fedlora.simulations.run import simulate

    cfg = RunConfig.from_mapping(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "auto",
            "num-server-rounds": 2,
            "local-steps": 1,
            "max-length": 64,
            "sites": "reproductive,mental,pain",
            "min-nodes": 2,
            "output-dir": str(tmp_path / "run"),
            "evaluate-every": 0,
            "secure-aggregation": True,
            "secagg-num-shares": 3,
            "secagg-threshold": 2,
            "secagg-clip-norm": 50.0,
            "dp-noise-multiplier": 1.0,
            "dp-clip-norm": 50.0,
        }
    )
    defaults = {
        "base-model": str(tiny_model_dir),
        "quantization": "auto",
        "sites": cfg.sites,
        "secagg-min-nodes": 2,
        "secagg-allow-unauthenticated": True,
    }
    simulate(cfg, client_app=_capturing(make_client_app(defaults), tmp_path / "nodes"))

    nodes = sorted((tmp_path / "nodes").iterdir())
    assert len(nodes) == 3
    for node in nodes:
        sent = [p.read_bytes() for p in sorted((node / "sent").iterdir())]
        lines = read_trail(node).lines
        assert len(lines) == len(sent) >= 8  # 4 SecAgg+ stages a round, 2 rounds
        for line, data in zip(lines, sent, strict=True):
            assert line["bytes"] == len(data)
            assert line["sha256"] == hashlib.sha256(data).hexdigest()
        assert {line["round"] for line in lines} == {1, 2}
        assert sum(line["dp-charge"] is not None for line in lines) == 2  # one per round
        ledger = json.loads((node / "dp-ledger.json").read_text())
        assert lines[-1]["epsilon"] == ledger["epsilon"] > 0
        assert read_trail(node).broken is None
