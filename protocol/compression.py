"""Compressed adapter deltas on the wire: ``none``, ``fp16``, ``int8`` and ``int8-block``.

A client encodes its delta (``dict[str, ndarray]``, float32, PEFT tensor names) with
:func:`encode`; the server decodes it back to float32 with :func:`decode`, which checks every
wire tensor against the expected names and shapes first. :func:`nbytes` gives the payload bytes
for the ``bytes-sent`` / ``bytes-received`` metrics.

Wire layout (what :func:`decode` accepts, and nothing else):

=============  ==================================================================================
codec          wire tensors for each adapter tensor ``name`` of shape ``s`` with ``n`` values
=============  ==================================================================================
``none``       ``name``: float32, shape ``s``
``fp16``       ``name``: float16, shape ``s`` (values beyond +-65504 are refused, not saturated)
``int8``       ``name``: int8 in [-127, 127], shape ``s``; ``name::scale``: float32, shape (1,)
``int8-block`` ``name``: int8 in [-127, 127], shape ``s``; ``name::scale``: float32, shape
               ``(ceil(n / block),)``, one scale per ``block`` consecutive values of the
               C-order flattened tensor (the last block may be short)
=============  ==================================================================================

The int8 codecs are symmetric (absmax) quantization: ``scale = max|x| / 127`` over the tensor or
the block, ``q = round(x / scale)``, decoded as ``q * scale``. A zero tensor or block has scale 0.
Blockwise scales (as in Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization",
arXiv:2110.02861) keep one outlier from flattening the resolution of a whole tensor.

Rounding is deterministic round-to-nearest (ties to even) unless a ``numpy.random.Generator`` is
given: then it is unbiased stochastic rounding (each value goes to one of its two neighbouring
grid points with probabilities that make the expectation exact), for all lossy codecs.

Error bounds (deterministic rounding; stochastic rounding doubles them):
``fp16`` ``|err| <= |x| * 2**-11 + 2**-25`` (half an ulp; the constant covers subnormals);
``int8`` / ``int8-block`` ``|err| <= scale / 2`` of the tensor / block holding the value.

With secure aggregation the server sees only the sum of masked integer vectors, so what is
masked must lie on one grid shared by all clients: a per-client scale cannot be undone after
summing. There, these codecs decide what a client puts on the wire only if every client uses
the same scale (int8 values of n clients then sum exactly in 8 + ceil(log2 n) bits); a codec
with per-client scales applies to replies the server reads one by one. Numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedlora.errors import WireError
from fedlora.protocol.adapter import TensorSpec

SCALE_SUFFIX = "::scale"  # wire name of a payload's scale tensor: "<name>::scale"
DEFAULT_BLOCK = 64
_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_QMAX = 127  # symmetric int8 range [-127, 127]; -128 is never produced and is refused


class CodecError(WireError, ValueError):
    """Wire tensors cannot be encoded or decoded with the requested codec."""


@dataclass(frozen=True)
class Codec:
    name: str
    dtype: np.dtype  # dtype of the payload tensor on the wire
    scaled: bool  # each payload comes with a float32 "<name>::scale" tensor
    blockwise: bool  # one scale per block of values instead of one per tensor


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("none", np.dtype(np.float32), scaled=False, blockwise=False),
        Codec("fp16", np.dtype(np.float16), scaled=False, blockwise=False),
        Codec("int8", np.dtype(np.int8), scaled=True, blockwise=False),
        Codec("int8-block", np.dtype(np.int8), scaled=True, blockwise=True),
    )
}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r}: use one of {sorted(CODECS)}")
    return CODECS[name]


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of ``arrays`` (what ``bytes-sent`` / ``bytes-received`` record)."""
    return sum(int(np.asarray(a).nbytes) for a in arrays.values())


