"""Client-level differential privacy: settings and the privacy ledger (epsilon per round).

DP-FedAvg (McMahan, Ramage, Talwar & Zhang, ICLR 2018, "Learning Differentially Private
Recurrent Language Models", arXiv:1710.06963): each round, every sampled client clips its whole
adapter delta to global L2 norm ``C`` (``clip_norm``), and Gaussian noise of standard deviation
``z * C`` (``z`` = ``noise_multiplier``) is added to the *sum* of the clipped deltas: by the
server, or, under secure aggregation, as one share of std ``z * C / sqrt(n)`` by each of ``n``
clients (:mod:`fedlora.client.privacy`).

What the reported epsilon means. The run is (epsilon, delta)-differentially private at the
level of *clients* (user-level DP): for any client, the distribution of the released sequence of
noised aggregates (hence of every global adapter, and anything computed from them) changes by at
most a factor ``e^epsilon``, up to probability ``delta``, whether that client's entire data set
takes part or not (add/remove-one-client neighbouring). It says nothing about a single example
beyond that (one example is part of one client's data), and nothing about what a client's own
node keeps. It holds under these assumptions:

- Poisson sampling: each round, every client takes part independently with probability ``q``
  (``sampling_rate``). Flower samples a fixed fraction of the connected nodes instead; treating
  that as Poisson sampling with ``q = fraction`` is the usual approximation, not a proof.
  ``q = 1`` (every client every round) needs no such assumption.
- Each client's contribution to the sum is its clipped delta, unweighted (a weight such as its
  number of examples would raise the sensitivity above ``C``); the noise on the sum really has
  std ``z * C`` (under distributed noise: as many honest contributors as promised, see
  :func:`effective_noise_multiplier`, and record what was achieved).
- Every aggregate the server sees is recorded: each round applied to the global adapter, and
  each secure round whose noised sum was decoded, even if it is then skipped (too few
  contributors). A round skipped before any sum is formed releases nothing. Under secure
  aggregation a round with ``a`` contributors is charged for ``a - 1`` noise shares: the
  protected client may be the one missing.

Accounting: each round is one ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` composed in
Google's ``dp-accounting`` library, by its RDP accountant (default; Mironov, Talwar & Zhang,
2019, epsilon from the conversion of Canonne, Kamath & Steinke, 2020) or its PLD accountant
(``accountant="pld"``; tighter, and slower: building each round's loss distribution takes about
1 s at the default discretization, against ~0.1 s for RDP).
The figures are the library's own: ``get_epsilon_and_optimal_order(delta)`` /
``get_epsilon(delta)``. With its default RDP orders, the library warns through absl, once per
fractional order and composition, when its series for an order does not converge (e.g. q = 0.5,
z = 1); it then leaves that order out, which can only make epsilon larger (conservative). We keep
the default orders, so the figure is exactly the library's, and drop those particular warnings
while we call it (:func:`_quiet_absl`), logging their count at debug level instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from itertools import groupby
from typing import Any

from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedlora.errors import ConfigError

log = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "pld")
LEDGER_VERSION = 1


@dataclass(frozen=True)
class DpSettings:
    """Client-level DP for a run; run-config keys are ``dp-<field with dashes>``."""

    noise_multiplier: float  # z: noise std on the sum of clipped deltas is z * clip_norm
    clip_norm: float  # C: each client's whole delta is clipped to this global L2 norm
    sampling_rate: float  # q: probability that a client takes part in a round (Poisson)
    delta: float = 1e-5  # the delta of (epsilon, delta)-DP; keep it below 1 / number of clients

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ConfigError(f"{_key(f.name)}={value!r}: must be a finite number")
        if self.noise_multiplier <= 0:
            raise ConfigError(
                f"dp-noise-multiplier={self.noise_multiplier}: must be > 0 "
                f"(e.g. 1.0); turn DP off instead of running it without noise"
            )
        if self.clip_norm <= 0:
            raise ConfigError(
                f"dp-clip-norm={self.clip_norm}: must be > 0, e.g. about the "
                f"median L2 norm of clients' deltas without DP"
            )
        if not 0 < self.sampling_rate <= 1:
            raise ConfigError(
                f"dp-sampling-rate={self.sampling_rate}: must be in (0, 1], the "
                f"share of clients sampled each round (e.g. fraction-train)"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(
                f"dp-delta={self.delta}: must be in (0, 1), well below "
                f"1 / number of clients (e.g. 1e-5)"
            )

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise on the sum of the clipped deltas: z * C."""
        return self.noise_multiplier * self.clip_norm


