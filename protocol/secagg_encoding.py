"""SecAgg+ integer encoding: flatten an update, quantize it, weight it, and decode the sum.

The arithmetic behind :mod:`fedlora.protocol.secagg` (whose docstring states the scheme and
its error bounds): a client's clipped float update becomes a vector of integers modulo
``2**modulus_bits``; the server's unmasked sum of such vectors becomes the weighted float sum.
Numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedlora.protocol.secagg import SecAggSettings

Spec = Mapping[str, tuple[int, ...]]  # tensor name -> shape; vectors follow sorted(names)


def vector_length(spec: Spec) -> int:
    """Length of an encoded vector: the weight plus every coordinate."""
    return 1 + sum(math.prod(shape) for shape in spec.values())


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


def weighted_vector(q: np.ndarray, weight: int, settings: SecAggSettings) -> np.ndarray:
    """The integer vector a node masks, mod ``2**modulus_bits`` as uint64.

    64-bit wire: ``[w, w·q_1, ..., w·q_D]`` (exact: w <= max_weight). Narrow: ``[w, q_1, ...,
    q_D]``, the weight already applied by :func:`encode_update`.
    """
    _check_weight(weight, settings)
    out = np.empty(q.size + 1, dtype=np.uint64)
    out[0] = weight
    if settings.narrow:
        out[1:] = q
    else:
        np.multiply(q, np.uint64(weight), out=out[1:])
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
    """``(Σ w_i x_i by tensor name in float64, Σ w_i)`` from the unmasked sum vector.

    A narrow sum needs ``contributors``, the number of nodes whose vectors it holds.
    """
    if total.shape != (vector_length(spec),):
        raise ValueError(f"sum vector has shape {total.shape}, expected ({vector_length(spec)},)")
    weight = int(total[0])
    if settings.narrow:
        if contributors is None:
            raise ValueError("a narrow sum decodes only with its number of contributors")
        offset = settings.clip_norm * contributors
        summed = settings.max_weight * (total[1:].astype(np.float64) * settings.step - offset)
    else:
        summed = total[1:].astype(np.float64) * settings.step - settings.clip_norm * weight
    return unflatten(summed, spec), weight
