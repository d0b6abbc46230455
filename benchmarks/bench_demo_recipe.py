"""The demo's two recipes, one training step each, on an fp32 base: where the fp32 demo's time goes.

Usage::

    .venv/bin/python benchmarks/bench_demo_recipe.py            # 1 thread, as a Ray node has
    .venv/bin/python benchmarks/bench_demo_recipe.py --steps 8

On a CPU without native bf16 the base trains in fp32 (``quantization = "auto"``), and the demo
takes its lighter recipe (``fedlora.cli._FP32_DEMO``: LoRA on the top 15 layers, reviews cut to
160 tokens). Each row trains the default model as a node does (``warm_model``, ``train_lora`` on
the packaged site "mental", batch 4, length-grouped batches, completion-only loss), one warm-up
step and then ``--steps`` timed steps, in its own process with ``FEDLORA_CPU_BF16=0`` (so an AMX
machine computes what an AVX2-only one does). Prints wall and CPU seconds per step, tokens per
step and the ratio of each row's CPU seconds to the full recipe's, from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROWS = [  # label, lora-layers, max-length
    ("full recipe (all 30 layers, 256 tokens)", 0, 256),
    ("reviews cut to 160 tokens", 0, 160),
    ("top 15 layers", 15, 256),
    ("fp32 demo recipe (top 15, 160 tokens)", 15, 160),
]


def worker(layers: int, max_length: int, steps: int, threads: int) -> dict[str, float]:
    import time

    import torch

    from fedlora.client.node import NodeSettings, encoded_rows, node_data, warm_model
    from fedlora.client.train import TrainOptions, sample_batches, train_lora
    from fedlora.config import RunConfig
    from fedlora.lora import LoraSettings

    torch.set_num_threads(threads)
    settings = NodeSettings.from_config({"site": "mental", "quantization": "auto"})
    node = warm_model(settings, LoraSettings(layers=layers))
    pad = node.tokenizer.pad_token_id
    data = node_data(settings)
    rows = encoded_rows(data, "train", node.tokenizer, max_length, "completion", False)
    train_lora(node.model, sample_batches(rows, 4, 1, (0, 1, 2), pad), TrainOptions(steps=1))
    batches = sample_batches(
        rows, 4, steps, (0, 1, 3), pad, length_grouping=RunConfig().length_grouping
    )
    cpu = time.process_time()
    stats = train_lora(node.model, batches, TrainOptions(steps=steps))
    return {
        "wall": stats.seconds / steps,
        "cpu": (time.process_time() - cpu) / steps,
        "tokens": stats.tokens / steps,
        "dtype": str(node.model.get_input_embeddings().weight.dtype),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray node has 1)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        layers, length = json.loads(args.worker)
        print(json.dumps(worker(layers, length, args.steps, args.threads)))
        return
    env = os.environ | {"FEDLORA_CPU_BF16": "0", "OMP_NUM_THREADS": str(args.threads)}
    results = []
    for label, layers, length in ROWS:
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(
            [*cmd, "--worker", json.dumps([layers, length])],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    base = results[0][1]["cpu"]
    print(f"fp32 base, {args.threads} thread(s), {args.steps} steps after a warm-up step\n")
    print("| recipe | wall s/step | CPU s/step | tokens/step | CPU vs full |")
    print("|---|---:|---:|---:|---:|")
    for label, r in results:
        assert r["dtype"] == "torch.float32", r
        print(
            f"| {label} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['tokens']:.0f} "
            f"| {base / r['cpu']:.2f}x |"
        )


if __name__ == "__main__":
    main()
