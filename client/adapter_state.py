"""The adapter a node starts a round from, and what it keeps between rounds.

The server sends every factor exactly, or only the factors nodes send back
(fedlora.protocol.downlink): exactly, or as the change since the version this node holds. The
other factors are derived from the run's seed and checked against the server's digest. A node's
personal factors (FedSA-LoRA's B) never leave it: they are kept in its files (simulation) or its
Flower state, as is the downlink version it holds. Anything that does not match what the round
config says is refused (:class:`RoundRefused`), never guessed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedlora.client.node import (
    NodeSettings,
    WarmModel,
    load_personal,
    save_personal,
    set_lora_state,
)
from fedlora.client.ranks import truncated
from fedlora.errors import FedloraError
from fedlora.lora import initial_adapter
from fedlora.protocol.adapter import AdapterSpec, restrict, validate
from fedlora.protocol.compression import nbytes, wire_spec
from fedlora.protocol.downlink import EXACT, apply_delta, digest
from fedlora.protocol.gate import array_record, read_arrays
from fedlora.protocol.messages import (
    ARRAYS,
    RoundConfig,
    arrays_of,
    to_array_record,
    wire_record,
)

PERSONAL = "fedlora.personal-lora"  # node state: trained factors that never leave the node


class RoundRefused(FedloraError):
    """The node cannot honour the round config it was sent."""


def node_rank(settings: NodeSettings, rc: RoundConfig) -> int:
    """The rank this node trains: its own lora-r, else the run's (client/ranks.py)."""
    return settings.lora_r or rc.lora_r


def load_adapter(
    node: WarmModel,
    content: Any,
    rc: RoundConfig,
    state: RecordDict | None,
    settings: NodeSettings,
) -> tuple[dict[str, np.ndarray], int]:
    """Put the global adapter (plus this node's personal factors) into the warm model.

    Returns the global value of every factor (what the node's delta is taken against) and the
    payload bytes received. The server sends every factor (exact), or only the factors nodes
    send back (fedlora.protocol.downlink): exact, or as the change since the version this node
    holds; the other factors are derived from the run's seed and checked against its digest.
    """
    # The node checks what the server sends, too, before decoding any of it (a ProtocolError).
    record = array_record(content, ARRAYS)
    if rc.down_version < 0:  # an untracked downlink: every factor, exact (RoundConfig checks)
        global_adapter = read_arrays(record, wire_spec("none", node.spec))
        validate(global_adapter, node.spec)
        received = nbytes(global_adapter)
    else:
        sent_spec = restrict(node.spec, rc.send_factors)
        held, received = _receive(record, rc, node.spec, sent_spec, state, settings)
        global_adapter = {**derived_factors(node.spec, sent_spec, rc), **held}
    start = dict(global_adapter)
    personal_spec = restrict(node.spec, rc.personal_factors) if rc.personal_factors else {}
    personal = _restore_personal(settings, state) if personal_spec else None
    if personal is not None:
        validate(personal, personal_spec)
        start.update(personal)
    if node_rank(settings, rc) < (rc.lora_r_max or rc.lora_r):  # client/ranks.py
        start = truncated(start, node_rank(settings, rc))
    set_lora_state(node.model, start)
    return global_adapter, received


def _receive(
    record: Any,
    rc: RoundConfig,
    spec: AdapterSpec,
    sent_spec: AdapterSpec,
    state: RecordDict | None,
    settings: NodeSettings,
) -> tuple[dict[str, np.ndarray], int]:
    """The global values of the sent factors from the downlink payload, and its bytes.

    Version 0 of a new run is the seeded initial adapter: a node that does not hold it derives
    it from the run's seed (fedlora.server.downlink), and the digest check below catches a
    server whose version 0 was something else.
    """
    if rc.down_base == EXACT:
        wire = read_arrays(record, wire_spec("none", sent_spec))
        validate(wire, sent_spec)
        held = dict(wire)
    else:
        version, before = _restore_held(settings, state)
        if rc.down_base == 0 and (before is None or version != 0):
            seeded = seeded_adapter(spec, rc.seed)
            version, before = 0, {n: seeded[n] for n in sent_spec}
        if before is None or version != rc.down_base:
            raise RoundRefused(
                f"downlink: the server sent the change since version {rc.down_base}, but this "
                f"node holds {'none' if before is None else f'version {version}'}; the server "
                f"sends the exact adapter next round"
            )
        validate(before, sent_spec)
        if rc.down_base == rc.down_version:  # nothing changed since
            wire = read_arrays(record, {})
            held = before
        else:
            wire = read_arrays(record, wire_spec(rc.down_codec, sent_spec, rc.codec_block))
            shapes = {k: v.shape for k, v in sent_spec.items()}
            held = apply_delta(before, wire, rc.down_codec, shapes, rc.codec_block)
            validate(held, sent_spec)
    if rc.down_digest and digest(held) != rc.down_digest:
        raise RoundRefused(
            f"downlink: the adapter this node holds after version {rc.down_version} does not "
            f"match the server's digest; the server sends the exact adapter next round"
        )
    if rc.down_codec != "none" and rc.down_version >= 0:
        _keep_held(settings, state, rc.down_version, held)
    return held, nbytes(wire)


