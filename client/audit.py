"""A node's audit trail: one line per message it sends, appended to ``audit.jsonl``.

A data-protection officer asks what left the node, when, and at what privacy cost. The audit mod
(:func:`make_audit_mod`, outermost in the ClientApp's mods, so it sees the reply exactly as it
leaves) writes, for every reply:

- ``time`` (UTC), ``run``, ``round``, ``stage`` (train, evaluate, or the SecAgg+ stage) and
  ``message-type``;
- ``bytes`` and ``sha256`` of the serialized content (Flower's RecordDict protobuf, deterministic
  serialization; an error reply: its Error protobuf), which :func:`content_bytes` gives for any
  captured message, so a line can be checked against what was seen on the way out;
- ``dp-charge`` (the charge the node's DP ledger took for this message, or null) and
  ``epsilon`` (the ledger's epsilon after it);
- ``refused`` and ``reason`` when the node answered with an error;
- ``prev``: the SHA-256 of the line before, so an edited, removed or reordered line breaks the
  chain (``fedlora federation audit`` checks it).

Values are never written: sizes and digests only. The file is ``audit-log`` (node config), else
``audit.jsonl`` beside the node's ``dp-ledger`` (``fedlora federation node`` puts both in the
node folder); without either there is no trail. It is opened append-only (``O_APPEND``, mode
0600), never rewritten, and survives restarts. A line that cannot be written stops the reply: the
node answers with an error rather than send a message it did not record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.app import Error as FlowerError
from flwr.common.serde import recorddict_to_proto
from flwr.common.serde_utils import error_to_proto

from fedlora.readback import parse_json

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
AUDIT_KEY = "audit-log"  # node config: the audit file (default: beside dp-ledger)
LEDGER_KEY = "dp-ledger"
LEDGER_STATE = "fedlora.dp-ledger"  # where client/dp_ledger keeps a file-less ledger
STATE = "fedlora.audit"  # ConfigRecord: the round the following SecAgg+ stages belong to
AUDIT_FAILED = 500  # error code of a reply the node withheld because it could not record it
TAIL_BYTES = 1 << 16  # the last line is read back from at most this much of the file's end
ROUND_KEY = "server-round"  # in the round config ("config") of train and evaluate messages

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def content_bytes(msg: Message) -> bytes:
    """What the audit hashes: the reply's content serialized, or its error."""
    if msg.has_content():
        return bytes(recorddict_to_proto(msg.content).SerializeToString(deterministic=True))
    return bytes(error_to_proto(msg.error).SerializeToString(deterministic=True))


def audit_path(settings: Mapping[str, Any]) -> Path | None:
    """The node's audit file, or None when the node keeps none."""
    if settings.get(AUDIT_KEY):
        return Path(str(settings[AUDIT_KEY]))
    if settings.get(LEDGER_KEY):
        return Path(str(settings[LEDGER_KEY])).parent / AUDIT_FILE
    return None


def line_digest(line: str) -> str:
    """The chain's link: SHA-256 of a line's text (without its newline)."""
    return hashlib.sha256(line.rstrip("\n").encode("utf-8")).hexdigest()


def make_audit_mod(defaults: Mapping[str, Any] | None = None) -> Mod:
    """The Flower mod that records every reply of a node whose settings (``defaults``, then its
    node config) name an audit file or a DP ledger file."""
    base = dict(defaults or {})

    def audit(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        settings = {**base, **context.node_config}
        path = audit_path(settings)
        if path is None:
            return call_next(msg, context)
        charges_before, _ = _ledger(settings, context)
        server_round, stage = _round_and_stage(msg, context)
        reply = call_next(msg, context)
        charges, epsilon = _ledger(settings, context)
        entry = describe(msg, reply, server_round, stage)
        entry["dp-charge"] = charges[-1] if len(charges) > len(charges_before) else None
        entry["epsilon"] = epsilon
        try:
            append(path, entry)
        except OSError as exc:
            log.error("The audit line could not be written to %s (%s): reply withheld", path, exc)
            reason = "the node's audit log could not be written; see the node's log"
            return Message(error=FlowerError(code=AUDIT_FAILED, reason=reason), reply_to=msg)
        return reply

    return audit


def describe(msg: Message, reply: Message, server_round: int | None, stage: str) -> dict[str, Any]:
    """The audit line of ``reply`` (the answer to ``msg``), without the ledger's figures."""
    data = content_bytes(reply)
    refused = reply.has_error()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": int(msg.metadata.run_id),
        "round": server_round,
        "stage": stage,
        "message-type": str(msg.metadata.message_type),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "refused": refused,
        "reason": " ".join(str(reply.error.reason).split())[:300] if refused else None,
    }


def append(path: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` as one line, linked to the line before (append-only, mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        line = json.dumps({**entry, "prev": _last_digest(fd)}, allow_nan=False)
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def _last_digest(fd: int) -> str | None:
    """The digest of the file's last line, or None for an empty file."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    start = max(0, size - TAIL_BYTES)
    tail = os.pread(fd, size - start, start).decode("utf-8", errors="replace")
    lines = tail.rstrip("\n").split("\n")
    return line_digest(lines[-1])


def _round_and_stage(msg: Message, context: Context) -> tuple[int | None, str]:
    """The server round (from the round config, or the SecAgg+ setup this stage follows) and the
    stage; nothing in the message is trusted beyond being recorded."""
    content = msg.content if msg.has_content() else None
    action = str(msg.metadata.message_type).split(".")[0]
    stage = action
    server_round: int | None = None
    try:
        if content is not None and "secagg" in content.config_records:
            stage = str(content.config_records["secagg"].get("stage", action))[:40]
        if content is not None and "config" in content.config_records:
            value = content.config_records["config"].get(ROUND_KEY)
            if isinstance(value, int) and not isinstance(value, bool):
                server_round = value
                context.state.config_records[STATE] = ConfigRecord({"round": value})
        if server_round is None and STATE in context.state.config_records:
            server_round = int(str(context.state.config_records[STATE]["round"]))
    except (KeyError, TypeError, ValueError):
        pass
    return server_round, stage


def _ledger(settings: Mapping[str, Any], context: Context) -> tuple[list[Any], float | None]:
    """The node's DP ledger as its file (or the node's state) holds it: charges and epsilon."""
    text = ""
    try:
        if settings.get(LEDGER_KEY):
            path = Path(str(settings[LEDGER_KEY]))
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
        elif LEDGER_STATE in context.state.config_records:
            text = str(context.state.config_records[LEDGER_STATE].get("json", ""))
        data = parse_json(text, allow_nonfinite=True) if text else {}
    except (OSError, ValueError):
        return [], None
    if not isinstance(data, dict):
        return [], None
    charges = data.get("charges")
    epsilon: Any = data.get("epsilon")  # a number when ``finite``
    finite = isinstance(epsilon, int | float) and math.isfinite(epsilon)
    return charges if isinstance(charges, list) else [], float(epsilon) if finite else None
