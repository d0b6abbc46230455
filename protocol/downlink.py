"""What the server sends a node each round: only the factors nodes aggregate, maybe as a delta.

A strategy's nodes need the global value of the factors they *send* (FedIT: A and B; FFA-LoRA:
B; FedSA-LoRA: A; Fed-SB: R). The others are never sent: they are frozen at the seeded initial
adapter (FFA-LoRA's A, Fed-SB's A and B) or start there and stay on the node (FedSA-LoRA's B),
so a node derives them itself with :func:`fedlora.lora.initial_adapter` from the run's seed and
checks them against the server's :func:`digest` of them (``frozen-digest`` in the round config).

The sent factors travel in one of two forms (the round config's ``down-*`` fields):

- **exact**: float32 values (``down-base = -1``, whatever ``down-codec`` says); always used
  for a node the server has no acknowledged version for, and with ``down-codec = "none"``;
- **delta**: the change since the version the node holds (``down-base``), encoded with a codec
  of :mod:`fedlora.protocol.compression` (``fp16``, ``int8``, ``int8-block``). The server makes
  the decoded result its global adapter (:func:`apply_delta`, the same float32 arithmetic on
  both sides), so a node that applies the delta holds *exactly* the server's global: encoding
  errors never accumulate and never make nodes drift apart. An empty delta with ``down-base ==
  down-version`` means "nothing changed".

A node keeps what it holds (and its version) only when ``down-codec`` is not ``none``. After
applying, a node compares the :func:`digest` of what it holds with ``down-digest``; any
mismatch (a lost version, corrupted state) is refused in one line, and the server sends the
exact form next time. Numpy only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from fedlora.protocol.compression import decode

Arrays = dict[str, np.ndarray]
EXACT = -1  # down-base of an exact (absolute float32) downlink


def digest(arrays: Mapping[str, np.ndarray]) -> str:
    """A SHA-256 (hex, 32 characters) of names, shapes and float32 bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name], dtype=np.float32)
        h.update(name.encode())
        h.update(repr(tuple(value.shape)).encode())
        h.update(value.tobytes())
    return h.hexdigest()[:32]


def apply_delta(
    held: Mapping[str, np.ndarray],
    wire: Mapping[str, np.ndarray],
    codec: str,
    spec: Mapping[str, tuple[int, ...]],
    block: int,
) -> Arrays:
    """``held + decode(wire)`` in float32, the one addition both sides perform."""
    delta = decode(dict(wire), codec, dict(spec), block)
    return {n: (held[n] + delta[n]).astype(np.float32) for n in sorted(spec)}


__all__ = ["EXACT", "apply_delta", "digest"]
