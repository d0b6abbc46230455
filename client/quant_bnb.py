"""bitsandbytes backends: ``nf4`` (default) and ``int8``.

``nf4``: 4-bit NormalFloat weights with matmuls in the compute dtype, as in QLoRA (Dettmers et
al., 2023, arXiv:2305.14314; no double quantization). ``int8``: LLM.int8() (Dettmers et al.,
2022, arXiv:2208.07339), vector-wise int8 with fp16 outlier columns; bitsandbytes casts the
activations to fp16 for its int8 matmul whatever the compute dtype.

bitsandbytes 0.50 runs both on CPU, forward and backward, through its ``torch.ops.bitsandbytes``
kernels (older releases were CUDA-only): :func:`available` checks that those kernels exist for
the device. Non-quantized parts (embeddings, norms, lm_head) are kept in the compute dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The op each variant's training step cannot do without (forward and backward).
_KEY_OP = {"nf4": "dequantize_4bit", "int8": "int8_linear_matmul"}


class _DropFp16CastNotice(logging.Filter):
    """bitsandbytes logs 'inputs will be cast ... to float16' on every int8 matmul call (per
    layer, per step); it is a fact of the backend, logged once by us instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_DROP_FP16_CAST_NOTICE = _DropFp16CastNotice()


def _has_kernel(op: str, dispatch_key: str) -> bool:
    import torch

    try:
        getattr(torch.ops.bitsandbytes, op)  # raises if the op is not registered at all
        return any(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"bitsandbytes::{op}", key)
            for key in (dispatch_key, "CompositeExplicitAutograd")
        )
    except (AttributeError, RuntimeError):
        return False


def available(variant: str) -> str | None:
    try:
        import bitsandbytes
    except ImportError:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    except Exception as exc:  # noqa: BLE001 -- a broken CUDA setup fails at import with various errors
        return f"bitsandbytes fails to import ({type(exc).__name__}: {exc})"
    import torch

    key = "CUDA" if torch.cuda.is_available() else "CPU"
    if not _has_kernel(_KEY_OP[variant], key):
        need = "a CUDA GPU (none is visible)" if key == "CPU" else "a supported GPU"
        return (
            f"bitsandbytes {bitsandbytes.__version__} has no {key} kernel for {variant}: "
            f"it needs {need}; bitsandbytes>=0.50 also runs on CPU"
        )
    return None


def load(model_dir: Path, device: str, compute_dtype: torch.dtype, variant: str) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if variant == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DROP_FP16_CAST_NOTICE)
        log.info("bitsandbytes int8: activations are cast to fp16 for each int8 matmul")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=compute_dtype, device_map=device, quantization_config=config
    )
    if variant == "nf4":
        _keep_training_layout(model)
    return model


def _keep_training_layout(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50, on CPUs with AVX512-BF16, repacks a Linear4bit weight in place the first
    time the layer runs in eval mode without gradients, and never unpacks it when training
    resumes: training after an evaluation then learns on garbage (default model, 5 steps: mean
    loss 17 instead of 1.6; tests/test_nf4_eval_then_train.py). A node evaluates and trains the
    same warm model, so the repacking is switched off; evaluation uses the training kernels.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(
            module, "support_avx512bf16_for_cpu", False
        ):
            module.support_avx512bf16_for_cpu = False
