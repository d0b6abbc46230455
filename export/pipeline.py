"""Adapter to edge model in one call: merge, export to ONNX, check parity, report.

``out_dir/merged`` receives the fp32 merged model (safetensors + tokenizer), ``out_dir/onnx`` the
ONNX model with its tokenizer files; the parity check must pass (see
:func:`fedlora.export.parity.check_parity`), otherwise :class:`~fedlora.export.parity.ParityError`
propagates and the folders are left in place for inspection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlora.export.card import Variant, build_card, write_card
from fedlora.export.gates import (
    DEFAULT_THRESHOLDS,
    GateError,
    GateResult,
    GateThresholds,
    TaskFigures,
    describe,
    gate,
)
from fedlora.export.genai import genai_status
from fedlora.export.merge import merge_adapter
from fedlora.export.onnx import choose_graph, export_onnx, onnx_size_mib
from fedlora.export.parity import ATOL, NOISE_FACTOR, ParityReport, check_parity
from fedlora.export.quantize import QuantSettings, quantize_variant

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    """Where the exports went, how well they agree, and how long each stage took."""

    merged_dir: Path
    onnx_dir: Path
    parity: ParityReport
    answer: str
    onnx_mib: float
    graph: str = "traced"  # the ONNX graph's form: fused (fedlora.export.fused) or traced
    seconds: dict[str, float] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)  # fp32 first, then the quantized
    reference: TaskFigures | None = None  # fp32's figures on the held-out task data
    gates: list[GateResult] = field(default_factory=list)  # one per quantized variant

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
    quantize: Sequence[str] = (),
    quant: QuantSettings | None = None,
    eval_examples: Sequence[Any] = (),
    labels: Sequence[str] = (),
    thresholds: Mapping[str, GateThresholds] | None = None,
    greedy_prompts: int = 20,
    graph: str = "auto",
) -> ExportReport:
    """Merge ``adapter_dir`` into ``base_dir``, export to ONNX and check parity on ``messages``;
    then build each ``quantize`` variant (``onnx-int8``, ``onnx-int4``) and gate it against the
    fp32 ONNX model on ``eval_examples`` (held-out data of the run's task, scored as a label task
    when ``labels`` are given). ``graph`` is the ONNX graph's form (auto, fused, traced; see
    :func:`fedlora.export.onnx.choose_graph`). A failed gate raises
    :class:`~fedlora.export.gates.GateError` with every figure; the folders stay for inspection
    and no model card is written."""
    out_dir = Path(out_dir)
    merged_dir, onnx_dir = out_dir / "merged", out_dir / "onnx"
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    merge_adapter(Path(base_dir), Path(adapter_dir), merged_dir)
    seconds["merge"] = time.perf_counter() - start

    start = time.perf_counter()
    form = choose_graph(merged_dir, graph)
    export_onnx(merged_dir, onnx_dir, graph=form)
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
        graph=form,
        seconds=seconds,
    )
    report.variants.append(
        Variant(
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
                        "cached-decode-diff-vs-fp64": parity.cache_logits_diff,
                    },
                }
            },
            decode_tokens_per_s=parity.decode_tokens_per_s,
            graph=form,
            genai=genai_status(onnx_dir),
        )
    )
    if quantize:
        if not eval_examples:
            raise GateError("quantized variants need held-out examples of the task to be gated")
        settings = quant or QuantSettings()
        _quantized(
            report,
            out_dir,
            quantize,
            settings,
            messages,
            eval_examples,
            labels,
            thresholds,
            greedy_prompts,
        )
    card = build_card(
        Path(base_dir),
        Path(adapter_dir),
        report.variants,
        default_base=default_base,
        eval_data=eval_data,
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


def _quantized(
    report: ExportReport,
    out_dir: Path,
    names: Sequence[str],
    quant: QuantSettings,
    messages: list[dict[str, Any]],
    examples: Sequence[Any],
    labels: Sequence[str],
    thresholds: Mapping[str, GateThresholds] | None,
    greedy_prompts: int,
) -> None:
    """Build each quantized variant, gate all of them against fp32; GateError if any fails."""
    from fedlora.export.runtime import EdgeModel

    folders = {}
    for name in names:
        start = time.perf_counter()
        folders[name] = quantize_variant(report.onnx_dir, out_dir / f"onnx-{name}", name, quant)
        report.seconds[f"quantize-{name}"] = time.perf_counter() - start
    models = {name: EdgeModel(folder) for name, folder in folders.items()}
    start = time.perf_counter()
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    ref, report.gates = gate(
        EdgeModel(report.onnx_dir), models, examples, labels, limits, greedy_prompts
    )
    report.reference = ref
    report.seconds["gates"] = time.perf_counter() - start
    for result in report.gates:
        model = models[result.variant]
        _, speed = model.decode_speed(model.encode(model.render(messages)), new_tokens=32)
        report.variants.append(
            Variant(
                name=result.variant,
                folder=folders[result.variant].name,
                size_mib=onnx_size_mib(folders[result.variant]),
                gates={"task": result.as_card(), "quantization": asdict(quant)},
                decode_tokens_per_s=speed,
                graph=report.graph,
                genai=genai_status(folders[result.variant]),
            )
        )
    text = describe(ref, report.gates)
    failed = [g.variant for g in report.gates if not g.passed]
    if failed:
        raise GateError(
            f"a quantized export failed its task gate:\n{text}\n"
            f"{report.onnx_dir} (fp32) passed parity and stays, as do the variants' folders, but "
            f"no model card is written. To go on: leave {' and '.join(failed)} out (--quantize "
            f"none, or another variant), compute in fp32 (--accuracy-level 1: slower), score more "
            f"held-out examples (--eval-samples), or accept the loss by name (--gate "
            f"{failed[0]}.max-accuracy-drop=N)"
        )
    log.info("Task gates on %d held-out examples:\n%s", ref.n, text)
