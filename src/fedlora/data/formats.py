"""Load user training data (chat JSONL, prompt/response JSONL, CSV, TSV, plain text, Parquet, a
``datasets`` folder from ``save_to_disk``) as examples.

``load_examples(DataSpec(path))`` reads a file or every supported file in a folder and checks
every record. Bad records are reported as ``file:line: what is wrong: what to do``: all of them
in one :class:`~fedlora.errors.DataError` (on-bad-record=stop), or dropped and listed in
``LoadResult.skipped`` (on-bad-record=skip). Problems with a whole file (wrong encoding, a header
without the mapped columns, no records) always stop. The readers live in
:mod:`fedlora.data.readers`, the record checks in :mod:`fedlora.data.records`.
"""

from __future__ import annotations

import codecs
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fedlora.data.readers import FAMILY_OF_EXTENSION, FAMILY_OF_FORMAT, READERS, decode
from fedlora.data.records import Example, Problem, Turn
from fedlora.data.tables import is_dataset_folder, read_dataset, read_parquet
from fedlora.errors import ConfigError, DataError

__all__ = [
    "FORMATS",
    "DataSpec",
    "Example",
    "LoadResult",
    "Turn",
    "describe",
    "load_examples",
    "train_eval_split",
]

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("auto", *FAMILY_OF_FORMAT)
BAD_RECORD_MODES: tuple[str, ...] = ("stop", "skip")
TABLE_READERS = {"parquet": read_parquet, "dataset": read_dataset}  # read from the path
MAX_LISTED = 20  # problems listed in one error message


@dataclass(frozen=True)
class DataSpec:
    path: str  # a data file, or a folder read recursively (hidden files ignored), in sorted order
    format: str = "auto"  # auto (by extension) | chat | pairs | preference | csv | tsv | text
    prompt_column: str = "prompt"  # pairs/csv/tsv: the column with the user's prompt
    response_column: str = "response"  # pairs/csv/tsv: the column with the answer to learn
    system_column: str = ""  # optional column with a system prompt (blank cell: none)
    text_column: str = ""  # pairs/csv/tsv: rows are plain text from this column instead
    on_bad_record: str = "stop"  # stop (raise listing every bad record) | skip (drop, count them)
    encoding: str = "utf-8"  # the files' text encoding; a UTF-8 byte-order mark is accepted

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        for f in fields(self):
            if not isinstance(getattr(self, f.name), str):
                raise ConfigError(f"{_key(f.name)}={getattr(self, f.name)!r}: expected text")
        if not self.path.strip():
            raise ConfigError("path is empty: give a data file or a folder of them")
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r}: use one of {', '.join(FORMATS)}")
        if self.on_bad_record not in BAD_RECORD_MODES:
            raise ConfigError(f"on-bad-record={self.on_bad_record!r}: use stop or skip")
        for name in ("prompt_column", "response_column"):
            if not getattr(self, name).strip():
                raise ConfigError(
                    f"{_key(name)} is empty: name the column, e.g. "
                    f"{_key(name)}={name.split('_')[0]}"
                )
        if self.prompt_column == self.response_column:
            raise ConfigError(
                f"prompt-column and response-column are both "
                f"{self.prompt_column!r}: name two different columns"
            )
        if (self.text_column or self.system_column) and self.format in ("chat", "text"):
            raise ConfigError(
                f"format={self.format}: text-column and system-column apply to "
                "pairs, csv and tsv records only; drop them"
            )
        if self.text_column and self.system_column:
            raise ConfigError(
                "text-column and system-column are both set: plain-text rows "
                "have no system prompt; drop system-column"
            )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(
                f"encoding={self.encoding!r} is unknown: use e.g. utf-8, cp1252 or latin-1"
            ) from None


@dataclass(frozen=True)
class LoadResult:
    examples: list[Example]
    skipped: list[str]  # "file:line: what is wrong: what to do", one per dropped record
    files: list[str]  # the files read, in order


def load_examples(spec: DataSpec) -> LoadResult:
    """Every example in ``spec.path``, in file order; raises DataError on unusable data."""
    files = _data_files(spec)
    examples: list[Example] = []
    problems: list[Problem] = []
    for path, family in files:
        source = str(path)
        items = _items(path, family, spec)
        if isinstance(items, Problem):
            problems.append(items)
            continue
        records = 0
        for item in items:
            records += 1
            if isinstance(item, Example):
                examples.append(item)
            else:
                problems.append(item)
        if not records:
            problems.append(
                Problem(source, "the file holds no records: add some or remove it", droppable=False)
            )
    fatal = [p for p in problems if not p.droppable]
    if fatal or (problems and spec.on_bad_record == "stop"):
        raise DataError(_report(spec.path, fatal if spec.on_bad_record == "skip" else problems))
    skipped = [str(p) for p in problems]
    if skipped:
        log.warning(
            "%s: dropped %d bad records (on-bad-record=skip), first: %s",
            spec.path,
            len(skipped),
            skipped[0],
        )
    if not examples:
        raise DataError(
            f"{spec.path}: no usable examples; all {len(skipped)} records are bad, "
            f"first: {skipped[0]}"
        )
    log.info("%s: %d examples from %d file(s)", spec.path, len(examples), len(files))
    return LoadResult(examples=examples, skipped=skipped, files=[str(p) for p, _ in files])


