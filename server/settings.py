"""The LoRA strategy's settings: one dataclass, checked at construction.

The server app builds it from the run config (fedlora.server.app.strategy_settings); tests build
it directly. DP, clipping and secure aggregation are not settings of the plain strategy: they
are wrappers around it (fedlora.server.wrappers, fedlora.server.secure), composed by
:func:`fedlora.server.build.build_strategy` after the one compatibility table
(fedlora.choices.RULES).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.choices import CODECS
from fedlora.server.bounds import ReplyBounds


@dataclass(frozen=True)
class StrategySettings:
    scale: float = 1.0  # lora_alpha / r: how the strategy scales B @ A
    evaluate_every: int = 0  # federated evaluation every N rounds (and after the last); 0: never
    federated_eval: bool = True  # False: only the central evaluation runs
    num_rounds: int = 0  # rounds of the whole run (the last one is evaluated)
    round_offset: int = 0  # rounds completed before this start (a resumed run)
    round_timeout: float = 3600.0  # seconds to wait for a round's replies (secure rounds)
    codec: str = "none"  # how nodes encode their deltas (protocol/compression.py)
    codec_block: int = 64  # the block size of the int8-block codec
    down_codec: str = "none"  # how the downlink sends a node the change since its version
    seeded: bool = False  # the global adapter is still the seeded initial one nodes derive
    bounds: ReplyBounds = field(default_factory=ReplyBounds)  # weight, norm and global bounds
    site_names: tuple[str, ...] = ()  # a node's site-id indexes this; else node-<id>
    history_file: Path | None = None  # metrics.jsonl: one line per completed round
    # Flower's node sampling (FedAvg), with Flower's defaults
    fraction_train: float = 1.0  # share of connected nodes sampled to train
    fraction_evaluate: float = 1.0  # share sampled to evaluate
    min_train_nodes: int = 2  # nodes to sample, and usable replies needed to aggregate
    min_evaluate_nodes: int = 2  # nodes to sample for evaluation
    min_available_nodes: int = 2  # nodes to wait for before sampling

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale={self.scale}: use lora_alpha / r, a positive number")
        if self.evaluate_every < 0 or self.num_rounds < 0 or self.round_offset < 0:
            raise ValueError(
                f"evaluate_every={self.evaluate_every}, num_rounds={self.num_rounds}, "
                f"round_offset={self.round_offset}: use counts >= 0"
            )
        if not self.round_timeout > 0:
            raise ValueError(f"round_timeout={self.round_timeout}: use seconds > 0")
        if self.codec not in CODECS or self.down_codec not in CODECS:
            raise ValueError(
                f"codec={self.codec!r}, down_codec={self.down_codec!r}: use one of {CODECS}"
            )
        if self.codec_block < 1:
            raise ValueError(f"codec_block={self.codec_block}: use a block of >= 1 values")
        if not (0 <= self.fraction_train <= 1 and 0 <= self.fraction_evaluate <= 1):
            raise ValueError(
                f"fraction_train={self.fraction_train}, fraction_evaluate="
                f"{self.fraction_evaluate}: use shares in [0, 1]"
            )
        object.__setattr__(self, "site_names", tuple(self.site_names))

    def evaluates(self, server_round: int) -> bool:
        """Whether nodes evaluate after ``server_round`` (counted over the whole run)."""
        every = self.evaluate_every
        return every > 0 and (server_round % every == 0 or server_round == self.num_rounds)

    def sampling(self) -> dict[str, Any]:
        """Flower's FedAvg arguments: how nodes are sampled."""
        return {
            "fraction_train": self.fraction_train,
            "fraction_evaluate": self.fraction_evaluate,
            "min_train_nodes": self.min_train_nodes,
            "min_evaluate_nodes": self.min_evaluate_nodes,
            "min_available_nodes": self.min_available_nodes,
        }

    def site_name(self, site_id: int, node_id: int) -> str:
        """The name of the site a node reports (an index into ``site_names``), else node-<id>."""
        if 0 <= site_id < len(self.site_names):
            return self.site_names[site_id]
        return f"node-{node_id}"
