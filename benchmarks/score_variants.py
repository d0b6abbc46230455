"""Label accuracy of exported ONNX variants on held-out drug reviews, paired against fp32.

The task gates of ``fedlora export`` (:mod:`fedlora.export.gates`) score the first
``--eval-samples`` (150) reviews; one review is 0.67 points there, so a 1-point bar allows one.
This script scores more of them (all 379 by default) by the same label log-likelihood and counts
the reviews each variant gets wrong that fp32 gets right (lost) and the reverse (won)::

    .venv/bin/python benchmarks/score_variants.py fp32=runs/edge/onnx int8=runs/edge/onnx-int8

The first variant is the reference. Accuracy does not depend on the machine's load; the seconds
do.
"""

from __future__ import annotations

import argparse
import time

from fedlora.export.gates import best_option, task_items
from fedlora.export.runtime import EdgeModel
from fedlora.server.central import central_examples


def correct(model: EdgeModel, items: list) -> list[bool]:
    """Per review: does ``model`` pick the gold label, as the gates score it."""
    return [
        best_option(model.continuation_logprobs(item.context, item.options)) == item.gold
        for item in items
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+", help="NAME=FOLDER, the reference first")
    ap.add_argument("--reviews", type=int, default=379, help="held-out reviews to score")
    ap.add_argument("--gate-reviews", type=int, default=150, help="the gates' share, reported")
    args = ap.parse_args()
    pairs = [v.split("=", 1) for v in args.variants]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit("give each variant as NAME=FOLDER")
    examples, labels = central_examples("drugreview", args.reviews, ())
    first = EdgeModel(pairs[0][1])
    items = task_items(first, examples, labels)
    k = args.gate_reviews
    print(
        f"| variant | accuracy on {len(items)} | lost | won | first {k}: accuracy | points vs "
        f"{pairs[0][0]} | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    ref: list[bool] | None = None
    for name, folder in pairs:
        start = time.perf_counter()
        got = correct(first if ref is None else EdgeModel(folder), items)
        ref = got if ref is None else ref
        lost = sum(r and not g for r, g in zip(ref, got, strict=True))
        won = sum(g and not r for r, g in zip(ref, got, strict=True))
        change = 100 * (sum(got[:k]) - sum(ref[:k])) / k
        seconds = time.perf_counter() - start
        print(f"| {name} | {100 * sum(got) / len(got):.1f}% | {lost} | {won} | "
              f"{100 * sum(got[:k]) / k:.1f}% | {change:+.1f} | {seconds:.0f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
