"""What every LoRA aggregation strategy shares: client updates, results, layer pairing, checks.

A LoRA layer holds two factors, named as in a PEFT adapter file: ``<prefix>.lora_A.weight`` of
shape (r, in) and ``<prefix>.lora_B.weight`` of shape (out, r); its weight update is
``scale * B @ A`` with ``scale = lora_alpha / r`` (Hu et al., 2021, arXiv:2106.09685). Clients
send *deltas* (their adapter minus the global one) and a number of examples, the weight.

A strategy subclasses :class:`LoraAggregator`, declares which factors clients send and whether it
needs each client's update on its own (secure aggregation only reveals the weighted sum), and
overrides one method, :meth:`LoraAggregator.combine`. Everything here is numpy only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fedlora.server.aggregate import apply_delta, weighted_mean
from fedlora.server.strategies.robust import Reducer

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
R_SUFFIX = ".lora_R.weight"  # LoRA-SB's r x r matrix between B and A (Fed-SB)
Arrays = dict[str, np.ndarray]
LayerPair = tuple[str, str]  # (name of A, name of B)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its adapter delta (local minus global) and its number of examples."""

    delta: Mapping[str, np.ndarray]
    num_examples: int

    def __post_init__(self) -> None:
        if self.num_examples < 0:
            raise ValueError(
                f"num_examples is {self.num_examples}; send the number of training "
                f"examples the client used (>= 0)"
            )


@dataclass(frozen=True)
class AggregationResult:
    """The outcome of one round of aggregation.

    ``delta`` is the aggregated pseudo-gradient (``new_global - global``, every tensor name,
    zeros where a factor does not move): a server optimizer may act on it instead.
    ``residuals`` maps a layer's module prefix (the name without ``.lora_A.weight``) to a dense
    (out, in) weight-space correction that the adapter's factors cannot express; empty for
    strategies that keep none.
    """

    new_global: Arrays
    delta: Arrays
    residuals: Arrays = field(default_factory=dict)


def layer_pairs(names: Iterable[str]) -> dict[str, LayerPair]:
    """Group LoRA tensor names by layer: ``{prefix: (a_name, b_name)}``, sorted by prefix.

    LoRA-SB's ``lora_R`` tensors are allowed beside the pairs (see :func:`check_adapter`).
    """
    a_of: dict[str, str] = {}
    b_of: dict[str, str] = {}
    for name in names:
        if name.endswith(R_SUFFIX):
            continue
        if name.endswith(A_SUFFIX):
            a_of[name[: -len(A_SUFFIX)]] = name
        elif name.endswith(B_SUFFIX):
            b_of[name[: -len(B_SUFFIX)]] = name
        else:
            raise ValueError(
                f"{name}: not a LoRA factor (expected a name ending in {A_SUFFIX} or {B_SUFFIX})"
            )
    for lonely, other, have in (
        (set(a_of) - set(b_of), B_SUFFIX, a_of),
        (set(b_of) - set(a_of), A_SUFFIX, b_of),
    ):
        if lonely:
            first = sorted(lonely)[0]
            raise ValueError(
                f"{have[first]} has no partner {first}{other} ({len(lonely)} "
                f"unpaired layers): every LoRA layer needs both factors"
            )
    return {p: (a_of[p], b_of[p]) for p in sorted(a_of)}


def check_adapter(adapter: Mapping[str, np.ndarray]) -> dict[str, LayerPair]:
    """The adapter's layer pairs, after checking that A is (r, in) and B is (out, r) (and any
    LoRA-SB R is (r, r), with one per layer or none at all)."""
    pairs = layer_pairs(adapter)
    r_names = {n[: -len(R_SUFFIX)] for n in adapter if n.endswith(R_SUFFIX)}
    if r_names and r_names != set(pairs):
        odd = sorted(r_names ^ set(pairs))[0]
        raise ValueError(f"{odd}: a LoRA-SB adapter needs one lora_R per layer, and only those")
    for prefix, (a_name, b_name) in pairs.items():
        a, b = adapter[a_name], adapter[b_name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{a_name} has shape {a.shape} and {b_name} {b.shape}: expected "
                f"A (r, in) and B (out, r) with the same rank r"
            )
        if r_names and adapter[prefix + R_SUFFIX].shape != (a.shape[0], a.shape[0]):
            raise ValueError(
                f"{prefix + R_SUFFIX} has shape {adapter[prefix + R_SUFFIX].shape}: "
                f"expected ({a.shape[0]}, {a.shape[0]}) for rank {a.shape[0]}"
            )
    return pairs


