"""Typed records on the wire: the server's round config and the client's train reply.

A train message from the server carries ``arrays`` (the global adapter) and ``config`` (a
:class:`RoundConfig`). A client's reply carries ``arrays`` (its adapter *delta*: local adapter minus
the global one it received) and ``metrics`` (only the keys in :data:`TRAIN_METRICS`). Nothing
else may leave a node; :meth:`TrainReply.to_content` is the only constructor of a reply.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.errors import WireError
from fedlora.protocol.adapter import WIRE_DTYPE, AdapterSpec, validate
from fedlora.protocol.compression import CODECS, CodecError, decode, encode, nbytes

WIRE_VERSION = 1
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
NUM_EXAMPLES = "num-examples"  # the weight FedAvg-style aggregation uses
# The whitelist of scalar metrics a client may send after training.
TRAIN_METRICS = frozenset(
    {
        NUM_EXAMPLES,
        "train-loss",
        "site-id",
        "wire-version",
        "load-seconds",
        "train-seconds",
        "train-tokens",
        "scored-tokens",
        "bytes-sent",
        "bytes-received",
        "dp-noised",
    }
)
# The whitelist of scalar metrics a client may send after evaluating the global adapter.
EVAL_METRICS = frozenset(
    {
        NUM_EXAMPLES,
        "eval-loss",
        "eval-perplexity",
        "eval-accuracy",
        "eval-tokens",
        "site-id",
        "wire-version",
        "eval-seconds",
    }
)
LOSSES = ("completion", "full")
SCHEDULES = ("constant", "cosine", "linear")


class ProtocolError(WireError, ValueError):
    """A message does not follow the wire format."""


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
    train_factors: str = "AB"  # LoRA factors nodes train: "AB", or "B" (A frozen: FFA-LoRA)
    send_factors: str = "AB"  # factors nodes send; trained but unsent ones stay on the node
    lora_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)
    local_epochs: float = 0.0  # > 0: passes over the node's data instead of local_steps
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 0  # linear learning-rate warmup at the start of the round
    lr_schedule: str = "constant"  # constant | cosine | linear after warmup
    max_grad_norm: float = 1.0  # gradient clip (global L2); 0 = off
    weight_decay: float = 0.0  # AdamW weight decay
    loss: str = "completion"  # completion (answer tokens only) | full (every token)
    packing: bool = False  # pack several examples into one row of max_length tokens
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    codec: str = "none"  # how nodes encode their delta: none | fp16 | int8 | int8-block
    codec_block: int = 64  # int8-block: values per scale
    dp_noise_multiplier: float = 0.0  # client-level DP under secure aggregation; 0 = off
    dp_clip_norm: float = 0.0  # DP: each node clips its delta to this L2 norm
    dp_expected_clients: int = 0  # DP: nodes sharing the noise (each adds 1/n of its variance)
    wire_version: int = WIRE_VERSION

    def __post_init__(self) -> None:
        for f in fields(self):
            want = type(f.default) if f.default is not MISSING else _REQUIRED_TYPES[f.name]
            value = getattr(self, f.name)
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            if not ok or (isinstance(value, bool) and want is not bool):
                raise ProtocolError(
                    f"round config {f.name.replace('_', '-')}={value!r}: expected {want.__name__}"
                )
        if self.loss not in LOSSES:
            raise ProtocolError(f"round config loss={self.loss!r}: use one of {LOSSES}")
        if self.codec not in CODECS:
            raise ProtocolError(f"round config codec={self.codec!r}: use one of {sorted(CODECS)}")
        if self.lr_schedule not in SCHEDULES:
            raise ProtocolError(
                f"round config lr-schedule={self.lr_schedule!r}: use one of {SCHEDULES}"
            )
        if self.train_factors not in ("AB", "B"):
            raise ProtocolError(f"train-factors={self.train_factors!r}: use 'AB' or 'B'")
        if self.send_factors not in ("AB", "A", "B") or not set(self.send_factors) <= set(
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
        return RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics)})

    @classmethod
    def from_content(
        cls, content: RecordDict, spec: AdapterSpec, codec: str = "none", codec_block: int = 64
    ) -> TrainReply:
        """Parse, decode and validate a reply; raise ProtocolError with every problem found."""
        metrics, n = checked_metrics(content, {ARRAYS, METRICS}, TRAIN_METRICS)
        loss = float(metrics.get("train-loss", float("nan")))
        wire = arrays_of(content.array_records[ARRAYS])
        try:
            delta = decode(wire, codec, spec, codec_block) if codec != "none" else wire
            validate(delta, spec)
        except (ValueError, CodecError) as exc:
            raise ProtocolError(str(exc)) from None
        return cls(
            delta=delta,
            num_examples=n,
            train_loss=loss,
            site_id=int(metrics.get("site-id", -1)),
            load_seconds=float(metrics.get("load-seconds", 0.0)),
            train_seconds=float(metrics.get("train-seconds", 0.0)),
            train_tokens=int(metrics.get("train-tokens", 0)),
            scored_tokens=int(metrics.get("scored-tokens", 0)),
            codec=codec,
            codec_block=codec_block,
            bytes_sent=int(metrics.get("bytes-sent", 0)),
            bytes_received=int(metrics.get("bytes-received", 0)),
            dp_norm_before_clip=0.0 if metrics.get("dp-noised") else -1.0,
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
        if not set(metrics) <= EVAL_METRICS:
            raise ProtocolError(
                f"refusing to send non-whitelisted metrics {sorted(set(metrics) - EVAL_METRICS)}"
            )
        return RecordDict({METRICS: MetricRecord(metrics)})

    @classmethod
    def from_content(cls, content: RecordDict) -> EvalReply:
        metrics, n = checked_metrics(content, {METRICS}, EVAL_METRICS)
        values = [float(metrics.get(k, float("nan"))) for k in ("eval-loss", "eval-perplexity")]
        if not all(np.isfinite(values)):
            raise ProtocolError(f"eval-loss/eval-perplexity not finite: {values}")
        acc = metrics.get("eval-accuracy")
        return cls(
            num_examples=n,
            loss=values[0],
            perplexity=values[1],
            tokens=int(metrics.get("eval-tokens", 0)),
            accuracy=None if acc is None else float(acc),
            site_id=int(metrics.get("site-id", -1)),
            seconds=float(metrics.get("eval-seconds", 0.0)),
        )


def checked_metrics(
    content: RecordDict, records: set[str], whitelist: frozenset[str]
) -> tuple[MetricRecord, int]:
    """A reply's metrics after the checks every reply passes; and its num-examples."""
    if set(content.keys()) != records:
        raise ProtocolError(f"reply records {sorted(content.keys())}, expected {sorted(records)}")
    metrics = content.metric_records[METRICS]
    extra = set(metrics.keys()) - whitelist
    if extra:
        raise ProtocolError(f"metrics outside the whitelist: {sorted(extra)}")
    if metrics.get("wire-version") != WIRE_VERSION:
        raise ProtocolError(f"wire version {metrics.get('wire-version')}, expected {WIRE_VERSION}")
    n = metrics.get(NUM_EXAMPLES)
    if not isinstance(n, int) or n <= 0:
        raise ProtocolError(f"{NUM_EXAMPLES}={n!r}: must be a positive integer")
    return metrics, n


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


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
    "TRAIN_METRICS",
    "WIRE_VERSION",
    "EvalReply",
    "ProtocolError",
    "RoundConfig",
    "TrainReply",
    "arrays_of",
    "to_array_record",
]
