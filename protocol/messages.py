"""Typed records on the wire: the server's round config and the client's train reply.

A train message from the server carries ``arrays`` (the global adapter) and ``config`` (a
:class:`RoundConfig`). A client's reply carries ``arrays`` (its adapter *delta*: local adapter minus
the global one it received) and ``metrics`` (only the keys in :data:`TRAIN_METRICS`). Nothing
else may leave a node; :meth:`TrainReply.to_content` is the only constructor of a reply.

Parsing goes through :mod:`fedlora.protocol.gate`: arrays are checked against the expected wire
spec before a byte is decoded, metrics against the one metric table (type and range), and the
round config against :data:`ROUND_BOUNDS`. Every problem is a :class:`ProtocolError`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.choices import OBJECTIVES
from fedlora.errors import WireError
from fedlora.protocol.adapter import WIRE_DTYPE, AdapterSpec, validate
from fedlora.protocol.compression import CODECS, decode, encode, nbytes, wire_spec
from fedlora.protocol.gate import (
    EVAL_METRICS,
    INT64_MAX,
    TRAIN_METRICS,
    Bound,
    ProtocolError,
    array_record,
    check_metrics,
    is_finite_number,
    read_arrays,
    record_keys,
    show,
)
from fedlora.ranges import RANGES

WIRE_VERSION = 1
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
NUM_EXAMPLES = "num-examples"  # the weight FedAvg-style aggregation uses
LOSSES = ("completion", "full")
SCHEDULES = ("constant", "cosine", "linear")
_NON_NEGATIVE_INT = Bound(int, 0, INT64_MAX)


def _ranged(kind: type, name: str, low: float, low_open: bool = False) -> Bound:
    """``low`` (and its openness) as the wire has always had it, the run settings' upper bound
    (fedlora.ranges): a node refuses what no run config could have asked."""
    return Bound(kind, low, RANGES[name][1], low_open=low_open)


# The range of every numeric round-config field a node accepts (floats must also be finite).
ROUND_BOUNDS: dict[str, Bound] = {
    "server_round": _NON_NEGATIVE_INT,
    "local_steps": _ranged(int, "local_steps", 1),
    "batch_size": _ranged(int, "batch_size", 1),
    "lr": Bound(float, 0.0, 1.0, low_open=True, high_open=True),
    "max_length": _ranged(int, "max_length", 1),
    "seed": _NON_NEGATIVE_INT,
    "lora_r": _ranged(int, "lora_r", 1),
    "lora_r_max": _ranged(int, "lora_r_max", 0),
    "lora_alpha": _ranged(float, "lora_alpha", 0.0, low_open=True),
    "lora_dropout": Bound(float, 0.0, 1.0, high_open=True),
    "lora_layers": _ranged(int, "lora_layers", 0),  # 0: every layer; a node checks its model's
    "local_epochs": _ranged(float, "local_epochs", 0.0),
    "grad_accum": _ranged(int, "grad_accum", 1),
    "length_grouping": _ranged(int, "length_grouping", 1),
    "warmup_steps": _ranged(int, "warmup_steps", 0),
    "max_grad_norm": _ranged(float, "max_grad_norm", 0.0),
    "weight_decay": _ranged(float, "weight_decay", 0.0),
    "codec_block": _ranged(int, "codec_block", 1),
    "down_base": Bound(int, -1, INT64_MAX),
    "down_version": Bound(int, -1, INT64_MAX),
    "dp_noise_multiplier": _ranged(float, "dp_noise_multiplier", 0.0),
    "dp_clip_norm": _ranged(float, "dp_clip_norm", 0.0),
    "dp_expected_clients": _NON_NEGATIVE_INT,
    "dpo_beta": _ranged(float, "dpo_beta", 0.0, low_open=True),
    "dpo_sft_weight": _ranged(float, "dpo_sft_weight", 0.0),
    "wire_version": _NON_NEGATIVE_INT,
}


@dataclass(frozen=True)
class RoundConfig:
    """What the server asks of every client in one training round."""

    server_round: int
    local_steps: int
    batch_size: int
    lr: float
    max_length: int
    seed: int
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: str
    train_factors: str = "AB"  # LoRA factors nodes train: "AB", "B" (A frozen: FFA-LoRA) or
    # "R" (LoRA-SB: A and B frozen, the r x r matrix between them trained: Fed-SB)
    send_factors: str = "AB"  # factors nodes send; trained but unsent ones stay on the node
    lora_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)
    lora_layers: int = 0  # LoRA on the last N transformer layers only; 0 = every layer
    # heterogeneous ranks: the adapter's rank (its shapes); a node trains the first lora_r
    # components, or its own lora-r (<= this), and sends them zero-padded; 0 = lora_r for all
    lora_r_max: int = 0
    local_epochs: float = 0.0  # > 0: passes over the node's data instead of local_steps
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 0  # linear learning-rate warmup at the start of the round
    lr_schedule: str = "constant"  # constant | cosine | linear after warmup
    max_grad_norm: float = 1.0  # gradient clip (global L2); 0 = off
    weight_decay: float = 0.0  # AdamW weight decay
    loss: str = "completion"  # completion (answer tokens only) | full (every token)
    packing: bool = False  # pack several examples into one row of max_length tokens
    length_grouping: int = 1  # batches whose examples are sorted by length together; 1 = off
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    codec: str = "none"  # how nodes encode their delta: none | fp16 | int8 | int8-block
    codec_block: int = 64  # int8-block: values per scale (both ways)
    # The downlink (fedlora.protocol.downlink): how the sent factors are encoded, the version
    # the arrays are a delta from (-1: exact float32 values), the version the node then holds
    # (-1: untracked) and digests of what it then holds and of the factors it derives itself.
    down_codec: str = "none"
    down_base: int = -1
    down_version: int = -1
    down_digest: str = ""
    frozen_digest: str = ""
    dp_noise_multiplier: float = 0.0  # client-level DP under secure aggregation; 0 = off
    dp_clip_norm: float = 0.0  # DP: each node clips its delta to this L2 norm
    dp_expected_clients: int = 0  # DP: nodes sharing the noise (each adds 1/n of its variance)
    objective: str = "sft"  # sft (next-token loss) | dpo (preference pairs, fedlora.client.dpo)
    dpo_beta: float = 0.1  # DPO: the implicit reward's scale
    dpo_sft_weight: float = 0.0  # DPO: weight of the chosen answers' next-token loss
    wire_version: int = WIRE_VERSION

    def __post_init__(self) -> None:
        for f in fields(self):
            want = type(f.default) if f.default is not MISSING else _REQUIRED_TYPES[f.name]
            value = getattr(self, f.name)
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            if not ok or (isinstance(value, bool) and want is not bool):
                raise ProtocolError(
                    f"round config {_key(f.name)}={show(value)}: expected {want.__name__}"
                )
            if want is float and not is_finite_number(value):
                raise ProtocolError(
                    f"round config {_key(f.name)}={value!r}: must be a finite number"
                )
        for name, bound in ROUND_BOUNDS.items():
            if not bound.accepts(getattr(self, name)):
                raise ProtocolError(
                    f"round config {_key(name)}={getattr(self, name)!r}: must be {bound.describe()}"
                )
        if self.dp_noise_multiplier > 0 and self.dp_clip_norm <= 0:
            raise ProtocolError(
                f"round config dp-noise-multiplier={self.dp_noise_multiplier} with dp-clip-norm="
                f"{self.dp_clip_norm}: noise needs a clip norm > 0"
            )
        if self.loss not in LOSSES:
            raise ProtocolError(f"round config loss={self.loss!r}: use one of {LOSSES}")
        if self.objective not in OBJECTIVES:
            raise ProtocolError(
                f"round config objective={self.objective!r}: use one of {OBJECTIVES}"
            )
        if self.codec not in CODECS:
            raise ProtocolError(f"round config codec={self.codec!r}: use one of {sorted(CODECS)}")
        if self.down_codec not in CODECS:
            raise ProtocolError(
                f"round config down-codec={self.down_codec!r}: use one of {sorted(CODECS)}"
            )
        for name in ("down_digest", "frozen_digest"):
            value = getattr(self, name)
            if len(value) > 64 or any(c not in "0123456789abcdef" for c in value):
                raise ProtocolError(f"round config {_key(name)}={show(value)}: not a hex digest")
        if self.down_base > self.down_version:
            raise ProtocolError(
                f"round config down-base={self.down_base} after down-version="
                f"{self.down_version}: a delta goes from an older version to a newer one"
            )
        if self.lr_schedule not in SCHEDULES:
            raise ProtocolError(
                f"round config lr-schedule={self.lr_schedule!r}: use one of {SCHEDULES}"
            )
        if self.train_factors not in ("AB", "B", "R"):
            raise ProtocolError(f"train-factors={self.train_factors!r}: use 'AB', 'B' or 'R'")
        if self.send_factors not in ("AB", "A", "B", "R") or not set(self.send_factors) <= set(
            self.train_factors
        ):
            raise ProtocolError(
                f"send-factors={self.send_factors!r} with train-factors="
                f"{self.train_factors!r}: send a non-empty subset of what is "
                f"trained"
            )

    @property
    def personal_factors(self) -> str:
        """Factors a node trains but keeps (e.g. FedSA-LoRA's B)."""
        return "".join(f for f in self.train_factors if f not in self.send_factors)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundConfig:
        """Parse and check a round config; any problem is a ProtocolError naming the key."""
        if not isinstance(record, ConfigRecord):
            raise ProtocolError(f"round config is a {type(record).__name__}, not a ConfigRecord")
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in record:
                if f.default is not MISSING:
                    continue  # optional: its default applies
                raise ProtocolError(f"round config lacks {key!r}")
            values[f.name] = record[key]
        config = cls(**values)
        if config.wire_version != WIRE_VERSION:
            raise ProtocolError(
                f"wire version {config.wire_version} from the server; this "
                f"client speaks {WIRE_VERSION}: upgrade the older side"
            )
        return config


_REQUIRED_TYPES = {
    "server_round": int,
    "local_steps": int,
    "batch_size": int,
    "lr": float,
    "max_length": int,
    "seed": int,
    "lora_r": int,
    "lora_alpha": float,
    "lora_dropout": float,
    "target_modules": str,
}


@dataclass
class TrainReply:
    """A client's answer to a training round: its adapter delta and whitelisted metrics."""

    delta: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    site_id: int = -1
    load_seconds: float = 0.0
    train_seconds: float = 0.0
    train_tokens: int = 0  # tokens processed this round (no padding)
    scored_tokens: int = 0  # tokens the loss covered
    codec: str = "none"  # wire encoding of the delta (fedlora.protocol.compression)
    codec_block: int = 64
    bytes_received: int = 0  # payload bytes of the global adapter this round
    bytes_sent: int = 0  # payload bytes of the encoded delta (set by to_content)
    dp_norm_before_clip: float = -1.0  # DP: the delta's norm before clipping (never sent)
    dp_noise_shares: int = 0  # DP: the nodes its noise share was sized for (never sent)

    def metrics(self) -> dict[str, float | int]:
        return {
            NUM_EXAMPLES: int(self.num_examples),
            "train-loss": float(self.train_loss),
            "site-id": int(self.site_id),
            "wire-version": WIRE_VERSION,
            "load-seconds": float(self.load_seconds),
            "train-seconds": float(self.train_seconds),
            "train-tokens": int(self.train_tokens),
            "scored-tokens": int(self.scored_tokens),
            "bytes-sent": int(self.bytes_sent),
            "bytes-received": int(self.bytes_received),
            "dp-noised": int(self.dp_norm_before_clip >= 0),
        }

    def to_content(self) -> RecordDict:
        if self.codec == "none":  # float32 as is (the server validates, NaN included)
            arrays = to_array_record(self.delta)
            self.bytes_sent = nbytes(self.delta)
        else:
            wire = encode(self.delta, self.codec, self.codec_block)
            arrays = ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in sorted(wire.items())}
            )
            self.bytes_sent = nbytes(wire)
        metrics = self.metrics()
        if not set(metrics) <= TRAIN_METRICS:  # a guard, not an assert: it must survive -O
            raise ProtocolError(
                f"refusing to send non-whitelisted metrics {sorted(set(metrics) - TRAIN_METRICS)}"
            )
        return RecordDict({ARRAYS: arrays, METRICS: MetricRecord(dict(metrics))})

    @classmethod
    def from_content(
        cls, content: RecordDict, spec: AdapterSpec, codec: str = "none", codec_block: int = 64
    ) -> TrainReply:
        """Check, decode and validate a reply; any problem is a ProtocolError naming the field.

        Every array passes the decoding gate (stype, dtype, shape, byte length against what
        ``codec`` puts on the wire for ``spec``) before a byte of it is decoded.
        """
        content = record_keys(content, {ARRAYS, METRICS})
        metrics = check_metrics(content.get(METRICS), "train", WIRE_VERSION)
        try:
            wire = read_arrays(array_record(content, ARRAYS), wire_spec(codec, spec, codec_block))
            delta = decode(wire, codec, spec, codec_block) if codec != "none" else wire
            validate(delta, spec)
        except WireError as exc:
            raise ProtocolError(str(exc)) from None
        return cls(
            delta=delta,
            num_examples=_int(metrics, NUM_EXAMPLES),
            train_loss=_float(metrics, "train-loss"),
            site_id=_int(metrics, "site-id"),
            load_seconds=_float(metrics, "load-seconds"),
            train_seconds=_float(metrics, "train-seconds"),
            train_tokens=_int(metrics, "train-tokens"),
            scored_tokens=_int(metrics, "scored-tokens"),
            codec=codec,
            codec_block=codec_block,
            bytes_sent=_int(metrics, "bytes-sent"),
            bytes_received=_int(metrics, "bytes-received"),
            dp_norm_before_clip=0.0 if metrics["dp-noised"] else -1.0,
        )


