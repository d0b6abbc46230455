"""Adapter tensors on the wire: naming, expected shapes and dtypes, and validation.

Tensors are named as in a PEFT adapter file (``adapter_model.safetensors``), e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, so a global adapter can be
saved as a standard PEFT folder without renaming. Everything on the wire is float32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedlora.errors import WireError

WIRE_DTYPE = np.dtype(np.float32)
_LORA_NAME = re.compile(r"^base_model\.model\.[A-Za-z0-9_.]+\.lora_(A|B|R)\.weight$")


class AdapterValidationError(WireError, ValueError):
    """A set of adapter tensors does not match the expected spec."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str = WIRE_DTYPE.name


AdapterSpec = dict[str, TensorSpec]


def is_lora_name(name: str) -> bool:
    return _LORA_NAME.match(name) is not None


def spec_of(arrays: Mapping[str, np.ndarray]) -> AdapterSpec:
    """The spec that ``arrays`` satisfy (names, shapes, wire dtype)."""
    return {k: TensorSpec(tuple(int(d) for d in v.shape)) for k, v in sorted(arrays.items())}


def factor_of(name: str) -> str:
    """ "A", "B" or "R" (LoRA-SB's r x r matrix) for a LoRA tensor name."""
    match = _LORA_NAME.match(name)
    if match is None:
        raise ValueError(f"{name} is not a LoRA tensor name")
    return match.group(1)


def restrict(spec: AdapterSpec, factors: str) -> AdapterSpec:
    """The part of ``spec`` holding the given LoRA factors ("AB", "A", "B", "R")."""
    return {k: v for k, v in spec.items() if factor_of(k) in factors}


def problems(arrays: Mapping[str, np.ndarray], spec: AdapterSpec) -> list[str]:
    """Every way ``arrays`` differ from ``spec``; empty when they match."""
    found: list[str] = []
    missing = sorted(set(spec) - set(arrays))
    unexpected = sorted(set(arrays) - set(spec))
    if missing:
        found.append(f"missing {len(missing)} tensors (first: {missing[0]})")
    if unexpected:
        found.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})")
    for name in sorted(set(spec) & set(arrays)):
        arr, want = arrays[name], spec[name]
        if not is_lora_name(name):
            found.append(f"{name}: not a LoRA tensor name")
        if tuple(arr.shape) != want.shape:
            found.append(f"{name}: shape {tuple(arr.shape)}, expected {want.shape}")
        if arr.dtype.name != want.dtype:
            found.append(f"{name}: dtype {arr.dtype.name}, expected {want.dtype}")
        elif not np.isfinite(arr).all():
            found.append(f"{name}: holds NaN or Inf")
    return found


def validate(arrays: Mapping[str, np.ndarray], spec: AdapterSpec) -> None:
    """Raise AdapterValidationError listing what is wrong, if anything."""
    found = problems(arrays, spec)
    if found:
        raise AdapterValidationError("; ".join(found[:5]) + (" ..." if len(found) > 5 else ""))
