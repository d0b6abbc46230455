"""Evaluation benchmark: label accuracy and answer loss on the drug-review test reviews, the way
the server scores them (``central-eval``), against the way it scored them before.

- before: the loss pass over the encoded rows, then the label pass (prompt once, every label from
  its KV cache), each in batches of 8 in input order (each batch padded to its longest row).
- now: one pass (``fedlora.evaluate.label_eval``): batches of 8 prompts of similar length, the
  loss read from the gold label's score.

Both on the same model (the default base with a seeded random-B LoRA adapter, so that the
scores are not the base model's), the same reviews and max-length, in the same process, one
after the other (each timed once after a warmup batch). The table gives seconds, reviews per
second and the ratio; then how far the two agree (predictions, and the loss, whose context is cut
to fit the longest label instead of the gold one on over-long reviews).

Usage::

    .venv/bin/python benchmarks/bench_eval.py    # 150 reviews (the demo's), max-length 256
    .venv/bin/python benchmarks/bench_eval.py --reviews 48 --max-length 256
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=int, default=150)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--per-batch", type=int, default=8)
    args = parser.parse_args()

    import numpy as np
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.basemodel import resolve_base_model
    from fedlora.client.node import get_lora_state, set_lora_state
    from fedlora.config import RunConfig
    from fedlora.encoding import encode_examples
    from fedlora.evaluate import label_eval
    from fedlora.lora import B_WEIGHT, LoraSettings
    from fedlora.precision import compute_dtype
    from fedlora.server.central import central_examples

    base_dir = resolve_base_model(RunConfig().base_model)
    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = compute_dtype()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model = get_peft_model(base, LoraSettings().peft_config(base_dir)).eval()
    rng = np.random.default_rng(1)
    state = get_lora_state(model)
    set_lora_state(
        model,
        {
            k: (rng.normal(0, 0.02, v.shape).astype(np.float32) if k.endswith(B_WEIGHT) else v)
            for k, v in state.items()
        },
    )
    examples, labels = central_examples("drugreview", args.reviews, ())
    rows = encode_examples(tok, examples, args.max_length)[0]
    pad = tok.pad_token_id

    def before() -> tuple[list[str], float]:
        from fedlora.encoding import prompt_and_answers
        from fedlora.evaluate import label_scores
        from fedlora.prompting import IGNORE, answer_logits, collate

        total, tokens, preds = 0.0, 0, []
        n, k = len(examples), args.per_batch
        with torch.no_grad():
            for s in range(0, n, k):
                logits, targets = answer_logits(model, collate(rows[s : s + k], pad))
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits.float().flatten(0, 1),
                        targets.flatten(),
                        ignore_index=IGNORE,
                        reduction="sum",
                    )
                )
                tokens += int((targets != IGNORE).sum())
            for s in range(0, n, k):
                enc = [
                    prompt_and_answers(tok, ex, labels, args.max_length)
                    for ex in examples[s : s + k]
                ]
                scores = label_scores(model, [p for p, _ in enc], enc[0][1], pad)
                preds += [labels[i] for i in scores.argmax(-1).tolist()]
        return preds, total / tokens

    def now() -> tuple[list[str], float]:
        acc, loss = label_eval(model, tok, examples, labels, args.max_length, args.per_batch)
        assert loss is not None
        return acc.predictions, loss.loss

    with torch.no_grad():  # warm up (first-call allocations, thread pools)
        label_eval(model, tok, examples[:2], labels, args.max_length, 2)
    timed: dict[str, Any] = {}
    for name, fn in (("before", before), ("now", now)):
        t = time.perf_counter()
        preds, loss = fn()
        timed[name] = (time.perf_counter() - t, preds, loss)

    lengths = [len(r.input_ids) for r in rows]
    print(
        f"{len(examples)} drug-review test reviews, max-length {args.max_length}, "
        f"{str(dtype).replace('torch.', '')} base, {torch.get_num_threads()} threads; "
        f"row tokens min {min(lengths)} mean {sum(lengths) / len(lengths):.0f} max {max(lengths)}"
    )
    print()
    print("| path | seconds | reviews/s | vs before |")
    print("|---|---:|---:|---:|")
    for name, label in (
        ("before", "loss pass + label pass, input order"),
        ("now", "one pass, by length"),
    ):
        secs = timed[name][0]
        ratio = timed["before"][0] / secs
        print(f"| {label} | {secs:.1f} | {len(examples) / secs:.2f} | {ratio:.2f}x |")
    agree = sum(a == b for a, b in zip(timed["before"][1], timed["now"][1], strict=True))
    print()
    print(f"same prediction on {agree} of {len(examples)} reviews")
    print(
        f"loss before {timed['before'][2]:.6f}, now {timed['now'][2]:.6f} "
        f"(|diff| {abs(timed['before'][2] - timed['now'][2]):.2e})"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(f"load average at the end: {load:.2f}")
    print(f"one-pass evaluation / before = {timed['before'][0] / timed['now'][0]:.2f}x faster")


if __name__ == "__main__":
    main()
