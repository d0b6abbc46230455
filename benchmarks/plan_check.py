"""Check ``fedlora plan`` against measured peaks: a few real training steps per configuration.

Usage::

    .venv/bin/python benchmarks/plan_check.py                 # default model, 0.5B and 1B
    .venv/bin/python benchmarks/plan_check.py --models default --steps 2

Each run is a fresh subprocess (its own peak RSS, ``VmHWM``) that trains the way a node does:
``fedlora.client.quantization.load_base`` (the node's loader), peft's LoRA from the run config
(r=8 on every linear layer), ``fedlora.client.train.train_lora`` (AdamW, eager attention on CPU,
bf16 autocast of the LoRA path) on batches of the default run config's shape (batch-size rows
of max-length tokens), every token scored: the plan's worst case, so that planned and measured
peaks describe the same step. Token ids are random (memory and time do not depend on them).

Models: the packaged default (SmolLM2-135M), and random-initialised Llama-shaped configs of
about 0.5B (Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864,
vocabulary 151,936) and 1B parameters (Llama-3.2-1B's shape: hidden 2048, 16 layers, 32 heads,
8 KV heads, MLP 8192, vocabulary 128,256), saved in bf16 to a temporary folder.

A "runtime" run imports what a training run imports and loads nothing: its peak is the fixed
overhead the planner models as ``fedlora.plan.RUNTIME_BYTES``; it is printed beside that constant.

Every configuration runs twice: with glibc's default allocator settings (what a node runs),
against the planned peak; and with glibc's mmap threshold fixed at its default 128 KiB
(``MALLOC_MMAP_THRESHOLD_=131072``), against the planned peak of live tensors. A fixed threshold
stops glibc from raising it as tensors are freed, so each freed tensor goes back to the system
and RSS follows the live tensors; the default keeps heap pages of freed activation-sized
tensors, for which the planner adds an allowance of ``fedlora.plan.HEAP_KEPT`` x the
activations (an upper bound, not a prediction: its error column is expected to be negative).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig

SHAPES: dict[str, dict[str, int]] = {
    "0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
}
RUNS = (("default", "auto"), ("default", "fp32"), ("0.5b", "auto"), ("1b", "auto"))
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
TIMEOUT_S = 1800
TOLERANCE = 0.15


def _peak() -> int:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries a forking parent's
    resident set into the child's across fork and exec, so a child of a large process (a test
    run) reported the parent's 5.7 GB for a model of a few hundred MB."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in status if x.startswith("VmHWM:")).split()[1]) * 1024  # KiB


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One run in this process: the runtime alone, or loading and a few training steps."""
    import torch
    from peft import get_peft_model

    from fedlora.client.quantization import load_base
    from fedlora.client.train import TrainOptions, train_lora
    from fedlora.prompting import Encoded, collate

    out: dict[str, Any] = {"runtime": _peak()}
    if job["model"] == "-":
        return out
    cfg = RunConfig(quantization=job["quantization"])
    folder = Path(job["model"])
    model = get_peft_model(load_base(folder, cfg.quantization), cfg.lora.peft_config(folder))
    out["load"] = _peak()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def batches() -> Any:
        while True:
            rows = [torch.randint(3, vocab, (cfg.max_length,), generator=gen).tolist()]
            rows += [
                torch.randint(3, vocab, (cfg.max_length,), generator=gen).tolist()
                for _ in range(cfg.batch_size - 1)
            ]
            yield collate([Encoded(r, r, False) for r in rows], 0)

    start = time.perf_counter()
    options = TrainOptions(lr=cfg.lr, steps=job["steps"])
    train_lora(model, batches(), options)
    out["seconds_per_step"] = (time.perf_counter() - start) / job["steps"]
    out["peak"] = _peak()
    return out


def run(model: str, quantization: str, steps: int, env: dict[str, str]) -> dict[str, Any]:
    """``worker`` in a fresh interpreter; its JSON result."""
    job = json.dumps({"model": model, "quantization": quantization, "steps": steps})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", job]
    full = {**os.environ, **env, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=full, timeout=TIMEOUT_S, check=False
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{model} {quantization} failed: {done.stderr[-2000:]}")
    return dict(json.loads(lines[-1]))


def build(name: str, folder: Path) -> Path:
    """A random-initialised Llama-shaped model of SHAPES[name], saved in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = folder / name
    config = LlamaConfig(**SHAPES[name], tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(target)
    return target


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="default,0.5b,1b", help="default, 0.5b, 1b")
    ap.add_argument("--steps", type=int, default=2, help="training steps per run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from fedlora.basemodel import resolve_base_model
    from fedlora.plan import RUNTIME_BYTES
    from fedlora.planner import make_plan
    from fedlora.simulations.run import offline_environment

    offline_environment()
    wanted = [m.strip() for m in args.models.split(",")]
    runtime = run("-", "auto", 0, {})["runtime"]
    print(
        f"runtime (imports only): measured {_mib(runtime)} MiB, "
        f"planner's RUNTIME_BYTES {_mib(RUNTIME_BYTES)} MiB",
        flush=True,
    )
    rows, worst, over = [], 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, quantization in [r for r in RUNS if r[0] in wanted]:
            folder = resolve_base_model("default") if name == "default" else Path(tmp) / name
            if not folder.exists():
                build(name, Path(tmp))
            plan = make_plan(RunConfig(quantization=quantization), folder)
            fixed_plan = make_plan(RunConfig(quantization=quantization), folder, allocator="fixed")
            glibc = run(str(folder), quantization, args.steps, {})
            fixed = run(str(folder), quantization, args.steps, FIXED_MMAP)
            mem = plan.memory
            live, peak = fixed_plan.memory.peak, mem.peak
            err = [(m["peak"] - p) / m["peak"] for m, p in ((glibc, peak), (fixed, live))]
            worst, over = max(worst, abs(err[1])), over + (err[0] > 0)
            rows.append(
                f"| {name} {quantization} ({plan.step.compute}) | {plan.shape.params / 1e6:,.0f}M "
                f"| {_mib(peak)} | {_mib(glibc['peak'])} | {100 * err[0]:+.1f}% "
                f"| {_mib(live)} | {_mib(fixed['peak'])} | {100 * err[1]:+.1f}% "
                f"| {_mib(mem.load_peak)} / {_mib(fixed['load'])} "
                f"| {plan.step_seconds:.1f} / {glibc['seconds_per_step']:.1f} |"
            )
            print(rows[-1], flush=True)
    cfg = RunConfig()
    print(
        f"\nbatch {cfg.batch_size} x {cfg.max_length} tokens, every token scored, LoRA "
        f"r={cfg.lora_r} on {cfg.target_modules}, {args.steps} steps; MiB; error = "
        f"(measured - planned) / measured; load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| config | params | planned peak | measured peak | error | planned live peak | "
        "measured, fixed mmap threshold | error | load peak planned / measured | "
        "s/step planned / measured |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(
        f"\nlive peak vs fixed mmap threshold: largest |error| {100 * worst:.1f}% (target "
        f"{100 * TOLERANCE:.0f}%); glibc default above the planned peak: {over} of {len(rows)}"
    )
    return 0 if worst <= TOLERANCE and not over else 1


if __name__ == "__main__":
    sys.exit(main())
