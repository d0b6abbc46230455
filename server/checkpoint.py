"""Write the global adapter as a standard PEFT adapter folder, atomically; check a saved
server checkpoint before a resume uses it.

``adapter_model.safetensors`` + ``adapter_config.json``: ``peft.PeftModel.from_pretrained(base,
folder)`` loads it as it is. A folder is written under a temporary name and renamed into place,
so a crash never leaves a half-written adapter behind. FedEx-LoRA's dense residuals, when
there are any, go beside it in ``fedex-residual.safetensors`` (keyed by layer module name);
PEFT ignores that file and the export adds it to the base weights.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from fedlora.errors import FileFormatError
from fedlora.lora import RESIDUAL_FILE, LoraSettings, fold_sb
from fedlora.protocol.adapter import factor_of
from fedlora.savedfiles import atomic_folder


def save_adapter(
    arrays: Mapping[str, np.ndarray],
    folder: Path,
    lora: LoraSettings,
    base_dir: Path,
    metadata: Mapping[str, Any] | None = None,
    residuals: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``arrays`` as a PEFT adapter folder at ``folder`` (replacing it atomically).

    A LoRA-SB adapter (Fed-SB) is written folded (``A' = R @ A``): a standard PEFT adapter.
    """
    arrays = fold_sb(dict(arrays))
    with atomic_folder(folder) as tmp:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()},
            tmp / "adapter_model.safetensors",
            metadata={"format": "pt"},
        )
        lora.peft_config(base_dir).save_pretrained(tmp)
        if residuals:
            save_file(
                {k: np.ascontiguousarray(v) for k, v in residuals.items()},
                tmp / RESIDUAL_FILE,
                metadata={"format": "pt"},
            )
        if metadata:
            (tmp / "fedlora.json").write_text(json.dumps(dict(metadata), indent=2))
    return folder


# The dtype of each part of ``state.safetensors`` (fedlora.server.state), by name prefix.
STATE_DTYPES = {"global/": "float32", "residual/": "float32", "optimizer/": "float64"}
OPTIMIZER_STEP = "optimizer/step"  # int64, one value


def check_checkpoint(meta: Any, arrays: Mapping[str, np.ndarray], where: Path, fix: str) -> None:
    """Raise a one-line FileFormatError unless ``state.json``'s ``meta`` and the arrays of
    ``state.safetensors`` are a checkpoint a resume can use (types, dtypes, shapes, history)."""
    problem = _meta_problem(meta) or _arrays_problem(arrays)
    if problem:
        raise FileFormatError(f"{where} holds an incomplete checkpoint ({problem}): {fix}")


def _meta_problem(meta: Any) -> str:
    if not isinstance(meta, dict):
        return "state.json is not an object"
    missing = [
        k for k in ("completed-round", "history", "settings", "python-random") if k not in meta
    ]
    if missing:
        return f"state.json lacks {', '.join(missing)}"
    done = meta["completed-round"]
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        return f"completed-round={str(done)[:20]} is not a round number"
    if not isinstance(meta["settings"], dict):
        return "settings is not an object"
    history = meta["history"]
    if not isinstance(history, list) or not all(
        isinstance(h, dict) and isinstance(h.get("round"), int) for h in history
    ):
        return "history is not a list of rounds, each with its round number"
    value = meta["python-random"]
    if value is not None:
        try:
            version, internal, gauss = value
            random.Random().setstate((version, tuple(internal), gauss))
        except (TypeError, ValueError, OverflowError):
            return "python-random is not a state of Python's random module"
    return ""


def _arrays_problem(arrays: Mapping[str, np.ndarray]) -> str:
    shapes = {k[len("global/") :]: v.shape for k, v in arrays.items() if k.startswith("global/")}
    for name, value in arrays.items():
        if name == OPTIMIZER_STEP:
            if value.dtype != np.int64 or value.size != 1 or int(value.reshape(-1)[0]) < 0:
                return f"{name} is not one int64 step count"
            continue
        want = next((d for p, d in STATE_DTYPES.items() if name.startswith(p)), None)
        if want is None:
            return f"tensor {name} is not part of a checkpoint"
        if value.dtype.name != want:
            return f"tensor {name} is {value.dtype.name}, expected {want}"
        if name.startswith(("optimizer/m/", "optimizer/v/")):
            of = name[len("optimizer/m/") :]
            if shapes.get(of) != value.shape:
                return f"tensor {name} has shape {value.shape}, the adapter's {of} {shapes.get(of)}"
    return _moments_problem(arrays, set(shapes))


def _moments_problem(arrays: Mapping[str, np.ndarray], names: set[str]) -> str:
    """The server optimizer's moments cover whole factors of the adapter (the tensors a strategy
    sends: every A and B, or every B), m and v the same ones."""
    covered = {
        kind: {k[len(f"optimizer/{kind}/") :] for k in arrays if k.startswith(f"optimizer/{kind}/")}
        for kind in ("m", "v")
    }
    if covered["m"] and covered["v"] and covered["m"] != covered["v"]:
        return "the optimizer's m and v moments cover different tensors"
    for kind, part in covered.items():
        try:
            factors = {factor_of(n) for n in part}
            whole = {n for n in names if factor_of(n) in factors}
        except ValueError:
            return f"the optimizer's {kind} moments or the adapter hold a non-LoRA tensor name"
        if part != whole:
            return f"the optimizer's {kind} moments cover part of a factor ({len(part)} tensors)"
    return ""
