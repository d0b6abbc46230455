"""Which floating-point dtype this machine computes in fastest: bf16 where it is native, else fp32.

Shared by the rooms that run the model (client training, the server's central evaluation, the
demo's scoring), so that none hard-codes bf16: on a CPU without native bf16 (x86 without
AVX512-BF16 or AMX, such as AVX2-only EPYCs) PyTorch runs bf16 by conversion, and there one
training step of the default model took 24x longer than in fp32 (README, "Precision").
"""

from __future__ import annotations

import functools
import logging
import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def device() -> str:
    """``"cuda"`` when a CUDA GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (x86: AVX512-BF16 or AMX; ARM: BF16).

    Without it PyTorch still runs bf16, but by conversion, far slower than fp32, so we only
    pick bf16 compute where it is native. (On the 2-core Xeons with AMX, bf16 matmuls ran 2x to
    8x faster than fp32; on a 2-core AVX2 EPYC, a bf16 training step ran 24x slower.)
    """
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
