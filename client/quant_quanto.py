"""optimum-quanto backends: ``quanto-int4`` and ``quanto-int8`` (weight-only).

Loaded through transformers' ``QuantoConfig``: every linear layer but ``lm_head`` becomes a
frozen ``optimum.quanto.QLinear`` (a ``torch.nn.Linear`` subclass), so peft wraps it with its
default LoRA ``Linear`` and gradients reach the LoRA tensors through quanto's matmul. Activations
stay in the compute dtype. Merging an adapter into a quanto layer is not supported (its weight is
a packed tensor): merge onto the fp32 base instead, as the export does.

int4 on CPU unpacks weights with a C++ extension that quanto compiles on first use (about 30-70 s
on these 2-core machines, once per installation: it is cached in quanto's own folder under
site-packages). It needs a C++ compiler, ninja and that folder writable; :func:`available` checks
for them and :func:`load` compiles up front, so a training step never pays for it. On CUDA,
quanto may build its CUDA kernels the same way (not measured here).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _cpp_extension() -> Any:
    from optimum.quanto.library.extensions import get_extension

    return get_extension("quanto_cpp")


def _extension_built(ext: Any) -> bool:
    import torch

    build = Path(ext.build_directory)
    version = build / "pytorch_version.txt"
    return (
        version.is_file()
        and version.read_text().strip() == torch.__version__
        and (build / f"{ext.name}.so").is_file()
    )


def _cannot_build_extension() -> str | None:
    from torch.utils.cpp_extension import is_ninja_available

    build = Path(_cpp_extension().build_directory)
    compiler = os.environ.get("CXX", "c++")
    missing = []
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler})")
    if not is_ninja_available():
        missing.append("ninja")
    folder = build if build.exists() else build.parent
    if not os.access(folder, os.W_OK):
        missing.append(f"write access to {folder}")
    if missing:
        return (
            f"quanto int4 on CPU compiles a C++ extension on first use and needs "
            f"{', '.join(missing)}"
        )
    return None


def available(variant: str) -> str | None:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return "optimum-quanto is not installed (pip install optimum-quanto)"
    import torch

    if (
        variant == "int4"
        and not torch.cuda.is_available()
        and not _extension_built(_cpp_extension())
    ):
        return _cannot_build_extension()
    return None


def load(model_dir: Path, device: str, compute_dtype: torch.dtype, variant: str) -> Any:
    from transformers import AutoModelForCausalLM, QuantoConfig

    if variant == "int4" and device == "cpu":
        ext = _cpp_extension()
        if not _extension_built(ext):
            log.info("Compiling optimum-quanto's C++ extension for int4 (once, ~30-70 s)")
            start = time.perf_counter()
            ext.lib  # noqa: B018 -- the property compiles and loads it
            log.info("Compiled it in %.0f s", time.perf_counter() - start)
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=compute_dtype,
        device_map=device,
        quantization_config=QuantoConfig(weights=variant),
    )
