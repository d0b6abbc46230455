"""Which floating-point dtype this machine computes in fastest: bf16 where it is native, else fp32.

Shared by the rooms that run the model (client training, the server's central evaluation, the
demo's scoring), so that none hard-codes bf16: on a CPU without native bf16 (x86 without
AVX512-BF16 or AMX, such as AVX2-only EPYCs) PyTorch runs bf16 by conversion, and there one
training step of the default model took 24x longer than in fp32 (README, "Precision").

``FEDLORA_CPU_BF16=0`` makes :func:`cpu_has_bf16` answer False on any CPU, so a machine with
native bf16 (AMX, AVX512-BF16) picks what an AVX2-only one picks (fp32 under
``quantization="auto"``), for measurements; ``FEDLORA_CPU_BF16=1`` or unset keeps the probe.
The variable is read at every call and must be set in every process that loads a model (Ray
workers started by a simulation inherit the driver's environment; nodes of a ``ray start``
cluster inherit the environment of their ``ray start``).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


DEVICE_ENV = "FEDLORA_DEVICE"
DEVICES = ("auto", "cpu", "cuda")
_FELL_BACK: list[bool] = []  # the CPU fallback is logged once per process


def device(choice: str | None = None) -> str:
    """Where models run: ``"cuda"`` or ``"cpu"``. Every place that builds or runs a model asks here.

    ``choice`` (a node's ``device`` setting; empty or None: the ``FEDLORA_DEVICE`` environment
    variable; unset: ``"auto"``) is one of :data:`DEVICES`. ``auto`` takes CUDA when a GPU is
    visible and falls back to CPU with one log line per process; ``cpu`` never touches the GPU;
    ``cuda`` with no visible GPU is a ConfigError (a run meant for a GPU would otherwise take
    hours on CPU without a word). Inside a Ray simulation, a virtual client sees only the GPU
    share Ray gave it (``--gpus-per-client``).
    """
    import torch

    from fedlora.errors import ConfigError

    choice = (choice or os.environ.get(DEVICE_ENV, "") or "auto").strip().lower()
    if choice not in DEVICES:
        raise ConfigError(f"device={choice!r}: use one of {', '.join(DEVICES)}")
    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        raise ConfigError(
            "device='cuda' but no CUDA GPU is visible here (CUDA_VISIBLE_DEVICES, drivers; in a "
            "simulation, give virtual clients a GPU share with --gpus-per-client); "
            "use device='auto' or 'cpu' to run on CPU"
        )
    if not _FELL_BACK:
        _FELL_BACK.append(True)
        log.info("No CUDA GPU visible: models run on CPU")
    return "cpu"


def auto_backend(dev: str) -> str:
    """The backend ``quantization="auto"`` means on ``dev``: ``nf4`` on CUDA (QLoRA), else
    ``auto`` (plain weights in the CPU's fast dtype). Nodes load it, the planner plans it."""
    return "nf4" if dev.startswith("cuda") else "auto"


CPU_BF16_ENV = "FEDLORA_CPU_BF16"


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (x86: AVX512-BF16 or AMX; ARM: BF16).

    Without it PyTorch still runs bf16, but by conversion, far slower than fp32, so we only
    pick bf16 compute where it is native. (On the 2-core Xeons with AMX, bf16 matmuls ran 2x to
    8x faster than fp32; on a 2-core AVX2 EPYC, a bf16 training step ran 24x slower.)
    ``FEDLORA_CPU_BF16=0`` answers False without probing (see the module docstring).
    """
    if os.environ.get(CPU_BF16_ENV, "").strip() == "0":
        return False
    return _cpu_probes_bf16()


@functools.cache
def _cpu_probes_bf16() -> bool:
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    if platform.machine().lower() in ("aarch64", "arm64") and torch.backends.mkldnn.is_available():
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # ARM: checks the BF16 ext.
    return False


def bf16_is_native(dev: str) -> bool:
    """Whether ``dev`` ("cpu" or "cuda...") does bf16 arithmetic natively."""
    import torch

    if dev.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return cpu_has_bf16()


def compute_dtype(dev: str | None = None) -> torch.dtype:
    """bf16 where ``dev`` (default: :func:`device`) has native bf16 (CUDA: Ampere or newer; CPU:
    :func:`cpu_has_bf16`), else fp32. fp16 is never chosen: training in it needs loss scaling,
    which nodes do not do."""
    import torch

    return torch.bfloat16 if bf16_is_native(dev or device()) else torch.float32


def warn_if_emulated_bf16(dev: str, what: str) -> None:
    """One warning when ``what`` is asked to run in bf16 on a device that only emulates it."""
    if not bf16_is_native(dev):
        log.warning(
            "%s runs in bf16, which this %s does not compute natively%s: expect it many times"
            ' slower than fp32. quantization="auto" picks fp32 here.',
            what,
            dev.upper(),
            "" if dev.startswith("cuda") else " (no AVX512-BF16 or AMX)",
        )
