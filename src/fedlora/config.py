"""The run configuration: one validated dataclass, read from Flower's run config or a TOML file.

Keys are written with dashes on the outside (``num-server-rounds``), as in ``pyproject.toml``'s
``[tool.flwr.app.config]`` and in ``--run-config``; fields use underscores. Unknown keys, wrong
types and out-of-range values fail at construction with a one-line message naming the key.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedlora.choices import (
    AGGREGATIONS,
    CODECS,
    DP_ACCOUNTANTS,
    LOSSES,
    OBJECTIVES,
    QUANTIZATIONS,
    SCHEDULES,
    SERVER_OPTIMIZERS,
    STRATEGIES,
    Combination,
    compatibility_problem,
)
from fedlora.data.drugreview import SITES
from fedlora.errors import ConfigError
from fedlora.lora import LoraSettings
from fedlora.ranges import RANGES

TRACKERS = ("none", "mlflow", "tensorboard")  # experiment trackers (server/tracking.py)


# What a deployment (`flwr run`: [tool.flwr.app.config] in pyproject.toml) changes from
# RunConfig's defaults, and nothing else (tests/test_config.py): secure aggregation is on there
# by default. A simulation keeps it off unless asked, because it refuses fedex-lora, the robust
# aggregations, a server-side clip-norm and single-node runs, which simulate and compare offer.
DEPLOYMENT_DEFAULTS: dict[str, Any] = {"secure-aggregation": True, "min-nodes": 2}


@dataclass(frozen=True)
class RunConfig:
    base_model: str = "default"  # "default" (packaged SmolLM2-135M-Instruct) or a model folder
    # frozen base: nf4 | int8 | quanto-int4 | quanto-int8 | auto | bf16 | fp32
    quantization: str = "nf4"
    # The default recipe (make bench-quality, README): 6 rounds x 5 local steps at lr 1e-3. Fewer
    # local steps between averages keep non-IID sites from drifting apart: at the same 150 client
    # steps, 3 x 10 at lr 5e-4 scored 78.7% and 6 x 5 at lr 1e-3 84.7% against centralized 86.0%.
    num_server_rounds: int = 6  # federated rounds
    local_steps: int = 5  # optimizer steps per node per round
    batch_size: int = 4  # examples per step
    lr: float = 1e-3  # AdamW learning rate for the LoRA tensors
    max_length: int = 256  # tokens per example; longer reviews are cut
    lora_r: int = 8  # LoRA rank (with lora-r-max: the rank of nodes that set none of their own)
    # Heterogeneous ranks: the adapter's rank on the wire; each node trains the first lora-r
    # components (its node setting, <= this) and sends them zero-padded; 0 = lora-r for all
    lora_r_max: int = 0
    # simulation: ranks given to the simulated nodes in turn (partition-id i trains at the
    # (i mod n)-th), e.g. "4,16" (a TOML list works too); needs lora-r-max; "" = lora-r for all
    client_ranks: str = ""
    lora_alpha: float = 16.0  # LoRA scaling numerator (update scaled by alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA path (0: none, and ~1.8x faster on CPU)
    target_modules: str = "all-linear"  # "all-linear" or comma-separated module names
    lora_rslora: bool = False  # rank-stabilised LoRA scaling alpha / sqrt(r)
    lora_layers: int = 0  # LoRA on the last N transformer layers only; 0 = every layer
    local_epochs: float = 0.0  # > 0: passes over each node's data per round, instead of local-steps
    grad_accum: int = 1  # micro-batches (of batch-size) per optimizer step
    warmup_steps: int = 0  # linear learning-rate warmup at the start of each round
    lr_schedule: str = "constant"  # after warmup: constant | cosine | linear (decay to 0)
    max_grad_norm: float = 1.0  # gradient clip on nodes (global L2); 0 = off
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA tensors
    loss: str = "completion"  # completion (answer tokens only) | full (every token)
    # sft (next-token loss) | dpo (preference pairs: DPO against the frozen base, docs/simulate.md)
    objective: str = "sft"
    dpo_beta: float = 0.1  # DPO: scale of the implicit reward beta * (log pi - log ref); > 0
    # DPO: weight of the chosen answers' next-token loss added to it (RPO; TRL's "sft" loss)
    dpo_sft_weight: float = 0.0
    packing: bool = False  # pack several examples into each row of max-length tokens
    length_grouping: int = 8  # sort each N batches' examples by length (less padding); 1 = off
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    eval_fraction: float = 0.1  # share of each node's examples held out (seeded) for evaluation
    evaluate_every: int = 1  # federated evaluation every N rounds and after the last; 0 = off
    fraction_evaluate: float = 1.0  # share of connected nodes asked to evaluate
    federated_eval: bool = True  # nodes evaluate on their own held-out split (false: only the
    # server's central-eval scores, e.g. many simulated clients with a few examples each)
    eval_labels: str = ""  # label task: comma-separated answers scored for accuracy ("" = none;
    # the packaged drug reviews always use negative,neutral,positive)
    central_eval: str = ""  # server-held test data: "" (off), "drugreview" or a data file/folder
    central_eval_samples: int = 150  # central evaluation uses the first N examples
    secure_aggregation: bool = False  # SecAgg+: the server learns only the sum of the updates
    secagg_clip_norm: float = 10.0  # SecAgg+: nodes clip their delta to this L2 norm (reported)
    secagg_num_shares: int = 5  # SecAgg+: shares per secret (neighbours + self); capped at nodes
    secagg_threshold: int = 4  # SecAgg+: shares needed to reconstruct; > half the shares (raised
    # per round to (holders + secagg-corrupt-nodes) // 2 + 1 where that is more)
    secagg_corrupt_nodes: int = 1  # SecAgg+: nodes assumed to collude with the server
    secagg_wire_bits: int = 64  # SecAgg+: masked values travel as 16/32/64-bit integers
    # (narrow: quantized after weighting)
    codec: str = "none"  # how nodes encode their delta: none | fp16 | int8 | int8-block
    codec_block: int = 64  # int8-block: values per scale
    down_codec: str = "none"  # server -> node: none (exact float32 every round) | fp16 | int8 |
    # int8-block (the change since the version the node holds; exact to a node holding none)
    dp_noise_multiplier: float = 0.0  # client-level DP: noise std on the sum = z * clip; 0 = off
    dp_clip_norm: float = 1.0  # DP: L2 bound on each node's delta
    dp_delta: float = 1e-5  # DP: the delta of (epsilon, delta); below 1 / number of nodes
    dp_accountant: str = "rdp"  # DP accounting (dp-accounting): rdp | pld
    # fedit | ffa-lora | fedsa-lora | fedex-lora | fed-sb (fedlora.server.strategies); for mixed
    # ranks (lora-r-max): zero-pad | hetlora | flexlora
    strategy: str = "fedit"
    server_optimizer: str = "sgd"  # sgd (FedAvg) | avgm | adam | yogi, on the aggregated delta
    server_lr: float = 0.0  # server learning rate; 0 = the optimizer's default (1 sgd/avgm, 0.01)
    aggregation: str = (
        "mean"  # mean (example-weighted) | median | trimmed-mean (robust, unweighted)
    )
    trim_fraction: float = 0.1  # trimmed-mean: share of values cut at each end per coordinate
    clip_norm: float = 0.0  # per-client L2 bound on the delta before aggregation; 0 = off
    # Bounds on one node's reply (server/bounds.py): its example weight is clipped to this (0: 4x
    # the round's lower median claim; under SecAgg+ it also caps the nodes' encoders)
    max_examples_per_node: int = 0
    norm_bound_factor: float = 3.0  # plain path: deltas clipped to this x the round's lower
    # median L2 norm; 0 = off
    seed: int = 0  # seeds the initial adapter and every node's sampling
    min_nodes: int = 1  # nodes needed to start a round, and usable replies to aggregate one
    min_available_nodes: int = 0  # nodes to wait for before sampling; 0 = min-nodes
    fraction_train: float = 1.0  # share of connected nodes sampled for each round
    round_timeout: float = 3600.0  # seconds to wait for replies in a round
    output_dir: str = "runs/latest"  # where global adapters and metrics are written
    resume: bool = False  # continue the run saved in output-dir from its last completed round
    sites: str = ",".join(SITES)  # simulation: node with partition-id i trains on the i-th site
    tracking: str = "none"  # experiment tracking: none | mlflow | tensorboard (server/tracking.py)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = type(f.default)
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            if not ok or (isinstance(value, bool) and want is not bool):
                raise ConfigError(f"{_key(f.name)}={value!r}: expected {want.__name__}")
            if want is float and not _finite(value):
                raise ConfigError(f"{_key(f.name)}={value!r}: must be a finite number")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization={self.quantization!r}: use one of {QUANTIZATIONS}")
        _check_ranges(self)
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr={self.lr}: must be in (0, 1), e.g. 3e-4")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}: use one of {LOSSES}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r}: use one of {OBJECTIVES}")
        if self.dpo_beta <= 0:
            raise ConfigError(f"dpo-beta={self.dpo_beta}: must be > 0, e.g. 0.1")
        if self.dpo_sft_weight > 0 and self.objective != "dpo":
            raise ConfigError(
                f'dpo-sft-weight={self.dpo_sft_weight} applies to objective = "dpo" only '
                f'(this run\'s is {self.objective!r}): set objective = "dpo" or remove it'
            )
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr-schedule={self.lr_schedule!r}: use one of {SCHEDULES}")
        if self.local_epochs == 0 and self.warmup_steps > self.local_steps:
            raise ConfigError(
                f"warmup-steps={self.warmup_steps} exceeds local-steps={self.local_steps}"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval-fraction={self.eval_fraction}: must be in [0, 1)")
        if not 0 < self.fraction_evaluate <= 1:
            raise ConfigError(f"fraction-evaluate={self.fraction_evaluate}: must be in (0, 1]")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train={self.fraction_train}: must be in (0, 1]")
        if self.round_timeout <= 0:
            raise ConfigError(f"round-timeout={self.round_timeout}: must be > 0 seconds")
        self._check_aggregation()
        if self.secure_aggregation:
            self._check_secure_aggregation()
        if self.secagg_wire_bits not in (16, 32, 64):
            raise ConfigError(f"secagg-wire-bits={self.secagg_wire_bits}: use 16, 32 or 64")
        if self.codec not in CODECS:
            raise ConfigError(f"codec={self.codec!r}: use one of {CODECS}")
        if self.down_codec not in CODECS:
            raise ConfigError(f"down-codec={self.down_codec!r}: use one of {CODECS}")
        self._check_privacy()
        if self.tracking not in TRACKERS:
            raise ConfigError(f"tracking={self.tracking!r}: use one of {TRACKERS}")
        unknown = [s for s in self.site_names if s not in SITES]
        if unknown or not self.site_names:
            raise ConfigError(f"sites={self.sites!r}: use comma-separated names from {SITES}")
        _ = self.lora  # building LoraSettings validates the LoRA fields
        self._check_ranks()

    # Which strategy, reducer, optimizer, secure aggregation and DP go together is decided by
    # the one table in fedlora.choices (RULES); the server's strategy builder reads it too.

    def _check_aggregation(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r}: use one of {STRATEGIES}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ConfigError(
                f"server-optimizer={self.server_optimizer!r}: use one of {SERVER_OPTIMIZERS}"
            )
        if self.server_lr < 0:
            raise ConfigError(
                f"server-lr={self.server_lr}: must be > 0, or 0 for the optimizer's default"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation={self.aggregation!r}: use one of {AGGREGATIONS}")
        if self.aggregation == "trimmed-mean" and not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(
                f"trim-fraction={self.trim_fraction}: must be in [0, 0.5), the share of "
                f"updates cut at each end (e.g. 0.1)"
            )
        if self.max_examples_per_node < 0 or self.norm_bound_factor < 0:
            raise ConfigError(
                f"max-examples-per-node={self.max_examples_per_node}, norm-bound-factor="
                f"{self.norm_bound_factor}: must be >= 0 (0: automatic / off)"
            )
        if self.clip_norm < 0:
            raise ConfigError(f"clip-norm={self.clip_norm}: must be >= 0 (0 turns it off)")
        combination = Combination(
            self.strategy,
            self.aggregation,
            secure=self.secure_aggregation,
            dp=self.dp_noise_multiplier > 0,
            server_clip=self.clip_norm > 0,
            server_optimizer=self.server_optimizer,
            server_lr=self.server_lr,
            codec=self.codec,
            mixed_ranks=self.heterogeneous,
        )
        problem = compatibility_problem(combination)  # the one table, fedlora.choices.RULES
        if problem:
            raise ConfigError(problem)

    def _check_ranks(self) -> None:
        if self.lora_r_max and self.lora_r > self.lora_r_max:
            raise ConfigError(
                f"lora-r={self.lora_r} exceeds lora-r-max={self.lora_r_max}: nodes train at "
                f"most the adapter's rank; raise lora-r-max or lower lora-r"
            )
        ranks = self.node_ranks
        if ranks and not self.lora_r_max:
            raise ConfigError(
                f"client-ranks={self.client_ranks!r} needs lora-r-max (the adapter's rank on "
                f"the wire, >= every client rank), e.g. lora-r-max={max(ranks)}"
            )
        if any(r > self.lora_r_max for r in ranks):
            raise ConfigError(
                f"client-ranks={self.client_ranks!r}: a rank exceeds lora-r-max="
                f"{self.lora_r_max}; use ranks in 1..{self.lora_r_max}"
            )

    @property
    def node_ranks(self) -> list[int]:
        """The simulated nodes' ranks from client-ranks (empty: lora-r for all)."""
        return parse_ranks(self.client_ranks)

    @property
    def heterogeneous(self) -> bool:
        """Whether nodes may train different ranks (lora-r-max above lora-r, or client-ranks)."""
        return bool(self.client_ranks.strip()) or self.lora_r_max not in (0, self.lora_r)

    def _check_secure_aggregation(self) -> None:
        if self.min_nodes < 2:
            raise ConfigError(
                f"secure-aggregation=true with min-nodes={self.min_nodes}: "
                f"the sum of one node's update is that update; set min-nodes "
                f">= 2, or secure-aggregation=false for a single site"
            )
        if (
            self.secagg_clip_norm <= 0
            or self.secagg_num_shares < 3
            or not self.secagg_num_shares // 2 < self.secagg_threshold <= self.secagg_num_shares
        ):
            raise ConfigError(
                f"secagg-clip-norm={self.secagg_clip_norm}, secagg-num-shares="
                f"{self.secagg_num_shares}, secagg-threshold="
                f"{self.secagg_threshold}: need clip > 0, shares >= 3 and "
                f"shares/2 < threshold <= shares"
            )
        if not 0 <= self.secagg_corrupt_nodes <= (self.secagg_num_shares - 3) // 2 + 1:
            raise ConfigError(
                f"secagg-corrupt-nodes={self.secagg_corrupt_nodes} with secagg-num-shares="
                f"{self.secagg_num_shares}: use 0..{(self.secagg_num_shares - 3) // 2 + 1}, or "
                f"more shares (each secret needs 2 x threshold > holders + corrupt nodes)"
            )

    def _check_privacy(self) -> None:
        if self.dp_noise_multiplier < 0:
            raise ConfigError(f"dp-noise-multiplier={self.dp_noise_multiplier}: must be >= 0")
        if self.dp_noise_multiplier == 0:
            return
        if self.dp_clip_norm <= 0:
            raise ConfigError(
                f"dp-clip-norm={self.dp_clip_norm}: must be > 0, e.g. about the "
                f"median L2 norm of clients' deltas without DP"
            )
        if not 0 < self.dp_delta < 1:
            raise ConfigError(
                f"dp-delta={self.dp_delta}: must be in (0, 1), well below "
                f"1 / number of clients (e.g. 1e-5)"
            )
        if self.dp_accountant not in DP_ACCOUNTANTS:
            raise ConfigError(f"dp-accountant={self.dp_accountant!r}: use one of {DP_ACCOUNTANTS}")

    @property
    def site_names(self) -> list[str]:
        return [s.strip() for s in self.sites.split(",") if s.strip()]

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(
            r=self.lora_r_max or self.lora_r,  # the adapter's rank (every node's on the wire)
            alpha=float(self.lora_alpha),
            dropout=float(self.lora_dropout),
            target_modules=self.target_modules,
            rslora=self.lora_rslora,
            sb=self.strategy == "fed-sb",
            layers=self.lora_layers,
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> RunConfig:
        """Build from dashed keys; an unknown key fails, naming ``source`` and the known keys."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"{source}: unknown key {key!r}; known keys: "
                    f"{', '.join(sorted(_key(k) for k in known))}"
                )
            kwargs[name] = value
        if isinstance(kwargs.get("client_ranks"), list):  # a TOML list: 4, 16 -> "4,16"
            kwargs["client_ranks"] = ",".join(str(r) for r in kwargs["client_ranks"])
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_mapping(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}


def parse_ranks(text: str) -> list[int]:
    """``"4,16"`` -> ``[4, 16]``; ConfigError naming client-ranks for anything else."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ConfigError(
            f"client-ranks={text!r}: use positive whole ranks separated by commas, e.g. '4,16'"
        )
    return [int(p) for p in parts]


def _check_ranges(cfg: RunConfig) -> None:
    """Every setting in :data:`RANGES` within its range; the first one out names it."""
    for name, (low, high) in RANGES.items():
        value = getattr(cfg, name)
        if value < low:
            raise ConfigError(f"{_key(name)}={_show(value)}: must be >= {_show(low)}")
        if value > high:
            raise ConfigError(
                f"{_key(name)}={_show(value)}: must be <= {_show(high)}, past what a run can use"
            )


def _show(value: float) -> str:
    """A number as a message shows it: ints whole (not 1e+06), at most 24 characters."""
    text = str(value) if isinstance(value, int) else f"{value:g}"
    return text if len(text) <= 24 else f"{text[:20]}..."


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


def _finite(value: float) -> bool:
    """A number a float holds finitely (no NaN, no inf, no int too large for a float)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _key(name: str) -> str:
    return name.replace("_", "-")
