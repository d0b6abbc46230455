"""The server's side of the downlink: per node, exact values or the change since its version.

See :mod:`fedlora.protocol.downlink` for the wire form. The server numbers its global adapter
(version 0 at the start of this process, +1 each time aggregation changes it) and remembers, per
node id, the version that node acknowledged (a reply the server accepted). Only the *last*
change is kept encoded, so a node one version behind gets it, a node up to date gets an empty
delta, and any other node (new, restarted, skipped rounds, or one whose reply was dropped) gets
the exact values: what the server keeps grows with the number of nodes by one integer each.

A new run's version 0 is the seeded initial adapter (``seeded=True``), which every node derives
itself from the run's seed: with a codec, a node the server has not heard from yet is taken to
hold version 0, so round 1 sends nothing and round 2 only the change (a node that cannot derive
it refuses on the digest, and gets the exact values next time). A resumed run's version 0 is
the saved adapter, which nodes cannot derive: it is sent exact.

With a lossy ``codec``, :meth:`Downlink.publish` makes the *decoded* new global the server's
global, so every node that follows the chain holds bit for bit what the server holds.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import numpy as np

from fedlora.protocol.adapter import restrict, spec_of
from fedlora.protocol.compression import encode
from fedlora.protocol.downlink import EXACT, Arrays, apply_delta, digest

log = logging.getLogger(__name__)


class Downlink:
    """What to send each node: the ``factors`` nodes aggregate, exact or as an encoded delta."""

    def __init__(
        self,
        global_adapter: Mapping[str, np.ndarray],
        factors: str,
        codec: str = "none",
        block: int = 64,
        seeded: bool = False,
    ) -> None:
        self.codec, self.block = codec, block
        self.seeded = seeded  # version 0 is the run's seeded initial adapter
        self.sent = sorted(restrict(spec_of(global_adapter), factors))
        self.shapes = {k: tuple(global_adapter[k].shape) for k in self.sent}
        frozen = {k: v for k, v in global_adapter.items() if k not in self.sent}
        self.frozen_digest = digest(frozen) if frozen else ""
        self.version = 0
        self.held = {k: np.asarray(global_adapter[k], np.float32) for k in self.sent}
        self.held_digest = digest(self.held)
        self.last_change: dict[str, np.ndarray] | None = None  # wire form, version-1 -> version
        self.acknowledged: dict[int, int] = {}  # node id -> version it holds
        self.carried: dict[int, int] = {}  # node id -> version its last payload carried

    def publish(self, new_global: Mapping[str, np.ndarray]) -> Arrays:
        """A new global adapter; returns it as nodes will hold it (decoded, with a lossy codec)."""
        out = dict(new_global)
        new = {k: np.asarray(new_global[k], np.float32) for k in self.sent}
        if self.codec == "none":
            self.last_change = None
        else:
            change = {k: new[k] - self.held[k] for k in self.sent}
            self.last_change = encode(change, self.codec, self.block)
            new = apply_delta(self.held, self.last_change, self.codec, self.shapes, self.block)
            out.update(new)
        self.held = new
        self.held_digest = digest(new)
        self.version += 1
        return out

    def payload(self, node: int) -> tuple[dict[str, np.ndarray], dict[str, int | str]]:
        """``(arrays, round-config fields)`` to send ``node`` now."""
        fields: dict[str, int | str] = {
            "down_codec": self.codec,
            "down_version": self.version,
            "down_digest": self.held_digest,
            "frozen_digest": self.frozen_digest,
        }
        self.carried[node] = self.version
        holds = self.acknowledged.get(node, 0 if self.seeded else None)
        if self.codec != "none" and holds == self.version:
            return {}, fields | {"down_base": self.version}
        if self.codec != "none" and holds == self.version - 1 and self.last_change is not None:
            return dict(self.last_change), fields | {"down_base": holds}
        return dict(self.held), fields | {"down_base": EXACT}

    def acknowledge(self, node: int, version: int) -> None:
        """``node`` replied to a message that left it holding ``version``."""
        self.acknowledged[node] = version

    def settle(self, node: int, used: bool) -> None:
        """``node``'s reply was used (it holds what it was last sent) or not (it gets exact
        values next time)."""
        if used and node in self.carried:
            self.acknowledge(node, self.carried[node])
        else:
            self.forget(node)

    def copy(self) -> Downlink:
        """A copy whose node tables are its own (a round's snapshot)."""
        other = copy.copy(self)
        other.acknowledged, other.carried = dict(self.acknowledged), dict(self.carried)
        return other

    def forget(self, node: int) -> None:
        """``node`` failed: send it the exact values next time."""
        self.acknowledged[node] = -1  # holds nothing the server knows (not even version 0)