def _key(name: str) -> str:
    return "dp-" + name.replace("_", "-")


def effective_noise_multiplier(noise_multiplier: float, expected: int, actual: int) -> float:
    """Noise multiplier achieved when ``actual`` of ``expected`` clients add their share.

    Shares sized for ``expected`` clients (``fedlora.client.privacy.noise_share_std``) sum,
    over ``actual`` of them, to std ``z * C * sqrt(actual / expected)``.
    """
    if expected < 1 or actual < 0:
        raise ValueError(f"expected={expected}, actual={actual}: need expected >= 1, actual >= 0")
    return noise_multiplier * math.sqrt(actual / expected)


@dataclass(frozen=True)
class PrivacyRecord:
    """The privacy spent by one released round, and in total after it."""

    server_round: int
    epsilon_round: float  # this round alone
    epsilon: float  # cumulative, over every recorded round up to and including this one
    delta: float
    accountant: str  # "rdp" or "pld"
    order: float | None  # the RDP order that gave the cumulative epsilon; None for PLD
    noise_multiplier: float  # the z accounted for this round (the achieved one)
    sampling_rate: float  # the q accounted for this round

    def metrics(self) -> dict[str, float]:
        """Scalar metrics for the round's MetricRecord / metrics history."""
        out = {
            "dp-epsilon": self.epsilon,
            "dp-epsilon-round": self.epsilon_round,
            "dp-delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sampling-rate": self.sampling_rate,
        }
        if self.order is not None:
            out["dp-rdp-order"] = self.order
        return out


