"""The server's state after a completed round, saved atomically so a run can resume.

Everything a later round depends on: the round number, the global adapter, the server
optimizer's moments, FedEx-LoRA's residuals, the metrics history, the state of Python's
``random`` (Flower samples nodes with it) and the run settings that shape the result (a resume
with different ones is refused). Arrays go to ``state.safetensors``, the rest to ``state.json``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, FileFormatError
from fedlora.savedfiles import atomic_folder, load_safetensors, read_json
from fedlora.server.checkpoint import check_checkpoint
from fedlora.server.strategies import OptimizerState

Arrays = dict[str, np.ndarray]
STATE_DIR = "server-state"
# Settings that may change between a run and its resume; every other one must match.
RESUMABLE_KEYS = frozenset(
    {
        "num-server-rounds",
        "round-timeout",
        "output-dir",
        "resume",
        "min-nodes",
        "min-available-nodes",
        "tracking",  # where the figures are logged, not what the run computes
    }
)


@dataclass
class ServerState:
    completed_round: int
    global_adapter: Arrays
    optimizer: OptimizerState = field(default_factory=OptimizerState)
    residuals: Arrays = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    python_random: Any = None  # random.getstate()


def save_state(out_dir: Path, state: ServerState) -> Path:
    """Write ``state`` to ``out_dir/server-state`` atomically."""
    arrays = {f"global/{k}": v for k, v in state.global_adapter.items()}
    arrays |= {f"optimizer/{k}": np.asarray(v) for k, v in state.optimizer.to_arrays().items()}
    arrays |= {f"residual/{k}": v for k, v in state.residuals.items()}
    meta = {
        "completed-round": state.completed_round,
        "history": state.history,
        "settings": state.settings,
        "python-random": _encode_random(state.python_random),
    }
    with atomic_folder(out_dir / STATE_DIR) as tmp:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp / "state.safetensors"
        )
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    return out_dir / STATE_DIR


def load_state(out_dir: Path) -> ServerState | None:
    """The state saved in ``out_dir``, or None when there is none."""
    folder = out_dir / STATE_DIR
    if not (folder / "state.json").is_file():
        return None
    fix = (
        f"the checkpoint is truncated or corrupted; delete {folder} to start the run over "
        f"(or set resume=false), or restore it from a backup"
    )
    meta = read_json(folder / "state.json", fix, allow_nonfinite=True)  # a NaN figure in history
    arrays = load_safetensors(folder / "state.safetensors", fix, ("float32", "float64", "int64"))
    check_checkpoint(meta, arrays, folder, fix)

    def part(prefix: str) -> Arrays:
        return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

    try:
        return ServerState(
            completed_round=int(meta["completed-round"]),
            global_adapter=part("global/"),
            optimizer=OptimizerState.from_arrays(part("optimizer/")),
            residuals=part("residual/"),
            history=list(meta["history"]),
            settings=dict(meta["settings"]),
            python_random=_decode_random(meta["python-random"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FileFormatError(
            f"{folder} holds an incomplete checkpoint (missing or malformed {exc}): {fix}"
        ) from None


def check_resumable(saved: Mapping[str, Any], now: Mapping[str, Any], where: Path) -> None:
    """Refuse a resume whose result-shaping settings differ from the saved run's.

    A key the saved run predates counts as its default (the run behaved as the default does).
    """
    defaults = RunConfig().to_mapping()
    for key in sorted(set(saved) | set(now)):
        was = saved.get(key, defaults.get(key))
        if key in RESUMABLE_KEYS or was == now.get(key):
            continue
        raise ConfigError(
            f"cannot resume the run in {where}: {key} was {was!r}, "
            f"now {now.get(key)!r}; use the same value or a new output-dir"
        )


def capture_random() -> Any:
    return random.getstate()


def restore_random(value: Any) -> None:
    if value is not None:
        random.setstate(value)


def _encode_random(value: Any) -> Any:
    if value is None:
        return None
    version, internal, gauss = value
    return [version, list(internal), gauss]


def _decode_random(value: Any) -> Any:
    if value is None:
        return None
    version, internal, gauss = value
    return (version, tuple(internal), gauss)
