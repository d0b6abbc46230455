"""Adapter to edge model in one call: merge, export to ONNX, check parity, report.

``out_dir/merged`` receives the fp32 merged model (safetensors + tokenizer), ``out_dir/onnx`` the
ONNX model with its tokenizer files; the parity check must pass (see
:func:`fedlora.export.parity.check_parity`), otherwise :class:`~fedlora.export.parity.ParityError`
propagates and the folders are left in place for inspection.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.export.card import Variant, build_card, write_card
from fedlora.export.merge import merge_adapter
from fedlora.export.onnx import export_onnx, onnx_size_mib
from fedlora.export.parity import ATOL, NOISE_FACTOR, ParityReport, check_parity

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    """Where the exports went, how well they agree, and how long each stage took."""

    merged_dir: Path
    onnx_dir: Path
    parity: ParityReport
    answer: str
    onnx_mib: float
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def onnx_file(self) -> Path:
        return self.onnx_dir / "model.onnx"


def export_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    messages: list[dict[str, Any]],
    max_new_tokens: int = 16,
    atol: float = ATOL,
    noise_factor: float = NOISE_FACTOR,
    default_base: bool = False,
    eval_data: dict[str, str] | None = None,
) -> ExportReport:
    """Merge ``adapter_dir`` into ``base_dir``, export to ONNX and check parity on ``messages``."""
    out_dir = Path(out_dir)
    merged_dir, onnx_dir = out_dir / "merged", out_dir / "onnx"
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    merge_adapter(Path(base_dir), Path(adapter_dir), merged_dir)
    seconds["merge"] = time.perf_counter() - start

    start = time.perf_counter()
    export_onnx(merged_dir, onnx_dir)
    seconds["onnx"] = time.perf_counter() - start

    start = time.perf_counter()
    parity = check_parity(
        merged_dir,
        onnx_dir,
        messages,
        max_new_tokens=max_new_tokens,
        atol=atol,
        noise_factor=noise_factor,
    )
    seconds["parity"] = time.perf_counter() - start

    report = ExportReport(
        merged_dir=merged_dir,
        onnx_dir=onnx_dir,
        parity=parity,
        answer=parity.onnx_text,
        onnx_mib=onnx_size_mib(onnx_dir),
        seconds=seconds,
    )
    fp32 = Variant(
        name="fp32",
        folder=onnx_dir.name,
        size_mib=report.onnx_mib,
        gates={
            "parity": {
                "passed": parity.ok,
                "figures": {
                    "max-abs-logits-diff-vs-fp64": parity.max_abs_logits_diff,
                    "tolerance": parity.tolerance,
                    "torch-fp32-vs-fp64": parity.torch_fp32_vs_fp64,
                    "same-greedy-tokens": parity.same_tokens,
                },
            }
        },
        decode_tokens_per_s=parity.decode_tokens_per_s,
    )
    card = build_card(
        Path(base_dir), Path(adapter_dir), [fp32], default_base=default_base, eval_data=eval_data
    )
    write_card(out_dir, card)
    log.info(
        "Exported %s (%.1f MiB) in %s; %s",
        report.onnx_file,
        report.onnx_mib,
        ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
        parity.summary(),
    )
    return report
