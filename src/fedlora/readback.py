"""The one reader for every file fedlora reads back: JSON, ``.npz`` and ``.safetensors``.

Files on disk are treated as hostile, as messages from the network are: a checkpoint, a DP
ledger, a node's personal state or an adapter folder may be truncated, corrupted, replaced or
written by someone else. Every reader here bounds what it accepts before using it, and ends in a
one-line :class:`fedlora.errors.FileFormatError` naming the file, what is wrong and what to do
(``fix``), never a traceback from the library that parsed it:

- JSON: nesting at most :data:`MAX_DEPTH` levels, integers of at most :data:`MAX_INT_DIGITS`
  digits, finite numbers only (unless the caller allows ``Infinity``/``NaN``, which Python's
  ``json`` writes for them).
- ``.npz``: ``allow_pickle=False``, a zip of ``.npy`` members (a plain ``.npy`` is refused), each
  member bounded in size before it is read, numeric dtypes only, finite values.
- ``.safetensors``: the header is checked first (it must cover the file), then the dtypes and
  finiteness of every tensor.

No pickle: nothing fedlora reads back goes through ``pickle``, ``torch.load`` or
``np.load(allow_pickle=True)``; ``tests/test_no_pickle.py`` scans the code for them.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import FileFormatError

MAX_DEPTH = 64  # JSON nesting levels (fedlora's own files use fewer than 10)
MAX_INT_DIGITS = 40  # digits of a JSON integer (int64 has 19)
MAX_JSON_BYTES = 256 * 2**20  # a JSON file fedlora reads back (ledgers, checkpoints' meta)
MAX_MEMBER_BYTES = 8 * 2**30  # one array of a .npz file
FLOAT_DTYPES = ("float32",)  # what fedlora writes its adapters and moments in


class JsonLimitError(ValueError):
    """JSON text beyond this module's limits (too deep, a huge number, a non-finite one)."""


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise JsonLimitError(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise JsonLimitError(f"the number {text[:20]} is beyond a float's range")
    return value


def _refuse_constant(name: str) -> float:
    raise JsonLimitError(f"{name} is not a finite number")


def json_decoder(allow_nonfinite: bool = False) -> json.JSONDecoder:
    """A decoder whose numbers are bounded (see the module docstring); depth: :func:`depth_ok`."""
    if allow_nonfinite:
        return json.JSONDecoder(parse_int=_parse_int)
    return json.JSONDecoder(
        parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant
    )


def depth_ok(value: Any, max_depth: int = MAX_DEPTH) -> bool:
    """Whether ``value`` (parsed JSON) nests at most ``max_depth`` lists/objects deep."""
    level: list[Any] = [value]
    for _ in range(max_depth + 1):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return True
    return False


def parse_json(text: str, allow_nonfinite: bool = False, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` within the limits; any problem is a ValueError (JSONDecodeError for bad
    syntax, :class:`JsonLimitError` for the limits) whose message is one line."""
    try:
        value = json_decoder(allow_nonfinite).decode(text)
    except RecursionError:
        raise JsonLimitError(f"nested more than {max_depth} levels deep") from None
    if not depth_ok(value, max_depth):
        raise JsonLimitError(f"nested more than {max_depth} levels deep")
    return value


def _reason(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: Path, fix: str, allow_nonfinite: bool = False) -> Any:
    """The JSON value in the file ``path``, within the limits; a bad file is a FileFormatError."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise JsonLimitError(f"{path.stat().st_size} bytes (at most {MAX_JSON_BYTES})")
        return parse_json(path.read_text(encoding="utf-8"), allow_nonfinite)
    except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise FileFormatError(f"{path} is not valid JSON ({_reason(exc)}): {fix}") from None


def check_arrays(
    arrays: dict[str, np.ndarray], path: Path, fix: str, dtypes: Iterable[str] = FLOAT_DTYPES
) -> dict[str, np.ndarray]:
    """``arrays`` read from ``path`` after checking every dtype is in ``dtypes`` and every value
    is finite; the first problem is a FileFormatError naming the tensor."""
    allowed = tuple(dtypes)
    for name, value in arrays.items():
        if value.dtype.name not in allowed:
            raise FileFormatError(
                f"{path}: tensor {name} is {value.dtype.name}, expected "
                f"{' or '.join(allowed)}: {fix}"
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise FileFormatError(
                f"{path}: tensor {name} holds {bad} non-finite values (NaN or inf): {fix}"
            )
    return arrays


def check_safetensors(path: Path, fix: str) -> list[str]:
    """The tensor names in ``path`` after checking its header and that it covers the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(
            f"{path} is not a readable safetensors file ({_reason(exc)}): {fix}"
        ) from None


def load_safetensors(
    path: Path, fix: str, dtypes: Iterable[str] = FLOAT_DTYPES
) -> dict[str, np.ndarray]:
    """All tensors of ``path`` as numpy arrays, each of a dtype in ``dtypes`` and finite; a bad
    file is a FileFormatError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    check_safetensors(path, fix)
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise FileFormatError(
            f"{path} is not a readable safetensors file ({_reason(exc)}): {fix}"
        ) from None
    return check_arrays(arrays, path, fix, dtypes)


# What reading a damaged zip or .npy member can raise (a flipped flag bit asks for a password:
# RuntimeError; an unknown compression method: NotImplementedError).
_NPZ_ERRORS = (
    zipfile.BadZipFile,
    ValueError,
    OSError,
    EOFError,
    KeyError,
    RuntimeError,
    NotImplementedError,
    struct.error,
    zlib.error,
    OverflowError,
)


def load_npz(path: Path, fix: str, dtypes: Iterable[str] = FLOAT_DTYPES) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file ``path`` (never unpickled), each of a dtype in ``dtypes``
    and finite; a bad file is a FileFormatError.

    Each member's ``.npy`` header is read first: an object dtype, or a shape whose bytes exceed
    what the member holds, is refused before the array is allocated."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            arrays = {
                info.filename.removesuffix(".npy"): _npz_member(zf, info) for info in zf.infolist()
            }
    except _NPZ_ERRORS as exc:
        raise FileFormatError(
            f"{path} is not a readable .npz file ({_reason(exc)}): {fix}"
        ) from None
    return check_arrays(arrays, path, fix, dtypes)


def _npz_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member, its header checked against the member's size before reading."""
    if info.file_size > MAX_MEMBER_BYTES:
        raise ValueError(f"member {info.filename} of {info.file_size} bytes")
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    if dtype.hasobject:
        raise ValueError(f"member {info.filename} holds objects (a pickle)")
    if math.prod(shape) * dtype.itemsize > info.file_size:
        raise ValueError(f"member {info.filename} claims shape {shape}, more than it holds")
    with zf.open(info) as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "JsonLimitError",
    "check_arrays",
    "check_safetensors",
    "depth_ok",
    "json_decoder",
    "load_npz",
    "load_safetensors",
    "parse_json",
    "read_json",
]
