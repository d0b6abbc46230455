"""Profile one client training step (torch.profiler) and print where the time goes.

Usage::

    .venv/bin/python benchmarks/profile_step.py                       # "auto" base, 1 thread
    .venv/bin/python benchmarks/profile_step.py --quantization nf4 --threads 2 --rows 20

Loads the default model as a node does (``fedlora.client.node.warm_model``), trains one untimed
warm-up step of ``fedlora.client.train.train_lora`` on the packaged site "mental" (batch 4,
max-length 256, completion-only loss), then profiles ``--steps`` steps (batches length-grouped as
nodes draw them) and prints the seconds per step and the top operators by self CPU time, overall
and by input shape.
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray actor has 1)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=14, help="operator rows per table")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from fedlora.client.node import (
        NodeSettings,
        encoded_rows,
        node_data,
        set_trainable,
        warm_model,
    )
    from fedlora.client.train import TrainOptions, sample_batches, train_lora
    from fedlora.config import RunConfig
    from fedlora.lora import LoraSettings

    torch.set_num_threads(args.threads)
    settings = NodeSettings.from_config({"site": "mental", "quantization": args.quantization})
    node = warm_model(settings, LoraSettings(dropout=args.dropout))
    rows = encoded_rows(node_data(settings), "train", node.tokenizer, 256, "completion", False)
    set_trainable(node.model, "AB")
    pad = node.tokenizer.pad_token_id
    train_lora(node.model, sample_batches(rows, 4, 1, (0, 1, 2), pad), TrainOptions(steps=1))
    batches = sample_batches(
        rows, 4, args.steps, (0, 1, 3), pad, length_grouping=RunConfig().length_grouping
    )
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        stats = train_lora(node.model, batches, TrainOptions(steps=args.steps))
    print(
        f"{args.quantization}, {args.threads} thread(s), dropout {args.dropout}: "
        f"{stats.seconds / stats.steps:.2f} s/step under the profiler, "
        f"{stats.tokens / stats.seconds:.0f} tokens/s"
    )
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    by_shape = prof.key_averages(group_by_input_shape=True)
    print(by_shape.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
