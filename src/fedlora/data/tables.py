"""Data kept as tables: Parquet files and Hugging Face ``datasets`` folders (``save_to_disk``).

Each row is a record, read like a JSON record (:func:`fedlora.data.readers.record_example`): a
``messages`` column is a chat, otherwise the prompt, response, system and text columns map as
for JSONL and CSV. Problems name the file and the row (``file:row N``, 1-based). pyarrow reads
Parquet; ``datasets.load_from_disk`` reads a saved dataset (both already installed with
fedlora). A saved ``DatasetDict`` (several splits) is refused with the splits to choose from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.data.records import Example, Problem
from fedlora.errors import DataError

if TYPE_CHECKING:
    from fedlora.data.formats import DataSpec

BATCH_ROWS = 1024
DATASET_FILES = ("dataset_info.json", "state.json")  # what save_to_disk writes for one split
DATASET_DICT_FILE = "dataset_dict.json"  # what save_to_disk writes for several splits


def is_dataset_folder(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and (
        all((path / name).is_file() for name in DATASET_FILES)
        or (path / DATASET_DICT_FILE).is_file()
    )


def read_parquet(path: Path, source: str, spec: DataSpec) -> Iterator[Example | Problem]:
    """Every row of a Parquet file, as a record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        batches = table.iter_batches(batch_size=BATCH_ROWS)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield _record(record, f"{source}:row {row}", spec)
    except (pa.ArrowException, OSError, ValueError) as exc:
        yield Problem(
            source,
            f"not a readable Parquet file ({type(exc).__name__}: {str(exc)[:120]}): write it "
            f"again (e.g. pandas' to_parquet) or convert it to JSONL",
            droppable=False,
        )


def read_dataset(path: Path, source: str, spec: DataSpec) -> Iterator[Example | Problem]:
    """Every row of a dataset saved with ``save_to_disk``, as a record."""
    if (path / DATASET_DICT_FILE).is_file():
        try:
            splits = json.loads((path / DATASET_DICT_FILE).read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError):
            splits = []
        names = ", ".join(f"{source}/{s}" for s in splits) or f"{source}/SPLIT"
        raise DataError(
            f"{source}: a dataset of several splits ({', '.join(splits) or '?'}): give one of "
            f"them: {names}"
        )
    from datasets import load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure to read a saved dataset is one line
        yield Problem(
            source,
            f"not a readable saved dataset ({type(exc).__name__}: {str(exc)[:120]}): save it "
            f"again with Dataset.save_to_disk",
            droppable=False,
        )
        return
    for row, record in enumerate(data, start=1):
        yield _record(record, f"{source}:row {row}", spec)


def _record(record: object, where: str, spec: DataSpec) -> Example | Problem:
    from fedlora.data.readers import record_example

    return record_example(record, where, spec)


__all__ = ["is_dataset_folder", "read_dataset", "read_parquet"]
