"""The decoding gate: every array and metric a node sends is checked before it is decoded.

Nothing from the network reaches ``np.load``: an array's Flower metadata (``stype``, ``dtype``,
``shape``) and its ``.npy`` header (read here, bounded, never through numpy's loader) must match
what the expected spec says, and ``len(data)`` must be exactly the header plus
``prod(shape) * itemsize`` bytes; only then are the bytes viewed with ``np.frombuffer`` (and
copied). An oversized or lying array is refused before anything of its size is allocated.

Metrics are typed and range-checked against :data:`METRIC_SPECS`, the one table of what a node
may report; the train and eval whitelists are derived from it. Every refusal is a
:class:`ProtocolError` (a :class:`fedlora.errors.WireError`) naming the field and what was expected;
no other exception leaves this module for any input. Numpy and Flower's record types only.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedlora.errors import WireError

NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: np.save bytes, allow_pickle=False
MAX_HEADER = 4096  # bytes of .npy header text accepted (np.save writes ~128)
MAX_INT = 2**53  # metric integers beyond this are refused (floats hold them exactly)
INT64_MAX = 2**63 - 1  # what a Flower record can carry as an integer
_NPY_MAGIC = b"\x93NUMPY"
_NPY_KEYS = {"descr", "fortran_order", "shape"}

Expected = Mapping[str, tuple[np.dtype, tuple[int, ...]]]  # wire name -> (dtype, shape)


class ProtocolError(WireError, ValueError):
    """A message does not follow the wire format (the message names the field and the fix)."""


# --------------------------------------------------------------------------- typed bounds


@dataclass(frozen=True)
class Bound:
    """A scalar's type (int or float) and closed/open range; floats must be finite."""

    kind: type
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        lo, hi = _num(self.low), _num(self.high)
        unbounded = self.high >= MAX_INT  # the integer cap is technical, not a documented range
        if self.low == -math.inf and (self.high == math.inf or unbounded):
            return what
        if self.high == math.inf or unbounded:
            return f"{what} {'>' if self.low_open else '>='} {lo}"
        if self.low == -math.inf:
            return f"{what} {'<' if self.high_open else '<='} {hi}"
        return (
            f"{what} in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        )

    def accepts(self, value: object) -> bool:
        """Whether ``value`` has the right type, is finite and lies in the range."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if isinstance(value, int) and abs(value) > INT64_MAX:
            return False  # also keeps float(value) from overflowing
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)


def is_finite_number(value: object) -> bool:
    """An int or float (not bool) that a float holds finitely."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def show(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile value may be huge)."""
    if isinstance(value, list | tuple) and len(value) > 8:
        text = f"{type(value).__name__} of {len(value)} items"
    else:
        try:
            text = repr(value)
        except Exception:  # noqa: BLE001 -- a hostile object's repr may raise anything
            text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# --------------------------------------------------------------------------- the metric table


@dataclass(frozen=True)
class MetricSpec:
    """One whitelisted metric: its type and range, the replies that carry it, its default."""

    bound: Bound
    replies: frozenset[str]  # "train" and/or "eval"
    required: bool = False
    default: float | None = None  # value when absent (None: no value)
    expect: str = ""  # wording of the expectation when the bound's own is not the clearest
    doc: str = ""


_TRAIN, _EVAL, _BOTH = frozenset({"train"}), frozenset({"eval"}), frozenset({"train", "eval"})
_COUNT = Bound(int, 0, MAX_INT)
# Finite is not enough: a figure enters sums and products (loss x examples, seconds summed over
# nodes), so each has a ceiling far above any honest value that keeps every such sum finite.
MAX_LOSS = 1e4  # nats per token; an untrained model scores about ln(vocabulary), ~11
MAX_PERPLEXITY = 1e22  # nodes report exp(min(loss, 50)) ~ 5.2e21
MAX_SECONDS = 1e7  # about 116 days
MAX_MARGIN = 1e9  # DPO reward margin: beta (<= 1e3) x a log-probability difference
_SECONDS = Bound(float, 0.0, MAX_SECONDS)
_LOSS = Bound(float, 0.0, MAX_LOSS)

# The one table of what a node may report. Both whitelists below derive from it.
METRIC_SPECS: dict[str, MetricSpec] = {
    "num-examples": MetricSpec(
        Bound(int, 1, MAX_INT), _BOTH, True, None, "a positive integer", "aggregation weight"
    ),
    "wire-version": MetricSpec(Bound(int, 1, INT64_MAX), _BOTH, True, None, "", "wire format"),
    "site-id": MetricSpec(Bound(int, -1, 2**31 - 1), _BOTH, False, -1, "", "-1: own data"),
    "train-loss": MetricSpec(_LOSS, _TRAIN, True, None, "", "mean train loss"),
    "load-seconds": MetricSpec(_SECONDS, _TRAIN, False, 0.0, "", "model load time"),
    "train-seconds": MetricSpec(_SECONDS, _TRAIN, False, 0.0, "", "training time"),
    "train-tokens": MetricSpec(_COUNT, _TRAIN, False, 0, "", "tokens processed"),
    "scored-tokens": MetricSpec(_COUNT, _TRAIN, False, 0, "", "tokens the loss covered"),
    "bytes-sent": MetricSpec(_COUNT, _TRAIN, False, 0, "", "encoded delta bytes"),
    "bytes-received": MetricSpec(_COUNT, _TRAIN, False, 0, "", "global adapter bytes"),
    "dp-noised": MetricSpec(Bound(int, 0, 1), _TRAIN, False, 0, "0 or 1", "DP noise added"),
    "eval-loss": MetricSpec(_LOSS, _EVAL, True, None, "", "loss per scored token"),
    "eval-perplexity": MetricSpec(
        Bound(float, 1.0, MAX_PERPLEXITY), _EVAL, True, None, "", "exp(eval-loss)"
    ),
    "eval-accuracy": MetricSpec(Bound(float, 0.0, 1.0), _EVAL, False, None, "", "label tasks"),
    "eval-tokens": MetricSpec(_COUNT, _EVAL, False, 0, "", "scored eval tokens"),
    "eval-pref-accuracy": MetricSpec(
        Bound(float, 0.0, 1.0), _EVAL, False, None, "", "DPO: pairs the reward ranks right"
    ),
    "eval-reward-margin": MetricSpec(
        Bound(float, -MAX_MARGIN, MAX_MARGIN), _EVAL, False, None, "", "DPO: mean reward margin"
    ),
    "eval-seconds": MetricSpec(_SECONDS, _EVAL, False, 0.0, "", "evaluation time"),
}
TRAIN_METRICS = frozenset(k for k, s in METRIC_SPECS.items() if "train" in s.replies)
EVAL_METRICS = frozenset(k for k, s in METRIC_SPECS.items() if "eval" in s.replies)
METRIC_NAMES = {"train": TRAIN_METRICS, "eval": EVAL_METRICS}


def metric_problem(name: str, value: object) -> str | None:
    """Why ``value`` is not acceptable for metric ``name``; None when it is."""
    spec = METRIC_SPECS.get(name)
    if spec is None:
        return f"metric {name!r} is not whitelisted"
    if spec.bound.accepts(value):
        return None
    return f"metric {name}={show(value)}: expected {spec.expect or spec.bound.describe()}"


def check_metrics(record: object, reply: str, wire_version: int) -> dict[str, int | float | None]:
    """Every metric of a ``reply`` ("train" or "eval") checked; absent optional ones defaulted."""
    if not isinstance(record, MetricRecord):
        raise ProtocolError(f"metrics record is a {type(record).__name__}, expected a MetricRecord")
    whitelist = METRIC_NAMES[reply]
    keys = list(record.keys())
    if not all(isinstance(k, str) for k in keys):
        raise ProtocolError("metrics record holds a non-string key")
    extra = sorted(set(keys) - whitelist)
    if extra:
        raise ProtocolError(f"metrics outside the whitelist: {[show(k, 40) for k in extra[:5]]}")
    version = record.get("wire-version")
    if type(version) is not int or version != wire_version:
        raise ProtocolError(
            f"wire version {show(version)}, expected {wire_version}: upgrade the older side"
        )
    values: dict[str, int | float | None] = {}
    for name in sorted(whitelist):
        spec = METRIC_SPECS[name]
        if name not in record:
            if spec.required:
                raise ProtocolError(f"metric {name} missing: a {reply} reply must report it")
            values[name] = spec.default
            continue
        raw = record[name]
        problem = metric_problem(name, raw)
        if problem or not isinstance(raw, int | float):
            raise ProtocolError(problem or f"metric {name}: expected a number")
        values[name] = int(raw) if spec.bound.kind is int else float(raw)
    return values


# --------------------------------------------------------------------------- records


def record_keys(content: object, expected: set[str]) -> RecordDict:
    """``content`` as a RecordDict holding exactly the ``expected`` records."""
    if not isinstance(content, RecordDict):
        raise ProtocolError(f"reply content is a {type(content).__name__}, expected a RecordDict")
    keys = list(content.keys())
    if set(keys) != expected:
        raise ProtocolError(
            f"reply records {sorted(show(k, 40) for k in keys)[:5]}, expected {sorted(expected)}"
        )
    return content


def array_record(content: RecordDict, key: str) -> ArrayRecord:
    record = content.get(key)
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"record {key!r} is a {type(record).__name__}, expected an ArrayRecord")
    return record


