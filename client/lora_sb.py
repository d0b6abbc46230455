"""LoRA-SB layers on a PEFT model: ``B @ R @ A`` with A and B frozen and only R trained.

PEFT's LoRA layer computes ``lora_B(lora_A(dropout(x))) * scaling``. :func:`attach_sb` swaps
each layer's ``lora_B`` for :class:`SBUp`, a ``Linear(r, out)`` whose weight is the frozen B and
which first applies the trainable r x r matrix R (zero at the start, so the model starts at the
base). The rest of PEFT (dropout, scaling, quantized base layers) is untouched. The LoRA-SB
tensors are named ``<module>.lora_R.weight`` (fedlora.lora), beside PEFT's ``lora_A`` and
``lora_B``; :func:`sb_state` and :func:`set_sb_state` read and write them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlora.lora import R_WEIGHT

ADAPTER = "default"
SB_PARAM = "sb_r"  # the parameter's name inside SBUp (PEFT state dicts list it; fedlora drops it)


class SBUp(nn.Linear):
    """``h -> B (R h)``: a frozen ``Linear(r, out)`` (B) after a trainable r x r matrix R."""

    def __init__(self, b: nn.Linear) -> None:
        super().__init__(b.in_features, b.out_features, bias=False, device=b.weight.device)
        self.weight = nn.Parameter(b.weight.detach().clone(), requires_grad=False)
        r = b.in_features
        self.sb_r = nn.Parameter(torch.zeros(r, r, dtype=b.weight.dtype, device=b.weight.device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(h, self.sb_r), self.weight)


def sb_layers(model: Any) -> dict[str, SBUp]:
    """``{module name: SBUp}`` for every LoRA layer carrying one."""
    out: dict[str, SBUp] = {}
    for name, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if (
            isinstance(lora_b, nn.ModuleDict)
            and ADAPTER in lora_b
            and isinstance(lora_b[ADAPTER], SBUp)
        ):
            out[name] = cast(SBUp, lora_b[ADAPTER])
    return out


def attach_sb(model: Any) -> int:
    """Give every LoRA layer of ``model`` an R (zero); return how many layers got one."""
    count = 0
    for _, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict) and ADAPTER in lora_b:
            if not isinstance(lora_b[ADAPTER], SBUp):
                lora_b[ADAPTER] = SBUp(cast(nn.Linear, lora_b[ADAPTER]))
            count += 1
    return count


def sb_state(model: Any) -> dict[str, np.ndarray]:
    """Every R as float32 numpy, named ``<module>.lora_R.weight``."""
    return {
        f"{name}{R_WEIGHT}": layer.sb_r.detach().float().cpu().numpy()
        for name, layer in sb_layers(model).items()
    }


def set_sb_state(model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy the ``lora_R`` tensors of ``arrays`` into the model's R; unknown names fail."""
    layers = sb_layers(model)
    for name, value in arrays.items():
        layer = layers.get(name[: -len(R_WEIGHT)])
        if layer is None:
            raise ValueError(f"{name}: no LoRA-SB layer of that name in the model")
        with torch.no_grad():
            layer.sb_r.copy_(torch.from_numpy(np.asarray(value)).to(layer.sb_r.dtype))


def is_sb_key(key: str) -> bool:
    """A PEFT state-dict key of an R (fedlora names it ``lora_R`` instead)."""
    return key.endswith(f".{SB_PARAM}")
