"""How far one node's reply may weigh and reach: bounds on by default, needing no tuning.

A reply can be right in form and hostile in value (issue 32). The gate (fedlora.protocol.gate)
already refuses non-finite values and metrics outside their ranges; what is left is bounded here,
on the plain path, before aggregation:

- **Example weight.** A node's claimed ``num-examples`` is clipped to a cap: ``max-examples-per-
  node`` when set, else :data:`EXAMPLES_FACTOR` times the round's lower median claim. Clipped,
  not dropped: an honest large site keeps its update (at a bounded weight), and a clipped claim
  can outweigh no more than the cap allows, so dropping would protect nothing more.
- **Update norm.** Each reply's delta is clipped to ``norm-bound-factor`` times the round's lower
  median L2 norm (norm bounding after Sun et al., 2019, arXiv:1911.07963, with the bound set from
  the round instead of tuned). The lower median is one of the honest norms while fewer than half
  the replies are hostile, one of two included.

With both, hostile replies holding a weight share ``s`` (each at most the cap) move the round's
mean from the honest-only mean by at most ``s * (b + M)`` in L2 norm (``b``: the round's norm
bound, ``M``: the largest honest norm) while the honest replies keep their weights and norms
(none capped or clipped), and never further than ``max(b, M) + M`` (both means lie in that
ball). The medians are honest values while hostile replies are fewer than honest ones; with as
many, the lower median still holds against large replies, but tiny ones can lower the bounds
and so shrink the honest replies (a stalled round, not a poisoned one). Tests:
tests/test_poisoned_replies.py, tests/test_poisoned_federation.py, and make fuzz's
tests/test_fuzz_values.py. Under secure aggregation the server sees only the sum:
:func:`bound_secure_mean` projects the decoded mean back into the ball every honest mean lies
in (radius the SecAgg clip), so a node bypassing its own clip moves the mean no further than one
clipping honestly can.

Last, :func:`fedlora.server.aggregate.check_bounded` refuses a global adapter that would hold
NaN/Inf or a value beyond :attr:`ReplyBounds.max_global_value`; the round then fails and the
previous global adapter is kept (server/strategy.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.clipping import clip_l2, global_norm
from fedlora.server.aggregate import cap_weights, norm_bound
from fedlora.server.strategies import ClientUpdate

EXAMPLES_FACTOR = 4.0  # automatic weight cap: this many times the round's lower median claim
# |value| of any global adapter tensor. Honest LoRA factors stay far below 1; with this bound the
# change a down codec encodes stays within 2e4, inside fp16's range (65504).
MAX_GLOBAL_VALUE = 1e4


@dataclass(frozen=True)
class ReplyBounds:
    """Per-reply bounds of the plain path and the global adapter's bound."""

    max_examples: int = 0  # cap on a reply's example weight; 0: EXAMPLES_FACTOR x lower median
    norm_factor: float = 3.0  # cap on a reply's L2 norm: x the round's lower median norm; 0 = off
    max_global_value: float = MAX_GLOBAL_VALUE  # beyond this the round fails

    def __post_init__(self) -> None:
        if self.max_examples < 0:
            raise ValueError(f"max-examples-per-node={self.max_examples}: use >= 0 (0: automatic)")
        if not (math.isfinite(self.norm_factor) and self.norm_factor >= 0):
            raise ValueError(f"norm-bound-factor={self.norm_factor}: use >= 0 (0: off)")
        if not (math.isfinite(self.max_global_value) and self.max_global_value > 0):
            raise ValueError(f"max global value {self.max_global_value}: use a positive number")


def cap_examples(
    claims: Sequence[int], nodes: Sequence[int], bounds: ReplyBounds
) -> tuple[list[int], dict[str, Any]]:
    """``(weights, record fields)``: claims clipped to the round's cap; the record lists each
    clipped node with its claim (``weight-capped``) and the cap (``max-examples``)."""
    weights, cap = cap_weights(claims, bounds.max_examples, EXAMPLES_FACTOR)
    capped = [
        {"node": node, "claimed": int(c)}
        for node, c, w in zip(nodes, claims, weights, strict=True)
        if w < c
    ]
    return weights, {"max-examples": cap, "weight-capped": capped}


def bound_norms(
    updates: Sequence[ClientUpdate], nodes: Sequence[int], bounds: ReplyBounds
) -> tuple[list[ClientUpdate], list[float], dict[str, Any]]:
    """``(updates, norms before, record fields)``: each delta clipped to the round's norm bound;
    the record holds the bound (``norm-bound``, None when off) and each clipped node with its
    norm (``norm-clipped``)."""
    norms = [global_norm(u.delta) for u in updates]
    bound = norm_bound(norms, bounds.norm_factor)
    out: list[ClientUpdate] = []
    clipped: list[dict[str, Any]] = []
    for node, update, norm in zip(nodes, updates, norms, strict=True):
        if norm > bound:
            delta, _, _ = clip_l2(update.delta, bound, "norm-bound-factor")
            update = ClientUpdate(delta, update.num_examples)
            clipped.append({"node": node, "norm": norm})
        out.append(update)
    fields = {"norm-bound": bound if math.isfinite(bound) else None, "norm-clipped": clipped}
    return out, norms, fields


def bound_secure_mean(
    update: ClientUpdate, clip_norm: float, tolerance: float
) -> tuple[ClientUpdate, dict[str, Any]]:
    """The decoded secure mean, projected onto the L2 ball of radius ``clip_norm`` when it lies
    beyond it by more than the decoding's error (``tolerance`` per coordinate).

    Every honest node clips its update to ``clip_norm``, so their weighted mean lies in that
    ball; a mean outside it means some node skipped its clip (SecAgg hides which one). The
    server cannot drop that node, so it projects: the mean moves no further than honest clipping
    would allow, and the round goes on.
    """
    norm = global_norm(update.delta)
    values = sum(v.size for v in update.delta.values())
    fields: dict[str, Any] = {"secagg-mean-norm": norm}
    if norm > clip_norm + tolerance * math.sqrt(values):
        delta, _, _ = clip_l2(update.delta, clip_norm, "secagg-clip-norm")
        update = ClientUpdate(delta, update.num_examples)
        fields["secagg-mean-clipped"] = True
    return update, fields