# --------------------------------------------------------------------------- arrays


def npy_layout(data: bytes) -> tuple[str, bool, tuple[int, ...], int]:
    """``(descr, fortran_order, shape, data offset)`` from a ``.npy`` header, read bounded.

    Only format versions 1.0 and 2.0 with a header of at most :data:`MAX_HEADER` bytes and a
    literal dict of exactly ``descr`` (a string), ``fortran_order`` (a bool) and ``shape`` (a
    tuple of non-negative ints) are accepted.
    """
    if len(data) < 10 or data[:6] != _NPY_MAGIC:
        raise ProtocolError("bytes are not a .npy array (bad magic or under 10 bytes)")
    version = (data[6], data[7])
    if version == (1, 0):
        size_bytes = 2
    elif version == (2, 0):
        size_bytes = 4
    else:
        raise ProtocolError(f".npy format version {version[0]}.{version[1]}, expected 1.0 or 2.0")
    start = 8 + size_bytes
    length = int.from_bytes(data[8:start], "little")
    if length > MAX_HEADER:
        raise ProtocolError(f".npy header of {length} bytes, more than {MAX_HEADER}")
    if len(data) < start + length:
        raise ProtocolError(f".npy header of {length} bytes, truncated at {len(data) - start}")
    try:
        header = ast.literal_eval(data[start : start + length].decode("latin1"))
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        raise ProtocolError(".npy header is not a Python literal") from None
    if not isinstance(header, dict) or set(header) != _NPY_KEYS:
        raise ProtocolError(".npy header is not a dict of descr, fortran_order and shape")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str) or not isinstance(fortran, bool):
        raise ProtocolError(f".npy header descr={show(descr)}, fortran_order={show(fortran)}")
    if not isinstance(shape, tuple) or not all(
        type(d) is int and 0 <= d <= INT64_MAX for d in shape
    ):
        raise ProtocolError(f".npy header shape={show(shape)}: expected a tuple of sizes")
    return descr, fortran, shape, start + length


