"""Secure aggregation on the wire: settings, stage and record names, and the integer encoding.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS
2020) over the double-masking protocol of Bonawitz et al. ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017) sums integer vectors modulo ``2**modulus_bits``.
This module turns a client's float update into such a vector and the server's sum back into
floats, with no silent damage:

1. **Clip** (client side, explicit): the whole update is scaled to global L2 norm at most
   ``C = clip_norm``; the node logs the norm before clipping and reports only whether it
   clipped, inside the masked vector (so the server learns how many nodes clipped).
   Every coordinate then lies in ``[-C, C]``.
2. **Quantize** deterministically (round half to even, no random numbers):
   ``q(x) = rint((x + C) / Δ)`` with ``L = 2**quantization_bits - 1`` levels and
   ``Δ = 2C / L``, so ``q(x)`` is an integer in ``[0, L]`` and ``|q(x)·Δ - C - x| <= Δ/2``.
3. **Weight exactly**: a client sends ``[w, s, w·q(x_1), ..., w·q(x_D)]`` (``s``: its training
   scalars in limbs, :mod:`fedlora.protocol.secagg_encoding`) where ``w`` is its
   number of examples, an exact integer (capped at ``max_weight``, which is logged and reported).
   The server recovers ``W = Σ w_i`` and ``Σ w_i x_i = Δ·Σ w_i q_i - C·W`` (up to rounding).

Error bound (the tolerance tests assert): per coordinate, the secure mean differs from the plain
example-weighted mean of the *clipped* updates (computed in float64) by at most

    |secure_mean - plain_mean| <= C / (2**quantization_bits - 1) + 16 · 2**-52 · C

(half a quantization step, since the weighted mean of errors bounded by Δ/2 is bounded by Δ/2,
plus float64 rounding in decoding). See :attr:`SecAggSettings.tolerance`.

No overflow: the sum of a coordinate is at most ``n · max_weight · L``; :meth:`check_overflow`
refuses any ``n`` for which this could reach the modulus.

**Narrow wire** (``wire_bits`` 16 or 32, ``modulus_bits == wire_bits``): masked vectors travel
as uint16 / uint32 instead of uint64. The weight is applied *before* quantizing, so the sum of a
coordinate no longer grows with the weights: a node quantizes ``y = (w / max_weight) · x``
(still ``|y| <= C``) and sends ``[w, q(y_1), ..., q(y_D)]``; the server recovers
``Σ w_i x_i ≈ max_weight · (Δ·Σ q_i - C·n)`` with ``n`` the number of contributors. Rounding
is stochastic, ``q = floor(s) + (u < s - floor(s))`` with ``s = (y + C) / Δ`` and ``u``
uniform from numpy's generator seeded by a fresh 64-bit seed of the node: unbiased,
reproducible per seed, error below one step. No overflow: ``n · max_weight < 2**m`` (weights)
and ``n · L < 2**m`` (coordinates); :meth:`SecAggSettings.for_nodes` picks the largest
``quantization_bits`` that keeps both. Error bound (:meth:`SecAggSettings.tolerance_for`):

    |secure_mean - plain_mean| <= (max_weight · n / W) · (Δ + 16 · 2**-52 · C) + 16 · 2**-52 · C

with ``W = Σ w_i`` (each node's error in ``y`` is below ``Δ``; scaled back by ``max_weight`` and
divided by ``W``), so choose ``max_weight`` close to the largest weight of the round.

Flower's own ``flwr.common.secure_aggregation.quantization`` is not used: it clips every value
silently and rounds stochastically with an unseeded generator. Needs numpy and Flower records;
never torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from fedlora.errors import ConfigError, WireError
from fedlora.protocol.gate import TRAIN_METRICS, metric_problem
from fedlora.protocol.secagg_encoding import (
    SCALAR_BITS,
    SUMMED_SCALARS,
    Spec,
    decode_scalars,
    decode_sum,
    encode_scalars,
    encode_update,
    flatten,
    quantize,
    quantize_stochastic,
    reduce_mod,
    scalar_slots,
    to_wire,
    unflatten,
    vector_length,
    weighted_vector,
)

log = logging.getLogger(__name__)

MESSAGE_TYPE = "train.secagg"  # every stage; the ClientApp registers @app.train("secagg")
ACTION = "secagg"


class Stage:
    """The four SecAgg+ stages, in order (a client refuses any other order)."""

    SETUP = "setup"  # carries the train content: train, clip, quantize; reply public keys
    SHARE_KEYS = "share-keys"  # neighbours' public keys in; encrypted Shamir shares out
    COLLECT = "collect-masked-vectors"  # shares addressed to the node in; masked vector out
    # authenticated rounds only (every node signed its keys): the survivors U3 in; this
    # node's signature of U3 out (Bonawitz et al., CCS 2017, section 4: consistency check)
    CONSISTENCY = "consistency-check"
    UNMASK = "unmask"  # alive/dropped neighbours in; shares for reconstruction out
    ORDER = (SETUP, SHARE_KEYS, COLLECT, UNMASK)
    SIGNED_ORDER = (SETUP, SHARE_KEYS, COLLECT, CONSISTENCY, UNMASK)


class Key:
    """Record and field names of SecAgg+ messages."""

    CONFIG = "secagg"  # ConfigRecord in every message, both ways
    MASKED = "secagg-masked"  # ArrayRecord: the masked vector (client -> server)
    METRICS = "secagg-metrics"  # MetricRecord: clip and training scalars (client -> server)
    VECTOR = "vector"  # the one Array inside MASKED
    STAGE = "stage"
    SESSION = "session"  # random per round: ties the stages of one round together
    NAMES = "tensor-names"
    SIZES = "tensor-sizes"
    C_PK = "c-pk"  # public key for encrypting shares (Bonawitz et al.: c^PK)
    S_PK = "s-pk"  # public key for pairwise masks (s^PK)
    NODES = "node-ids"
    SRCS = "srcs"
    DSTS = "dsts"
    CIPHERTEXTS = "ciphertexts"
    ALIVE = "alive"
    DROPPED = "dropped"
    B_OWNERS = "b-owners"
    B_SHARES = "b-shares"
    SK_OWNERS = "sk-owners"
    SK_SHARES = "sk-shares"
    B_COMMIT = "b-commit"  # SHA-256 commitment to the self-mask seed (share-keys reply)
    SIGNATURE = "key-signature"  # setup reply: the node's signature of its round keys
    SIGNER = "signer"  # setup reply: the node's name in the federation's roster
    SIGNATURES = "key-signatures"  # share-keys: each participant's signature, as NODES
    SIGNERS = "signers"  # share-keys: each participant's roster name, as NODES
    NONCE = "nonce"  # setup reply: the node's fresh nonce; share-keys: every participant's


# Flags a node sums inside its masked vector (fedlora.protocol.secagg_encoding.SUMMED_SCALARS).
CLIPPED = "secagg-clipped"
WEIGHT_CAPPED = "secagg-weight-capped"

# The only metrics a node sends in the clear beside its masked vector: the wire version and the
# simulated site index (-1 in deployment), checked against the one metric table
# (fedlora.protocol.gate.METRIC_SPECS). Its training scalars (examples, loss, tokens, seconds,
# clipped and capped flags) travel inside the masked vector, so only their sums are revealed;
# the norm before clipping is never sent. Anything else, a wrong type, NaN or a value out of
# range makes the whole reply invalid (that node drops out).
SECURE_METRICS: frozenset[str] = frozenset({"wire-version", "site-id"})
assert SECURE_METRICS <= TRAIN_METRICS
MAX_ID = 2**64 - 1  # node ids are unsigned 64-bit integers (Flower; the share plaintext)
MAX_KEY_BYTES = 4096  # a PEM public key of P-384 is 215 bytes
MAX_CIPHERTEXT_BYTES = 2**16  # an encrypted share pair is under 1 KiB
WIRE_BITS = (16, 32, 64)  # masked vectors travel as uint16 / uint32 / uint64
FLOAT_SLACK = 16 * 2.0**-52  # float64 rounding in encoding and decoding, in units of clip_norm


class SecAggProtocolError(WireError, ValueError):
    """A SecAgg+ message that breaks the protocol (wrong order, session, types, keys or lists).

    A node refuses such a stage message (an error reply); the server treats such a reply as a
    dropout of the node that sent it.
    """


def config_field(cfg: ConfigRecord, key: str, kind: type, what: str) -> Any:
    """``cfg[key]`` if it is a ``kind`` (never a bool for int), else SecAggProtocolError."""
    value = cfg.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SecAggProtocolError(
            f"{what}: {key!r} is {type(value).__name__}, expected {kind.__name__}"
        )
    return value


def id_list(cfg: ConfigRecord, key: str, what: str) -> list[int]:
    """A list of distinct node ids (unsigned 64-bit integers) under ``key``."""
    value = config_field(cfg, key, list, what)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID for v in value):
        raise SecAggProtocolError(f"{what}: {key!r} holds something other than node ids")
    if len(set(value)) != len(value):
        raise SecAggProtocolError(f"{what}: {key!r} repeats a node id")
    return list(value)


def bytes_list(cfg: ConfigRecord, key: str, what: str, length: int, max_bytes: int) -> list[bytes]:
    """A list of ``length`` non-empty byte strings of at most ``max_bytes`` each under ``key``."""
    value = config_field(cfg, key, list, what)
    if len(value) != length:
        raise SecAggProtocolError(f"{what}: {key!r} has {len(value)} entries, expected {length}")
    if not all(isinstance(v, bytes) and 0 < len(v) <= max_bytes for v in value):
        raise SecAggProtocolError(
            f"{what}: {key!r} holds something other than byte strings of 1..{max_bytes} bytes"
        )
    return list(value)


def check_share(share: bytes, what: str) -> bytes:
    """A Shamir share as Flower's shamir lays it out: 4-byte index 1.., then 16-byte chunks."""
    index = int.from_bytes(share[:4], "little")
    if len(share) < 20 or (len(share) - 4) % 16 or not 1 <= index <= 2**16:
        raise SecAggProtocolError(
            f"{what}: a share of {len(share)} bytes, index {index}: malformed"
        )
    return share


