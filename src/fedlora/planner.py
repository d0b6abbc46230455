"""``fedlora plan``: a node's memory, traffic and time per round for a run config, as a table.

:func:`make_plan` gathers what :mod:`fedlora.plan`'s maths needs: the model's shape (its
config.json), the LoRA tensors (:func:`fedlora.lora.adapter_shapes`, on the meta device), the
factors the strategy trains and sends (its registry, numpy only), the wire sizes (the wire
format, numpy only) and the device's throughput. :func:`rows` lists the result for a table;
:func:`table` and :func:`plain` render it. Never imports Flower.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.choices import wire_codec
from fedlora.errors import ConfigError
from fedlora.plan import (
    ALLOCATORS,
    GIB,
    THROUGHPUT,
    THROUGHPUT_SOURCE,
    Budget,
    Memory,
    ModelShape,
    StepSettings,
    Traffic,
    adapted_layers,
    largest_batch,
    memory,
    needs_gradient_checkpointing,
    read_shape,
    step_flops,
    traffic,
)

if TYPE_CHECKING:
    from fedlora.config import RunConfig

DEVICES = ("cpu", "cuda")
COMPUTES = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Plan:
    """Everything ``fedlora plan`` prints for one node."""

    model: str  # the base model as given
    shape: ModelShape
    quantization: str
    step: StepSettings
    budget: Budget  # bytes (0 unless --memory) and the adapter's sizes
    memory: Memory
    traffic: Traffic
    secure: bool  # the run uses SecAgg+ (its up bytes are the masked vector's)
    flops: float  # one micro-batch
    tflops: float | None  # achieved TFLOP/s the times assume (None: unknown)
    tflops_source: str
    micro_batches: int  # per round: local steps x grad-accum
    largest_batch: int = 0  # within budget.bytes, with the run's checkpointing setting
    largest_batch_checkpointed: int = 0  # within budget.bytes, checkpointing on
    needs_checkpointing: bool = False  # the run's batch fits only with checkpointing

    @property
    def step_seconds(self) -> float | None:
        return None if not self.tflops else self.flops / (self.tflops * 1e12)

    @property
    def round_seconds(self) -> float | None:
        s = self.step_seconds
        return None if s is None else s * self.micro_batches


def resolve_auto(quantization: str, device: str) -> str:
    """What ``quantization`` means on ``device``: "auto" is nf4 on CUDA, plain weights on CPU
    (:func:`fedlora.precision.auto_backend`, which nodes load by)."""
    from fedlora.precision import auto_backend

    return auto_backend(device) if quantization == "auto" else quantization


def compute_dtype(quantization: str, device: str, compute: str) -> str:
    """ "bf16" or "fp32": what activations are computed in (client/quantization.py's choice:
    the plain dtype of bf16/fp32 bases, else the device's native one; ``compute`` overrides
    "auto" for a machine other than this one)."""
    if quantization in ("bf16", "fp32"):
        return quantization
    if compute != "auto":
        return compute
    if device == "cuda":
        return "bf16"
    from fedlora.precision import cpu_has_bf16

    return "bf16" if cpu_has_bf16() else "fp32"


def lora_sizes(base: Path, cfg: RunConfig) -> tuple[dict[str, tuple[int, ...]], str, str]:
    """The LoRA tensors' shapes, and the factors the strategy trains and sends."""
    from fedlora.lora import adapter_shapes
    from fedlora.server.strategies import get_strategy

    folder = base if base.is_dir() else None
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:  # a config.json file (or another name): give it a folder
            folder = Path(tmp)
            shutil.copy(base, folder / "config.json")
        shapes = adapter_shapes(folder, cfg.lora)
    train, send = get_strategy(cfg.strategy).factors()
    return shapes, train, send


