"""A node keeps its own DP ledger and budget; the server's run config cannot set either."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.app import Context, RecordDict

from fedlora.client import dp_ledger
from fedlora.client.app import node_view
from fedlora.client.dp_ledger import BudgetExceeded, Charge, LedgerSettings, NodeLedger
from fedlora.errors import ConfigError, FileFormatError

pytestmark = pytest.mark.unit


def _rdp_epsilon(multipliers: list[float], delta: float) -> float:
    accountant = RdpAccountant()
    for z in multipliers:
        accountant.compose(dp_event.GaussianDpEvent(z))
    return accountant.get_epsilon(delta)


def _charge(round_: int, z: float = 1.0, n: int = 4) -> Charge:
    return Charge(round=round_, noise_multiplier=z, expected_clients=n, clip_norm=1.0)


def test_the_ledger_charges_the_other_nodes_shares_and_states_its_own_alone(tmp_path: Path):
    settings = LedgerSettings(path=str(tmp_path / "node" / "dp-ledger.json"), delta=1e-6)
    for r in (1, 2, 3):
        ledger = dp_ledger.charge(settings, None, _charge(r))
    others = 1.0 * math.sqrt(3 / 4)  # z * sqrt((n - 1) / n)
    assert ledger.epsilon() == pytest.approx(_rdp_epsilon([others] * 3, 1e-6), rel=1e-12)
    assert ledger.epsilon_alone() == pytest.approx(_rdp_epsilon([0.5] * 3, 1e-6), rel=1e-12)
    assert ledger.epsilon_alone() > ledger.epsilon()
    # On disk, readable, and reloaded as it was (another process, another run).
    saved = json.loads(Path(settings.path).read_text())
    assert [c["round"] for c in saved["charges"]] == [1, 2, 3]
    assert saved["epsilon"] == pytest.approx(ledger.epsilon())
    again = dp_ledger.load(settings, None)
    assert again.charges == ledger.charges
    assert not list(Path(settings.path).parent.glob(".dp-ledger-*"))  # no temporary left


def test_without_a_file_the_ledger_lives_in_the_node_state():
    state = RecordDict()
    settings = LedgerSettings()
    dp_ledger.charge(settings, state, _charge(1))
    dp_ledger.charge(settings, state, _charge(2))
    assert len(dp_ledger.load(settings, state).charges) == 2


def test_the_budget_refuses_a_round_that_would_pass_it_and_any_round_without_noise(
    tmp_path: Path,
):
    path = str(tmp_path / "dp-ledger.json")
    one = NodeLedger(delta=1e-5, charges=[_charge(1)]).epsilon()
    two = NodeLedger(delta=1e-5, charges=[_charge(1), _charge(2)]).epsilon()
    settings = LedgerSettings(path=path, max_epsilon=(one + two) / 2)
    dp_ledger.check_budget(settings, None, _charge(1))
    dp_ledger.charge(settings, None, _charge(1))
    with pytest.raises(BudgetExceeded, match=r"past its dp-max-epsilon") as info:
        dp_ledger.check_budget(settings, None, _charge(2))
    assert f"{two:.4g}" in str(info.value) and path not in str(info.value)  # goes to the server
    with pytest.raises(BudgetExceeded, match="adds no DP noise"):
        dp_ledger.check_budget(settings, None, _charge(2, z=0.0))
    # No budget: nothing is refused (the ledger still records what was spent).
    dp_ledger.check_budget(LedgerSettings(path=path), None, _charge(2, z=0.0))


def test_a_broken_ledger_file_and_bad_settings_are_named(tmp_path: Path):
    path = tmp_path / "dp-ledger.json"
    path.write_text("{not json")
    with pytest.raises(FileFormatError, match="not a fedlora DP ledger"):
        dp_ledger.load(LedgerSettings(path=str(path)), None)
    with pytest.raises(ConfigError, match="dp-max-epsilon=-1"):
        LedgerSettings.from_config({"dp-max-epsilon": -1})
    with pytest.raises(ConfigError, match="dp-ledger-delta=2"):
        LedgerSettings.from_config({"dp-ledger-delta": 2})


def test_the_run_config_cannot_set_what_only_the_node_decides():
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"site": "pain", "max-local-steps": 5},
        state=RecordDict(),
        run_config={
            "lr": 1e-3,
            "max-local-steps": 1000,
            "dp-max-epsilon": 1e9,
            "dp-ledger": "/tmp/elsewhere.json",
            "data-path": "/etc/passwd",
            "dp-min-noise-multiplier": 0.0,
        },
    )
    merged = node_view({"dp-min-noise-multiplier": 0.5}, context)
    assert merged["lr"] == 1e-3 and merged["site"] == "pain"
    assert merged["max-local-steps"] == 5
    assert merged["dp-min-noise-multiplier"] == 0.5  # the node's default, not the server's
    assert not {"dp-max-epsilon", "dp-ledger", "data-path"} & set(merged)
