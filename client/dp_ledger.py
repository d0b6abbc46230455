"""A node's own privacy ledger: what its noised updates have spent, by its own account.

The server's ledger (:mod:`fedlora.server.privacy`) is the coordinator's word. A hospital needs
its own: every round in which this node clips its delta and adds its share of the Gaussian noise
(``z · C / sqrt(n)`` for ``n`` expected nodes) is charged here, before the update leaves.

Two figures, both by dp-accounting's RDP accountant, with no amplification by sampling (the
node knows it took part), for the node's own ``delta``:

- ``epsilon``: the other ``n - 1`` expected nodes added their shares (multiplier
  ``z · sqrt((n - 1) / n)``, the server's conservative figure when all answer);
- ``epsilon-alone``: only this node's own share (``z / sqrt(n)``), the bound if every other
  node colluded with the server and added nothing.

``dp-max-epsilon`` (node config) is a budget on ``epsilon``: a round that would pass it, or any
round without DP noise once a budget is set, is refused before training. The ledger lives in a
JSON file (node config ``dp-ledger``; ``fedlora federation node`` puts it in the node folder),
written atomically, so it survives restarts and runs; without a file it lives in the node's
Flower state for the run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedlora.errors import ConfigError, FileFormatError
from fedlora.readback import parse_json, read_json
from fedlora.savedfiles import atomic_file

log = logging.getLogger(__name__)

LEDGER_VERSION = 1
STATE_KEY = "fedlora.dp-ledger"  # ConfigRecord {"json": ...} in the node's state (no file)


class BudgetExceeded(Exception):
    """This round would spend more than the node's ``dp-max-epsilon``."""


@dataclass(frozen=True)
class Charge:
    """One noised update this node sent."""

    round: int
    noise_multiplier: float  # z of the whole sum
    expected_clients: int  # n: the noise is split in n shares
    clip_norm: float

    def others(self) -> float:
        """The multiplier from the other nodes' shares: ``z · sqrt((n - 1) / n)``."""
        n = self.expected_clients
        return self.noise_multiplier * math.sqrt((n - 1) / n)

    def alone(self) -> float:
        """The multiplier from this node's share only: ``z / sqrt(n)``."""
        return self.noise_multiplier / math.sqrt(self.expected_clients)


def epsilon_of(multipliers: list[float], delta: float) -> float:
    """Epsilon of composing one Gaussian event per multiplier (inf if any is 0)."""
    if not multipliers:
        return 0.0
    if min(multipliers) <= 0:
        return math.inf
    # imported here: dp-accounting (scipy) takes seconds to import, and every ClientApp process
    # imports this module, also the short-lived ones that hand messages to the warm worker
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    for z in multipliers:
        accountant.compose(dp_event.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))


@dataclass
class NodeLedger:
    delta: float = 1e-5
    charges: list[Charge] = field(default_factory=list)

    def epsilon(self, extra: Charge | None = None) -> float:
        """Epsilon with the other expected nodes' shares (inf if a round expected one node)."""
        charges = self.charges + ([extra] if extra else [])
        return epsilon_of([c.others() for c in charges], self.delta)

    def epsilon_alone(self) -> float:
        """Epsilon from this node's own noise shares only."""
        return epsilon_of([c.alone() for c in self.charges], self.delta)

    def figures(self) -> dict[str, float]:
        """Both epsilons of the charges so far (each composes every charge: compute once)."""
        return {"epsilon": self.epsilon(), "epsilon-alone": self.epsilon_alone()}

    def to_json(self, figures: Mapping[str, float] | None = None) -> str:
        """The ledger file's text; ``figures`` when the caller has them already."""
        return json.dumps(
            {
                "version": LEDGER_VERSION,
                "delta": self.delta,
                "charges": [c.__dict__ for c in self.charges],
                **(figures if figures is not None else self.figures()),
            },
            indent=1,
        )

    @classmethod
    def from_data(cls, data: Any, where: str) -> NodeLedger:
        """The ledger in ``data`` (parsed JSON), checked field by field; a FileFormatError
        naming ``where`` otherwise."""
        problem = _ledger_problem(data)
        if problem:
            raise FileFormatError(f"{where}: not a fedlora DP ledger ({problem}); {LEDGER_FIX}")
        charges = [Charge(**{k: c[k] for k in _CHARGE_FIELDS}) for c in data["charges"]]
        return cls(delta=float(data["delta"]), charges=charges)


LEDGER_FIX = "move it aside to start a new one (its charges would then be forgotten)"
_CHARGE_FIELDS = ("round", "noise_multiplier", "expected_clients", "clip_norm")


def _number(value: Any, low: float, integer: bool = False) -> bool:
    """Whether ``value`` is a finite JSON number >= ``low`` (an int where ``integer``)."""
    kinds = (int,) if integer else (int, float)
    return (
        isinstance(value, kinds)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= low
    )