def _weight_files(base: Path) -> int | None:
    files = list(base.glob("*.safetensors")) if base.is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def make_plan(
    cfg: RunConfig,
    base: Path,
    *,
    device: str = "cpu",
    compute: str = "auto",
    answer_tokens: int = 0,
    tflops: float | None = None,
    allocator: str = "glibc",
) -> Plan:
    """The plan of one node of the run ``cfg`` on the base model at ``base`` (a model folder,
    a folder holding only config.json, or a config.json file). ``answer_tokens``: columns the
    loss scores (0: every column, the worst case of max-length rows all answer)."""
    from fedlora.protocol.adapter import factor_of

    if device not in DEVICES:
        raise ConfigError(f"--device {device!r}: use one of {', '.join(DEVICES)}")
    if compute not in COMPUTES:
        raise ConfigError(f"--compute {compute!r}: use one of {', '.join(COMPUTES)}")
    if allocator not in ALLOCATORS:
        raise ConfigError(f"--allocator {allocator!r}: use one of {', '.join(ALLOCATORS)}")
    if answer_tokens < 0 or (tflops is not None and tflops <= 0):
        raise ConfigError("--answer-tokens must be >= 0 and --tflops > 0")
    shape = read_shape(base)
    shapes, train, send = lora_sizes(base, cfg)
    targets = adapted_layers(shapes)
    indices = [int(m.group(1)) for n in shapes if (m := re.search(r"\.layers\.(\d+)\.", n))]
    quantization = resolve_auto(cfg.quantization, device)
    dtype = compute_dtype(quantization, device, compute)
    step = StepSettings(
        compute=dtype,
        batch_size=cfg.batch_size,
        length=cfg.max_length,
        scored=min(answer_tokens or cfg.max_length, cfg.max_length),
        lora_r=cfg.lora_r,
        targets=targets,
        dropout=cfg.lora_dropout > 0,
        checkpointing=cfg.gradient_checkpointing,
        device=device,
        grad_layers=shape.layers - min(indices) if indices else 0,
        allocator=allocator,
    )
    adapter = sum(math.prod(s) for s in shapes.values())
    trained = sum(math.prod(s) for n, s in shapes.items() if factor_of(n) in train)
    sent = {n: s for n, s in shapes.items() if factor_of(n) in send}
    codec = wire_codec(cfg.codec, cfg.secure_aggregation)  # the one table (fedlora.choices)
    budget = Budget(0, adapter, trained)
    speed, source = _throughput(device, dtype, tflops)
    return Plan(
        model=str(base),
        shape=shape,
        quantization=quantization,
        step=step,
        budget=budget,
        memory=memory(shape, step, quantization, adapter, trained, _weight_files(base)),
        traffic=traffic(sent, codec, cfg.down_codec, cfg.codec_block, cfg.secagg_wire_bits),
        secure=cfg.secure_aggregation,
        flops=step_flops(shape, step, adapter),
        tflops=speed,
        tflops_source=source,
        micro_batches=cfg.local_steps * cfg.grad_accum,
    )


def _throughput(device: str, compute: str, tflops: float | None) -> tuple[float | None, str]:
    if tflops:
        return tflops, "--tflops"
    known = THROUGHPUT.get((device, compute))
    if known is None:
        return None, f"no figure for {device} {compute}: pass --tflops"
    return known / 1e12, THROUGHPUT_SOURCE


