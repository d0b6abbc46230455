"""The demo's console tells the truth: a column per site only where the server saw each site's
figures (never under secure aggregation), Ray's node-line prefixes without colour codes, and
fedlora's node lines carrying the site's name."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.console import name_node_lines, node_name
from fedlora.simulations import report

SITES = ("reproductive", "mental", "pain")


def _history(secure: bool) -> list[dict]:
    def sites(r: int) -> dict:
        if secure:  # the server knows who took part, and (unmasked) evaluation figures
            return {s: ({"eval-loss": 1.0} if r == 2 else {}) for s in SITES}
        return {s: {"train-loss": 1.0 + r} for s in SITES}

    extra = {"secure-aggregation": True} if secure else {}
    return [
        {"round": r, "sites": sites(r), "train-loss": 2.0, "replies": 3, **extra} for r in (1, 2)
    ]


def _printed(history: list[dict]) -> str:
    with report.console.capture() as captured:
        report.rounds(history)
    return captured.get()


def test_a_secure_run_gets_no_per_site_columns() -> None:
    out = _printed(_history(secure=True))
    assert not any(site in out for site in SITES), out
    assert "nodes answered" in out and "sum only" in out


def test_a_plain_run_gets_a_column_per_site() -> None:
    out = _printed(_history(secure=False))
    assert all(site in out for site in SITES) and "nodes answered" not in out


@pytest.mark.integration
def test_ray_prefixes_carry_no_colour_codes() -> None:
    code = "import os; from fedlora.console import configure; configure(); "
    code += "print(os.environ['RAY_COLOR_PREFIX'])"
    env = {k: v for k, v in os.environ.items() if k != "RAY_COLOR_PREFIX"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == "0"


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"site": "pain"}, "pain"),
        ({"partition-id": 1, "sites": ",".join(SITES)}, "mental"),
        ({"partition-id": 4, "partition-dir": "/p"}, "client-4"),
        ({}, "node-12"),
    ],
)
def test_a_node_is_named_after_its_site(settings: dict, name: str) -> None:
    assert node_name(settings, 12) == name


@pytest.mark.usefixtures("task_identity")
def test_an_odd_partition_id_still_gets_the_message_answered() -> None:
    app = ClientApp(mods=[name_node_lines({})])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(content=RecordDict(), reply_to=msg)

    msg = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    context = Context(
        run_id=1, node_id=5, node_config={"partition-id": "x"}, state=RecordDict(), run_config={}
    )
    assert app(msg, context).has_content()


@pytest.mark.usefixtures("task_identity")
def test_node_lines_carry_the_sites_name(caplog) -> None:
    app = ClientApp(mods=[name_node_lines({"sites": ",".join(SITES)})])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        logging.getLogger("fedlora.client.node").warning("refused round %d", 3)
        return Message(content=RecordDict(), reply_to=msg)

    msg = Message(
        content=RecordDict({"config": ConfigRecord({})}), dst_node_id=5, message_type="train"
    )
    context = Context(
        run_id=1, node_id=5, node_config={"partition-id": 2}, state=RecordDict(), run_config={}
    )
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        app(msg, context)
        logging.getLogger("fedlora.server").warning("after the message")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["[pain] refused round 3", "after the message"]


@pytest.mark.integration  # imports Ray
def test_the_client_app_with_its_mods_pickles_for_ray() -> None:
    from ray import cloudpickle  # what Ray pickles a simulation's ClientApp with

    from fedlora.client.app import make_client_app

    app = cloudpickle.loads(cloudpickle.dumps(make_client_app({"sites": "pain"})))
    assert isinstance(app, ClientApp)
