"""Load the frozen base model, quantized or not, through one dispatch over small backends.

A backend is a name in the run config (``quantization = "nf4"``) mapped to a small module in
``fedlora.client``: ``quant_bnb`` (bitsandbytes nf4 / int8), ``quant_quanto`` (optimum-quanto
int4 / int8) and ``quant_plain`` (bf16 / fp32). Each module has two functions:
``available(variant) -> str | None`` (why it cannot run here, or None) and
``load(model_dir, device, compute_dtype, variant)``. Adding a backend is adding a module and one
registry line below. Modules are imported only when a backend is asked for, and import their
optional library inside those functions, so this file (and :data:`BACKEND_NAMES`, which the run
config validates against) imports neither torch nor any quantization library.

Device and compute dtype are chosen here, once: CUDA when present, else CPU; bf16 compute where
the hardware does bf16 arithmetic natively, else fp32 (see :func:`compute_dtype`).
"""

from __future__ import annotations

import importlib
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.errors import ConfigError

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
        Backend("bf16", "quant_plain", "bf16", "plain bfloat16 weights"),
        Backend("fp32", "quant_plain", "fp32", "plain float32 weights"),
    )
}
BACKEND_NAMES: tuple[str, ...] = tuple(BACKENDS)


def device() -> str:
    """``"cuda"`` when a CUDA GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (x86: AVX512-BF16 or AMX; ARM: BF16).

    Without it PyTorch still runs bf16, but by conversion, often slower than fp32, so we only
    pick bf16 compute where it is native. (On the 2-core Xeons here, AVX512-BF16: bf16 matmuls
    ran 2x to 8x faster than fp32.)
    """
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    if platform.machine().lower() in ("aarch64", "arm64") and torch.backends.mkldnn.is_available():
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # ARM: checks the BF16 ext.
    return False


def compute_dtype(device: str) -> torch.dtype:
    """bf16 where ``device`` has native bf16 (CUDA: Ampere or newer; CPU: :func:`cpu_has_bf16`),
    else fp32. fp16 is never chosen: training in it needs loss scaling, which nodes do not do."""
    import torch

    if device.startswith("cuda"):
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = cpu_has_bf16()
    return torch.bfloat16 if native else torch.float32


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ConfigError listing every name if there is none."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"quantization={name!r}: use one of {', '.join(BACKEND_NAMES)}") from None


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (imports their libraries)."""
    return [name for name, backend in BACKENDS.items() if backend.available() is None]


def load_base(model_dir: Path, quantization: str) -> Any:
    """The frozen base model in ``quantization``; ConfigError naming the alternatives if that
    backend is unknown or cannot run here."""
    backend = get_backend(quantization)
    reason = backend.available()
    if reason is not None:
        others = [n for n in available_backends() if n != quantization]
        raise ConfigError(
            f"quantization={quantization!r} cannot run here: {reason}. "
            f"Available here: {', '.join(others) or 'none'}"
        )
    dev = device()
    dtype = compute_dtype(dev)
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
