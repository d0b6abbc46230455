"""A data set split across simulated clients, kept on disk: the pool once, each client's indices.

A partition folder (written by ``fedlora.simulations.partition``) holds:

- ``train.jsonl``: the training pool, one example per line in a canonical form
  (``{"source", "messages"}`` or ``{"source", "text"}``), read back by :func:`read_examples`;
- ``indices.npy`` and ``offsets.npy``: client ``i`` trains on
  ``pool[indices[offsets[i]:offsets[i + 1]]]``;
- ``test.jsonl`` (when the test split came from the pool), ``partition.json`` and ``.png``.

A node process reads the pool once and memory-maps the indices, so what it keeps in memory does
not grow with the number of clients it serves in turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedlora.data.records import Example, Turn
from fedlora.errors import DataError
from fedlora.readback import parse_json

POOL = "train.jsonl"
TEST = "test.jsonl"
INDICES = "indices.npy"
OFFSETS = "offsets.npy"
STATS = "partition.json"


def write_examples(path: Path, examples: Iterable[Example]) -> int:
    """Write examples as canonical JSONL; returns how many."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            record: dict[str, object] = {"source": ex.source}
            if ex.turns:
                record["messages"] = [{"role": t.role, "content": t.content} for t in ex.turns]
                if ex.rejected:
                    record["rejected"] = ex.rejected
            else:
                record["text"] = ex.text
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_examples(path: Path) -> list[Example]:
    """Examples written by :func:`write_examples` (a damaged line names the file and line)."""
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = parse_json(line)
            turns = tuple(Turn(m["role"], m["content"]) for m in record.get("messages", ()))
            out.append(
                Example(
                    source=record["source"],
                    turns=turns,
                    text=record.get("text", ""),
                    rejected=record.get("rejected", ""),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(
                f"{path}:{line_no}: not a partition record ({exc}): write the partition again "
                f"with fedlora simulate --data"
            ) from None
    return out


def write_indices(folder: Path, parts: list[np.ndarray]) -> None:
    """Save each client's pool indices as one flat array plus offsets."""
    sizes = [len(p) for p in parts]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    np.save(folder / INDICES, flat)
    np.save(folder / OFFSETS, offsets)


def client_indices(folder: str | Path, client: int) -> np.ndarray:
    """Client ``client``'s indices into the pool (memory-mapped)."""
    folder = Path(folder)
    offsets, indices = _index_file(folder / OFFSETS), _index_file(folder / INDICES)
    if (
        len(offsets) < 1
        or offsets[0] != 0
        or np.any(np.diff(offsets) < 0)
        or (offsets[-1] != len(indices))
    ):
        raise DataError(f"{folder}: the partition's offsets do not fit its indices: {_REDO}")
    if not 0 <= client < len(offsets) - 1:
        raise DataError(
            f"{folder}: partition-id {client} has no data: the partition has "
            f"{len(offsets) - 1} clients; run that many nodes"
        )
    return indices[offsets[client] : offsets[client + 1]]


_REDO = "write the partition again with fedlora simulate --data"


def _index_file(path: Path) -> np.ndarray:
    """A partition's int64 index file (memory-mapped, never unpickled), or a DataError."""
    try:
        values = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a partition index file ({exc}): {_REDO}") from None
    if not isinstance(values, np.ndarray) or values.dtype != np.int64 or values.ndim != 1:
        raise DataError(f"{path}: not a partition index file (int64, one dimension): {_REDO}")
    return values


def client_examples(folder: str | Path, client: int) -> list[Example]:
    """The training examples of client ``client`` (its partition id) in this partition."""
    indices = client_indices(folder, client)
    pool = _pool(str(Path(folder) / POOL))
    if len(indices) and not 0 <= int(indices.min()) <= int(indices.max()) < len(pool):
        raise DataError(f"{folder}: the partition's indices point past its pool: {_REDO}")
    return [pool[int(i)] for i in indices]


@lru_cache(maxsize=1)
def _pool(path: str) -> tuple[Example, ...]:
    """The training pool, read once per process (one partition at a time)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no partition pool here: run fedlora simulate --data to write it")
    return tuple(read_examples(Path(path)))
