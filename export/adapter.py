"""The runtime side of LoRA slots: check an adapter file against a loaded base and activate it.

An adaptable base graph (:mod:`fedlora.export.slots`) carries its base id in its metadata
(``fedlora.base_id``) and one pair of overridable initializers per linear layer
(``<slot>.lora_A`` ``[in, rank]``, ``<slot>.lora_B`` ``[rank, out]``). An adapter file
(``.onnx_adapter``, onnxruntime's LoRA adapter format) holds some of those pairs and, as its
``model_version``, a number derived from the base id. :func:`activate` refuses, in one line, a
file written for another base or whose factors do not fit the slots, and returns the
``RunOptions`` that apply it; the session itself never changes, so one base serves many adapters.

Like :mod:`fedlora.export.runtime`, this module needs only numpy and onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort

from fedlora.errors import FedloraError

ADAPTER_FILE = "adapter.onnx_adapter"  # the file `fedlora export --adapter-only` writes
BASE_ID_KEY = "fedlora.base_id"  # graph metadata: the sha256 id of the base's weights


def slot_names(linear: str) -> tuple[str, str]:
    """A linear layer's slot: initializers A ``[in, rank]`` and B ``[rank, out]``."""
    return f"{linear}.lora_A", f"{linear}.lora_B"


def model_version(base_id: str) -> int:
    """The adapter format's ``model_version`` (an int32) for a base id: its first 28 bits (the
    file's card holds the whole id; a wrong base also fails the slot shapes, checked too)."""
    return int(base_id[:7], 16)


def adapter_file(path: Path) -> Path:
    """The ``.onnx_adapter`` file of ``path`` (the file, or the folder the export wrote)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FedloraError(
            f"adapter {path} does not exist: give the {ADAPTER_FILE} written by "
            f"`fedlora export --adapter-only --base BUNDLE` (or its folder)"
        )
    return path


def base_id_of(session: ort.InferenceSession) -> str | None:
    """The base id of a loaded graph (None when it has no LoRA slots)."""
    meta = session.get_modelmeta().custom_metadata_map
    return meta.get(BASE_ID_KEY)


def activate(
    session: ort.InferenceSession, model_dir: Path, path: Path
) -> tuple[ort.RunOptions, ort.LoraAdapter]:
    """RunOptions that apply the adapter ``path`` to ``session`` (the graph in ``model_dir``),
    and the loaded adapter, which the caller must keep alive as long as it uses the options
    (they hold a plain pointer to it: a freed adapter is silently not applied).

    FedloraError (one line) when the graph has no slots, the file was written for another base,
    or a factor names no slot or does not fit it."""
    path = adapter_file(path)
    base = base_id_of(session)
    if base is None:
        raise FedloraError(
            f"{model_dir} has no LoRA slots (a merged export): give a base exported with "
            f"`fedlora export --base-only`, or drop the adapter"
        )
    try:
        stored = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own types
        raise FedloraError(
            f"{path} is not an onnxruntime adapter file ({str(exc).splitlines()[0][:120]}): "
            f"export it again with `fedlora export --adapter-only`"
        ) from None
    if stored.get_model_version() != model_version(base):
        raise FedloraError(
            f"{path} was exported for another base (model version "
            f"{stored.get_model_version():x}, this base {model_version(base):x}, id "
            f"{base[:12]}): export the adapter with `fedlora export --adapter-only --base` "
            f"pointing at this model's bundle"
        )
    _check_fit(session, path, stored.get_parameters())
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter


def _check_fit(session: ort.InferenceSession, path: Path, params: dict[str, Any]) -> None:
    slots = {i.name: i.shape for i in session.get_overridable_initializers()}
    ranks: dict[str, int] = {}
    for name, value in params.items():
        if name not in slots:
            raise FedloraError(f"{path}: {name} is no LoRA slot of this base: re-export it")
        shape, expected = value.shape(), slots[name]
        fixed = [d for d in expected if isinstance(d, int)]
        got = [shape[0]] if name.endswith("lora_A") else [shape[1]]
        if len(shape) != 2 or got != fixed:
            raise FedloraError(f"{path}: {name} has shape {shape}, the slot {expected}: re-export")
        slot = name.rsplit(".", 1)[0]
        rank = shape[1] if name.endswith("lora_A") else shape[0]
        if ranks.setdefault(slot, rank) != rank:
            raise FedloraError(f"{path}: {slot}'s A and B differ in rank: re-export it")
    for slot in ranks:
        a, b = slot_names(slot)
        if a not in params or b not in params:
            raise FedloraError(f"{path}: {slot} has only one of lora_A and lora_B: re-export it")
