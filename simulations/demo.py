"""The demo: hospital sites fine-tune the default model, then the result goes to ONNX.

1. held-out accuracy of the base model on a fixed sample of the test split;
2. a federated run on the simulation engine, one node per site (per-round loss per site);
3. held-out accuracy of the base + global adapter, on the same sample;
4. merge, ONNX export, an answer from ONNX Runtime and the logits difference against PyTorch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedlora.basemodel import resolve_base_model
from fedlora.config import RunConfig
from fedlora.console import status
from fedlora.data.drugreview import LABELS, load_split
from fedlora.errors import ConfigError
from fedlora.server.tracking import attach_files
from fedlora.simulations.run import SimulationResult, simulate

log = logging.getLogger(__name__)


# Where bf16 is not native the base trains in fp32, 2-3x slower per step (on a 2-core AVX2 EPYC
# the demo took 24 min). There the demo's sites adapt the top 15 of the default model's 30
# layers (backward stops below them) on reviews cut to 160 tokens (18% of training reviews are
# longer; the answer is always kept): 1.8x less CPU per step, same rounds, steps and checks
# (benchmarks/bench_demo_recipe.py; docs/benchmarks.md, "make demo without native bf16").
FP32_RECIPE = {"lora-layers": 15, "max-length": 160}


@dataclass(frozen=True)
class DemoOptions:
    eval_samples: int = 150  # first N reviews of the test split, the same for base and tuned
    export: bool = True  # merge, export to ONNX and answer with ONNX Runtime
    # CPUs per simulated node (Ray schedules nodes by it); 0: all sites at once, sharing the
    # machine's cores (packed_cpus)
    client_cpus: float = 0.0

    def __post_init__(self) -> None:
        if self.eval_samples < 1:
            raise ConfigError(f"eval-samples={self.eval_samples}: must be >= 1")
        if self.client_cpus < 0:
            raise ConfigError(f"client-cpus={self.client_cpus}: must be > 0, or 0 for auto")


def packed_cpus(sites: int, cpus: int | None = None) -> float:
    """CPUs per node so that every site trains at once, at most one each.

    Ray runs as many nodes at a time as whole shares fit: with one CPU each, five sites on two
    cores train in three waves (2 + 2 + 1), and in the last one a core idles. With 2/5 CPU each
    all five run together (one thread each, time-shared), a round in 2.5 steps' time instead
    of 3. Rounded down to Ray's resource precision (1e-4), so that the shares always fit.
    """
    n = max(cpus or os.cpu_count() or 1, 1)
    return min(1.0, math.floor(1e4 * n / max(sites, 1)) / 1e4)


def evaluate_sample(base_dir: Path, adapter_dir: Path | None, n: int) -> dict[str, Any]:
    """Label accuracy of the base (plus adapter) on the first ``n`` test reviews, on the GPU
    when one is visible, in the device's fast dtype (bf16 where native, else fp32:
    :mod:`fedlora.precision`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.evaluate import label_accuracy
    from fedlora.precision import compute_dtype, device
    from fedlora.prompting import review_example

    reviews = load_split("test")[:n]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    dev = device()
    if adapter_dir is None:
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=compute_dtype(dev), device_map=dev
        )
    else:  # merged in fp32, then run in the base's dtype: same cost, same precision
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        model = model.to(device=dev, dtype=compute_dtype(dev))
    start = time.perf_counter()
    examples = [
        review_example(r.text, r.label, f"drugreview:test:{i + 2}") for i, r in enumerate(reviews)
    ]
    res = label_accuracy(model, tokenizer, examples, LABELS)
    majority = max(LABELS, key=lambda lab: sum(r.label == lab for r in reviews))
    confusion = {
        true: {
            pred: sum(
                r.label == true and p == pred for r, p in zip(reviews, res.predictions, strict=True)
            )
            for pred in LABELS
        }
        for true in LABELS
    }
    return {
        "accuracy": res.accuracy,
        "n": res.n,
        "seconds": time.perf_counter() - start,
        "predicted": {lab: res.predictions.count(lab) for lab in LABELS},
        "confusion": confusion,  # true label -> predicted label -> count
        "majority-label": majority,
        "majority-accuracy": sum(r.label == majority for r in reviews) / len(reviews),
    }


def run_demo(cfg: RunConfig, options: DemoOptions) -> dict[str, Any]:
    """Run the whole pipeline and return (and save) its report."""
    from fedlora.simulations import report

    out = Path(cfg.output_dir)
    with status("Preparing the base model"):
        base_dir = resolve_base_model(cfg.base_model)
    if all(cfg.to_mapping()[k] == v for k, v in FP32_RECIPE.items()):
        log.warning(
            "No native bf16 here: the demo trains in fp32 on its lighter recipe (LoRA on the "
            "top %d layers, reviews cut to %d tokens)",
            cfg.lora_layers,
            cfg.max_length,
        )
    report.section("1/4 Base model on held-out reviews")
    with status(f"Scoring the base model on {options.eval_samples} reviews"):
        base_eval = evaluate_sample(base_dir, None, options.eval_samples)
    report.accuracy("base", base_eval)

    report.section(
        f"2/4 Federated fine-tuning: {len(cfg.site_names)} sites, "
        f"{cfg.num_server_rounds} rounds, {cfg.quantization} base"
    )
    cpus = options.client_cpus or packed_cpus(len(cfg.site_names))
    sim: SimulationResult = simulate(cfg, client_cpus=cpus)
    report.rounds(sim.history)

    report.section("3/4 Tuned model (base + global adapter) on the same reviews")
    with status(f"Scoring the tuned model on {options.eval_samples} reviews"):
        tuned_eval = evaluate_sample(base_dir, sim.adapter_dir, options.eval_samples)
    report.accuracy("tuned", tuned_eval)
    report.confusion(tuned_eval["confusion"])
    with (out / "report.md").open("a") as f:  # the server's report, plus the demo's scoring
        f.write(report.confusion_markdown("Tuned model (base + global adapter)", tuned_eval))

    result: dict[str, Any] = {
        "config": cfg.to_mapping(),
        "options": asdict(options),
        "base": base_eval,
        "tuned": tuned_eval,
        "simulation-seconds": sim.seconds,
        "rounds": sim.history,
        "adapter": str(sim.adapter_dir),
    }
    if options.export:
        from fedlora.export.card import DRUG_REVIEWS
        from fedlora.export.pipeline import export_adapter
        from fedlora.prompting import messages

        report.section("4/4 Export: merge, ONNX, ONNX Runtime")
        held_out = load_split("test")[options.eval_samples]  # outside the evaluated sample
        with status("Merging, exporting to ONNX and checking parity"):
            exp = export_adapter(
                base_dir,
                sim.adapter_dir,
                out / "export",
                messages(held_out.text),
                default_base=cfg.base_model == "default",
                eval_data=DRUG_REVIEWS,
            )
        result["export"] = report.export(exp, held_out.text, held_out.label)
    attach_files(out, [out / "report.md", out / "export" / "MODEL_CARD.md"])  # when tracked
    (out / "demo-report.json").write_text(json.dumps(result, indent=2, default=str))
    report.section(
        f"Done. Outputs in {out}/ (global-adapter/, rounds/, metrics.jsonl, "
        f"export/onnx/, export/MODEL_CARD.md, demo-report.json)"
    )
    return result
