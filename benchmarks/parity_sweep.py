"""fp32 parity of the default model's export on several adapters, and two broken exports.

Usage (after ``make demo``; about 6 minutes)::

    .venv/bin/python benchmarks/parity_sweep.py

Exports, with the graph ``fedlora export`` ships (``--graph auto``), the base model, the demo's
trained adapter (``runs/demo/global-adapter``) and two adapters with random B (r 8,
B ~ N(0, 0.02), seeds 1 and 2; A as PEFT initialises it), and checks each with
:func:`fedlora.export.parity.check_parity` on a held-out review. Then two deliberately broken
exports must fail: the adapter lost in the merge (the base's ONNX model checked against the
merged demo model) and a KV cache that loses its oldest position at every decode step. One line
per case: PASS or FAIL and the gate's figures.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any


def _random_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(out)
    return out


def main() -> int:
    from fedlora.basemodel import resolve_base_model
    from fedlora.data.drugreview import load_split
    from fedlora.export.merge import merge_adapter
    from fedlora.export.onnx import export_onnx
    from fedlora.export.parity import ParityError, check_parity
    from fedlora.export.runtime import EdgeModel
    from fedlora.prompting import messages

    demo = Path("runs/demo/global-adapter")
    if not demo.is_dir():
        print(f"{demo}: missing; run `make demo` first")
        return 2
    root = Path(tempfile.mkdtemp(prefix="parity-sweep-"))
    base = resolve_base_model("default")
    prompt = messages(load_split("test")[150].text)  # outside the demo's 150 scored reviews

    def case(name: str, merged: Path, onnx_dir: Path) -> None:
        try:
            print(f"{name}: PASS {check_parity(merged, onnx_dir, prompt).summary()}", flush=True)
        except ParityError as exc:
            print(f"{name}: FAIL {exc.report.summary() if exc.report else exc}", flush=True)

    try:
        base_onnx = export_onnx(base, root / "base-onnx")
        case("base model", base, base_onnx)
        merged = merge_adapter(base, demo, root / "demo-merged")
        demo_onnx = export_onnx(merged, root / "demo-onnx")
        case("demo adapter (drug reviews, trained)", merged, demo_onnx)
        for seed in (1, 2):
            adapter = _random_adapter(base, root / f"random-{seed}", seed)
            other = merge_adapter(base, adapter, root / f"random-{seed}-merged")
            case(
                f"random-B adapter, seed {seed}",
                other,
                export_onnx(other, root / f"random-{seed}-onnx"),
            )
        case("BROKEN: adapter lost in the merge", merged, base_onnx)
        real_run = EdgeModel._run

        def cut(self: EdgeModel, ids: Any, past: Any, past_len: int) -> Any:
            if past_len > 1:
                past = {name: value[:, :, 1:, :] for name, value in past.items()}
                past_len = next(iter(past.values())).shape[2]
            return real_run(self, ids, past, past_len)

        EdgeModel._run = cut  # type: ignore[method-assign]
        case("BROKEN: KV cache losing its oldest position", merged, demo_onnx)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