def train_eval_split(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded random ``round(n * eval_fraction)`` go to eval, order kept.

    Eval gets at least one example when ``eval_fraction > 0`` and there are two or more, and
    train is never left empty.
    """
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval-fraction={eval_fraction}: must be in [0, 1), e.g. 0.1")
    n = len(examples)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, max(n - 1, 0))
    held_out = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in held_out]
    held = [e for i, e in enumerate(examples) if i in held_out]
    return train, held


def describe(result: LoadResult, max_problems: int = 10) -> str:
    """A short summary for people: examples per file and kind, and the first skipped records."""
    per_file: dict[str, Counter[str]] = {f: Counter() for f in result.files}
    for ex in result.examples:
        per_file[ex.source.rsplit(":", 1)[0]][ex.kind] += 1
    kinds = Counter(ex.kind for ex in result.examples)
    lines = [
        f"{_n(len(result.files), 'file')}, {_n(len(result.examples), 'example')} "
        f"({_counts(kinds)}), {_n(len(result.skipped), 'bad record')} skipped"
    ]
    width = max(len(f) for f in result.files)
    lines += [f"  {f:<{width}}  {_counts(c) or 'no examples'}" for f, c in per_file.items()]
    if result.skipped:
        lines.append("skipped:")
        lines += [f"  {s}" for s in result.skipped[:max_problems]]
        if len(result.skipped) > max_problems:
            lines.append(f"  ... and {len(result.skipped) - max_problems} more")
    return "\n".join(lines)


def _counts(kinds: Counter[str]) -> str:
    return ", ".join(f"{kinds[k]} {k}" for k in ("chat", "text", "preference") if kinds[k])


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _items(path: Path, family: str, spec: DataSpec) -> Iterator[Example | Problem] | Problem:
    """The records of one file (or saved dataset) as examples and problems."""
    source = str(path)
    if family in TABLE_READERS:
        return TABLE_READERS[family](path, source, spec)
    try:
        text = decode(path.read_bytes(), source, spec.encoding)
    except OSError as exc:
        raise DataError(
            f"{source}: cannot be read ({exc.strerror}): check the permissions"
        ) from None
    if isinstance(text, Problem):
        return text
    return READERS[family](text, source, spec)


def _data_files(spec: DataSpec) -> list[tuple[Path, str]]:
    """(file, reader family) for every file to read."""
    root = Path(spec.path)
    if not root.exists():
        raise DataError(f"{spec.path} does not exist: give a data file or a folder of them")
    if spec.format in ("auto", "dataset") and is_dataset_folder(root):
        return [(root, "dataset")]
    if spec.format == "dataset":
        raise DataError(
            f"{spec.path}: not a folder written by datasets' save_to_disk (no dataset_info.json "
            f"and state.json): give such a folder, or another format"
        )
    if spec.format == "auto":
        extensions = sorted(FAMILY_OF_EXTENSION)
    else:
        family = FAMILY_OF_FORMAT[spec.format]
        extensions = sorted(e for e, fam in FAMILY_OF_EXTENSION.items() if fam == family)
    if root.is_file():
        if spec.format != "auto":
            return [(root, FAMILY_OF_FORMAT[spec.format])]
        if root.suffix.lower() not in FAMILY_OF_EXTENSION:
            raise DataError(
                f"{spec.path}: cannot tell the format from the name: rename it to "
                f"end in one of {', '.join(extensions)}, or set format"
            )
        return [(root, FAMILY_OF_EXTENSION[root.suffix.lower()])]
    found = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in extensions
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not found:
        raise DataError(
            f"{spec.path}: the folder holds no {', '.join(extensions)} files (hidden "
            "ones are ignored): add data files, or point to another folder"
        )
    return [
        (
            p,
            FAMILY_OF_EXTENSION[p.suffix.lower()]
            if spec.format == "auto"
            else FAMILY_OF_FORMAT[spec.format],
        )
        for p in found
    ]


def _report(path: str, problems: list[Problem]) -> str:
    lines = [f"{_n(len(problems), 'problem')} in {path}:"]
    lines += [str(p) for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"... and {len(problems) - MAX_LISTED} more")
    if all(p.droppable for p in problems):
        lines.append("fix them, or set on-bad-record=skip to drop these records")
    else:
        lines.append(
            "fix them; on-bad-record=skip drops bad records, but not a file that cannot "
            "be decoded, has no records, or lacks a mapped column"
        )
    return "\n".join(lines)


def _key(name: str) -> str:
    return name.replace("_", "-")
