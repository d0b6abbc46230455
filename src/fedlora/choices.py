"""The allowed values of every named setting, in one torch- and Flower-free place.

The run config (``fedlora.config``) validates against these lists; each room's registry holds
the implementations under the same names (client/quantization.py: backends; protocol/
compression.py: codecs; server/strategies: strategies, reducers, server optimizers), and
``tests/test_choices.py`` checks that the names here and the registries agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Frozen-base quantization backends (client/quantization.py), the default first.
QUANTIZATIONS: tuple[str, ...] = (
    "nf4",
    "int8",
    "quanto-int4",
    "quanto-int8",
    "auto",
    "bf16",
    "fp32",
)
# Training loss: answer tokens only, or every token (fedlora.encoding).
LOSSES: tuple[str, ...] = ("completion", "full")
OBJECTIVES: tuple[str, ...] = ("sft", "dpo")  # next-token loss | DPO on preference pairs
# Learning-rate schedule after warmup (client/train.py).
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")
# Wire encodings of a node's delta (protocol/compression.py).
CODECS: tuple[str, ...] = ("none", "fp16", "int8", "int8-block")
# LoRA aggregation strategies (server/strategies/).
STRATEGIES: tuple[str, ...] = (
    "fedit",
    "ffa-lora",
    "fedsa-lora",
    "fedex-lora",
    "fed-sb",
    "zero-pad",
    "hetlora",
    "flexlora",
)
# Server optimizers on the aggregated delta (server/strategies/optimizers.py).
SERVER_OPTIMIZERS: tuple[str, ...] = ("sgd", "avgm", "adam", "yogi")
# How deltas are combined (server/strategies/robust.py).
AGGREGATIONS: tuple[str, ...] = ("mean", "median", "trimmed-mean")
# Privacy accountants (dp-accounting) for client-level DP.
DP_ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")

# ---- What goes with what: the ONE compatibility table ---------------------------------------
# Every check (the run config, the server's strategy builder, SecAgg+'s composability check) and
# every message about strategy x secure aggregation x DP x server clip x optimizer x codec reads
# the rows below; tests/test_choices.py checks them against the strategies' own flags.


@dataclass(frozen=True)
class StrategyTraits:
    sum_only: bool  # its aggregate needs only the weighted sum of the deltas (SecAgg+, DP)
    robust: bool  # exact with median / trimmed-mean too (else: aggregation='mean' only)
    any_optimizer: bool  # exact with every server optimizer (else: sgd at lr 1 only)
    mixed_ranks: bool = False  # aggregates clients of different ranks (zero-padded to r_max)


STRATEGY_TRAITS: dict[str, StrategyTraits] = {
    "fedit": StrategyTraits(sum_only=True, robust=True, any_optimizer=True),
    "ffa-lora": StrategyTraits(sum_only=True, robust=True, any_optimizer=True),
    "fedsa-lora": StrategyTraits(sum_only=True, robust=True, any_optimizer=True),
    # FedEx-LoRA's residual needs each client's factors and FedAvg's plain step
    "fedex-lora": StrategyTraits(sum_only=False, robust=False, any_optimizer=False),
    "fed-sb": StrategyTraits(sum_only=True, robust=True, any_optimizer=True),
    # Heterogeneous ranks (lora-r-max): zero-padded sums compose with SecAgg+; HetLoRA's norm
    # weights and FlexLoRA's SVD of the products need each client's factors
    "zero-pad": StrategyTraits(sum_only=True, robust=True, any_optimizer=True, mixed_ranks=True),
    "hetlora": StrategyTraits(sum_only=False, robust=False, any_optimizer=True, mixed_ranks=True),
    "flexlora": StrategyTraits(sum_only=False, robust=False, any_optimizer=False, mixed_ranks=True),
}
# Aggregations that are a function of the weighted sum (median and trimmed mean need every update).
SUM_ONLY_AGGREGATIONS: frozenset[str] = frozenset({"mean"})
SUM_ONLY_STRATEGIES: frozenset[str] = frozenset(n for n, t in STRATEGY_TRAITS.items() if t.sum_only)
# Secure aggregation masks 64-bit integers: nodes send plain values, whatever the codec says.
SECURE_WIRE_CODEC = "none"


@dataclass(frozen=True)
class Combination:
    """One run's choices, as the compatibility rules see them."""

    strategy: str
    aggregation: str = "mean"
    secure: bool = False  # secure aggregation (SecAgg+)
    dp: bool = False  # client-level differential privacy (dp-noise-multiplier > 0)
    server_clip: bool = False  # clip-norm > 0: the server clips each update
    server_optimizer: str = "sgd"
    server_lr: float = 0.0  # 0: the optimizer's default
    codec: str = "none"
    mixed_ranks: bool = False  # nodes may train different ranks (lora-r-max, client-ranks)

    @property
    def traits(self) -> StrategyTraits:
        return STRATEGY_TRAITS[self.strategy]

    @property
    def sum_only(self) -> bool:
        return self.traits.sum_only and self.aggregation in SUM_ONLY_AGGREGATIONS


