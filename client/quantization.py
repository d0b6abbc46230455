"""Load the frozen base model, quantized or not, through one dispatch over small backends.

A backend is a name in the run config (``quantization = "nf4"``) mapped to a small module in
``fedlora.client``: ``quant_bnb`` (bitsandbytes nf4 / int8), ``quant_quanto`` (optimum-quanto
int4 / int8) and ``quant_plain`` (auto / bf16 / fp32). Each module has two functions:
``available(variant) -> str | None`` (why it cannot run here, or None) and
``load(model_dir, device, compute_dtype, variant)``. Adding a backend is adding a module and one
registry line below. Modules are imported only when a backend is asked for, and import their
optional library inside those functions, so this file (and :data:`BACKEND_NAMES`, which the run
config validates against) imports neither torch nor any quantization library.

Device and compute dtype are chosen here, once: CUDA when present, else CPU
(:func:`fedlora.precision.device`, which a node's ``device`` setting or ``FEDLORA_DEVICE`` can
pin); bf16 compute where the hardware does bf16 arithmetic natively, else fp32 (see
:func:`fedlora.precision.compute_dtype`).

``quantization = "auto"`` is decided per device and said in one log line: on CUDA it is ``nf4``
(bitsandbytes NF4 weights, QLoRA-style, compute in bf16 where the GPU has it, else fp32); on CPU
it is plain weights in the fast dtype (bf16 where native, else fp32), where NF4's dequantization
costs more than it saves (README, "Client training").
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.errors import ConfigError
from fedlora.precision import auto_backend as resolve_auto
from fedlora.precision import compute_dtype, device

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: str  # the run-config value, e.g. "quanto-int4"
    module: str  # module in fedlora.client holding available() and load()
    variant: str  # what that module calls this backend ("nf4", "int4", "bf16", ...)
    description: str  # one line for errors and help texts

    def _impl(self) -> Any:
        return importlib.import_module(f"fedlora.client.{self.module}")

    def available(self) -> str | None:
        """None if this backend can run on this machine, else the reason it cannot."""
        reason: str | None = self._impl().available(self.variant)
        return reason

    def load(self, model_dir: Path, device: str, compute_dtype: torch.dtype) -> Any:
        """The base model from ``model_dir`` on ``device`` (weights not yet frozen)."""
        return self._impl().load(model_dir, device, compute_dtype, self.variant)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "nf4",
            "quant_bnb",
            "nf4",
            "bitsandbytes 4-bit NormalFloat weights, QLoRA-style (default)",
        ),
        Backend("int8", "quant_bnb", "int8", "bitsandbytes LLM.int8() 8-bit weights"),
        Backend("quanto-int4", "quant_quanto", "int4", "optimum-quanto 4-bit weights"),
        Backend("quanto-int8", "quant_quanto", "int8", "optimum-quanto 8-bit weights"),
        Backend(
            "auto",
            "quant_plain",
            "auto",
            "per device: nf4 with bf16 compute on CUDA (QLoRA); plain weights on CPU in its "
            "fast dtype (bf16 where native, else fp32)",
        ),
        Backend("bf16", "quant_plain", "bf16", "plain bfloat16 weights"),
        Backend("fp32", "quant_plain", "fp32", "plain float32 weights"),
    )
}
BACKEND_NAMES: tuple[str, ...] = tuple(BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ConfigError listing every name if there is none."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"quantization={name!r}: use one of {', '.join(BACKEND_NAMES)}") from None


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (imports their libraries)."""
    return [name for name, backend in BACKENDS.items() if backend.available() is None]


def describe_auto(dev: str, dtype: torch.dtype) -> str:
    """One line saying what ``quantization="auto"`` picked on ``dev``."""
    compute = str(dtype).removeprefix("torch.")
    if resolve_auto(dev) == "nf4":
        return f'quantization="auto" on {dev}: nf4 (bitsandbytes NF4 weights, {compute} compute)'
    why = "native here" if compute == "bfloat16" else "no native bf16 here"
    return f'quantization="auto" on {dev}: plain {compute} weights ({why})'


def load_base(model_dir: Path, quantization: str, device_choice: str | None = None) -> Any:
    """The frozen base model in ``quantization`` on :func:`fedlora.precision.device`
    (``device_choice``: auto | cpu | cuda); ConfigError naming the alternatives if that backend
    is unknown or cannot run here."""
    dev = device(device_choice)
    dtype = compute_dtype(dev)
    if quantization == "auto":
        log.info("%s", describe_auto(dev, dtype))
        quantization = resolve_auto(dev)
    backend = get_backend(quantization)
    reason = backend.available()
    if reason is not None:
        others = [n for n in available_backends() if n != quantization]
        raise ConfigError(
            f"quantization={quantization!r} cannot run here: {reason}. "
            f"Available here: {', '.join(others) or 'none'}"
        )
    model = backend.load(model_dir, dev, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    log.info(
        "Loaded base %s as %s on %s (compute %s)",
        model_dir.name,
        quantization,
        dev,
        str(dtype).removeprefix("torch."),
    )
    return model
