"""A node's warm state: base model + LoRA and encoded data, loaded once per process.

Flower calls the ClientApp once per message; the base model stays in a module-level cache so a
second round in the same process only swaps adapter weights (no reload).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.basemodel import resolve_base_model
from fedlora.data.drugreview import SITES, load_split, split_by_site
from fedlora.errors import ConfigError, DataError
from fedlora.lora import LoraSettings
from fedlora.prompting import Encoded, encode
from fedlora.protocol.adapter import AdapterSpec, spec_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeSettings:
    """Node-local settings: which base model, how to load it, and which private data."""

    base_model: str
    quantization: str
    site: str

    @property
    def site_id(self) -> int:
        return SITES.index(self.site)

    @classmethod
    def from_config(cls, merged: Mapping[str, Any]) -> NodeSettings:
        """From run config overlaid by node config (``site``, or ``partition-id`` in simulation)."""
        site = merged.get("site")
        if site is None:
            sites = [s.strip() for s in str(merged.get("sites", ",".join(SITES))).split(",")]
            pid = int(merged.get("partition-id", 0))
            if pid >= len(sites):
                raise ConfigError(f"partition-id {pid} has no site: sites={sites}; run at most "
                                  f"{len(sites)} nodes or list more sites")
            site = sites[pid]
        if site not in SITES:
            raise ConfigError(f"site={site!r}: use one of {SITES}")
        return cls(base_model=str(merged.get("base-model", "default")),
                   quantization=str(merged.get("quantization", "nf4")), site=str(site))


@dataclass
class WarmModel:
    model: Any  # peft model over the frozen base
    tokenizer: Any
    spec: AdapterSpec  # names and shapes of the LoRA tensors
    load_seconds: float
    rounds_served: int = 0


_MODELS: dict[tuple[Any, ...], WarmModel] = {}
_EXAMPLES: dict[tuple[Any, ...], list[Encoded]] = {}
_LOADS = [0]


def warm_model(settings: NodeSettings, lora: LoraSettings) -> WarmModel:
    """The cached base + LoRA for these settings, loaded on first use.

    The key leaves out the site: in simulation one process serves different sites in turn, and
    only the data changes between them.
    """
    key = (settings.base_model, settings.quantization, lora)
    if key not in _MODELS:
        _MODELS.clear()  # one base model per process: free the old one before loading another
        _MODELS[key] = _load_model(settings, lora)
    return _MODELS[key]


def site_examples(warm: WarmModel, settings: NodeSettings, max_length: int) -> list[Encoded]:
    """The site's training examples, encoded once per process."""
    key = (settings.base_model, settings.site, max_length)
    if key not in _EXAMPLES:
        _EXAMPLES[key] = encode_site(warm.tokenizer, settings.site, max_length)
    return _EXAMPLES[key]


def loads_so_far() -> int:
    """How many times this process has loaded a base model."""
    return _LOADS[0]


def _load_model(settings: NodeSettings, lora: LoraSettings) -> WarmModel:
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from fedlora.client.quantization import load_base

    start = time.perf_counter()
    base_dir = resolve_base_model(settings.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = get_peft_model(load_base(base_dir, settings.quantization), lora.peft_config(base_dir))
    _LOADS[0] += 1
    warm = WarmModel(model=model, tokenizer=tokenizer, spec=spec_of(get_lora_state(model)),
                     load_seconds=time.perf_counter() - start)
    log.info("Base %s (%s) + LoRA r=%d ready in %.1f s: %d LoRA tensors", base_dir.name,
             settings.quantization, lora.r, warm.load_seconds, len(warm.spec))
    return warm


def encode_site(tokenizer: Any, site: str, max_length: int) -> list[Encoded]:
    reviews = split_by_site(load_split("train"))[site]
    if not reviews:
        raise DataError(f"site {site!r} has no training reviews")
    encoded = [encode(tokenizer, r.text, r.label, max_length) for r in reviews]
    cut = sum(e.truncated for e in encoded)
    if cut:
        log.info("Site %s: %d of %d reviews cut to max-length=%d", site, cut, len(encoded),
                 max_length)
    return encoded


def get_lora_state(model: Any) -> dict[str, np.ndarray]:
    """The LoRA tensors under their PEFT file names, as float32 numpy arrays."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().numpy()
            for k, v in get_peft_model_state_dict(model).items()}


def set_lora_state(model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    import torch
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, {k: torch.from_numpy(np.array(v))
                                               for k, v in arrays.items()})
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise ValueError(f"adapter tensors not in the model: {bad[:3]}")


def set_trainable(model: Any, factors: str) -> None:
    """Train the LoRA factors in ``factors`` ("AB" or "B"); freeze the others."""
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_("A" in factors)
        elif ".lora_B." in name:
            param.requires_grad_("B" in factors)


def seed_torch(*key: int) -> None:
    """Seed torch from a tuple (seed, site, round): a round trains the same wherever it runs."""
    import torch

    torch.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))
