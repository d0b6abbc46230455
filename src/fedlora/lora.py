"""LoRA settings shared by nodes and the server, and the server's initial adapter.

LoRA (Hu et al., 2021, arXiv:2106.09685) adds ``B @ A`` (rank r) to frozen linear layers, scaled
by ``alpha / r``. The server owns the initial adapter so every node starts from the same one:
A ~ U(-1/sqrt(in), 1/sqrt(in)) as in peft's default Kaiming init, B = 0, from a seeded generator.
Shapes come from the model's config alone, on the meta device (no weights are loaded).

LoRA-SB (``sb=True``; Ponkshe et al., 2024; Fed-SB, Singhal et al., 2025) adds an r x r matrix
``R`` between the factors: the update is ``scale * B @ R @ A`` with A and B frozen at a seeded
initialization (Gaussian, nearly orthonormal rows of A and columns of B) and only R trained (zero at
the start). Its tensor is ``<module>.lora_R.weight``. :func:`fold_sb` turns such an adapter
into a standard PEFT one (``A' = R @ A``, B unchanged), exactly, since ``B (R A) = B R A``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import ConfigError

# FedEx-LoRA's dense residuals, beside a PEFT adapter folder: one (out, in) float32 matrix per
# adapted layer, keyed by the layer's PEFT module name (``base_model.model.<module>``), to be
# added to ``<module>.weight`` of the base model (the server writes it, the export reads it).
RESIDUAL_FILE = "fedex-residual.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8  # rank of each update B @ A
    alpha: float = 16.0  # scaling numerator: the update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the LoRA path during training
    target_modules: str = "all-linear"  # "all-linear" or comma-separated module names
    rslora: bool = False  # rank-stabilised LoRA: scale by alpha / sqrt(r) (Kalajdzievski, 2023)
    sb: bool = False  # LoRA-SB: train only an r x r matrix R between frozen A and B (Fed-SB)
    # LoRA on the last N transformer layers only (0: every layer). Backward then stops at the
    # lowest adapted layer: on an fp32 CPU the top 15 of SmolLM2's 30 layers train ~1.7x faster
    layers: int = 0

    @property
    def scaling(self) -> float:
        """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (self.r**0.5 if self.rslora else self.r)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora-r={self.r!r}: must be a positive integer (e.g. 8)")
        if self.alpha <= 0:
            raise ConfigError(f"lora-alpha={self.alpha!r}: must be positive (e.g. 16)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora-dropout={self.dropout!r}: must be in [0, 1)")
        if not self.target_modules.strip():
            raise ConfigError("target-modules is empty: use 'all-linear' or module names")
        if not isinstance(self.layers, int) or self.layers < 0:
            raise ConfigError(f"lora-layers={self.layers!r}: must be 0 (all layers) or a count")

    def peft_config(self, base_dir: Path | str | None = None, model_config: Any = None) -> Any:
        """peft's LoraConfig. With ``layers`` set, the model's config (``model_config``, or read
        from ``base_dir``) gives its layer count (and, for all-linear, its linear layer names)."""
        from peft import LoraConfig

        targets: str | list[str] = self.target_modules
        if self.target_modules != "all-linear":
            targets = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        top: dict[str, Any] = {}
        if self.layers:
            targets, top = self._top_layers(targets, base_dir, model_config)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft annotates int; a float works
            lora_dropout=self.dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
            use_rslora=self.rslora,
            base_model_name_or_path=str(base_dir) if base_dir else None,
            **top,
        )

    def _top_layers(
        self, targets: str | list[str], base_dir: Path | str | None, model_config: Any
    ) -> tuple[list[str], dict[str, Any]]:
        """Target names and peft's ``layers_to_transform`` for the last ``layers`` layers (peft
        takes a layer list only with named targets, so all-linear becomes the model's names)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        if model_config is not None:
            config = model_config
        elif base_dir is not None:
            config = AutoConfig.from_pretrained(base_dir)
        else:
            raise ConfigError("lora-layers needs the base model's config: give its folder")
        n = int(config.num_hidden_layers)
        if self.layers > n:
            raise ConfigError(f"lora-layers={self.layers}: the model has only {n} layers")
        if isinstance(targets, str):  # all-linear
            with init_empty_weights():
                targets = linear_layer_names(AutoModelForCausalLM.from_config(config))
        return targets, {"layers_to_transform": list(range(n - self.layers, n))}


def adapter_shapes(base_dir: Path, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """The name and shape of every LoRA tensor for this model, computed on the meta device."""
    from accelerate import init_empty_weights
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    try:
        peft_model = get_peft_model(model, settings.peft_config(model_config=config))
    except ValueError as exc:  # peft's NoMatchingPeftModuleError: no layer has such a name
        if "not found in the base model" not in str(exc):
            raise
        kind = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise ConfigError(
            f"target-modules={settings.target_modules!r} names no layer of {base_dir} ({kind}), "
            f"whose linear layers are {', '.join(linear_layer_names(model))}: use some of "
            f"those or 'all-linear'"
        ) from None
    state = get_peft_model_state_dict(peft_model)
    shapes = {k: tuple(v.shape) for k, v in sorted(state.items())}
    if settings.sb:
        for name in [n for n in shapes if n.endswith(A_WEIGHT)]:
            shapes[name[: -len(A_WEIGHT)] + R_WEIGHT] = (settings.r, settings.r)
    return dict(sorted(shapes.items()))


def linear_layer_names(model: Any) -> list[str]:
    """The distinct names of ``model``'s linear layers that LoRA can target (not the head):
    ``q_proj, k_proj, v_proj, ...`` in a Llama, ``qkv_proj, gate_up_proj, ...`` in a Phi-3."""
    import torch

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    return sorted(names)


A_WEIGHT, B_WEIGHT, R_WEIGHT = ".lora_A.weight", ".lora_B.weight", ".lora_R.weight"


def initial_adapter(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Seeded initial LoRA tensors.

    Plain LoRA: A uniform in +-1/sqrt(fan_in), B zero. LoRA-SB (the shapes hold ``lora_R``
    tensors): A and B Gaussian with rows of A and columns of B of norm about 1 (nearly
    orthonormal for r much below the layer's dimensions), R zero. Deterministic in ``(shapes,
    seed)`` on any platform (numpy's PCG64, no LAPACK): a node derives the frozen factors it is
    not sent from the same call, and checks them against the server's digest.
    """
    rng = np.random.default_rng(seed)
    sb = any(n.endswith(R_WEIGHT) for n in shapes)
    out: dict[str, np.ndarray] = {}
    for name, shape in sorted(shapes.items()):
        if sb and name.endswith(A_WEIGHT):  # rows of norm ~1, nearly orthogonal (r << in)
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        elif sb and name.endswith(B_WEIGHT):  # columns of norm ~1
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        elif ".lora_A." in name:
            bound = 1.0 / np.sqrt(shape[1])
            out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, dtype=np.float32)
    return out


def fold_sb(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A LoRA-SB adapter as a standard PEFT one (``A' = R @ A``); others unchanged."""
    out = {k: v for k, v in adapter.items() if not k.endswith(R_WEIGHT)}
    for name, r in adapter.items():
        if name.endswith(R_WEIGHT):
            a_name = name[: -len(R_WEIGHT)] + A_WEIGHT
            folded = r.astype(np.float64) @ adapter[a_name].astype(np.float64)
            out[a_name] = folded.astype(np.float32)
    return out
