"""Write the global adapter as a standard PEFT adapter folder, atomically.

``adapter_model.safetensors`` + ``adapter_config.json``: ``peft.PeftModel.from_pretrained(base,
folder)`` loads it as it is. A folder is written under a temporary name and renamed into place,
so a crash never leaves a half-written adapter behind. FedEx-LoRA's dense residuals, when
there are any, go beside it in ``fedex-residual.safetensors`` (keyed by layer module name);
PEFT ignores that file and the export adds it to the base weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from fedlora.lora import RESIDUAL_FILE, LoraSettings, fold_sb
from fedlora.savedfiles import atomic_folder


def save_adapter(
    arrays: Mapping[str, np.ndarray],
    folder: Path,
    lora: LoraSettings,
    base_dir: Path,
    metadata: Mapping[str, Any] | None = None,
    residuals: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``arrays`` as a PEFT adapter folder at ``folder`` (replacing it atomically).

    A LoRA-SB adapter (Fed-SB) is written folded (``A' = R @ A``): a standard PEFT adapter.
    """
    arrays = fold_sb(dict(arrays))
    with atomic_folder(folder) as tmp:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()},
            tmp / "adapter_model.safetensors",
            metadata={"format": "pt"},
        )
        lora.peft_config(base_dir).save_pretrained(tmp)
        if residuals:
            save_file(
                {k: np.ascontiguousarray(v) for k, v in residuals.items()},
                tmp / RESIDUAL_FILE,
                metadata={"format": "pt"},
            )
        if metadata:
            (tmp / "fedlora.json").write_text(json.dumps(dict(metadata), indent=2))
    return folder
