"""LoRA aggregation strategies and server optimizers, one small file each, with a registry.

Strategies (``get_strategy(name)``): ``fedit`` (FedIT, the baseline), ``ffa-lora`` (A frozen, B
averaged; exact), ``fedsa-lora`` (A averaged, B personal), ``fedex-lora`` (FedIT plus an exact
dense residual), ``fed-sb`` (A and B frozen, the r x r matrix R between them averaged; exact);
for clients of different ranks (zero-padded to lora-r-max): ``zero-pad`` (the padded factors
averaged), ``hetlora`` (weighted by each client's update norm), ``flexlora`` (the mean of the
clients' products, factored back by SVD). Server optimizers (:mod:`.optimizers`): FedAvg,
FedAvgM, FedAdam, FedYogi on any strategy's aggregated delta. :func:`needs_individual_updates`
tells secure aggregation which strategies it must refuse. Numpy only: no torch, no flwr.
"""

from __future__ import annotations

from fedlora.server.strategies.base import (
    AggregationResult,
    ClientUpdate,
    LoraAggregator,
    layer_pairs,
)
from fedlora.server.strategies.fed_sb import FedSB
from fedlora.server.strategies.fedex_lora import FedExLoRA
from fedlora.server.strategies.fedit import FedIT
from fedlora.server.strategies.fedsa_lora import FedSALoRA
from fedlora.server.strategies.ffa_lora import FFALoRA
from fedlora.server.strategies.flexlora import FlexLoRA
from fedlora.server.strategies.hetlora import HetLoRA
from fedlora.server.strategies.optimizers import OptimizerState, ServerOptimizer, step
from fedlora.server.strategies.robust import Reducer, make_reducer
from fedlora.server.strategies.zero_pad import ZeroPad

STRATEGIES: dict[str, type[LoraAggregator]] = {
    cls.name: cls
    for cls in (FedIT, FFALoRA, FedSALoRA, FedExLoRA, FedSB, ZeroPad, HetLoRA, FlexLoRA)
}


def _lookup(name: str) -> type[LoraAggregator]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def get_strategy(name: str, reducer: Reducer | None = None) -> LoraAggregator:
    """A new instance of the strategy registered as ``name``, reducing updates with ``reducer``."""
    return _lookup(name)(reducer)


def needs_individual_updates(name: str, reducer: str = "mean") -> bool:
    """True when the strategy needs each client's update (so secure aggregation must refuse it)."""
    return _lookup(name).needs_individual_updates or reducer != "mean"


__all__ = [
    "STRATEGIES",
    "AggregationResult",
    "ClientUpdate",
    "FFALoRA",
    "FedExLoRA",
    "FedIT",
    "FedSALoRA",
    "FedSB",
    "FlexLoRA",
    "HetLoRA",
    "LoraAggregator",
    "OptimizerState",
    "Reducer",
    "ServerOptimizer",
    "ZeroPad",
    "get_strategy",
    "layer_pairs",
    "make_reducer",
    "needs_individual_updates",
    "step",
]