def _num_scales(codec: Codec, size: int, block: int) -> int:
    return -(-size // block) if codec.blockwise else 1


def encode(
    arrays: Mapping[str, np.ndarray],
    codec: str,
    block: int = DEFAULT_BLOCK,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Wire tensors for ``arrays`` (see the module docstring for the layout).

    ``block`` is used by ``int8-block`` only; ``rng`` turns on unbiased stochastic rounding.
    Raises :class:`CodecError` naming the tensor for NaN/Inf values, values out of fp16 range
    and names that would clash with scale tensors.
    """
    spec = get_codec(codec)
    _check_block(block)
    wire: dict[str, np.ndarray] = {}
    for name in sorted(arrays):
        if SCALE_SUFFIX in name:
            raise CodecError(f"{name}: tensor names may not contain {SCALE_SUFFIX!r}")
        x = np.asarray(arrays[name], dtype=np.float32)
        if not np.isfinite(x).all():
            raise CodecError(f"{name}: holds NaN or Inf; refusing to encode it")
        if spec.name == "none":
            wire[name] = x.copy()
        elif spec.name == "fp16":
            wire[name] = _to_fp16(name, x, rng)
        else:
            groups = _groups(x.reshape(-1).astype(np.float64), _group(spec, x.size, block))
            scale = np.zeros(_num_scales(spec, x.size, block), np.float32)
            scale[: groups.shape[0]] = np.abs(groups).max(axis=1, initial=0.0) / _QMAX
            safe = np.where(scale > 0, scale, 1.0).astype(np.float64)[:, None]
            y = groups / safe
            q = np.rint(y) if rng is None else np.floor(y + rng.random(y.shape))
            q = np.clip(q, -_QMAX, _QMAX).astype(np.int8).reshape(-1)[: x.size]
            wire[name] = q.reshape(x.shape)
            wire[name + SCALE_SUFFIX] = scale
    return wire


def decode(
    wire: Mapping[str, np.ndarray],
    codec: str,
    spec: Mapping[str, tuple[int, ...] | TensorSpec],
    block: int = DEFAULT_BLOCK,
) -> dict[str, np.ndarray]:
    """Float32 arrays with the names and shapes of ``spec`` (name -> shape) from ``wire``.

    ``spec`` values are shapes or :class:`fedlora.protocol.adapter.TensorSpec`. ``block`` must be
    the one the sender used (``int8-block``). Checks everything before decoding anything and
    raises :class:`CodecError` listing what is wrong per tensor (missing payload or scale,
    unexpected tensors, dtype, shape, scale length, NaN/Inf or negative scales, -128).
    """
    c = get_codec(codec)
    _check_block(block)
    shapes = {k: _shape_of(v) for k, v in spec.items()}
    if not isinstance(wire, Mapping) or not all(isinstance(v, np.ndarray) for v in wire.values()):
        raise CodecError(f"{codec} wire: expected a mapping of names to numpy arrays")
    found = problems(wire, c, shapes, block)
    if found:
        raise CodecError(
            f"{codec} wire: "
            + "; ".join(found[:5])
            + (f" (and {len(found) - 5} more)" if len(found) > 5 else "")
        )
    out: dict[str, np.ndarray] = {}
    for name, shape in sorted(shapes.items()):
        payload = wire[name]
        if not c.scaled:
            out[name] = payload.astype(np.float32)
            continue
        scale = wire[name + SCALE_SUFFIX].astype(np.float32)
        size = payload.size
        groups = _groups(payload.reshape(-1).astype(np.float32), _group(c, size, block))
        with np.errstate(over="ignore"):  # an overflow gives Inf, which validation refuses
            values = (groups * scale[: groups.shape[0], None]).reshape(-1)[:size]
        out[name] = values.astype(np.float32).reshape(shape)
    return out


def wire_spec(
    codec: str,
    spec: Mapping[str, tuple[int, ...] | TensorSpec],
    block: int = DEFAULT_BLOCK,
) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Wire name -> (dtype, shape) of every tensor ``codec`` puts on the wire for ``spec``.

    What a reply must hold exactly, checked before any byte of it is decoded.
    """
    c = get_codec(codec)
    _check_block(block)
    out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for name, value in spec.items():
        shape = _shape_of(value)
        out[name] = (c.dtype, shape)
        if c.scaled:
            size = int(np.prod(shape, dtype=np.int64))
            out[name + SCALE_SUFFIX] = (np.dtype(np.float32), (_num_scales(c, size, block),))
    return out


def _shape_of(value: tuple[int, ...] | TensorSpec) -> tuple[int, ...]:
    shape = value.shape if isinstance(value, TensorSpec) else value
    return tuple(int(d) for d in shape)


def problems(
    wire: Mapping[str, np.ndarray],
    codec: Codec,
    spec: Mapping[str, tuple[int, ...]],
    block: int = DEFAULT_BLOCK,
) -> list[str]:
    """Every way ``wire`` differs from what ``codec`` produces for ``spec``; empty if none."""
    found: list[str] = []
    expected = set(spec) | ({k + SCALE_SUFFIX for k in spec} if codec.scaled else set())
    for name in sorted(set(wire) - expected):
        found.append(f"unexpected wire tensor {name}")
    for name, shape in sorted(spec.items()):
        payload = wire.get(name)
        if payload is None:
            found.append(f"{name}: payload missing")
        elif payload.dtype != codec.dtype:
            found.append(f"{name}: payload dtype {payload.dtype.name}, expected {codec.dtype.name}")
        elif tuple(payload.shape) != shape:
            found.append(f"{name}: payload shape {tuple(payload.shape)}, expected {shape}")
        elif not codec.scaled and not np.isfinite(payload).all():
            found.append(f"{name}: payload holds NaN or Inf")
        elif codec.scaled and payload.size and int(payload.min()) < -_QMAX:
            found.append(f"{name}: payload holds -128, outside the symmetric range [-127, 127]")
        if not codec.scaled:
            continue
        scale_name = name + SCALE_SUFFIX
        scale = wire.get(scale_name)
        want = (_num_scales(codec, int(np.prod(shape, dtype=np.int64)), block),)
        if scale is None:
            found.append(f"{name}: scale tensor {scale_name} missing")
        elif scale.dtype != np.float32:
            found.append(f"{name}: scale dtype {scale.dtype.name}, expected float32")
        elif tuple(scale.shape) != want:
            found.append(
                f"{name}: scale shape {tuple(scale.shape)}, expected {want}"
                + (f" (block {block})" if codec.blockwise else "")
            )
        elif not np.isfinite(scale).all():
            found.append(f"{name}: scale holds NaN or Inf")
        elif (scale < 0).any():
            found.append(f"{name}: scale holds a negative value")
    return found


def _group(codec: Codec, size: int, block: int) -> int:
    """Values per scale: ``block`` (at most the tensor), or the whole tensor for one scale.

    A block longer than the tensor groups the same values as the tensor's length does, without
    padding up to ``block`` (which may be huge).
    """
    return min(block, max(size, 1)) if codec.blockwise else max(size, 1)


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise CodecError(f"block={block!r}: must be a positive integer (e.g. {DEFAULT_BLOCK})")


def _groups(flat: np.ndarray, block: int) -> np.ndarray:
    """``flat`` zero-padded to a multiple of ``block`` and shaped (groups, block)."""
    pad = (-flat.size) % block
    return np.concatenate([flat, np.zeros(pad, flat.dtype)]).reshape(-1, block)


def _to_fp16(name: str, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    if x.size and float(np.abs(x).max()) > _FP16_MAX:
        raise CodecError(
            f"{name}: |value| {float(np.abs(x).max()):.4g} exceeds the fp16 range "
            f"(65504); send it with 'int8-block' or 'none'"
        )
    nearest = x.astype(np.float16)
    if rng is None:
        return nearest
    # The other neighbouring fp16 value, on the far side of x; pick it with probability
    # |x - nearest| / |other - nearest|, which makes the expectation exactly x.
    below = nearest.astype(np.float64) < x
    other = np.where(
        below, np.nextafter(nearest, np.float16(np.inf)), np.nextafter(nearest, np.float16(-np.inf))
    )
    gap = other.astype(np.float64) - nearest.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(gap != 0, (x - nearest.astype(np.float64)) / gap, 0.0)
    p = np.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0)
    return np.where(rng.random(x.shape) < p, other, nearest).astype(np.float16)


__all__ = [
    "CODECS",
    "DEFAULT_BLOCK",
    "SCALE_SUFFIX",
    "Codec",
    "CodecError",
    "decode",
    "encode",
    "get_codec",
    "nbytes",
    "problems",
    "wire_spec",
]
