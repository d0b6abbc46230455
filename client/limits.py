"""A node's sanity limits: the largest round settings it accepts, from its own model and machine.

The server's round config passes the wire gate when its fields are of the right type and sign
(:data:`fedlora.protocol.messages.ROUND_BOUNDS`); a hostile or careless server can still ask for
``batch-size = 2^31``, ``max-length = 10^9``, ``lora-r = 2^20`` or ``local-steps = 10^9``. Before
it loads or allocates anything for a round, a node checks the settings against limits it derives
itself, with no setting of its operator's needed:

- ``max-length``: at most the model's context (``max_position_embeddings`` in its config.json);
- ``lora-r``: at most the model's hidden size (a rank beyond a layer's width adds nothing);
- ``lora-layers``: at most the model's layers;
- ``codec-block``: at most the adapter's values at the round's rank;
- ``batch-size``: one training step at ``max-length`` must fit the node's memory (node setting
  ``memory-gib``, else the machine's RAM or GPU memory) even with gradient checkpointing, by
  :mod:`fedlora.plan`'s estimate (``fedlora plan --memory`` shows the largest batch);
- local steps (``local-steps x grad-accum`` micro-batches, or the epochs' worth):
  :data:`DEFAULT_MAX_LOCAL_STEPS`, or the node's ``max-local-steps``.

Node settings tighten them: ``max-batch-size``, ``memory-gib``, ``max-local-steps``. A model the
planner does not know (not Llama-style) bounds the tokens of one batch by
:data:`UNKNOWN_MODEL_TOKENS` instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from fedlora.errors import ConfigError
from fedlora.plan import GIB, Budget, ModelShape, StepSettings, activations_fit, largest_batch
from fedlora.protocol.messages import RoundConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_LOCAL_STEPS = 10_000  # micro-batches a round may ask of a node (about 8 h at 3 s)
UNKNOWN_MODEL_TOKENS = 1 << 20  # tokens of one batch, for a model the planner does not know
UNKNOWN_CONTEXT = 1 << 17  # max-length for a model whose config names no context length


@dataclass(frozen=True)
class ModelLimits:
    """What a node's base model allows, from its config.json alone (no weights loaded)."""

    context: int  # max_position_embeddings
    hidden: int  # hidden_size: the largest useful LoRA rank
    layers: int  # num_hidden_layers
    shape: ModelShape | None  # None: not a model the planner knows


@cache
def model_limits(base_dir: Path) -> ModelLimits:
    """The limits of the model in ``base_dir`` (read once per process)."""
    from fedlora.readback import read_json

    config = read_json(base_dir / "config.json", "re-save the model folder")
    if not isinstance(config, dict):
        raise ConfigError(f"{base_dir / 'config.json'} is not a model config (a JSON object)")
    try:
        shape: ModelShape | None = ModelShape.from_config(config)
    except (ConfigError, TypeError, ValueError, ZeroDivisionError):
        shape = None

    def positive(key: str, default: int) -> int:
        value = config.get(key)
        return value if isinstance(value, int) and value > 0 else default

    return ModelLimits(
        context=positive("max_position_embeddings", UNKNOWN_CONTEXT),
        hidden=positive("hidden_size", 1 << 16),
        layers=positive("num_hidden_layers", 100_000),
        shape=shape,
    )


def machine_bytes(dev: str, memory_gib: float) -> int:
    """The memory a node trains in: its ``memory-gib`` when set, else the device's memory."""
    if memory_gib > 0:
        return int(memory_gib * GIB)
    if dev == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class NodeBudget:
    """What the node has, from its settings: the memory and the steps it gives a round."""

    dev: str  # "cpu" or "cuda"
    quantization: str  # the node's resolved backend (fedlora.planner.resolve_auto)
    compute: str  # "bf16" or "fp32"
    memory_bytes: int
    max_batch_size: int  # the node's own max-batch-size; 0 = memory decides
    max_local_steps: int  # micro-batches per round


def limit_problem(rc: RoundConfig, model: ModelLimits, budget: NodeBudget) -> str:
    """Why this node refuses ``rc`` ("" if it does not), checked before anything is allocated."""
    if rc.max_length > model.context:
        return f"max-length={rc.max_length} exceeds the model's context of {model.context} tokens"
    if rc.lora_r > model.hidden:
        return f"lora-r={rc.lora_r} exceeds the model's hidden size {model.hidden}"
    if rc.lora_layers > model.layers:
        return f"lora-layers={rc.lora_layers} exceeds the model's {model.layers} layers"
    layers = rc.lora_layers or model.layers
    if model.shape is not None:
        widths = sum(a + b for a, b in model.shape.linear_shapes().values())
        adapter = rc.lora_r * widths * layers
    else:
        adapter = rc.lora_r * 2 * model.hidden * 7 * layers  # up to 7 linear layers of ~hidden
    if rc.codec_block > adapter:
        return f"codec-block={rc.codec_block} exceeds the adapter's {adapter} values"
    if budget.max_batch_size and rc.batch_size > budget.max_batch_size:
        return (
            f"batch-size={rc.batch_size} exceeds this node's max-batch-size={budget.max_batch_size}"
        )
    if rc.local_epochs == 0 and rc.local_steps * rc.grad_accum > budget.max_local_steps:
        return (
            f"local-steps={rc.local_steps} x grad-accum={rc.grad_accum} exceeds this node's "
            f"max-local-steps={budget.max_local_steps}"
        )
    return _batch_problem(rc, model, budget, adapter)


def _batch_problem(rc: RoundConfig, model: ModelLimits, budget: NodeBudget, adapter: int) -> str:
    if model.shape is None:
        tokens = rc.batch_size * rc.max_length
        if tokens > UNKNOWN_MODEL_TOKENS:
            return (
                f"batch-size={rc.batch_size} x max-length={rc.max_length} = {tokens} tokens "
                f"exceeds {UNKNOWN_MODEL_TOKENS} per batch"
            )
        return ""
    step = StepSettings(
        compute=budget.compute,
        batch_size=rc.batch_size,
        length=rc.max_length,
        scored=rc.max_length,
        lora_r=rc.lora_r,
        targets=tuple(model.shape.linear_shapes()),
        dropout=rc.lora_dropout > 0,
        checkpointing=True,  # the least a step needs
        device=budget.dev,
        grad_layers=rc.lora_layers,
    )
    room = Budget(bytes=budget.memory_bytes, adapter_params=adapter, trained_params=adapter)
    shape = model.shape
    if activations_fit(shape, step, budget.quantization, room):
        return ""
    most = largest_batch(
        lambda b: activations_fit(shape, replace(step, batch_size=b), budget.quantization, room),
        limit=min(rc.batch_size, 1 << 16),
    )
    return (
        f"batch-size={rc.batch_size} x max-length={rc.max_length} does not fit this node's "
        f"{budget.memory_bytes / GIB:.1f} GiB even with gradient checkpointing (at most batch "
        f"{most}; fedlora plan --memory)"
    )


__all__ = [
    "DEFAULT_MAX_LOCAL_STEPS",
    "ModelLimits",
    "NodeBudget",
    "limit_problem",
    "machine_bytes",
    "model_limits",
]
