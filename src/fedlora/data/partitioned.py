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
            record = json.loads(line)
            turns = tuple(Turn(m["role"], m["content"]) for m in record.get("messages", ()))
            out.append(Example(source=record["source"], turns=turns, text=record.get("text", "")))
        except (ValueError, KeyError, TypeError) as exc:
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
    offsets = np.load(folder / OFFSETS, mmap_mode="r")
    if not 0 <= client < len(offsets) - 1:
        raise DataError(
            f"{folder}: partition-id {client} has no data: the partition has "
            f"{len(offsets) - 1} clients; run that many nodes"
        )
    indices: np.ndarray = np.load(folder / INDICES, mmap_mode="r")
    return indices[offsets[client] : offsets[client + 1]]


def client_examples(folder: str | Path, client: int) -> list[Example]:
    """The training examples of client ``client`` (its partition id) in this partition."""
    indices = client_indices(folder, client)
    pool = _pool(str(Path(folder) / POOL))
    return [pool[int(i)] for i in indices]


@lru_cache(maxsize=1)
def _pool(path: str) -> tuple[Example, ...]:
    """The training pool, read once per process (one partition at a time)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no partition pool here: run fedlora simulate --data to write it")
    return tuple(read_examples(Path(path)))
