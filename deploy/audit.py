"""``fedlora federation audit NODE_DIR``: what a node's audit trail says it sent.

The trail (``audit.jsonl``, written by fedlora.client.audit) is read through the hardened JSON
reader, its chain checked line by line (each line names the SHA-256 of the one before: an edited,
removed or reordered line breaks it), and summarised per run: messages, rounds, bytes sent,
refusals and the epsilon the node's DP ledger stood at after the run's last message.
:func:`verify` finds the line of a captured message (its serialized content, as
``fedlora.client.audit.content_bytes`` gives it) by hash and size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.client.audit import AUDIT_FILE, line_digest
from fedlora.errors import FileFormatError
from fedlora.readback import parse_json

MAX_AUDIT_BYTES = 1 << 30  # a trail beyond this is not read whole
FIELDS = ("time", "run", "round", "stage", "message-type", "bytes", "sha256", "refused")


@dataclass
class RunSummary:
    run: int
    messages: int = 0
    bytes: int = 0
    rounds: set[int] = field(default_factory=set)
    refused: int = 0
    charges: int = 0
    epsilon: float | None = None  # the ledger's epsilon after the run's last message


@dataclass(frozen=True)
class Trail:
    path: Path
    lines: list[dict[str, Any]]
    broken: int | None  # the first line whose ``prev`` does not match the line before (1-based)


def trail_path(node_dir: Path) -> Path:
    return node_dir / AUDIT_FILE if node_dir.is_dir() else node_dir


def read_trail(node_dir: Path) -> Trail:
    """Every line of the node's trail, checked; a line that is not an audit line is a
    FileFormatError naming it."""
    path = trail_path(node_dir)
    if not path.is_file():
        raise FileFormatError(
            f"{path}: no audit trail here; a node writes one once it has sent a message "
            f"(pass the node folder that holds {AUDIT_FILE})"
        )
    if path.stat().st_size > MAX_AUDIT_BYTES:
        raise FileFormatError(f"{path}: larger than {MAX_AUDIT_BYTES} bytes; split it first")
    lines, broken, prev = [], None, None
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            entry = parse_json(text)
        except ValueError as exc:
            raise FileFormatError(f"{path}:{number}: not an audit line ({exc})") from None
        if not isinstance(entry, dict) or any(k not in entry for k in FIELDS):
            raise FileFormatError(f"{path}:{number}: not an audit line (fields {FIELDS} needed)")
        if broken is None and entry.get("prev") != prev:
            broken = number
        prev = line_digest(text)
        lines.append(entry)
    return Trail(path, lines, broken)


def summarise(trail: Trail) -> list[RunSummary]:
    """One summary per run, in the order the runs appear."""
    runs: dict[int, RunSummary] = {}
    for entry in trail.lines:
        run = runs.setdefault(int(entry["run"]), RunSummary(int(entry["run"])))
        run.messages += 1
        run.bytes += int(entry["bytes"])
        if isinstance(entry["round"], int):
            run.rounds.add(entry["round"])
        run.refused += bool(entry["refused"])
        run.charges += entry.get("dp-charge") is not None
        if entry.get("epsilon") is not None:
            run.epsilon = float(entry["epsilon"])
    return list(runs.values())


def summary_lines(trail: Trail) -> list[str]:
    """What ``fedlora federation audit`` prints."""
    out = [f"{trail.path}: {len(trail.lines)} messages sent"]
    for s in summarise(trail):
        eps = f"epsilon {s.epsilon:.4g} after it" if s.epsilon is not None else "no DP ledger"
        out.append(
            f"run {s.run}: {s.messages} messages, rounds {_span(s.rounds)}, {s.bytes} bytes, "
            f"{s.refused} refused, {s.charges} DP charges, {eps}"
        )
    if trail.broken is None:
        out.append("chain intact: no line was edited, removed or reordered")
    else:
        out.append(
            f"chain BROKEN at line {trail.broken}: a line before it was edited, removed or "
            f"reordered (keep this file and compare it with a backup)"
        )
    return out


def verify(trail: Trail, captured: bytes) -> list[int]:
    """The (1-based) lines whose hash and size are those of ``captured``."""
    digest = hashlib.sha256(captured).hexdigest()
    return [
        number
        for number, entry in enumerate(trail.lines, 1)
        if entry["sha256"] == digest and entry["bytes"] == len(captured)
    ]


def _span(rounds: set[int]) -> str:
    if not rounds:
        return "-"
    low, high = min(rounds), max(rounds)
    return f"{low}" if low == high else f"{low}-{high}"
