"""Live status of a run: the round and stage in progress, who was asked, who answered, and each
node's last error, in ``<output-dir>/status.json`` (read by ``fedlora federation status``).

:class:`WatchedGrid` holds the run's Flower Grid and forwards to it, noting what crosses it
(Flower's DP wrappers hold a strategy the same way): the message type of what the server sends,
the stage name of a SecAgg+ message, the round from a round config, the node ids asked and those
that answered, and an error reply's reason. Never a value: under secure aggregation the file
shows stages and node ids only. ``send_and_receive`` pushes and then pulls replies as Flower's own
grids do (same pull interval), so answers are noted as they arrive, not when the stage ends.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
PULL_INTERVAL = 3.0  # seconds between pulls, as Flower's gRPC grid (its own where it has one)
MAX_REASON = 300


class WatchedGrid(Grid):
    """``grid``, with what crosses it written to ``folder/status.json`` after every change."""

    def __init__(self, grid: Grid, folder: Path) -> None:
        self.grid = grid
        self.path = folder / STATUS_FILE
        self._sent: dict[str, int] = {}  # message id -> the node it went to (this stage)
        self.state: dict[str, Any] = {
            "round": None,
            "stage": None,
            "asked": [],
            "answered": [],  # node ids that replied this stage
            "failed": [],  # node ids whose reply this stage was an error
            "errors": {},  # node id -> its last error reason, over the whole run
            "started": time.time(),
        }
        self._write()

    # ---- forwarded ----------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    # ---- watched ------------------------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._asked(messages)
        ids = list(self.grid.push_messages(messages))
        # a reply names the message it answers; an error the SuperLink writes for a node that
        # is gone does not come from that node
        self._sent = {i: int(m.metadata.dst_node_id) for m, i in zip(messages, ids, strict=False)}
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self._answered(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every reply is in or ``timeout`` passed (Flower's loop). A grid
        that only sends and receives (an in-process one) is asked to, and its replies noted."""
        messages = list(messages)
        try:
            pushed = self.push_messages(messages)
        except NotImplementedError:
            answers = list(self.grid.send_and_receive(messages, timeout=timeout))
            self._answered(answers)
            return answers
        pending = set(pushed)
        pending.discard("")
        end = time.time() + (timeout if timeout is not None else 0.0)
        interval = float(getattr(self.grid, "pull_interval", PULL_INTERVAL))
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending:
                break
            time.sleep(interval)
        return replies

    # ---- the status file ----------------------------------------------------------------
    def _asked(self, messages: list[Message]) -> None:
        if not messages:
            return
        first = messages[0]
        stage = str(first.metadata.message_type)
        content = first.content if first.has_content() else None
        if content is not None and "secagg" in content.config_records:
            name = content.config_records["secagg"].get("stage")
            stage = f"{stage}:{name if isinstance(name, str) else '?'}"
        if content is not None and "config" in content.config_records:
            value = content.config_records["config"].get("server-round")
            if isinstance(value, int) and not isinstance(value, bool):
                self.state["round"] = value
        self.state.update(
            stage=stage,
            asked=sorted(int(m.metadata.dst_node_id) for m in messages),
            answered=[],
            failed=[],
            stage_started=time.time(),
        )
        self._write()

    def _answered(self, replies: list[Message]) -> None:
        if not replies:
            return
        for reply in replies:
            node = self._sent.get(reply.metadata.reply_to_message_id)
            node = int(reply.metadata.src_node_id) if node is None else node
            key = "failed" if reply.has_error() else "answered"
            self.state[key] = sorted({*self.state[key], node})
            if reply.has_error():
                reason = " ".join(str(reply.error.reason).split())[:MAX_REASON]
                self.state["errors"][str(node)] = {"stage": self.state["stage"], "error": reason}
        self._write()

    def _write(self) -> None:
        """The status file, replaced atomically; a failure to write it never stops the run."""
        self.state["updated"] = time.time()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{STATUS_FILE}.{os.getpid()}")
            tmp.write_text(json.dumps(self.state, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.debug("status file %s not written: %s", self.path, exc)


def watch(grid: Grid, folder: Path) -> Grid:
    """The run's grid, watched (see :class:`WatchedGrid`)."""
    return WatchedGrid(grid, folder)