def check_updates(
    global_adapter: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    required: Iterable[str],
) -> None:
    """Every update holds the ``required`` names, nothing unknown, with the global's shapes."""
    if not updates:
        raise ValueError("no client updates to aggregate: drop the round instead")
    need = set(required)
    for k, update in enumerate(updates):
        missing = sorted(need - set(update.delta))
        unknown = sorted(set(update.delta) - set(global_adapter))
        if missing or unknown:
            raise ValueError(
                f"client update {k}: missing {missing[:1]}, unknown {unknown[:1]} "
                f"({len(missing)} missing, {len(unknown)} unknown tensor names)"
            )
        for name, arr in update.delta.items():
            want = global_adapter[name].shape
            if arr.shape != want:
                raise ValueError(
                    f"client update {k}: {name} has shape {arr.shape}, the global adapter {want}"
                )
            if not np.isfinite(arr).all():
                raise ValueError(f"client update {k}: {name} holds NaN or Inf")


def mean_delta(updates: Sequence[ClientUpdate], names: Iterable[str]) -> Arrays:
    """The example-weighted mean of the updates' ``names`` (float64 accumulation)."""
    keep = sorted(names)
    return weighted_mean(
        [{n: u.delta[n] for n in keep} for u in updates], [u.num_examples for u in updates]
    )


def refuse_moved(
    updates: Sequence[ClientUpdate], frozen: Iterable[str], rule: str, fix: str
) -> None:
    """ValueError naming the first update that changed a ``frozen`` tensor (absent is fine)."""
    names = list(frozen)
    for k, update in enumerate(updates):
        for name in names:
            if name in update.delta and np.any(update.delta[name] != 0):
                largest = float(np.max(np.abs(update.delta[name])))
                raise ValueError(
                    f"{rule}: client update {k} changed {name} (largest |delta| "
                    f"{largest:.3g}); {fix}"
                )


def zeros_like(adapter: Mapping[str, np.ndarray], names: Iterable[str]) -> Arrays:
    """Zero tensors shaped and typed like ``adapter[name]`` for each name."""
    return {n: np.zeros_like(adapter[n]) for n in names}


class LoraAggregator(ABC):
    """A LoRA aggregation strategy: validate the updates, then :meth:`combine` them."""

    name: ClassVar[str]
    needs_individual_updates: ClassVar[bool]  # True: cannot run on a secure-aggregated sum
    sends_a: ClassVar[bool]  # clients train and send their A delta
    sends_b: ClassVar[bool]  # clients train and send their B delta
    trains_a: ClassVar[bool] = True  # False: A stays frozen at the shared init (FFA-LoRA)
    sb: ClassVar[bool] = False  # LoRA-SB: A and B frozen, only R trained and sent (Fed-SB)

    def __init__(self, reducer: Reducer | None = None) -> None:
        self.reducer = reducer or Reducer()  # mean (example-weighted) | median | trimmed-mean

    @property
    def individual_updates_needed(self) -> bool:
        """True when this instance cannot run on a secure-aggregated sum."""
        return self.needs_individual_updates or self.reducer.needs_individual_updates

    @classmethod
    def factors(cls) -> tuple[str, str]:
        """``(train, send)``: the LoRA factors nodes train and those they send ("AB", "A", "B").

        A factor trained but not sent stays personal to the node (FedSA-LoRA's B).
        """
        if cls.sb:
            return "R", "R"
        train = ("A" if cls.trains_a else "") + "B"
        send = ("A" if cls.sends_a else "") + ("B" if cls.sends_b else "")
        return train, send

    def aggregate(
        self,
        global_adapter: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        scale: float = 1.0,
    ) -> AggregationResult:
        """Aggregate ``updates`` into a new global adapter; ``scale`` is lora_alpha / r."""
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale is {scale}; pass lora_alpha / r (a positive number)")
        pairs = check_adapter(global_adapter)
        required = [
            n
            for a, b in pairs.values()
            for n, sent in ((a, self.sends_a), (b, self.sends_b))
            if sent
        ] + [n for n in global_adapter if self.sb and n.endswith(R_SUFFIX)]
        check_updates(global_adapter, updates, required)
        delta, residuals = self.combine(global_adapter, pairs, updates, scale)
        return AggregationResult(apply_delta(global_adapter, delta), delta, residuals)

    @abstractmethod
    def combine(
        self,
        global_adapter: Mapping[str, np.ndarray],
        pairs: Mapping[str, LayerPair],
        updates: Sequence[ClientUpdate],
        scale: float,
    ) -> tuple[Arrays, Arrays]:
        """``(delta, residuals)`` for validated updates; delta holds every global name."""
