"""Load the frozen base model, quantized or not, through one dispatch.

``nf4`` (default) and ``int8`` use bitsandbytes (QLoRA-style: Dettmers et al., 2023,
arXiv:2305.14314) with bf16 compute; ``bf16`` and ``fp32`` load plain weights. Each backend is a
small function; the registry maps names to them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError

log = logging.getLogger(__name__)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(model_dir: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, device_map=_device(), **kwargs)


def _bnb(model_dir: Path, **bnb: Any) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"bitsandbytes is not installed: install it or use one of "
                          f"{sorted(set(BACKENDS) - {'nf4', 'int8'})}") from None
    return _load(model_dir, dtype=torch.bfloat16,
                 quantization_config=BitsAndBytesConfig(**bnb))


def load_nf4(model_dir: Path) -> Any:
    import torch

    return _bnb(model_dir, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16)


def load_int8(model_dir: Path) -> Any:
    return _bnb(model_dir, load_in_8bit=True)


def load_bf16(model_dir: Path) -> Any:
    import torch

    return _load(model_dir, dtype=torch.bfloat16)


def load_fp32(model_dir: Path) -> Any:
    import torch

    return _load(model_dir, dtype=torch.float32)


BACKENDS: dict[str, Callable[[Path], Any]] = {
    "nf4": load_nf4, "int8": load_int8, "bf16": load_bf16, "fp32": load_fp32,
}


def load_base(model_dir: Path, quantization: str) -> Any:
    """The frozen base model in ``quantization``; raises ConfigError naming the alternatives."""
    try:
        loader = BACKENDS[quantization]
    except KeyError:
        raise ConfigError(f"quantization={quantization!r}: use one of {sorted(BACKENDS)}") \
            from None
    model = loader(model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("Loaded base %s as %s on %s", model_dir.name, quantization, _device())
    return model
