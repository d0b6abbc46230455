"""One small reader per file format, and the registry that picks one for a file.

A reader is a function ``(text, source, spec) -> Iterator[Example | Problem]`` over the decoded
text of one file; ``source`` is the file's name as shown in messages. Readers are pure, except
that the CSV reader raises the ``csv`` module's global field-size limit to the file's length
(lengths are the tokenizer's business, not this module's). Line numbers are 1-based and count
``\\n`` (a ``\\r\\n`` file reads the same). Adding a format is adding a reader and a row in
:data:`READERS`, :data:`FAMILY_OF_FORMAT` and :data:`FAMILY_OF_EXTENSION`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from fedlora.data.preference import is_preference, preference_example
from fedlora.data.records import (
    Example,
    Problem,
    chat_example,
    column_example,
    json_type,
    scalar_fields,
)
from fedlora.readback import MAX_DEPTH, JsonLimitError, depth_ok, json_decoder, parse_json

if TYPE_CHECKING:
    from fedlora.data.formats import DataSpec

Reader = Callable[[str, str, "DataSpec"], Iterator[Example | Problem]]
_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, pos: int) -> int:
    """The first position at or after ``pos`` that is not JSON whitespace."""
    found = _WS.match(text, pos)
    return found.end() if found else pos


def decode(data: bytes, source: str, encoding: str) -> str | Problem:
    """The file's text without a byte-order mark, or the line where decoding fails."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        utf16 = data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
        which = "encoding=utf-16" if utf16 else "encoding to the file's (e.g. cp1252, latin-1)"
        return Problem(
            f"{source}:{line}",
            f"not valid {encoding} (byte 0x{data[exc.start]:02x} "
            f"at column {column}): re-save the file as UTF-8, or "
            f"set {which}",
            droppable=False,
        )
    return text.removeprefix("\ufeff")


def _lines(text: str) -> list[str]:
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_json(text: str, source: str, spec: DataSpec) -> Iterator[Example | Problem]:
    """JSON lines (one object per line, blank lines skipped), or a ``.json`` file's top array."""
    if source.endswith(".json") and text.lstrip().startswith("["):
        yield from _json_array(text, source, spec)
        return
    for line, raw in enumerate(_lines(text), start=1):
        if not raw.strip():
            continue
        try:
            record = parse_json(raw)
        except json.JSONDecodeError as exc:
            yield Problem(
                f"{source}:{line}",
                f"not valid JSON ({exc.msg} at column {exc.colno}): fix or delete the line",
            )
            continue
        except ValueError as exc:  # beyond fedlora.readback's limits
            yield Problem(f"{source}:{line}", f"not usable JSON ({exc}): fix or delete the line")
            continue
        yield _json_record(record, f"{source}:{line}", spec)


def _json_array(text: str, source: str, spec: DataSpec) -> Iterator[Example | Problem]:
    """The items of a top-level JSON array, each with the line it starts on."""
    decoder = json_decoder()
    pos = _skip_ws(text, text.index("[") + 1)
    line, counted = 1, 0
    while not text.startswith("]", pos):
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            record, pos = decoder.raw_decode(text, pos)
            if not depth_ok(record):
                raise JsonLimitError(f"nested more than {MAX_DEPTH} levels deep")
        except json.JSONDecodeError as exc:
            yield Problem(
                f"{source}:{exc.lineno}",
                f"not valid JSON ({exc.msg} at column "
                f"{exc.colno}): fix it; the rest of the file "
                "cannot be read",
                droppable=False,
            )
            return
        except (ValueError, RecursionError) as exc:  # beyond fedlora.readback's limits
            reason = exc if isinstance(exc, ValueError) else f"nested more than {MAX_DEPTH} levels"
            yield Problem(
                f"{source}:{line}",
                f"not usable JSON ({reason}): fix it; the rest of the file cannot be read",
                droppable=False,
            )
            return
        yield _json_record(record, f"{source}:{line}", spec)
        pos = _skip_ws(text, pos)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif not text.startswith("]", pos):
            at = text.count("\n", 0, pos) + 1
            yield Problem(
                f"{source}:{at}",
                "not valid JSON (expected ',' or ']' after an item)"
                ": fix it; the rest of the file cannot be read",
                droppable=False,
            )
            return


def record_example(record: object, where: str, spec: DataSpec) -> Example | Problem:
    """One record (a JSON object, or a table's row) as an example: a chat under ``messages``,
    else the columns ``spec`` maps."""
    return _json_record(record, where, spec)


def _json_record(record: object, where: str, spec: DataSpec) -> Example | Problem:
    if not isinstance(record, dict):
        return Problem(
            where,
            f"the record is {json_type(record)}, not a JSON object: write one "
            'object per record, e.g. {"messages": [...]}',
        )
    if spec.format == "preference" or (spec.format == "auto" and is_preference(record)):
        return _with_fields(
            preference_example(record, where, spec.prompt_column, spec.system_column),
            record,
            spec,
        )
    chat = spec.format == "chat" or (
        spec.format == "auto" and not spec.text_column and "messages" in record
    )
    if chat:
        if "messages" not in record:
            return Problem(
                where,
                "missing field 'messages': write the record as "
                '{"messages": [{"role": "user", "content": "..."}, ...]}',
            )
        return _with_fields(chat_example(record["messages"], where), record, spec)
    return _columns_example(record, where, spec)


