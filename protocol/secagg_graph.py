"""Who holds whose shares in a SecAgg+ round, and how many must agree: pure functions that
every node recomputes, so the server chooses neither.

Bell et al. (CCS 2020) pick the share graph at random *and out of the server's hands*: a graph
the server chooses lets it surround a victim with the nodes it controls or can split. Here the
graph is a function of the round id (:func:`fedlora.protocol.secagg_auth.round_id`: the session,
every participant's signed keys and a fresh nonce from each), so a node recomputes its own
neighbourhood from the participant list it verified and refuses anything else.

Thresholds against ``c`` corrupt nodes (the node's ``secagg-corrupt-nodes``, default 1):

- shares: ``2t > holders + c`` (:func:`least_threshold`). Even if honest holders could be split
  into two groups, one revealing a node's self-mask seed and the other its mask key, the server
  plus ``c`` colluders would hold ``holders + c`` shares in all, fewer than ``2t``;
  It also keeps a server from isolating a node: forwarding the victim only ``t - 1``
  neighbours' shares and declaring them all dropped leaves ``holders - t + c`` holders of its
  seed besides itself (the victim, whose mask partners all dropped, refuses to unmask), fewer
  than ``t``;
- the consistency round: a node reveals shares only when more than ``(n + c) / 2`` of the
  round's ``n`` participants signed the very survivor set it was told (:func:`majority`). Two
  different survivor sets would then share more than ``c`` signers, so at least one honest node
  would have signed both, which an honest node never does.

Needs the standard library only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

GRAPH_DOMAIN = b"fedlora secagg+ graph v1"


def least_threshold(holders: int, corrupt: int) -> int:
    """The smallest reconstruction threshold ``t`` with ``2t > holders + corrupt``."""
    return (holders + corrupt) // 2 + 1


def majority(participants: int, corrupt: int) -> int:
    """The fewest signatures of one survivor set that no split view can also gather: more than
    ``(participants + corrupt) / 2``."""
    return (participants + corrupt) // 2 + 1


def max_holders(nodes: int, num_shares: int) -> int:
    """The most share holders (the node included) :func:`neighbour_graph` gives any node of a
    round of at most ``nodes`` participants (fewer may answer the setup): ``num_shares``, or one
    more when the degree ``num_shares - 1`` is odd and some odd ring is larger than it."""
    return min(nodes, num_shares + (num_shares % 2 == 0))


def _ring(round_id: bytes, nodes: Iterable[int]) -> list[int]:
    """The nodes in the order of SHA-256(domain, round id, node id): a permutation that no one
    chooses, the same on every node and on the server."""

    def key(node: int) -> bytes:
        return hashlib.sha256(GRAPH_DOMAIN + round_id + node.to_bytes(8, "big")).digest()

    return sorted(set(nodes), key=lambda n: (key(n), n))


def neighbour_graph(round_id: bytes, nodes: Iterable[int], num_shares: int) -> dict[int, set[int]]:
    """SecAgg+'s sparse graph on a ring ordered by the round id; each set includes the node.

    Each node is joined to the ``h = (num_shares - 1) // 2`` nearest on either side (a Harary
    graph, Bell et al. §3); with ``num_shares - 1`` odd and an even ring, also to the opposite
    node; on an odd ring, to one more on each side instead (``num_shares + 1`` holders, see
    :func:`max_holders`). ``num_shares >= len(nodes)`` gives the complete graph (classic SecAgg).
    """
    order = _ring(round_id, nodes)
    n = len(order)
    if num_shares >= n:
        return {u: set(order) for u in order}
    h = (num_shares - 1) // 2
    odd_degree = (num_shares - 1) % 2 == 1
    if odd_degree and n % 2 == 1:
        h += 1
    graph = {u: {order[(i + d) % n] for d in range(-h, h + 1)} for i, u in enumerate(order)}
    if odd_degree and n % 2 == 0:
        for i, u in enumerate(order):
            graph[u].add(order[(i + n // 2) % n])
    return graph


__all__ = ["least_threshold", "majority", "max_holders", "neighbour_graph"]