class PrivacyLedger:
    """Composes one Poisson-subsampled Gaussian event per released round; reports epsilon.

    Serializable with :meth:`to_dict` / :meth:`from_dict` (plain JSON types) so the server can
    checkpoint it with its state and resume: loading replays the recorded events in order (runs
    of equal events at once; the figures then agree with an uninterrupted run to ~1e-9).
    """

    def __init__(self, settings: DpSettings, accountant: str = "rdp") -> None:
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"dp-accountant={accountant!r}: use one of {ACCOUNTANTS}")
        self.settings = settings
        self.accountant = accountant
        self.records: list[PrivacyRecord] = []
        self._total = self._new()
        self._single: dict[tuple[float, float], float] = {}

    @property
    def epsilon(self) -> float:
        """Cumulative epsilon so far (0 before any round)."""
        return self.records[-1].epsilon if self.records else 0.0

    def record_round(
        self,
        server_round: int,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
    ) -> PrivacyRecord:
        """Account for one released round; z and q default to the settings' values.

        Pass the noise multiplier actually achieved when it differs (distributed noise with
        fewer contributors than expected: :func:`effective_noise_multiplier`).
        """
        z = self.settings.noise_multiplier if noise_multiplier is None else noise_multiplier
        q = self.settings.sampling_rate if sampling_rate is None else sampling_rate
        if self.records and server_round <= self.records[-1].server_round:
            raise ValueError(
                f"round {server_round} recorded after round "
                f"{self.records[-1].server_round}: rounds are recorded once, in "
                f"order"
            )
        if not (math.isfinite(z) and z > 0) or not 0 < q <= 1:
            raise ValueError(
                f"round {server_round}: noise multiplier {z} and sampling rate {q} "
                f"give no DP guarantee (need z > 0, 0 < q <= 1); stop the run "
                f"rather than release this aggregate"
            )
        with _quiet_absl():
            self._total.compose(_event(z, q))
            epsilon, order = self._epsilon(self._total)
        record = PrivacyRecord(
            server_round=server_round,
            epsilon_round=self._one_round(z, q),
            epsilon=epsilon,
            delta=self.settings.delta,
            accountant=self.accountant,
            order=order,
            noise_multiplier=z,
            sampling_rate=q,
        )
        self.records.append(record)
        log.info(
            "round %s: DP epsilon %.4g this round, %.4g in total (delta %.1e, %s)",
            server_round,
            record.epsilon_round,
            epsilon,
            self.settings.delta,
            self.accountant,
        )
        return record

    def summary(self) -> dict[str, Any]:
        """What the run report and the final adapter's metadata state about privacy."""
        return {
            "dp": "client-level (add/remove one client's data), Poisson sampling assumed",
            "epsilon": self.epsilon,
            "delta": self.settings.delta,
            "rounds": len(self.records),
            "accountant": f"dp-accounting {self.accountant}",
            **{k: v for k, v in asdict(self.settings).items() if k != "delta"},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": LEDGER_VERSION,
            "accountant": self.accountant,
            "settings": asdict(self.settings),
            "records": [asdict(r) for r in self.records],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(
                f"privacy ledger version {data.get('version')!r}, expected "
                f"{LEDGER_VERSION}: it was saved by another fedlora version"
            )
        ledger = cls(DpSettings(**data["settings"]), accountant=data["accountant"])
        ledger.records = [PrivacyRecord(**r) for r in data["records"]]
        with _quiet_absl():  # runs of equal events composed at once: PLD builds each in ~1 s
            for (z, q), run in groupby(
                (r.noise_multiplier, r.sampling_rate) for r in ledger.records
            ):
                ledger._total.compose(_event(z, q), sum(1 for _ in run))
            epsilon = ledger._epsilon(ledger._total)[0] if ledger.records else 0.0
        if not math.isclose(epsilon, ledger.epsilon, rel_tol=1e-6, abs_tol=1e-9):
            log.warning(
                "replaying the privacy ledger gives epsilon %.6g, it recorded %.6g (did "
                "dp-accounting change?); later rounds build on the replayed figure",
                epsilon,
                ledger.epsilon,
            )
        return ledger

    def _new(self) -> RdpAccountant | PLDAccountant:
        return RdpAccountant() if self.accountant == "rdp" else PLDAccountant()

    def _epsilon(self, accountant: RdpAccountant | PLDAccountant) -> tuple[float, float | None]:
        if isinstance(accountant, RdpAccountant):
            epsilon, order = accountant.get_epsilon_and_optimal_order(self.settings.delta)
            return float(epsilon), float(order)
        return float(accountant.get_epsilon(self.settings.delta)), None

    def _one_round(self, z: float, q: float) -> float:
        if (z, q) not in self._single:
            with _quiet_absl():
                single = self._new()
                single.compose(_event(z, q))
                self._single[z, q] = self._epsilon(single)[0]
        return self._single[z, q]


def _event(noise_multiplier: float, sampling_rate: float) -> dp_event.DpEvent:
    return dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))


class _DropNonConvergence(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("_compute_log_a_frac failed to converge"):
            self.dropped += 1
            return False
        return True


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """Drop dp-accounting's per-order non-convergence warnings (absl logger) while inside."""
    absl_logger = logging.getLogger("absl")
    dropper = _DropNonConvergence()
    absl_logger.addFilter(dropper)
    try:
        yield
    finally:
        absl_logger.removeFilter(dropper)
        if dropper.dropped:
            log.debug(
                "dp-accounting left out %d RDP orders whose series did not converge (conservative)",
                dropper.dropped,
            )


__all__ = [
    "ACCOUNTANTS",
    "DpSettings",
    "PrivacyLedger",
    "PrivacyRecord",
    "effective_noise_multiplier",
]
