"""Files fedlora writes (adapters, checkpoints, ledgers, personal state): whole or not at all.

The readers of those files live in :mod:`fedlora.readback` (re-exported here for the modules
that import them from this one). Writes go to a temporary file (or folder) of a unique name
beside the target, which replaces the target at once when complete (:func:`atomic_file`,
:func:`atomic_folder`): a crash or an error mid-write leaves the previous version and no partial
file, and two writers never share a temporary name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fedlora.readback import check_safetensors, load_safetensors, read_json

__all__ = ["atomic_file", "atomic_folder", "check_safetensors", "load_safetensors", "read_json"]


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
