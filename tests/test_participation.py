"""Participation: a node that never answers costs each round its timeout, no more."""

import time
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.client.app import run_round
from fedlora.client.node import NodeSettings
from fedlora.config import RunConfig
from fedlora.simulations.run import simulate

pytestmark = pytest.mark.integration

TIMEOUT = 60.0  # covers a cold start (Ray actor, imports, model load) on a loaded machine
SAFETY_CAP = 300.0  # the hanging node gives up waiting then (only if the timeout were broken)


def _app_with_a_hanging_site(defaults: dict, hanging_site: str, out: Path) -> ClientApp:
    """The hanging site answers only once both rounds are recorded without it (or at the cap)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        merged = {**defaults, **context.run_config, **context.node_config}
        if NodeSettings.from_config(merged).site == hanging_site:
            history, waited = out / "metrics.jsonl", 0.0
            while waited < SAFETY_CAP:
                if history.is_file() and len(history.read_text().splitlines()) >= 2:
                    (out / "rounds-ended-without-the-hanging-node").touch()
                    break
                time.sleep(0.5)
                waited += 0.5
        reply = run_round(msg.content, merged, context.state)
        return Message(content=reply.to_content(), reply_to=msg)

    return app


def test_rounds_end_at_the_timeout_and_aggregate_who_answered(tiny_model_dir, tmp_path):
    cfg = RunConfig.from_mapping(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "fp32",
            "num-server-rounds": 2,
            "local-steps": 1,
            "sites": "mental,pain",
            "round-timeout": TIMEOUT,
            "min-nodes": 1,
            "output-dir": str(tmp_path),
        }
    )
    app = _app_with_a_hanging_site(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "fp32",
            "sites": cfg.sites,
            "secagg-allow-unauthenticated": True,  # simulated nodes: no federation roster
        },
        hanging_site="pain",
        out=tmp_path,
    )
    result = simulate(cfg, client_app=app)

    assert [r["replies"] for r in result.history] == [1, 1]
    assert all(set(r["sites"]) == {"mental"} for r in result.history)
    assert not any(r.get("skipped") for r in result.history)
    # Both rounds were recorded while the hanging node still held its first task: each round
    # ended at its timeout instead of waiting for it.
    assert (tmp_path / "rounds-ended-without-the-hanging-node").exists()
