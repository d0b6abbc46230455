"""LoRA slots: a base graph that takes an adapter at load time, and the adapter file that fills it.

An adaptable base (``fedlora export --base-only``) is the fused graph of the *unmerged* base
(:func:`fedlora.export.fused.export_fused` with a ``base_id``) where every linear layer computes
``x @ W + (x @ A) @ B`` (LoRA, Hu et al., 2021). ``A`` ``[in, rank]`` and ``B`` ``[rank, out]`` are
overridable initializers, empty (rank 0) by default, so the bare base answers as the base model.
Quantized variants quantize ``W`` only; the slots stay fp32.

An adapter (``fedlora export --adapter-only --base BUNDLE``) is one file in onnxruntime's LoRA
adapter format (``.onnx_adapter``, :class:`onnxruntime.AdapterFormat`): the factors of each slot,
with PEFT's scaling folded into ``B``, and the base's id as its ``model_version``. onnxruntime
applies it per request (:meth:`onnxruntime.RunOptions.add_active_adapter`), so switching adapters
does not reload the base (:mod:`fedlora.export.adapter` is the runtime side).

The fused graph packs q, k and v into one product, so their factors share a slot: ``A`` is
``[A_q | A_k | A_v]`` and ``B`` block-diagonal, which computes exactly the three separate products.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import FedloraError
from fedlora.export.adapter import ADAPTER_FILE, BASE_ID_KEY, model_version, slot_names

__all__ = [
    "ADAPTER_FILE",
    "BASE_ID_KEY",
    "adapter_factors",
    "base_id",
    "model_version",
    "pack_slots",
    "slot_names",
    "slot_shapes",
    "write_adapter_file",
]

_PEFT_NAME = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
    r"(q|k|v|o|gate|up|down)_proj\.lora_([ABR])\.weight$"
)
_QKV = ("q", "k", "v")


def base_id(base_dir: Path) -> str:
    """The id an adapter file must carry to fit an export of ``base_dir``: sha256 over the
    sha256 of each of its weights files (the model card's ``base.sha256``)."""
    from fedlora.export.card import weight_hashes

    hashes = weight_hashes(Path(base_dir))
    if not hashes:
        raise FedloraError(f"{base_dir} has no weights files: give the base model folder")
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def _slot_of(layer: str, kind: str, proj: str) -> str:
    if proj in _QKV:
        return f"layers.{layer}.attn.qkv_proj"
    return f"layers.{layer}.{'attn' if kind == 'self_attn' else 'mlp'}.{proj}_proj"


def _refusal(adapter_dir: Path, config: dict[str, Any]) -> str:
    """Why this PEFT adapter cannot be a slot file ("" when it can)."""
    from fedlora.lora import RESIDUAL_FILE

    if (adapter_dir / RESIDUAL_FILE).is_file():
        return f"it carries FedEx-LoRA's dense residuals ({RESIDUAL_FILE})"
    for key in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if config.get(key):
            return f"{key} is set"
    if config.get("modules_to_save"):
        return f"it trains whole modules ({config['modules_to_save']})"
    return ""


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one module: alpha / r (alpha / sqrt(r) with rsLoRA), where
    ``alpha_pattern`` may override alpha per module as PEFT matches it (a suffix of the name)."""
    alpha = float(config.get("lora_alpha", 8))
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = float(value)
            break
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def adapter_factors(adapter_dir: Path) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """``{(slot, proj): (A [in, r], B [r, out] with the scaling folded in)}`` of a PEFT adapter
    folder (LoRA-SB's ``R`` folded into ``A``); one-line FedloraError for what a slot can't hold."""
    from fedlora.export.merge import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_dir
    from fedlora.lora import fold_sb
    from fedlora.readback import load_safetensors, read_json

    adapter_dir = check_adapter_dir(Path(adapter_dir))
    config = read_json(adapter_dir / ADAPTER_CONFIG, "re-save the adapter")
    why = _refusal(adapter_dir, config)
    if why:
        raise FedloraError(
            f"{adapter_dir}: {why}, which a LoRA slot cannot hold: export it merged "
            f"(fedlora export without --adapter-only)"
        )
    fix = "copy the adapter folder again or re-save it"
    tensors = fold_sb(load_safetensors(adapter_dir / ADAPTER_WEIGHTS, fix, ("float32", "float16")))
    pairs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, tensor in tensors.items():
        match = _PEFT_NAME.match(name)
        if not match:
            raise FedloraError(
                f"{adapter_dir}: {name} is not a LoRA factor of a decoder layer's linear "
                f"projection: export this adapter merged (without --adapter-only)"
            )
        layer, kind, proj, part = match.groups()
        key = (_slot_of(layer, kind, proj), proj)
        pairs.setdefault(key, {})[part] = tensor.astype(np.float64)
    factors = {}
    for (slot, proj), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise FedloraError(f"{adapter_dir}: {slot} {proj}_proj lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]  # PEFT: A [r, in], B [out, r]
        rank = a.shape[0]
        layer = slot.split(".")[1]
        module = f"model.layers.{layer}.{'self_attn' if '.attn.' in slot else 'mlp'}.{proj}_proj"
        factors[(slot, proj)] = (a.T, b.T * _scale(config, module, rank))
    return factors


def pack_slots(
    factors: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    shapes: dict[str, tuple[int, int]],
) -> dict[str, np.ndarray]:
    """The slot tensors ``{"<slot>.lora_A": [in, r], "<slot>.lora_B": [r, out]}`` (float32) of
    ``factors`` for a base whose slots have ``shapes`` (``{slot: (in, out)}``); q, k and v
    packed block-diagonally. FedloraError when a factor does not fit its slot."""
    by_slot: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for (slot, proj), pair in factors.items():
        if slot not in shapes:
            raise FedloraError(f"the base has no LoRA slot {slot}: it is not this adapter's base")
        by_slot.setdefault(slot, {})[proj] = pair
    out: dict[str, np.ndarray] = {}
    for slot, parts in by_slot.items():
        fan_in, fan_out = shapes[slot]
        projs = list(_QKV) if slot.endswith("qkv_proj") else list(parts)
        widths = _qkv_widths(parts, fan_out) if slot.endswith("qkv_proj") else [fan_out]
        a_cols, b_blocks, offset = [], [], 0
        for proj, width in zip(projs, widths, strict=True):
            if proj in parts:
                a, b = parts[proj]
                if a.shape[0] != fan_in or b.shape[1] != width:
                    raise FedloraError(
                        f"adapter factor {slot} {proj}_proj is [{a.shape[0]} -> {b.shape[1]}], "
                        f"the base's [{fan_in} -> {width}]: it is not this adapter's base"
                    )
                block = np.zeros((b.shape[0], fan_out))
                block[:, offset : offset + width] = b
                a_cols.append(a)
                b_blocks.append(block)
            offset += width
        a_name, b_name = slot_names(slot)
        out[a_name] = np.ascontiguousarray(np.concatenate(a_cols, axis=1), dtype=np.float32)
        out[b_name] = np.ascontiguousarray(np.concatenate(b_blocks, axis=0), dtype=np.float32)
    return out


def _qkv_widths(parts: dict[str, tuple[np.ndarray, np.ndarray]], fan_out: int) -> list[int]:
    """Output widths of q, k and v in a packed slot of ``fan_out`` columns, from the factors'
    B shapes (k and v have the same width; q the rest)."""
    kv = {parts[p][1].shape[1] for p in ("k", "v") if p in parts}
    q = parts["q"][1].shape[1] if "q" in parts else None
    if len(kv) > 1:
        raise FedloraError("adapter factors k_proj and v_proj differ in width: not a decoder")
    if kv:
        (width,) = kv
        return [fan_out - 2 * width, width, width]
    if q is None or (fan_out - q) % 2:
        raise FedloraError(f"cannot split the packed qkv slot of width {fan_out}")
    return [q, (fan_out - q) // 2, (fan_out - q) // 2]


def slot_shapes(model_file: Path) -> tuple[str, dict[str, tuple[int, int]]]:
    """The base id and ``{slot: (in, out)}`` of an adaptable base graph (FedloraError if it is
    not one)."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if BASE_ID_KEY not in props:
        raise FedloraError(
            f"{model_file} has no LoRA slots: export the base with `fedlora export --base-only`"
        )
    shapes = {}
    for value in model.graph.input:
        if value.name.endswith(".lora_A"):
            dims = value.type.tensor_type.shape.dim
            b = next(v for v in model.graph.input if v.name == value.name[:-1] + "B")
            out_dim = b.type.tensor_type.shape.dim[1].dim_value
            shapes[value.name[: -len(".lora_A")]] = (dims[0].dim_value, out_dim)
    return props[BASE_ID_KEY], shapes


def write_adapter_file(adapter_dir: Path, base_model_file: Path, out_file: Path) -> dict[str, Any]:
    """Write ``adapter_dir``'s factors for the base graph ``base_model_file`` as one
    ``.onnx_adapter`` file; returns what the card records (base id, slots, rank, size)."""
    import onnxruntime as ort

    base, shapes = slot_shapes(base_model_file)
    tensors = pack_slots(adapter_factors(adapter_dir), shapes)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(model_version(base))
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    adapter.export_adapter(str(out_file))
    return {
        "file": out_file.name,
        "base_id": base,
        "model_version": model_version(base),
        "slots": len(tensors) // 2,
        "of_slots": len(shapes),
        "parameters": int(sum(v.size for v in tensors.values())),
        "size_mib": out_file.stat().st_size / 2**20,
    }