_SEEDED: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
_DERIVED: dict[tuple[Any, ...], tuple[dict[str, np.ndarray], str]] = {}  # factors, digest


def seeded_adapter(spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
    """The run's seeded initial adapter (fedlora.lora.initial_adapter), computed once."""
    key = (tuple((n, spec[n].shape) for n in sorted(spec)), seed)
    if key not in _SEEDED:
        _SEEDED.clear()  # one run at a time per process: keep one
        _SEEDED[key] = initial_adapter({n: s.shape for n, s in spec.items()}, seed)
    return _SEEDED[key]


def derived_factors(
    spec: AdapterSpec, sent_spec: AdapterSpec, rc: RoundConfig
) -> dict[str, np.ndarray]:
    """The factors the server does not send, from the run's seed (checked against its digest)."""
    names = tuple(sorted(set(spec) - set(sent_spec)))
    if not names:
        return {}
    key = (tuple((n, spec[n].shape) for n in sorted(spec)), rc.seed, names)
    if key not in _DERIVED:
        _DERIVED.clear()  # one run at a time per process: keep one set
        init = seeded_adapter(spec, rc.seed)
        derived = {n: init[n] for n in names}
        _DERIVED[key] = derived, digest(derived)
    derived, derived_digest = _DERIVED[key]
    if rc.frozen_digest and derived_digest != rc.frozen_digest:
        raise RoundRefused(
            f"the factors this node derives from seed {rc.seed} ({names[0]}, ...) differ from "
            f"the server's: its initial adapter was not built from the run's seed"
        )
    return derived


HELD = "fedlora.downlink"  # node state: the sent factors as this node holds them, and version
_VERSION_KEY = "fedlora::version"


def _restore_held(
    settings: NodeSettings, state: RecordDict | None
) -> tuple[int, dict[str, np.ndarray] | None]:
    arrays = None
    if settings.personal_dir:
        arrays = load_personal(settings, kind="downlink")
    elif state is not None and HELD in state.array_records:
        arrays = arrays_of(state.array_records[HELD])
    if arrays is None or _VERSION_KEY not in arrays:
        return -1, None
    version = int(arrays.pop(_VERSION_KEY).reshape(-1)[0])
    return version, arrays


def _keep_held(
    settings: NodeSettings, state: RecordDict | None, version: int, held: dict[str, np.ndarray]
) -> None:
    arrays = dict(held) | {_VERSION_KEY: np.array([version], dtype=np.float64)}
    if settings.personal_dir:
        save_personal(settings, arrays, kind="downlink")
    elif state is not None:
        state[HELD] = wire_record(arrays)


def _restore_personal(
    settings: NodeSettings, state: RecordDict | None
) -> dict[str, np.ndarray] | None:
    """This node's personal factors from its files (simulation) or its Flower state; None at
    first."""
    if settings.personal_dir:
        return load_personal(settings)
    if state is not None and PERSONAL in state.array_records:
        return arrays_of(state.array_records[PERSONAL])
    return None


def keep_personal(
    settings: NodeSettings, state: RecordDict | None, arrays: dict[str, np.ndarray]
) -> None:
    """Where :func:`_restore_personal` finds them next round."""
    if settings.personal_dir:
        save_personal(settings, arrays)
    elif state is not None:
        state[PERSONAL] = to_array_record(arrays)
