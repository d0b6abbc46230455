"""Files fedlora reads back (adapters, checkpoints, model weights), checked before use, and
written whole or not at all.

A truncated or corrupted ``.safetensors`` or ``.json`` file ends in a one-line
:class:`fedlora.errors.FileFormatError` naming the file and what to do, never a traceback from
the library that would have parsed it. Checking a ``.safetensors`` file reads its header only.

Writes go to a temporary file (or folder) of a unique name beside the target, which replaces the
target at once when complete (:func:`atomic_file`, :func:`atomic_folder`): a crash or an error
mid-write leaves the previous version and no partial file, and two writers never share a
temporary name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedlora.errors import FileFormatError


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield an open temporary file beside ``path`` (``mode`` "wb" or "w"); when the block ends
    without an exception it is flushed to disk and replaces ``path`` at once. On an exception
    the temporary file is removed and ``path`` is left as it was."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file mode={mode!r}: use 'wb' or 'w'")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; on success it replaces ``folder`` at once.

    On an exception the temporary folder is removed and ``folder`` is left as it was.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f".{folder.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reason(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def load_safetensors(path: Path, fix: str) -> dict[str, np.ndarray]:
    """All tensors of ``path`` as numpy arrays; a bad file is a FileFormatError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    check_safetensors(path, fix)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise FileFormatError(
            f"{path} is not a readable safetensors file ({_reason(exc)}): {fix}"
        ) from None


def read_json(path: Path, fix: str) -> Any:
    """The JSON value in ``path``; a bad file is a FileFormatError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise FileFormatError(f"{path} is not valid JSON ({_reason(exc)}): {fix}") from None