def _names(pick: Callable[[StrategyTraits], bool]) -> str:
    return ", ".join(n for n, t in STRATEGY_TRAITS.items() if pick(t))


# (setting the rule is about, when it is broken, what to say): checked in this order.
RULES: tuple[tuple[str, Callable[[Combination], bool], str], ...] = (
    (
        "strategy",
        lambda c: c.mixed_ranks and not c.traits.mixed_ranks,
        "strategy={strategy!r} needs one rank for all nodes, but lora-r-max or client-ranks "
        "lets ranks differ: use one of "
        + _names(lambda t: t.mixed_ranks)
        + ", or drop lora-r-max and client-ranks",
    ),
    (
        "strategy",
        lambda c: not c.traits.robust and c.aggregation != "mean",
        "strategy={strategy!r} is exact only for aggregation='mean': use one of "
        + _names(lambda t: t.robust)
        + " with a robust aggregation",
    ),
    (
        "strategy",
        lambda c: (
            not c.traits.any_optimizer
            and (c.server_optimizer != "sgd" or c.server_lr not in (0.0, 1.0))
        ),
        "strategy={strategy!r} is exact only with server-optimizer='sgd' and server-lr=1: "
        "drop the server optimizer or pick another strategy",
    ),
    (
        "secure-aggregation",
        lambda c: c.secure and not c.sum_only,
        "secure-aggregation=true: strategy {strategy!r} with the {aggregation!r} aggregation "
        "needs each client's update, which secure aggregation hides: use aggregation='mean' with "
        + _names(lambda t: t.sum_only)
        + ", or turn secure aggregation off",
    ),
    (
        "secure-aggregation",
        lambda c: c.secure and c.server_clip,
        "secure-aggregation=true: clip-norm clips each update on the server, which secure "
        "aggregation hides: set "
        "clip-norm=0 and use secagg-clip-norm",
    ),
    (
        "dp",
        lambda c: c.dp and (not c.sum_only or c.server_clip),
        "dp-noise-multiplier > 0 needs the plain mean of clipped deltas: use one of "
        + _names(lambda t: t.sum_only)
        + " with aggregation=mean and clip-norm=0 (DP clips to dp-clip-norm)",
    ),
)


def compatibility_problem(combination: Combination, about: str | None = None) -> str | None:
    """The first rule ``combination`` breaks (only rules about ``about`` when given), or None."""
    for topic, broken, message in RULES:
        if (about is None or topic == about) and broken(combination):
            return message.format(**vars(combination))
    return None


def wire_codec(codec: str, secure: bool) -> str:
    """How nodes encode their deltas: the run's codec, or none under secure aggregation."""
    return SECURE_WIRE_CODEC if secure else codec


def secure_aggregation_problem(strategy: str, aggregation: str) -> str | None:
    """Why ``strategy`` with ``aggregation`` cannot run under secure aggregation, or None."""
    combination = Combination(strategy, aggregation, secure=True)
    return compatibility_problem(combination, about="secure-aggregation")
