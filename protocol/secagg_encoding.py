"""SecAgg+ integer encoding: flatten an update, quantize it, weight it, and decode the sum.

The arithmetic behind :mod:`fedlora.protocol.secagg` (whose docstring states the scheme and
its error bounds): a client's clipped float update becomes a vector of integers modulo
``2**modulus_bits``; the server's unmasked sum of such vectors becomes the weighted float sum.

A vector is ``[w, scalar limbs, q_1, ..., q_D]``. The node's training scalars (examples, loss,
tokens, seconds, the clipped flag: :data:`SUMMED_SCALARS`) travel in the limbs, so the server
learns only their sums, never one node's. Each scalar is a fixed-point integer in
``[0, 2**SCALAR_BITS)`` cut into limbs of :func:`limb_bits` bits, small enough that the limb
sums of every node the settings allow cannot wrap the modulus; the server adds the limb sums
back with their place values (:func:`decode_scalars`), which is exact. Numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedlora.protocol.secagg import SecAggSettings

Spec = Mapping[str, tuple[int, ...]]  # tensor name -> shape; vectors follow sorted(names)

# The per-node scalars summed inside the masked vector: name -> fixed-point scale. Each is
# encoded as round(value * scale), clamped to [0, 2**SCALAR_BITS); "train-loss" travels weighted
# by the node's examples (its sum over nodes divided by the summed examples is the
# example-weighted mean loss). Flags (0 / 1) sum to the number of nodes that raised them.
SUMMED_SCALARS: dict[str, float] = {
    "num-examples": 1.0,
    "train-loss": 1e6,  # x num-examples
    "train-tokens": 1.0,
    "scored-tokens": 1.0,
    "train-seconds": 1e3,
    "load-seconds": 1e3,
    "bytes-sent": 1.0,
    "bytes-received": 1.0,
    "dp-noised": 1.0,
    "secagg-clipped": 1.0,
    "secagg-weight-capped": 1.0,
}
SCALAR_BITS = 48  # each node's fixed-point scalar lies in [0, 2**48)
MAX_LIMB_BITS = 48


def limb_bits(settings: SecAggSettings) -> int:
    """Bits per scalar limb: ``max_clients() * (2**b - 1)`` stays below the modulus."""
    room = 2**settings.modulus_bits - 1
    fit = (room // max(settings.max_clients(), 1) + 1).bit_length() - 1
    return max(1, min(fit, MAX_LIMB_BITS, SCALAR_BITS))


def _limbs(settings: SecAggSettings) -> tuple[int, int]:
    """``(bits per limb, limbs per scalar)``."""
    bits = limb_bits(settings)
    return bits, math.ceil(SCALAR_BITS / bits)


def scalar_slots(settings: SecAggSettings) -> int:
    """How many vector entries the summed scalars take (limbs of every scalar)."""
    return len(SUMMED_SCALARS) * _limbs(settings)[1]


def vector_length(spec: Spec, settings: SecAggSettings) -> int:
    """Length of an encoded vector: the weight, the scalar limbs and every coordinate."""
    return 1 + scalar_slots(settings) + sum(math.prod(shape) for shape in spec.values())


def encode_scalars(metrics: Mapping[str, float], settings: SecAggSettings) -> np.ndarray:
    """The limbs (uint64, least significant first per scalar) of a node's summed scalars.

    A missing scalar is 0; a negative or non-finite one is refused (ValueError); one past
    ``2**SCALAR_BITS`` after scaling is clamped (a node's own figure, only its sum is seen).
    """
    bits, per = _limbs(settings)
    out = np.zeros(len(SUMMED_SCALARS) * per, dtype=np.uint64)
    examples = float(metrics.get("num-examples", 0))
    for i, (name, scale) in enumerate(SUMMED_SCALARS.items()):
        value = float(metrics.get(name, 0))
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"scalar {name}={value!r}: expected a finite number >= 0")
        if name == "train-loss":
            value *= examples
        fixed = min(round(value * scale), 2**SCALAR_BITS - 1)
        for j in range(per):
            out[i * per + j] = (fixed >> (bits * j)) & (2**bits - 1)
    return out


def decode_scalars(limb_sums: np.ndarray, settings: SecAggSettings) -> dict[str, float]:
    """The summed scalars from the limb sums: ``train-loss`` as Σ examples·loss (exact sums of
    the fixed-point values, divided by their scale)."""
    bits, per = _limbs(settings)
    if limb_sums.shape != (len(SUMMED_SCALARS) * per,):
        raise ValueError(f"scalar limbs of shape {limb_sums.shape}, expected ({per} per scalar)")
    out = {}
    for i, (name, scale) in enumerate(SUMMED_SCALARS.items()):
        fixed = sum(int(limb_sums[i * per + j]) << (bits * j) for j in range(per))
        out[name] = fixed / scale
    return out


def flatten(arrays: Mapping[str, np.ndarray], spec: Spec) -> np.ndarray:
    """One float64 vector in sorted-name order, after checking names and shapes against spec."""
    if set(arrays) != set(spec):
        missing, extra = sorted(set(spec) - set(arrays)), sorted(set(arrays) - set(spec))
        raise ValueError(
            f"update tensors differ from the spec: missing {missing[:2]}, unexpected {extra[:2]}"
        )
    parts = []
    for name in sorted(spec):
        arr = np.asarray(arrays[name])
        if tuple(arr.shape) != tuple(spec[name]):
            raise ValueError(f"{name} has shape {arr.shape}, expected {tuple(spec[name])}")
        parts.append(arr.astype(np.float64, copy=False).ravel())
    vec = np.concatenate(parts) if parts else np.zeros(0)
    if not np.isfinite(vec).all():
        raise ValueError("the update holds NaN or Inf: refusing to encode it")
    return vec


def unflatten(vec: np.ndarray, spec: Spec) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name in sorted(spec):
        size = math.prod(spec[name])
        out[name] = vec[start : start + size].reshape(spec[name])
        start += size
    return out


def _scaled(vec: np.ndarray, settings: SecAggSettings) -> np.ndarray:
    """``(x + C) / Δ`` in ``[0, L]`` (float64); ``vec`` must be clipped.

    ``np.clip`` only absorbs float rounding of the L2 scaling (at most an ulp past ``±C``).
    """
    c = settings.clip_norm
    if vec.size and float(np.max(np.abs(vec))) > c * (1 + 1e-9):
        raise ValueError(
            f"a coordinate exceeds clip_norm {c}: clip the update (fedlora.clipping.clip_l2) first"
        )
    scaled = (np.clip(vec, -c, c) + c) / settings.step
    return np.clip(scaled, 0, settings.levels)


def quantize(vec: np.ndarray, settings: SecAggSettings) -> np.ndarray:
    """Deterministic ``rint((x + C) / Δ)`` in ``[0, L]`` (uint64); ``vec`` must be clipped."""
    return np.rint(_scaled(vec, settings)).astype(np.uint64)


def quantize_stochastic(vec: np.ndarray, settings: SecAggSettings, seed: int) -> np.ndarray:
    """Unbiased ``floor(s) + (u < s - floor(s))``, ``s = (x + C) / Δ``, in ``[0, L]`` (uint64).

    ``u`` is uniform on [0, 1) from ``numpy.random.default_rng(seed)``: the same seed gives the
    same integers, ``E[q·Δ - C] = x`` and ``|q·Δ - C - x| < Δ``. ``vec`` must be clipped.
    """
    scaled = _scaled(vec, settings)
    low = np.floor(scaled)
    up = np.random.default_rng(seed).random(scaled.size) < scaled - low
    return np.minimum(low + up, settings.levels).astype(np.uint64)


def encode_update(
    vec: np.ndarray, weight: int, settings: SecAggSettings, seed: int | None = None
) -> np.ndarray:
    """The quantized coordinates a node keeps until masking (uint64 in ``[0, L]``).

    64-bit wire: ``q(x)``, deterministic (the weight multiplies in :func:`weighted_vector`).
    Narrow: ``q(y)`` of ``y = (w / max_weight) · x``, rounded stochastically with ``seed``.
    """
    if not settings.narrow:
        return quantize(vec, settings)
    _check_weight(weight, settings)
    if seed is None:
        raise ValueError("narrow quantization rounds stochastically: give the node's seed")
    return quantize_stochastic(vec * (weight / settings.max_weight), settings, seed)


def _check_weight(weight: int, settings: SecAggSettings) -> None:
    if not 0 <= weight <= settings.max_weight:
        raise ValueError(f"weight {weight} outside [0, max_weight={settings.max_weight}]")


def weighted_vector(
    q: np.ndarray,
    weight: int,
    settings: SecAggSettings,
    scalars: Mapping[str, float] | None = None,
) -> np.ndarray:
    """The integer vector a node masks, mod ``2**modulus_bits`` as uint64.

    64-bit wire: ``[w, limbs, w·q_1, ..., w·q_D]`` (exact: w <= max_weight). Narrow: ``[w,
    limbs, q_1, ..., q_D]``, the weight already applied by :func:`encode_update`. ``limbs``
    encode ``scalars`` (:func:`encode_scalars`; none given: zeros).
    """
    _check_weight(weight, settings)
    limbs = encode_scalars(scalars or {}, settings)
    head = 1 + limbs.size
    out = np.empty(q.size + head, dtype=np.uint64)
    out[0] = weight
    out[1:head] = limbs
    if settings.narrow:
        out[head:] = q
    else:
        np.multiply(q, np.uint64(weight), out=out[head:])
    return reduce_mod(out, settings.modulus_bits)


def to_wire(vec: np.ndarray, settings: SecAggSettings) -> np.ndarray:
    """A masked uint64 vector reduced mod ``2**modulus_bits``, in its wire dtype."""
    return reduce_mod(vec, settings.modulus_bits).astype(settings.wire_dtype, copy=False)


def reduce_mod(vec: np.ndarray, modulus_bits: int) -> np.ndarray:
    """``vec mod 2**modulus_bits`` in place (uint64 arithmetic already wraps modulo 2**64)."""
    if modulus_bits < 64:
        np.bitwise_and(vec, np.uint64(2**modulus_bits - 1), out=vec)
    return vec


def decode_sum(
    total: np.ndarray, settings: SecAggSettings, spec: Spec, contributors: int | None = None
) -> tuple[dict[str, np.ndarray], int]:
    """``(Σ w_i x_i by tensor name in float64, Σ w_i)`` from the unmasked sum vector (the
    scalar sums: :func:`decode_scalars` of ``total[1 : 1 + scalar_slots(settings)]``).

    A narrow sum needs ``contributors``, the number of nodes whose vectors it holds.
    """
    length = vector_length(spec, settings)
    if total.shape != (length,):
        raise ValueError(f"sum vector has shape {total.shape}, expected ({length},)")
    weight = int(total[0])
    coords = total[1 + scalar_slots(settings) :].astype(np.float64)
    if settings.narrow:
        if contributors is None:
            raise ValueError("a narrow sum decodes only with its number of contributors")
        offset = settings.clip_norm * contributors
        summed = settings.max_weight * (coords * settings.step - offset)
    else:
        summed = coords * settings.step - settings.clip_norm * weight
    return unflatten(summed, spec), weight
