"""Files fedlora reads back (adapters, checkpoints, model weights), checked before use.

A truncated or corrupted ``.safetensors`` or ``.json`` file ends in a one-line
:class:`fedlora.errors.FileFormatError` naming the file and what to do, never a traceback from
the library that would have parsed it. Checking a ``.safetensors`` file reads its header only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import FileFormatError


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