@dataclass
class EvalReply:
    """A client's evaluation of the global adapter on its eval split: scalars only."""

    num_examples: int
    loss: float
    perplexity: float
    tokens: int
    accuracy: float | None = None  # label tasks only
    site_id: int = -1
    seconds: float = 0.0
    pref_accuracy: float | None = None  # DPO: share of held-out pairs the reward prefers right
    reward_margin: float | None = None  # DPO: mean reward margin (chosen - rejected)

    def to_content(self) -> RecordDict:
        metrics: dict[str, float | int] = {
            NUM_EXAMPLES: int(self.num_examples),
            "eval-loss": float(self.loss),
            "eval-perplexity": float(self.perplexity),
            "eval-tokens": int(self.tokens),
            "site-id": int(self.site_id),
            "wire-version": WIRE_VERSION,
            "eval-seconds": float(self.seconds),
        }
        if self.accuracy is not None:
            metrics["eval-accuracy"] = float(self.accuracy)
        if self.pref_accuracy is not None and self.reward_margin is not None:
            metrics["eval-pref-accuracy"] = float(self.pref_accuracy)
            metrics["eval-reward-margin"] = float(self.reward_margin)
        if not set(metrics) <= EVAL_METRICS:
            raise ProtocolError(
                f"refusing to send non-whitelisted metrics {sorted(set(metrics) - EVAL_METRICS)}"
            )
        return RecordDict({METRICS: MetricRecord(dict(metrics))})

    @classmethod
    def from_content(cls, content: RecordDict) -> EvalReply:
        """Check an eval reply; any problem is a ProtocolError naming the metric."""
        content = record_keys(content, {METRICS})
        metrics = check_metrics(content.get(METRICS), "eval", WIRE_VERSION)
        acc = metrics["eval-accuracy"]
        pref, margin = metrics["eval-pref-accuracy"], metrics["eval-reward-margin"]
        return cls(
            num_examples=_int(metrics, NUM_EXAMPLES),
            loss=_float(metrics, "eval-loss"),
            perplexity=_float(metrics, "eval-perplexity"),
            tokens=_int(metrics, "eval-tokens"),
            accuracy=None if acc is None else float(acc),
            site_id=_int(metrics, "site-id"),
            seconds=_float(metrics, "eval-seconds"),
            pref_accuracy=None if pref is None else float(pref),
            reward_margin=None if margin is None else float(margin),
        )


def _int(metrics: dict[str, int | float | None], name: str) -> int:
    value = metrics[name]
    if value is None:  # required, or given a default, by the metric table
        raise ProtocolError(f"metric {name} missing")
    return int(value)


def _float(metrics: dict[str, int | float | None], name: str) -> float:
    value = metrics[name]
    if value is None:
        raise ProtocolError(f"metric {name} missing")
    return float(value)


def _key(name: str) -> str:
    return name.replace("_", "-")


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record this process trusts (its own state, a test's output)."""
    return {k: v.numpy() for k, v in record.items()}


def wire_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Arrays already in their wire dtypes (an encoded payload) as an ArrayRecord, name-sorted."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sorted(arrays.items())})


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v, dtype=WIRE_DTYPE)) for k, v in sorted(arrays.items())}
    )


__all__ = [
    "ARRAYS",
    "CONFIG",
    "EVAL_METRICS",
    "METRICS",
    "NUM_EXAMPLES",
    "ROUND_BOUNDS",
    "TRAIN_METRICS",
    "WIRE_VERSION",
    "EvalReply",
    "ProtocolError",
    "RoundConfig",
    "TrainReply",
    "arrays_of",
    "to_array_record",
    "wire_record",
]
