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
from collections.abc import Generator
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


_RAY_LOADED = pytest.StashKey[bool]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_RAY_LOADED] = "ray" in sys.modules


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    """Keep the unit tier fast: a unit test (or a fixture it sets up) that imports Ray is an
    error here, not a slower make test-fast (Flower imports Ray only to start it)."""
    yield  # the test's own teardown first
    loaded_here = not item.stash.get(_RAY_LOADED, True) and "ray" in sys.modules
    if loaded_here and item.get_closest_marker("unit"):
        pytest.fail(
            f"{item.nodeid} is a unit test but imported Ray (seconds; Flower imports it to "
            f"start it): mark it @pytest.mark.integration or keep Ray out (tests/conftest.py)",
            pytrace=False,
        )


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
