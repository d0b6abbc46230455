"""Shared fixtures (a tiny config-built model, built once per session) and the test tiers.

Tiers (markers): ``unit`` (no Ray, no real model, no subprocess federation: seconds),
``integration`` (Ray simulations, tiny federations, CLI subprocesses), ``slow`` (the real
default model, real SuperLink/SuperNode processes: minutes), and ``fuzz`` (hypothesis over
network entry points; a unit test under the ``ci`` profile). A test without ``integration`` or
``slow`` is a unit test. ``make test-fast`` runs the unit tier; ``make test`` runs everything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fuzzing  # registers and loads the hypothesis profiles
from tiny import make_tiny_model


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (
            item.get_closest_marker("slow") is None
            and item.get_closest_marker("integration") is None
        ):
            item.add_marker(pytest.mark.unit)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    report = os.environ.get("FEDLORA_FUZZ_REPORT")
    if report:
        fuzzing.write_report(Path(report))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def task_identity():
    """Messages built outside a running ServerApp need a task identity (Flower sets one in a
    run); restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
