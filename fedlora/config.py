"""The run configuration: one validated dataclass, read from Flower's run config or a TOML file.

Keys are written with dashes on the outside (``num-server-rounds``), as in ``pyproject.toml``'s
``[tool.flwr.app.config]`` and in ``--run-config``; fields use underscores. Unknown keys, wrong
types and out-of-range values fail at construction with a one-line message naming the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.data.drugreview import SITES
from fedlora.errors import ConfigError
from fedlora.lora import LoraSettings

if TYPE_CHECKING:
    from fedlora.server.strategies import ServerOptimizer

QUANTIZATIONS = ("nf4", "int8", "bf16", "fp32")


@dataclass(frozen=True)
class RunConfig:
    base_model: str = "default"  # "default" (packaged SmolLM2-135M-Instruct) or a model folder
    quantization: str = "nf4"  # how nodes load the frozen base: nf4 | int8 | bf16 | fp32
    num_server_rounds: int = 3  # federated rounds
    local_steps: int = 5  # optimizer steps per node per round
    batch_size: int = 4  # examples per step
    lr: float = 3e-4  # AdamW learning rate for the LoRA tensors
    max_length: int = 256  # tokens per example; longer reviews are cut
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling numerator (update scaled by alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA path
    target_modules: str = "all-linear"  # "all-linear" or comma-separated module names
    strategy: str = "fedit"  # fedit | ffa-lora | fedsa-lora | fedex-lora (fedlora.server.strategies)
    server_optimizer: str = "sgd"  # sgd (FedAvg) | avgm | adam | yogi, on the aggregated delta
    server_lr: float = 0.0  # server learning rate; 0 = the optimizer's default (1 sgd/avgm, 0.01)
    aggregation: str = "mean"  # mean (example-weighted) | median | trimmed-mean (robust, unweighted)
    trim_fraction: float = 0.1  # trimmed-mean: share of values cut at each end per coordinate
    clip_norm: float = 0.0  # per-client L2 bound on the delta before aggregation; 0 = off
    seed: int = 0  # seeds the initial adapter and every node's sampling
    min_nodes: int = 1  # nodes needed to start a round, and usable replies to aggregate one
    min_available_nodes: int = 0  # nodes to wait for before sampling; 0 = min-nodes
    fraction_train: float = 1.0  # share of connected nodes sampled for each round
    round_timeout: float = 3600.0  # seconds to wait for replies in a round
    output_dir: str = "runs/latest"  # where global adapters and metrics are written
    resume: bool = False  # continue the run saved in output-dir from its last completed round
    sites: str = ",".join(SITES)  # simulation: node with partition-id i trains on the i-th site

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = type(f.default)
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            if not ok or (isinstance(value, bool) and want is not bool):
                raise ConfigError(f"{_key(f.name)}={value!r}: expected {want.__name__}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization={self.quantization!r}: use one of {QUANTIZATIONS}")
        for name in ("num_server_rounds", "local_steps", "batch_size", "min_nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)}={getattr(self, name)}: must be >= 1")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr={self.lr}: must be in (0, 1), e.g. 3e-4")
        if self.max_length < 32:
            raise ConfigError(f"max-length={self.max_length}: must be >= 32")
        if self.min_available_nodes < 0:
            raise ConfigError(f"min-available-nodes={self.min_available_nodes}: must be >= 0")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train={self.fraction_train}: must be in (0, 1]")
        if self.round_timeout <= 0:
            raise ConfigError(f"round-timeout={self.round_timeout}: must be > 0 seconds")
        from fedlora.server.strategies import STRATEGIES, ServerOptimizer

        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r}: use one of {sorted(STRATEGIES)}")
        try:
            ServerOptimizer(kind=self.server_optimizer, lr=self.server_lr or None)
        except ValueError as exc:
            raise ConfigError(f"server-optimizer={self.server_optimizer!r}, server-lr="
                              f"{self.server_lr}: {exc}") from None
        from fedlora.server.strategies import make_reducer

        try:
            make_reducer(self.aggregation, self.trim_fraction)
        except ValueError as exc:
            raise ConfigError(f"aggregation={self.aggregation!r}, trim-fraction="
                              f"{self.trim_fraction}: {exc}") from None
        if self.clip_norm < 0:
            raise ConfigError(f"clip-norm={self.clip_norm}: must be >= 0 (0 turns it off)")
        if self.strategy == "fedex-lora" and self.aggregation != "mean":
            raise ConfigError("strategy='fedex-lora' is exact only for aggregation='mean': "
                              "use fedit, ffa-lora or fedsa-lora with a robust aggregation")
        if self.strategy == "fedex-lora" and (self.server_optimizer != "sgd"
                                              or self.server_lr not in (0.0, 1.0)):
            raise ConfigError("strategy='fedex-lora' is exact only with server-optimizer='sgd' "
                              "and server-lr=1: drop the server optimizer or pick another strategy")
        unknown = [s for s in self.site_names if s not in SITES]
        if unknown or not self.site_names:
            raise ConfigError(f"sites={self.sites!r}: use comma-separated names from {SITES}")
        _ = self.lora  # building LoraSettings validates the LoRA fields

    @property
    def optimizer(self) -> ServerOptimizer:
        from fedlora.server.strategies import ServerOptimizer

        return ServerOptimizer(kind=self.server_optimizer, lr=self.server_lr or None)

    @property
    def site_names(self) -> list[str]:
        return [s.strip() for s in self.sites.split(",") if s.strip()]

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=float(self.lora_alpha),
                            dropout=float(self.lora_dropout), target_modules=self.target_modules)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> RunConfig:
        """Build from dashed keys; an unknown key fails, naming ``source`` and the known keys."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"{source}: unknown key {key!r}; known keys: "
                                  f"{', '.join(sorted(_key(k) for k in known))}")
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_mapping(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file, failing with the file, line and column of a syntax error."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}: fix the TOML syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def _key(name: str) -> str:
    return name.replace("_", "-")
