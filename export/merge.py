"""Merge a LoRA adapter into its base model and save a plain float32 model folder.

The adapter is a standard PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``),
as written by ``PeftModel.save_pretrained``. The base is loaded in float32 (also when the adapter
was trained on a quantized base), the adapter applied with ``PeftModel.from_pretrained`` and folded
into the weights with ``merge_and_unload()``. The result is an ordinary Hugging Face causal-LM
folder (safetensors, config, generation config, tokenizer) that any exporter can read.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from fedlora.basemodel import check_model_dir
from fedlora.errors import FedloraError, FileFormatError
from fedlora.lora import RESIDUAL_FILE
from fedlora.readback import load_safetensors, read_json

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"  # torch.save's pickle: refused, never opened


def check_adapter_dir(adapter_dir: Path) -> Path:
    """Fail with a one-line :class:`FedloraError` unless ``adapter_dir`` is a PEFT LoRA folder
    whose settings are in range and whose tensors are finite floats (a NaN names its tensor).

    Only safetensors weights are read: ``adapter_model.bin`` is a pickle (``torch.save``), which
    can run code when loaded, and is refused.
    """
    adapter_dir = Path(adapter_dir)
    hint = "give the folder written by PeftModel.save_pretrained (adapter_config.json + weights)"
    if not adapter_dir.exists():
        raise FedloraError(f"adapter folder {adapter_dir} does not exist: {hint}")
    if not adapter_dir.is_dir():
        raise FedloraError(f"adapter {adapter_dir} is a file, not a folder: {hint}")
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FedloraError(
            f"{adapter_dir} has no {ADAPTER_CONFIG}: it is not a PEFT adapter folder; {hint}"
        )
    config = read_json(config_file, "re-save the adapter")
    problem = _config_problem(config)
    if problem:
        raise FileFormatError(f"{config_file}: {problem}; re-save the adapter")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (adapter_dir / PICKLED_WEIGHTS).is_file():
            raise FileFormatError(
                f"{adapter_dir / PICKLED_WEIGHTS} is a pickle (torch.save), which can run code "
                f"when loaded, and fedlora does not open it: convert it to {ADAPTER_WEIGHTS} "
                f"where you trust it (PeftModel.save_pretrained(folder) writes safetensors)"
            )
        raise FedloraError(f"{adapter_dir} holds no adapter weights ({ADAPTER_WEIGHTS}): {hint}")
    fix = "the file is truncated or corrupted; copy the adapter folder again or re-save it"
    for name in (ADAPTER_WEIGHTS, RESIDUAL_FILE):
        if (adapter_dir / name).is_file():
            load_safetensors(adapter_dir / name, fix, ("float32", "float16"))
    return adapter_dir


MAX_RANK = 1 << 16  # a LoRA rank fedlora merges (ranks beyond a layer's width add nothing)


def _config_problem(config: Any) -> str:
    """What is wrong with an adapter_config.json's LoRA settings ("" if nothing)."""
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        return f"peft_type={str(peft_type)[:20]!r} is not a LoRA adapter; only LoRA merges"
    r, alpha = config.get("r"), config.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        return f"r={str(r)[:20]} is not a LoRA rank (an integer in [1, {MAX_RANK}])"
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha < 1e6:
        return f"lora_alpha={str(alpha)[:20]} is not a number in (0, 1e6)"
    targets = config.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        return "target_modules is not a name or a list of names"
    if isinstance(targets, str) and targets != "all-linear":
        try:  # peft matches a string as a regular expression
            re.compile(targets)
        except (re.error, RecursionError, OverflowError):
            return f"target_modules={targets[:40]!r} is not a valid regular expression"
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        return f"lora_dropout={str(dropout)[:20]} is not a number in [0, 1)"
    return ""


def _brief(exc: BaseException, limit: int = 240) -> str:
    """The first two non-empty lines of an exception (torch puts the detail on line two)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:2]
    text = " ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_residuals(model: Any, residual_file: Path) -> int:
    """Add FedEx-LoRA's dense residuals to the matching base weights; return how many layers."""
    import torch

    prefix = "base_model.model."
    fix = "the file is truncated or corrupted; copy the adapter folder again"
    residuals = {k: torch.from_numpy(v) for k, v in load_safetensors(residual_file, fix).items()}
    for key, residual in residuals.items():
        module_name = key[len(prefix) :] if key.startswith(prefix) else key
        try:
            weight = model.get_submodule(module_name).weight
        except AttributeError:
            raise FedloraError(
                f"{residual_file}: {key} names no layer of the base model: "
                f"merge it onto the base model it was trained on"
            ) from None
        if tuple(weight.shape) != tuple(residual.shape):
            raise FedloraError(
                f"{residual_file}: {key} has shape {tuple(residual.shape)}, the "
                f"base layer {tuple(weight.shape)}"
            )
        with torch.no_grad():
            weight += residual.to(weight.dtype)
    log.info("Added FedEx-LoRA residuals to %d layers from %s", len(residuals), residual_file)
    return len(residuals)


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge the LoRA adapter in ``adapter_dir`` into ``base_dir`` (fp32) and save to ``out_dir``.

    Writes model.safetensors, config.json, generation_config.json and the base tokenizer files.
    Returns ``out_dir``. Raises :class:`FedloraError` for a missing or unusable adapter.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    check_model_dir(base_dir)
    check_adapter_dir(adapter_dir)

    log.info("Loading base %s in float32", base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    log.info("Applying adapter %s", adapter_dir)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (
        ValueError,
        RuntimeError,
        KeyError,
        OSError,
        TypeError,
        AttributeError,
        IndexError,
    ) as exc:
        # peft reads every field of adapter_config.json; one it cannot use ends here
        raise FedloraError(
            f"adapter {adapter_dir} does not fit base {base_dir} "
            f"({_brief(exc)}): merge it onto the base model it was trained on"
        ) from None
    merged = peft_model.merge_and_unload()
    merged.eval()
    if (adapter_dir / RESIDUAL_FILE).is_file():
        add_residuals(merged, adapter_dir / RESIDUAL_FILE)

    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.info("Saved merged model to %s", out_dir)
    return out_dir