def with_budget(plan: Plan, budget_bytes: int) -> Plan:
    """``plan`` with the largest batch sizes whose peak (loading or training) fits
    ``budget_bytes``, and whether the run's batch needs gradient checkpointing to fit."""
    files = _weight_files(Path(plan.model))

    def fits(checkpointing: bool) -> Callable[[int], bool]:
        def at(batch: int) -> bool:
            step = replace(plan.step, batch_size=batch, checkpointing=checkpointing)
            b = plan.budget
            found = memory(
                plan.shape, step, plan.quantization, b.adapter_params, b.trained_params, files
            )
            return found.peak <= budget_bytes

        return at

    budget = replace(plan.budget, bytes=budget_bytes)
    loads = plan.memory.load_peak <= budget_bytes
    return replace(
        plan,
        budget=budget,
        largest_batch=largest_batch(fits(plan.step.checkpointing)),
        largest_batch_checkpointed=largest_batch(fits(True)),
        needs_checkpointing=loads
        and needs_gradient_checkpointing(plan.shape, plan.step, plan.quantization, budget),
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _layers(plan: Plan) -> str:
    n = plan.step.grad_layers
    return f" of the last {n} layers" if n and n != plan.shape.layers else ""


def rows(plan: Plan) -> list[tuple[str, str, str]]:
    """(section, item, value) rows of the plan, in print order."""
    s, m, t = plan.step, plan.memory, plan.traffic
    out = [
        ("model", "base", plan.model),
        ("model", "parameters", f"{plan.shape.params:,} ({plan.shape.layers} layers)"),
        ("model", "quantization / compute", f"{plan.quantization} / {s.compute} on {s.device}"),
        ("model", "LoRA", f"r={s.lora_r} on {', '.join(s.targets)}" + _layers(plan)),
        (
            "model",
            "adapter values",
            f"{plan.budget.adapter_params:,} ({plan.budget.trained_params:,} trained)",
        ),
        (
            "step",
            "batch x length",
            f"{s.batch_size} x {s.length} tokens, {s.scored} scored "
            f"columns, checkpointing {'on' if s.checkpointing else 'off'}",
        ),
        ("memory", "runtime (Python, torch)", _gib(m.runtime)),
        ("memory", "weights", _gib(m.weights)),
        ("memory", "adapter", _mib(m.adapter)),
        ("memory", "optimizer (grads + Adam)", _mib(m.optimizer)),
        ("memory", "activations", _gib(m.activations)),
        ("memory", "logits + loss", _gib(m.logits)),
        ("memory", "peak while loading", _gib(m.load_peak)),
        ("memory", "peak while training (live tensors)", _gib(m.live_peak)),
        ("memory", "glibc's allocator may keep (allowance)", _gib(m.heap_kept)),
        ("memory", "peak while training", _gib(m.train_peak)),
        ("memory", "PEAK", _gib(m.peak)),
        ("traffic", "values sent per round", f"{t.values:,}"),
        ("traffic", "up per round (plain codec)", _mib(t.up_plain)),
        (
            "traffic",
            "up per round (SecAgg+)",
            _mib(t.up_secure) + (" <- this run" if plan.secure else ""),
        ),
        ("traffic", "down per round (round 1)", f"{_mib(t.down)} ({_mib(t.down_first)})"),
        ("time", "TFLOP per micro-batch", f"{plan.flops / 1e12:.2f}"),
    ]
    if plan.tflops:
        out += [
            ("time", "throughput", f"{plan.tflops:g} TFLOP/s ({plan.tflops_source})"),
            ("time", "seconds per step", f"{plan.step_seconds:.1f}"),
            (
                "time",
                "seconds per round",
                f"{plan.round_seconds:.0f} ({plan.micro_batches} micro-batches; compute only)",
            ),
        ]
    else:
        out.append(("time", "seconds per step", plan.tflops_source))
    if plan.budget.bytes:
        out += [
            ("budget", "memory", _gib(plan.budget.bytes)),
            ("budget", "fits", "yes" if m.peak <= plan.budget.bytes else "NO"),
            ("budget", "largest batch", str(plan.largest_batch)),
            ("budget", "largest batch, checkpointing on", str(plan.largest_batch_checkpointed)),
            ("budget", "needs gradient checkpointing", "yes" if plan.needs_checkpointing else "no"),
        ]
    return out


def plain(plan: Plan) -> str:
    """The plan as aligned plain text."""
    found = rows(plan)
    width = max(len(item) for _, item, _ in found)
    return "\n".join(f"{sec:<8} {item:<{width}}  {value}" for sec, item, value in found)


def table(plan: Plan) -> Any:
    """The plan as a rich table."""
    from rich.table import Table

    out = Table(title="fedlora plan: one node, one round")
    for name in ("", "item", "value"):
        out.add_column(name)
    last = ""
    for sec, item, value in rows(plan):
        out.add_row(sec if sec != last else "", item, value)
        last = sec
    return out
