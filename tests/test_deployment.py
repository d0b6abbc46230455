"""The Flower App on Flower's deployment engine, with real faults: `flwr run` on a SuperLink and
SuperNodes with warm workers on 127.0.0.1 (``tests/local_deployment.py``), tiny model.

- Three nodes, two secure rounds; one node is killed (SIGKILL, worker and SuperNode) after it
  trained in round 1: the round completes with the other two (SecAgg+ removes the masks they
  shared with it), the restarted node takes part in round 2, and each surviving node served
  every message with one base-model load (its warm worker).
- The ServerApp process is killed (SIGKILL) after round 1 of a two-round run, and the run is
  submitted again with ``resume=true``: it ends with the global adapter of an uninterrupted run.

Insecure transport here: the TLS federation with node authentication is
``tests/test_federation_deploy.py``'s. Every process the tests start is stopped by its pid.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora.client.worker import status
from fedlora.server.state import load_state
from local_deployment import LocalDeployment, wait_until

pytestmark = pytest.mark.slow


def _history(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _node_config(model: Path) -> str:
    # three hospitals, each operator accepts secure rounds of two and assumes no colluder (2 of
    # 3 holders rebuild a secret: one dropout tolerated); no federation roster here
    return (
        f'base-model="{model}" quantization="auto" secagg-min-nodes=2 '
        f"secagg-allow-unauthenticated=true secagg-corrupt-nodes=0"
    )


def test_secure_rounds_survive_a_node_killed_mid_round_and_take_it_back(
    tiny_model_dir: Path, tmp_path: Path
):
    sites = ("reproductive", "mental", "pain")
    victim = "mental"
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    with LocalDeployment(tmp_path) as dep:
        sockets = {site: dep.start_node(site, _node_config(tiny_model_dir)) for site in sites}
        submitted = dep.flwr_run(
            f'num-server-rounds=2 local-steps=2 base-model="{tiny_model_dir}" '
            f'quantization="auto" min-nodes=2 min-available-nodes=3 secure-aggregation=true '
            f"secagg-num-shares=3 secagg-threshold=2 secagg-corrupt-nodes=0 round-timeout=45 "
            f"evaluate-every=0 "
            f'output-dir="{out}"',
            stream=False,
            timeout=120,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        # The victim trained on round 1's setup message; it crashes before it masks.
        wait_until(lambda: status(str(sockets[victim]))["messages"] >= 1, 300, "the victim trained")
        dep.kill_node(victim)
        dep.start_node(victim, _node_config(tiny_model_dir))  # back for the next round
        history = wait_until(
            lambda: len(h := _history(metrics)) >= 2 and h, 600, "two rounds\n" + dep.tail()
        )
        first, second = history
        assert first["secure-aggregation"] and first["asked"] == 3, first
        assert first["replies"] == 2 and set(first["sites"]) == set(sites) - {victim}, first
        assert set(second["sites"]) == set(sites) and second["replies"] >= 3, second
        assert not first.get("skipped") and not second.get("skipped")
        wait_until(
            lambda: (out / "global-adapter" / "adapter_model.safetensors").is_file(),
            120,
            "the final adapter",
        )
        for site in set(sites) - {victim}:  # every message of the run, one base-model load
            served = status(str(sockets[site]))
            # 2 rounds x 4 SecAgg+ exchanges (unauthenticated: no consistency check)
            assert served["model-loads"] == 1 and served["messages"] >= 8, (site, served)


def test_a_server_killed_mid_run_resumes_to_the_uninterrupted_adapter(
    tiny_model_dir: Path, tmp_path: Path
):
    common = (
        f'num-server-rounds=2 local-steps=2 base-model="{tiny_model_dir}" quantization="auto" '
        f"min-nodes=2 secure-aggregation=false evaluate-every=0 lr=0.005"
    )
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    with LocalDeployment(tmp_path) as dep:
        for site in ("pain", "dermatology"):
            dep.start_node(site, _node_config(tiny_model_dir))
        done = dep.flwr_run(f'{common} output-dir="{straight}"')
        assert done.returncode == 0, done.stdout[-3000:] + dep.tail()

        submitted = dep.flwr_run(f'{common} output-dir="{crashed}"', stream=False, timeout=120)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        wait_until(lambda: _history(crashed / "metrics.jsonl"), 300, "round 1 before the crash")
        pids = wait_until(dep.serverapp_pids, 30, "the run's ServerApp process")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert load_state(crashed).completed_round == 1  # killed while round 2 was under way

        done = dep.flwr_run(f'{common} output-dir="{crashed}" resume=true')
        assert done.returncode == 0, done.stdout[-3000:] + dep.tail()

    for run in (straight, crashed):
        history = _history(run / "metrics.jsonl")
        assert [r["round"] for r in history] == [1, 2], history
        assert all(r["replies"] == 2 and not r.get("skipped") for r in history), history
    a = load_file(str(straight / "global-adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "global-adapter" / "adapter_model.safetensors"))
    assert load_state(crashed).completed_round == 2
    assert set(a) == set(b)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= 1e-6, f"the resumed run differs from the uninterrupted one by {worst}"
    moved = max(float(np.max(np.abs(a[k]))) for k in a if "lora_B" in k)
    assert moved > 0, "the run changed nothing: the comparison would prove nothing"
