"""Plain backends: ``bf16`` and ``fp32`` weights, no quantization.

The name fixes the weight dtype, so the machine's compute dtype is not used here. bf16 runs
everywhere PyTorch does (on a CPU without native bf16 by conversion, slowly); fp32 is the
reference the quantized backends are compared with.
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

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, _DTYPES[variant]), device_map=device
    )