def _meta_shape(shape: object) -> tuple[int, ...] | None:
    if isinstance(shape, list | tuple) and all(type(d) is int for d in shape):
        return tuple(shape)
    return None


def array_problem(array: object, dtype: np.dtype, shape: tuple[int, ...]) -> str | None:
    """Why ``array`` is not a ``dtype`` array of ``shape`` in np.save bytes; None if it is."""
    if not isinstance(array, Array):
        return f"is a {type(array).__name__}, expected a flwr Array"
    stype, meta_dtype, data = array.stype, array.dtype, array.data
    if stype != NUMPY_STYPE:
        return f"stype {show(stype)}, expected {NUMPY_STYPE!r}"
    if meta_dtype != dtype.name:
        return f"dtype {show(meta_dtype)}, expected {dtype.name}"
    if _meta_shape(array.shape) != shape:
        return f"shape {show(array.shape)}, expected {shape}"
    if not isinstance(data, bytes):
        return f"data is a {type(data).__name__}, expected bytes"
    payload = math.prod(shape) * dtype.itemsize
    if len(data) > payload + 16 + MAX_HEADER:
        return f"{len(data)} bytes, far more than the {payload} a {dtype.name} {shape} needs"
    try:
        descr, _, npy_shape, offset = npy_layout(data)
    except ProtocolError as exc:
        return str(exc)
    if descr != dtype.str:
        return f".npy dtype {show(descr)}, expected {dtype.str!r} ({dtype.name}; never pickled)"
    if npy_shape != shape:
        return f".npy shape {show(npy_shape)}, expected {shape}"
    if len(data) != offset + payload:
        return f"{len(data)} bytes, expected {offset + payload} ({offset} header + {payload} data)"
    return None


def read_array(array: Array, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The checked array's values (C order, a fresh writable copy); call after array_problem."""
    _, fortran, _, offset = npy_layout(array.data)
    flat = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=offset)
    return np.array(flat.reshape(shape, order="F" if fortran else "C"), order="C")


def read_arrays(record: object, expected: Expected) -> dict[str, np.ndarray]:
    """All arrays of ``record`` after checking each against ``expected`` (name -> dtype, shape).

    Raises :class:`ProtocolError` listing up to five problems (missing, unexpected and malformed
    arrays); decodes nothing unless every array passes.
    """
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"arrays record is a {type(record).__name__}, expected an ArrayRecord")
    names = list(record.keys())
    found: list[str] = []
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(show(k, 80) for k in set(names) - set(expected))
    if missing:
        found.append(f"missing {len(missing)} arrays (first: {missing[0]})")
    if unexpected:
        found.append(f"{len(unexpected)} unexpected arrays (first: {unexpected[0]})")
    for name in sorted(set(expected) & set(names)):
        dtype, shape = expected[name]
        problem = array_problem(record[name], np.dtype(dtype), tuple(shape))
        if problem:
            found.append(f"array {name}: {problem}")
    if found:
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        raise ProtocolError("; ".join(found[:5]) + more)
    return {
        name: read_array(record[name], np.dtype(dtype), tuple(shape))
        for name, (dtype, shape) in sorted(expected.items())
    }


__all__ = [
    "EVAL_METRICS",
    "MAX_HEADER",
    "METRIC_SPECS",
    "NUMPY_STYPE",
    "TRAIN_METRICS",
    "Bound",
    "Expected",
    "MetricSpec",
    "ProtocolError",
    "array_problem",
    "check_metrics",
    "is_finite_number",
    "metric_problem",
    "npy_layout",
    "read_array",
    "read_arrays",
    "record_keys",
    "show",
]