def check_metrics(metrics: Mapping[str, Any], what: str) -> dict[str, int | float]:
    """The scalar metrics beside a masked vector, checked against :data:`SECURE_METRICS`."""
    extra = sorted(set(metrics) - set(SECURE_METRICS))
    if extra:
        raise SecAggProtocolError(f"{what}: metrics outside the whitelist: {extra[:3]}")
    out: dict[str, int | float] = {}
    for name, value in metrics.items():
        problem = metric_problem(name, value)
        if problem:
            raise SecAggProtocolError(f"{what}: {problem}")
        out[name] = value
    return out


@dataclass(frozen=True)
class SecAggSettings:
    """How secure aggregation quantizes, masks and recovers (checked at construction)."""

    clip_norm: float = field(
        metadata={
            "help": "L2 bound on each client's whole update, applied "
            "on the client; sets the quantization range"
        }
    )
    num_shares: int = field(
        default=5,
        metadata={
            "help": "shares per secret, one kept and one per neighbour (SecAgg+ graph degree + 1); "
            ">= the number of clients gives classic SecAgg (complete graph)"
        },
    )
    reconstruction_threshold: int = field(
        default=4,
        metadata={
            "help": "shares needed to rebuild a secret; more than half of num_shares, and "
            "2t > holders + corrupt_nodes at the nodes"
        },
    )
    quantization_bits: int = field(
        default=32,
        metadata={
            "help": "levels per coordinate are 2**bits - 1; the error bound is clip_norm / levels"
        },
    )
    modulus_bits: int = field(
        default=64,
        metadata={"help": "sums are taken modulo 2**modulus_bits (<= 64; = wire_bits if narrow)"},
    )
    max_weight: int = field(
        default=2**20,
        metadata={"help": "cap on a client's weight (its number of examples), an exact integer"},
    )
    wire_bits: int = field(
        default=64,
        metadata={
            "help": "masked values travel as uint16, uint32 or uint64; 16 and 32 (narrow) need "
            "modulus_bits == wire_bits and quantize after weighting, rounding stochastically"
        },
    )

    corrupt_nodes: int = field(
        default=1,
        metadata={
            "help": "nodes assumed to collude with the server: thresholds need 2t > holders + c "
            "and the consistency check more than (n + c) / 2 signers; each node also applies its "
            "own secagg-corrupt-nodes, whichever is larger"
        },
    )

    def __post_init__(self) -> None:
        if not (
            isinstance(self.clip_norm, int | float)
            and math.isfinite(self.clip_norm)
            and self.clip_norm > 0
        ):
            raise ConfigError(
                f"secagg clip_norm={self.clip_norm!r}: give a positive L2 bound "
                f"on client updates (e.g. a little above their typical norm)"
            )
        for name in (
            "num_shares",
            "reconstruction_threshold",
            "quantization_bits",
            "modulus_bits",
            "max_weight",
            "wire_bits",
            "corrupt_nodes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"secagg {name}={value!r}: must be an integer")
        if self.wire_bits not in WIRE_BITS:
            raise ConfigError(f"secagg wire_bits={self.wire_bits}: use one of 16, 32, 64")
        if self.narrow and self.modulus_bits != self.wire_bits:
            raise ConfigError(
                f"secagg wire_bits={self.wire_bits} with modulus_bits={self.modulus_bits}: a "
                f"narrow wire sums modulo its own width, set modulus_bits={self.wire_bits}"
            )
        t, k = self.reconstruction_threshold, self.num_shares
        if k < 3:
            raise ConfigError(f"secagg num_shares={k}: use at least 3")
        if not (2 * t > k and t <= k):
            raise ConfigError(
                f"secagg reconstruction_threshold={t} with num_shares={k}: it "
                f"must exceed half of num_shares (else a server could rebuild "
                f"both secrets of one client) and not exceed it: use "
                f"{k // 2 + 1}..{k}"
            )
        if not 2 <= self.modulus_bits <= 64:
            raise ConfigError(f"secagg modulus_bits={self.modulus_bits}: use 2..64")
        if not 1 <= self.quantization_bits < self.modulus_bits:
            raise ConfigError(
                f"secagg quantization_bits={self.quantization_bits}: use 1.."
                f"{self.modulus_bits - 1} (below modulus_bits)"
            )
        if self.max_weight < 1:
            raise ConfigError(f"secagg max_weight={self.max_weight}: must be >= 1")
        if not 0 <= self.corrupt_nodes < t:
            raise ConfigError(
                f"secagg corrupt_nodes={self.corrupt_nodes}: use 0..{t - 1} (below the "
                f"reconstruction threshold {t}, else colluders alone could rebuild a secret)"
            )
        self.check_overflow(1)

    @classmethod
    def for_nodes(
        cls,
        clip_norm: float,
        num_nodes: int,
        *,
        wire_bits: int = 64,
        max_weight: int = 2**20,
        max_bits: int = 32,
        **rest: Any,
    ) -> SecAggSettings:
        """Settings for rounds of up to ``num_nodes`` nodes with the largest quantization_bits
        (at most ``max_bits``, below the modulus) that cannot overflow; ``modulus_bits`` is
        ``wire_bits``. ConfigError (what to change) when not even one bit fits."""
        if not isinstance(num_nodes, int) or num_nodes < 1:
            raise ConfigError(f"secagg for {num_nodes!r} nodes: give at least one node")
        if wire_bits not in WIRE_BITS:
            raise ConfigError(f"secagg wire_bits={wire_bits}: use one of 16, 32, 64")
        weight = max_weight if isinstance(max_weight, int) and max_weight >= 1 else 1
        per_level = num_nodes if wire_bits < 64 else num_nodes * weight
        levels = (2**wire_bits - 1) // per_level  # the largest L with no wrap
        bits = max(1, min((levels + 1).bit_length() - 1, max_bits, wire_bits - 1))
        settings = cls(
            clip_norm=clip_norm,
            quantization_bits=bits,
            modulus_bits=wire_bits,
            max_weight=max_weight,
            wire_bits=wire_bits,
            **rest,
        )
        settings.check_overflow(num_nodes)
        return settings

    @property
    def narrow(self) -> bool:
        """Whether masked vectors travel as uint16 / uint32 (weighted before quantizing)."""
        return self.wire_bits < 64

    @property
    def wire_dtype(self) -> np.dtype:
        """The dtype of masked vectors on the wire."""
        return np.dtype(f"uint{self.wire_bits}")

    @property
    def levels(self) -> int:
        """``L``: quantized coordinates are integers in ``[0, L]``."""
        return 2**self.quantization_bits - 1

    @property
    def step(self) -> float:
        """``Δ = 2C / L``, the value of one quantization level."""
        return 2.0 * self.clip_norm / self.levels

    @property
    def tolerance(self) -> float:
        """Per-coordinate bound on |secure mean - plain mean of clipped updates|.

        64-bit wire: half a step, whatever the round. Narrow: the bound of any round whose
        weights are all >= 1 (``tolerance_for`` with ``n = W``); a round's own bound,
        :meth:`tolerance_for`, is usually far tighter.
        """
        if self.narrow:
            return self.tolerance_for(1, 1)
        return self.clip_norm / self.levels + FLOAT_SLACK * self.clip_norm

    def tolerance_for(self, num_contributors: int, total_weight: int) -> float:
        """Per-coordinate bound on |secure weighted mean - plain weighted mean of the clipped
        updates| for a round of ``num_contributors`` nodes of total weight ``total_weight``.

        64-bit wire: :attr:`tolerance`. Narrow: each node's stochastic rounding errs by less than
        one step ``Δ`` of ``y = (w / max_weight) · x``, so the mean errs by less than
        ``max_weight · n · Δ / W``, plus float64 slack.
        """
        if not self.narrow:
            return self.tolerance
        if num_contributors < 1 or total_weight < 1:
            raise ValueError(
                f"no bound for {num_contributors} contributors of total weight {total_weight}"
            )
        eps = FLOAT_SLACK * self.clip_norm
        return self.max_weight * num_contributors / total_weight * (self.step + eps) + eps

    def max_clients(self) -> int:
        """The most clients whose sum cannot wrap the modulus."""
        room = 2**self.modulus_bits - 1
        if self.narrow:
            return min(room // self.max_weight, room // self.levels)
        return room // (self.max_weight * self.levels)

    def check_overflow(self, num_clients: int) -> None:
        """Raise ConfigError if the sums of ``num_clients`` nodes could wrap the modulus.

        64-bit wire: ``num_clients * max_weight * L``; narrow: ``num_clients * max_weight``
        (weights) and ``num_clients * L`` (coordinates), each below ``2**modulus_bits``.
        """
        if self.narrow:
            self._check_narrow_overflow(num_clients)
            return
        if num_clients * self.max_weight * self.levels < 2**self.modulus_bits:
            return
        room = 2**self.modulus_bits - 1
        bits = (room // (num_clients * self.max_weight)).bit_length() - 1
        raise ConfigError(
            f"secagg overflow: {num_clients} clients x max_weight {self.max_weight} x "
            f"{self.levels} levels can reach 2**{self.modulus_bits}; lower quantization_bits "
            f"to {max(bits, 0)}, or max_weight to {room // (num_clients * self.levels)}, or "
            f"raise modulus_bits (at most 64), or sample fewer clients "
            f"(at most {self.max_clients()})"
        )

    def _check_narrow_overflow(self, n: int) -> None:
        most = self.max_clients()
        if n <= most:
            return
        room = 2**self.modulus_bits - 1
        fixes = [f"sample at most {most} nodes per round"] if most else []
        lower = []
        if n * self.max_weight > room:
            lower.append(f"max_weight to {room // n}")
        if n * self.levels > room:
            lower.append(f"quantization_bits to {(room // n + 1).bit_length() - 1}")
        if room // n:  # one level and weight 1 still fit
            fixes.append("lower " + " and ".join(lower))
        fixes.append("use wire_bits 32 or 64" if self.wire_bits == 16 else "use wire_bits 64")
        raise ConfigError(
            f"secagg overflow: {n} nodes on a {self.wire_bits}-bit wire can wrap 2**"
            f"{self.modulus_bits} (weights {n} x max_weight {self.max_weight}, coordinates {n} x "
            f"{self.levels} levels): {'; or '.join(fixes)}"
        )

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({k.replace("_", "-"): v for k, v in asdict(self).items()})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SecAggSettings:
        values = {}
        for name in cls.__dataclass_fields__:
            key = name.replace("_", "-")
            if key not in record:
                raise ConfigError(f"secagg settings lack {key!r}")
            values[name] = record[key]
        return cls(**values)  # type: ignore[arg-type]


__all__ = [
    "ACTION",
    "CLIPPED",
    "MAX_CIPHERTEXT_BYTES",
    "MAX_ID",
    "MAX_KEY_BYTES",
    "MESSAGE_TYPE",
    "SCALAR_BITS",
    "SECURE_METRICS",
    "SUMMED_SCALARS",
    "WEIGHT_CAPPED",
    "WIRE_BITS",
    "Key",
    "SecAggProtocolError",
    "SecAggSettings",
    "Spec",
    "Stage",
    "bytes_list",
    "check_metrics",
    "check_share",
    "config_field",
    "decode_scalars",
    "decode_sum",
    "encode_scalars",
    "encode_update",
    "flatten",
    "id_list",
    "quantize",
    "quantize_stochastic",
    "reduce_mod",
    "scalar_slots",
    "to_wire",
    "unflatten",
    "vector_length",
    "weighted_vector",
]
