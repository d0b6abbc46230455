"""The allowed values of every named setting, in one torch- and Flower-free place.

The run config (``fedlora.config``) validates against these lists; each room's registry holds
the implementations under the same names (client/quantization.py: backends; protocol/
compression.py: codecs; server/strategies: strategies, reducers, server optimizers), and
``tests/test_choices.py`` checks that the names here and the registries agree.
"""

from __future__ import annotations

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
# Learning-rate schedule after warmup (client/train.py).
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")
# Wire encodings of a node's delta (protocol/compression.py).
CODECS: tuple[str, ...] = ("none", "fp16", "int8", "int8-block")
# LoRA aggregation strategies (server/strategies/).
STRATEGIES: tuple[str, ...] = ("fedit", "ffa-lora", "fedsa-lora", "fedex-lora", "fed-sb")
# Server optimizers on the aggregated delta (server/strategies/optimizers.py).
SERVER_OPTIMIZERS: tuple[str, ...] = ("sgd", "avgm", "adam", "yogi")
# How deltas are combined (server/strategies/robust.py).
AGGREGATIONS: tuple[str, ...] = ("mean", "median", "trimmed-mean")
# Privacy accountants (dp-accounting) for client-level DP.
DP_ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")

# Strategies whose aggregate is a function of the weighted sum of the deltas only, so that they
# run under secure aggregation (which reveals nothing else) with the "mean" aggregation.
# FedEx-LoRA needs each client's factors for its residual; median and trimmed mean need every
# individual update.
SUM_ONLY_STRATEGIES: frozenset[str] = frozenset({"fedit", "ffa-lora", "fedsa-lora", "fed-sb"})
SUM_ONLY_AGGREGATIONS: frozenset[str] = frozenset({"mean"})


def secure_aggregation_problem(strategy: str, aggregation: str) -> str | None:
    """Why ``strategy`` with ``aggregation`` cannot run under secure aggregation, or None."""
    if strategy in SUM_ONLY_STRATEGIES and aggregation in SUM_ONLY_AGGREGATIONS:
        return None
    return (
        f"strategy {strategy!r} with the {aggregation!r} aggregation needs each client's "
        f"update, which secure aggregation hides: use aggregation='mean' with "
        f"{', '.join(sorted(SUM_ONLY_STRATEGIES))}, or turn secure aggregation off"
    )