def _columns_example(record: Mapping[str, object], where: str, spec: DataSpec) -> Example | Problem:
    """An example from a record's named columns (as ``spec`` maps them), with its other fields."""
    if is_preference(record) and not spec.text_column:  # a table of preference pairs
        return _with_fields(
            preference_example(record, where, spec.prompt_column, spec.system_column),
            record,
            spec,
        )
    return _with_fields(
        column_example(
            record,
            where,
            prompt=spec.prompt_column,
            response=spec.response_column,
            system=spec.system_column,
            text=spec.text_column,
        ),
        record,
        spec,
    )


def _with_fields(
    result: Example | Problem, record: Mapping[str, object], spec: DataSpec
) -> Example | Problem:
    """The example with the record's other scalar fields attached (for partitioning)."""
    if isinstance(result, Problem):
        return result
    used = {"messages", spec.prompt_column, spec.response_column, "chosen", "rejected"}
    used |= {c for c in (spec.system_column, spec.text_column) if c}
    return replace(result, fields=scalar_fields(record, used))


def read_csv(
    text: str, source: str, spec: DataSpec, delimiter: str = ","
) -> Iterator[Example | Problem]:
    """Rows under a header row; a quoted cell may span lines (the record's first line is named)."""
    name, sep = ("TSV", "tabs") if delimiter == "\t" else ("CSV", "commas")
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # lengths are not checked here
    text = text.replace("\r\n", "\n")  # cells spanning lines keep "\n" only
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] = []
    done = 0  # lines consumed so far
    while True:
        start = done + 1
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            done = rows.line_num
            if "end of data" in str(exc):  # the rest of the file went into one cell
                yield Problem(
                    f"{source}:{start}",
                    f"not valid {name} (unexpected end of data): a "
                    "quote opened in this record is never closed; "
                    "close it",
                    droppable=False,
                )
                return
            yield Problem(
                f"{source}:{start}",
                f"not valid {name} ({exc}): quote a cell that "
                'holds quotes, doubling the quotes inside ("")',
                droppable=bool(header),
            )
            if not header:
                return
            continue
        done = rows.line_num
        if not any(cell.strip() for cell in row):
            continue  # blank line, or a row of empty cells
        if not header:
            header = [cell.strip() for cell in row]
            if problem := _header_problem(header, f"{source}:{start}", spec):
                yield problem
                return
            continue
        if len(row) != len(header):
            yield Problem(
                f"{source}:{start}",
                f"the row has {len(row)} cells, the header has "
                f"{len(header)}: quote cells that contain {sep}, "
                "or fill in the missing cells",
            )
            continue
        yield _columns_example(dict(zip(header, row, strict=True)), f"{source}:{start}", spec)


def read_tsv(text: str, source: str, spec: DataSpec) -> Iterator[Example | Problem]:
    """Tab-separated rows under a header row, quoted like CSV."""
    return read_csv(text, source, spec, delimiter="\t")


def _header_problem(header: list[str], where: str, spec: DataSpec) -> Problem | None:
    wanted = (
        [("text-column", spec.text_column)]
        if spec.text_column
        else [("prompt-column", spec.prompt_column), ("response-column", spec.response_column)]
    )
    if not spec.text_column and is_preference(dict.fromkeys(header)):  # preference pairs
        wanted = [("prompt-column", spec.prompt_column)]
    if spec.system_column:
        wanted.append(("system-column", spec.system_column))
    missing = [(setting, col) for setting, col in wanted if col not in header]
    if not missing:
        return None
    names = ", ".join(f"'{col}'" for _, col in missing)
    settings = " and ".join(setting for setting, _ in missing)
    plural = "s" * (len(missing) > 1)
    return Problem(
        where,
        f"the header has no column{plural} {names} (columns: "
        f"{', '.join(header)}): set {settings} to the column{plural} that "
        f"hold{'s' * (not plural)} {'them' if plural else 'it'}, or rename "
        "the header",
        droppable=False,
    )


def read_text(text: str, source: str, spec: DataSpec) -> Iterator[Example | Problem]:
    """Documents separated by one or more blank lines; each starts at its first line."""
    lines = [*_lines(text), ""]
    start = 0
    for i, line in enumerate(lines):
        if line.strip():
            start = start or i + 1
        elif start:
            yield Example(source=f"{source}:{start}", text="\n".join(lines[start - 1 : i]))
            start = 0


READERS: dict[str, Reader] = {
    "json": read_json,
    "csv": read_csv,
    "tsv": read_tsv,
    "text": read_text,
}
FAMILY_OF_FORMAT: dict[str, str] = {
    "chat": "json",
    "pairs": "json",
    "preference": "json",
    "csv": "csv",
    "tsv": "tsv",
    "text": "text",
    "parquet": "parquet",  # tables (fedlora.data.tables): read from the file, not decoded text
    "dataset": "dataset",  # a datasets save_to_disk folder
}
FAMILY_OF_EXTENSION: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".md": "text",
    ".parquet": "parquet",
}