def _ledger_problem(data: Any) -> str:
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("version") != LEDGER_VERSION:
        return f"version {str(data.get('version'))[:20]}, expected {LEDGER_VERSION}"
    if not _number(data.get("delta"), 0.0) or not 0 < data["delta"] < 1:
        return "delta is not a number in (0, 1)"
    charges = data.get("charges")
    if not isinstance(charges, list):
        return "charges is not a list"
    for i, c in enumerate(charges):
        if not (
            isinstance(c, dict)
            and _number(c.get("round"), 0, integer=True)
            and _number(c.get("noise_multiplier"), 0.0)
            and _number(c.get("expected_clients"), 1, integer=True)
            and _number(c.get("clip_norm"), 0.0)
        ):
            return f"charge {i} is not a charge ({', '.join(_CHARGE_FIELDS)})"
    return ""


@dataclass(frozen=True)
class LedgerSettings:
    """A node's DP ledger settings, from its node config only (never the server's)."""

    path: str = ""
    max_epsilon: float = 0.0  # 0: no budget
    delta: float = 1e-5

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> LedgerSettings:
        try:
            out = cls(
                path=str(node.get("dp-ledger", "") or ""),
                max_epsilon=float(node.get("dp-max-epsilon", 0.0)),
                delta=float(node.get("dp-ledger-delta", 1e-5)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"node config dp-max-epsilon / dp-ledger-delta: {exc}") from None
        if not (math.isfinite(out.max_epsilon) and out.max_epsilon >= 0):
            raise ConfigError(f"node config dp-max-epsilon={out.max_epsilon}: use a number >= 0")
        if not 0 < out.delta < 1:
            raise ConfigError(f"node config dp-ledger-delta={out.delta}: use a number in (0, 1)")
        return out


def load(settings: LedgerSettings, state: RecordDict | None) -> NodeLedger:
    if settings.path:
        path = Path(settings.path)
        if not path.exists():
            return NodeLedger(delta=settings.delta)
        # Python writes an epsilon of inf as Infinity: allowed here, the figures are not read
        data = read_json(path, f"not a fedlora DP ledger; {LEDGER_FIX}", allow_nonfinite=True)
        ledger = NodeLedger.from_data(data, str(path))
    elif state is not None and STATE_KEY in state.config_records:
        text = str(state.config_records[STATE_KEY].get("json", ""))
        try:
            data = parse_json(text, allow_nonfinite=True)
        except ValueError as exc:
            raise FileFormatError(f"node state: not a fedlora DP ledger ({exc})") from None
        ledger = NodeLedger.from_data(data, "node state")
    else:
        return NodeLedger(delta=settings.delta)
    ledger.delta = settings.delta
    return ledger


def save(
    ledger: NodeLedger,
    settings: LedgerSettings,
    state: RecordDict | None,
    figures: Mapping[str, float] | None = None,
) -> None:
    text = ledger.to_json(figures)
    if settings.path:
        with atomic_file(Path(settings.path), "w") as f:  # an error leaves the old ledger
            f.write(text)
    elif state is not None:
        state.config_records[STATE_KEY] = ConfigRecord({"json": text})


def check_budget(settings: LedgerSettings, state: RecordDict | None, charge: Charge) -> None:
    """Raise BudgetExceeded if ``charge`` would take the node past ``dp-max-epsilon``."""
    if not settings.max_epsilon:
        return
    if charge.noise_multiplier <= 0:
        raise BudgetExceeded(
            f"this node keeps a DP budget (dp-max-epsilon={settings.max_epsilon:g}) and the "
            f"round adds no DP noise (dp-noise-multiplier=0)"
        )
    ledger = load(settings, state)
    after = ledger.epsilon(charge)
    if after > settings.max_epsilon:
        log.warning("DP budget reached; this node's ledger: %s", settings.path or "node state")
        raise BudgetExceeded(
            f"this round would take the node's DP epsilon from {ledger.epsilon():.4g} to "
            f"{after:.4g} (delta {settings.delta:g}), past its dp-max-epsilon="
            f"{settings.max_epsilon:g}"
        )


def charge(settings: LedgerSettings, state: RecordDict | None, charge: Charge) -> NodeLedger:
    """Record a noised update this node is about to send; log what it has spent."""
    ledger = load(settings, state)
    ledger.charges.append(charge)
    figures = ledger.figures()
    save(ledger, settings, state, figures)
    log.info(
        "DP ledger: this node has spent epsilon %.4g (delta %g) over %d noised updates; %.4g "
        "if no other node added its noise share",
        figures["epsilon"],
        ledger.delta,
        len(ledger.charges),
        figures["epsilon-alone"],
    )
    return ledger


__all__ = ["BudgetExceeded", "Charge", "LedgerSettings", "NodeLedger", "charge", "check_budget"]
