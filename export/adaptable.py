"""An adaptable base bundle, exported once, and adapter files gated against a merged re-export.

- :func:`export_base` (``fedlora export --base-only``): the fused graph of the unmerged base with
  a LoRA slot on every linear layer (:mod:`fedlora.export.slots`), parity-checked against the
  base in PyTorch, with its quantized variants gated as ``fedlora export`` gates them; the model
  card records the base id adapters must carry.
- :func:`export_adapter_only` (``fedlora export --adapter-only --base BUNDLE``): one
  ``adapter.onnx_adapter`` for that bundle, and its gate: applied to the bundle's fp32 base, its
  logits must match a full re-export of the merged model (:func:`fedlora.export.pipeline.
  export_adapter`'s graph) within that export's parity tolerance, on the prompt and over a cached
  greedy decode, with the same greedy tokens. The re-export is deleted once the gate passes
  (kept for inspection when it fails).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import FedloraError
from fedlora.export.card import Variant, adapter_card, build_card, write_card
from fedlora.export.gates import GateThresholds
from fedlora.export.genai import genai_status
from fedlora.export.onnx import MODEL_FILE, choose_graph, onnx_size_mib
from fedlora.export.parity import ATOL, NOISE_FACTOR, ParityError, ParityReport, check_parity
from fedlora.export.pipeline import ExportReport, _quantized
from fedlora.export.quantize import QuantSettings
from fedlora.export.slots import ADAPTER_FILE, base_id, slot_shapes, write_adapter_file

log = logging.getLogger(__name__)


@dataclass
class AdapterReport:
    """An adapter file and how it compares with the merged re-export."""

    adapter_file: Path
    info: dict[str, Any]  # what the card records of the file (base id, slots, size)
    parity: ParityReport  # the merged re-export against PyTorch fp64: sets the tolerance
    logits_diff: float  # applied vs merged export: prompt logits
    cache_diff: float  # applied vs merged export: each cached decode step's logits
    same_tokens: bool
    tokens: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        tol = self.parity.tolerance
        return self.logits_diff <= tol and self.cache_diff <= tol and self.same_tokens

    def gate_figures(self) -> dict[str, Any]:
        """The gate as the card records it."""
        return {
            "passed": self.ok,
            "figures": {
                "prompt-logits-diff-vs-merged-export": self.logits_diff,
                "cached-decode-diff-vs-merged-export": self.cache_diff,
                "tolerance": self.parity.tolerance,
                "same-greedy-tokens": self.same_tokens,
                "merged-export-vs-fp64": self.parity.max_abs_logits_diff,
            },
        }

    def summary(self) -> str:
        return (
            f"adapter on the base vs the merged export: prompt logits {self.logits_diff:.2e}, "
            f"cached decode {self.cache_diff:.2e} (tolerance {self.parity.tolerance:.2e}), "
            f"{'same' if self.same_tokens else 'DIFFERENT'} greedy tokens"
        )


def bundle_model(bundle: Path) -> Path:
    """The fp32 adaptable graph of a base bundle (``BUNDLE/onnx``, or a variant folder)."""
    bundle = Path(bundle)
    for folder in (bundle / "onnx", bundle):
        if (folder / MODEL_FILE).is_file():
            return folder
    raise FedloraError(
        f"{bundle} holds no {MODEL_FILE} (nor onnx/{MODEL_FILE}): give the folder written by "
        f"`fedlora export --base-only`"
    )


def export_base(
    base_dir: Path,
    out_dir: Path,
    messages: list[dict[str, Any]],
    *,
    default_base: bool = False,
    quantize: Sequence[str] = (),
    quant: QuantSettings | None = None,
    eval_examples: Sequence[Any] = (),
    labels: Sequence[str] = (),
    thresholds: Mapping[str, GateThresholds] | None = None,
    eval_data: dict[str, str] | None = None,
) -> ExportReport:
    """Export ``base_dir`` as an adaptable base bundle in ``out_dir`` (``onnx/`` fp32, then
    ``onnx-<variant>/``), parity-checked and gated; the card records its base id."""
    from fedlora.export.fused import export_fused

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    choose_graph(base_dir, "fused")  # one line when the fused graph cannot express the model
    ident = base_id(base_dir)
    onnx_dir = out_dir / "onnx"
    start = time.perf_counter()
    export_fused(base_dir, onnx_dir, base_id=ident)
    seconds = {"onnx": time.perf_counter() - start}
    start = time.perf_counter()
    parity = check_parity(base_dir, onnx_dir, messages)
    seconds["parity"] = time.perf_counter() - start
    report = ExportReport(
        merged_dir=base_dir,
        onnx_dir=onnx_dir,
        parity=parity,
        answer=parity.onnx_text,
        onnx_mib=onnx_size_mib(onnx_dir),
        graph="fused",
        seconds=seconds,
    )
    figures = {"max-abs-logits-diff-vs-fp64": parity.max_abs_logits_diff}
    figures |= {"tolerance": parity.tolerance, "same-greedy-tokens": parity.same_tokens}
    report.variants.append(
        Variant(
            name="fp32",
            folder=onnx_dir.name,
            size_mib=report.onnx_mib,
            gates={"parity": {"passed": parity.ok, "figures": figures}},
            decode_tokens_per_s=parity.decode_tokens_per_s,
            graph="fused",
            genai=genai_status(onnx_dir),
        )
    )
    if quantize:
        _quantized(
            report, out_dir, quantize, quant or QuantSettings(), messages, eval_examples,
            labels, thresholds, 20,
        )  # fmt: skip
    card = build_card(
        base_dir, None, report.variants, default_base=default_base, eval_data=eval_data
    )
    slots = len(slot_shapes(onnx_dir / MODEL_FILE)[1])
    card["adaptable"] = {"base-id": ident, "lora-slots": slots}
    write_card(out_dir, card)
    log.info("Exported the adaptable base %s (id %s) to %s", base_dir, ident[:12], out_dir)
    return report


def export_adapter_only(
    base_dir: Path,
    adapter_dir: Path,
    bundle: Path,
    out_dir: Path,
    messages: list[dict[str, Any]],
    *,
    max_new_tokens: int = 16,
    atol: float = ATOL,
    noise_factor: float = NOISE_FACTOR,
) -> AdapterReport:
    """Write ``out_dir/adapter.onnx_adapter`` for ``bundle`` (an adaptable export of
    ``base_dir``) and gate it against a merged re-export; ParityError when it misses."""
    from fedlora.export.fused import export_fused
    from fedlora.export.merge import merge_adapter
    from fedlora.export.runtime import EdgeModel

    base_dir, out_dir, fp32_dir = Path(base_dir), Path(out_dir), bundle_model(bundle)
    graph_id, _ = slot_shapes(fp32_dir / MODEL_FILE)
    if graph_id != base_id(base_dir):
        raise FedloraError(
            f"{fp32_dir} was exported from another base than {base_dir} (id {graph_id[:12]}): "
            f"give the --base-model the bundle was exported from"
        )
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    info = write_adapter_file(adapter_dir, fp32_dir / MODEL_FILE, out_dir / ADAPTER_FILE)
    seconds["adapter"] = time.perf_counter() - start
    check = out_dir / "merged-check"
    start = time.perf_counter()
    merge_adapter(base_dir, Path(adapter_dir), check / "merged")
    export_fused(check / "merged", check / "onnx")
    parity = check_parity(
        check / "merged", check / "onnx", messages, max_new_tokens, atol, noise_factor
    )
    seconds["merged-export"] = time.perf_counter() - start
    merged = EdgeModel(check / "onnx")
    applied = EdgeModel(fp32_dir, adapter=out_dir / ADAPTER_FILE)
    report = compare(merged, applied, messages, max_new_tokens, parity, info)
    report.seconds |= seconds
    if not report.ok:
        raise ParityError(f"{report.adapter_file}: {report.summary()} ({check} kept)", parity)
    shutil.rmtree(check)
    card = adapter_card(base_dir, Path(adapter_dir), Path(bundle), info, report.gate_figures())
    write_card(out_dir, card)
    log.info("Wrote %s (%.2f MiB): %s", report.adapter_file, info["size_mib"], report.summary())
    return report


def compare(
    merged: Any,
    applied: Any,
    messages: list[dict[str, Any]],
    steps: int,
    parity: ParityReport,
    info: dict[str, Any],
) -> AdapterReport:
    """The adapter applied to the base (``applied``) against the merged export (``merged``)."""
    ids = merged.encode(merged.render(messages))
    prompt = np.asarray([ids], dtype=np.int64)
    logits_diff = float(np.max(np.abs(applied.logits(prompt) - merged.logits(prompt))))
    tokens, rows = merged.decode_logits(ids, max(steps, 2))
    tokens_applied, rows_applied = applied.decode_logits(ids, max(steps, 2))
    cache_diff = float(np.max(np.abs(rows_applied - rows)))
    greedy = merged.generate_ids(ids, steps)
    return AdapterReport(
        adapter_file=applied.adapter,
        info=info,
        parity=parity,
        logits_diff=logits_diff,
        cache_diff=cache_diff,
        same_tokens=tokens == tokens_applied and greedy == applied.generate_ids(ids, steps),
        tokens=greedy,
    )


def run_cli(
    base_dir: Path,
    adapter: Path | None,
    output: Path,
    messages: list[dict[str, Any]],
    base_only: bool,
    adapter_only: bool,
    bundle: Path | None,
    **options: Any,
) -> None:
    """``fedlora export --base-only`` / ``--adapter-only --base BUNDLE``: check the flags (one
    ConfigError line), export, print the figures."""
    from fedlora.errors import ConfigError
    from fedlora.simulations import report

    if base_only == adapter_only:
        raise ConfigError(
            "fedlora export: give --adapter (a merged export), --base-only (the base with LoRA "
            "slots) or --adapter-only --base BUNDLE --adapter FOLDER (one adapter file)"
        )
    if base_only:
        if adapter is not None:
            raise ConfigError("--base-only exports the base alone: drop --adapter")
        keep = ("default_base", "quantize", "quant", "eval_examples", "labels", "thresholds")
        exp = export_base(base_dir, output, messages, **{k: options[k] for k in keep})
        report.export(exp, messages[-1]["content"], "")
        report.console.print(f"adaptable base bundle: {output} (adapters: --adapter-only)")
        return
    if adapter is None or bundle is None:
        raise ConfigError("--adapter-only needs --adapter FOLDER and --base BUNDLE")
    result = export_adapter_only(
        base_dir,
        adapter,
        bundle,
        output,
        messages,
        atol=options["atol"],
        noise_factor=options["noise_factor"],
    )
    report.console.print(
        f"{result.adapter_file}: {result.info['size_mib']:.2f} MiB, {result.info['slots']} "
        f"LoRA slots, fits base {result.info['base_id'][:12]}; {result.summary()}"
    )
