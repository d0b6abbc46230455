"""Plain backends: ``auto``, ``bf16`` and ``fp32`` weights, no quantization.

``bf16`` and ``fp32`` fix the weight dtype, so the machine's compute dtype is not used; ``auto``
takes it (bf16 where the machine computes bf16 natively, else fp32). bf16 runs everywhere
PyTorch does, but on a CPU without native bf16 by conversion, many times slower than fp32, so
asking for it there logs a warning. fp32 is the reference the quantized backends are compared
with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def available(variant: str) -> str | None:
    import torch

    if variant == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "this GPU cannot run bf16"
    return None


def load(model_dir: Path, device: str, compute_dtype: torch.dtype, variant: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from fedlora.precision import warn_if_emulated_bf16

    if variant == "bf16":
        warn_if_emulated_bf16(device, 'quantization="bf16"')
    dtype = compute_dtype if variant == "auto" else getattr(torch, _DTYPES[variant])
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device)
