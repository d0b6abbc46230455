"""Server optimizers: FedAvg, FedAvgM, FedAdam and FedYogi on the aggregated pseudo-gradient.

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar & McMahan, 2021, "Adaptive Federated
Optimization", ICLR 2021, arXiv:2003.00295, Algorithm 2. The server treats the aggregated delta
``d`` (what a strategy in this package returns as ``AggregationResult.delta``) as a
pseudo-gradient and, per tensor and element, with ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (the
algorithm asks ``v_{-1} >= tau^2``; Flower's FedAdam starts from 0 instead):

    sgd  (FedAvg):  x += lr * d
    avgm (FedAvgM; Hsu, Qi & Brown, 2019, arXiv:1909.06335):  m = momentum * m + d;  x += lr * m
    adam (FedAdam): m = b1 m + (1 - b1) d;  v = b2 v + (1 - b2) d^2;  x += lr m / (sqrt(v) + tau)
    yogi (FedYogi): m as FedAdam;  v = v - (1 - b2) d^2 sign(v - d^2);  x += lr m / (sqrt(v) + tau)

No bias correction, as in the paper. ``kind="sgd", lr=1`` is exactly
:func:`fedlora.server.aggregate.apply_delta`. Composable with every strategy: the optimizer
acts on whatever delta the strategy produced, so tensors a strategy does not move (B under
FedSA-LoRA, A under FFA-LoRA) get a zero delta and, from a fresh state, never move. FedEx-LoRA's
residual is exact only for ``sgd`` with ``lr=1``: any other step moves the factors away from the
averages the residual was computed against. Moments are float64; numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedlora.server.aggregate import apply_delta

Arrays = dict[str, np.ndarray]
KINDS = ("sgd", "avgm", "adam", "yogi")
# Server learning rates when none is given: 1 keeps FedAvg's step; the adaptive kinds take
# per-element steps of about lr, so they need a small one (Reddi et al. tune it per task).
DEFAULT_LR = {"sgd": 1.0, "avgm": 1.0, "adam": 1e-2, "yogi": 1e-2}


@dataclass(frozen=True)
class ServerOptimizer:
    """How the server moves the global adapter along the aggregated delta."""

    kind: str = "sgd"  # one of KINDS: sgd (plain FedAvg), avgm, adam, yogi
    lr: float | None = None  # server learning rate eta; None: DEFAULT_LR[kind]
    momentum: float = 0.9  # FedAvgM's server momentum beta
    beta1: float = 0.9  # FedAdam/FedYogi first-moment decay
    beta2: float = 0.99  # FedAdam/FedYogi second-moment decay
    tau: float = 1e-3  # FedAdam/FedYogi adaptivity: larger is closer to momentum SGD

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown server optimizer {self.kind!r}: choose one of {', '.join(KINDS)}"
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(
                f"server lr is {self.lr}: set a positive number, or leave it unset "
                f"for {DEFAULT_LR[self.kind]} ({self.kind})"
            )
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} is {value}: set it in [0, 1) (e.g. 0.9)")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau is {self.tau}: set a small positive number (e.g. 1e-3)")

    @property
    def server_lr(self) -> float:
        """The server learning rate in use: ``lr``, or the kind's default."""
        return DEFAULT_LR[self.kind] if self.lr is None else self.lr


@dataclass(frozen=True)
class OptimizerState:
    """The server optimizer's moments per tensor name and the number of steps taken."""

    num_steps: int = 0
    m: Arrays = field(default_factory=dict)  # first moment (FedAvgM's momentum buffer)
    v: Arrays = field(default_factory=dict)  # second moment (FedAdam, FedYogi)

    def to_arrays(self) -> Arrays:
        """Flat arrays for a checkpoint: ``step``, ``m/<name>``, ``v/<name>``."""
        out: Arrays = {"step": np.array(self.num_steps, dtype=np.int64)}
        out.update({f"m/{k}": v for k, v in self.m.items()})
        out.update({f"v/{k}": v for k, v in self.v.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> OptimizerState:
        """The inverse of :meth:`to_arrays`."""
        if "step" not in arrays:
            raise ValueError("optimizer state lacks 'step': was it saved with to_arrays()?")
        return cls(
            int(np.asarray(arrays["step"]).reshape(-1)[0]),  # 0-d, or (1,) on reload
            {k[2:]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith("m/")},
            {k[2:]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith("v/")},
        )


def _moments(state: Arrays, delta: Mapping[str, np.ndarray], fill: float, what: str) -> Arrays:
    if not state:
        return {k: np.full(d.shape, fill, dtype=np.float64) for k, d in delta.items()}
    if set(state) != set(delta) or any(state[k].shape != delta[k].shape for k in delta):
        raise ValueError(
            f"the optimizer's {what} moments do not match the delta's tensors: start "
            f"from a fresh OptimizerState() when the adapter changes"
        )
    return state


def step(
    global_adapter: Mapping[str, np.ndarray],
    mean_delta: Mapping[str, np.ndarray],
    state: OptimizerState,
    cfg: ServerOptimizer,
) -> tuple[dict[str, np.ndarray], OptimizerState]:
    """One server step: ``(new_global, new_state)``; neither input is modified."""
    if set(mean_delta) != set(global_adapter):
        raise ValueError("the delta and the global adapter hold different tensor names")
    for k, d in mean_delta.items():
        if d.shape != global_adapter[k].shape:
            raise ValueError(f"{k}: delta shape {d.shape}, global {global_adapter[k].shape}")
    lr = cfg.server_lr
    d64 = {k: np.asarray(d, dtype=np.float64) for k, d in mean_delta.items()}
    if cfg.kind == "sgd":
        new = OptimizerState(state.num_steps + 1)
        return apply_delta(global_adapter, {k: lr * d for k, d in d64.items()}), new
    m_prev = _moments(state.m, d64, 0.0, "first")
    if cfg.kind == "avgm":
        m = {k: cfg.momentum * m_prev[k] + d for k, d in d64.items()}
        new = OptimizerState(state.num_steps + 1, m)
        return apply_delta(global_adapter, {k: lr * m[k] for k in m}), new
    v_prev = _moments(state.v, d64, cfg.tau**2, "second")
    m = {k: cfg.beta1 * m_prev[k] + (1 - cfg.beta1) * d for k, d in d64.items()}
    if cfg.kind == "adam":
        v = {k: cfg.beta2 * v_prev[k] + (1 - cfg.beta2) * d**2 for k, d in d64.items()}
    else:  # yogi
        v = {
            k: v_prev[k] - (1 - cfg.beta2) * d**2 * np.sign(v_prev[k] - d**2)
            for k, d in d64.items()
        }
    update = {k: lr * m[k] / (np.sqrt(v[k]) + cfg.tau) for k in m}
    return apply_delta(global_adapter, update), OptimizerState(state.num_steps + 1, m, v)
