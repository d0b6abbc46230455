"""Gradient checkpointing for a round whose activations the planner says would not fit the node.

A node with a memory budget (node config ``memory-gib``; 0, the default, turns the check off)
asks :mod:`fedlora.plan` before each round whether one training step, as the server's round
config describes it, peaks within that budget. When it fits only with gradient checkpointing,
the round trains with it and one log line says so; when it fits without, nothing changes; when
it fits neither way, checkpointing is no cure and the round runs as asked (a smaller batch is the
cure: ``fedlora plan --memory``). The server's ``gradient-checkpointing = true`` still turns it
on for every node. Models the planner does not know (not Llama-style) are left as asked.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fedlora.errors import ConfigError
from fedlora.lora import LoraSettings
from fedlora.plan import (
    GIB,
    Budget,
    ModelShape,
    StepSettings,
    adapted_layers,
    needs_gradient_checkpointing,
)
from fedlora.planner import resolve_auto
from fedlora.protocol.adapter import AdapterSpec, factor_of
from fedlora.protocol.messages import RoundConfig

log = logging.getLogger(__name__)


def round_checkpointing(
    model: Any,
    spec: AdapterSpec,
    rc: RoundConfig,
    lora: LoraSettings,
    memory_gib: float,
    quantization: str = "auto",
) -> bool:
    """Whether this round trains with gradient checkpointing (see the module docstring);
    ``quantization``: the node's setting, as its base was loaded."""
    if rc.gradient_checkpointing or memory_gib <= 0:
        return rc.gradient_checkpointing
    try:
        shape = ModelShape.from_config(model.config.to_dict())
    except ConfigError:
        return False
    weight = model.get_input_embeddings().weight
    step = StepSettings(
        compute="bf16" if str(weight.dtype) == "torch.bfloat16" else "fp32",
        batch_size=rc.batch_size,
        length=rc.max_length,
        scored=rc.max_length,  # the worst case: every column scored
        lora_r=rc.lora_r,
        targets=adapted_layers(spec),
        dropout=rc.lora_dropout > 0,
        device=weight.device.type,
        grad_layers=lora.layers,
    )
    sizes = {n: math.prod(s.shape) for n, s in spec.items()}
    budget = Budget(
        bytes=int(memory_gib * GIB),
        adapter_params=sum(sizes.values()),
        trained_params=sum(v for n, v in sizes.items() if factor_of(n) in rc.train_factors),
    )
    weights = resolve_auto(quantization, step.device)
    if not needs_gradient_checkpointing(shape, step, weights, budget):
        return False
    log.info(
        "Round %d: batch %d x %d tokens fits memory-gib=%s only with gradient checkpointing "
        "(fedlora plan): on for this round",
        rc.server_round,
        rc.batch_size,
        rc.max_length,
        memory_gib,
    )
    return True
