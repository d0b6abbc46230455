"""DPO training of a node's LoRA adapter on its preference pairs (fedlora.dpo has the loss,
the log-probabilities against the frozen base and the held-out scores).

:func:`train_dpo` runs the round's AdamW steps as :func:`fedlora.client.train.train_lora` does
(schedule, gradient clipping, accumulation, the LoRA path in the base's half precision), on the
DPO loss of batches of pairs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fedlora.dpo import (
    Pair,
    PreferenceEval,
    dpo_loss,
    encode_pair,
    encode_pairs,
    evaluate_pairs,
    pair_batch,
    pair_logps,
    sequence_logps,
    sft_loss,
)
from fedlora.prompting import IGNORE

__all__ = [
    "Pair",
    "PreferenceEval",
    "dpo_loss",
    "encode_pair",
    "encode_pairs",
    "encoded_pairs",
    "evaluate_pairs",
    "pair_batch",
    "pair_batches",
    "pair_logps",
    "sequence_logps",
    "sft_loss",
    "train_dpo",
]


def pair_batches(
    pairs: Sequence[Pair], batch_size: int, count: int, seed: Sequence[int], pad_id: int
) -> Iterator[dict[str, Any]]:
    """``count`` batches of pairs drawn without replacement, reshuffling when they run out."""
    if not pairs:
        raise ValueError("no preference pairs")
    rng = np.random.default_rng(list(seed))
    order: list[int] = []
    for _ in range(count):
        while len(order) < batch_size:
            order += rng.permutation(len(pairs)).tolist()
        take, order = order[:batch_size], order[batch_size:]
        yield pair_batch([pairs[i] for i in take], pad_id)


def train_dpo(
    model: Any,
    batches: Iterator[dict[str, Any]],
    options: Any,
    beta: float,
    sft_weight: float = 0.0,
) -> Any:
    """``options.steps`` AdamW steps of the DPO loss, plus ``sft_weight`` times the chosen
    answers' next-token loss (``options`` a :class:`~fedlora.client.train.TrainOptions`);
    returns its TrainStats, the loss being that sum and the scored tokens the response tokens
    of both answers."""
    import torch
    from transformers import get_scheduler

    from fedlora.client.train import SCHEDULES, TrainStats, _checkpointing, _lora_in_compute_dtype

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters: was LoRA added?")
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = get_scheduler(
        SCHEDULES[options.schedule],
        optimizer,
        num_warmup_steps=options.warmup_steps,
        num_training_steps=options.steps,
    )
    _checkpointing(model, options.gradient_checkpointing)
    low_precision = _lora_in_compute_dtype(model, params)
    model.train()
    start, losses, tokens, scored = time.perf_counter(), [], 0, 0
    try:
        for step in range(options.steps):
            step_loss = 0.0
            for _ in range(options.grad_accum):
                batch = next(batches)
                # each row's response tokens; the chosen rows come first
                row_tokens = (batch["labels"][:, 1:] != IGNORE).sum(1)
                with low_precision():
                    chosen, rejected, ref_c, ref_r = pair_logps(model, batch)
                    loss, _, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta)
                    if sft_weight > 0:
                        own = int(row_tokens[: len(chosen)].sum())
                        loss = loss + sft_weight * sft_loss(chosen, own)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"DPO loss became {loss.item()} at step {step}")
                (loss / options.grad_accum).backward()
                step_loss += loss.item() / options.grad_accum
                tokens += batch["tokens"]
                scored += int(row_tokens.sum())
            if options.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
    finally:
        model.eval()
        _checkpointing(model, False)
    return TrainStats(
        loss=float(np.mean(losses)),
        steps=len(losses),
        seconds=time.perf_counter() - start,
        tokens=tokens,
        scored_tokens=scored,
        first_loss=losses[0],
        last_loss=losses[-1],
    )


_PAIRS: dict[tuple[Any, ...], tuple[Any, list[Pair]]] = {}
PAIR_CACHE = 8  # nodes' tokenized pairs kept per process (as client/node.py keeps their data)


def encoded_pairs(data: Any, part: str, tokenizer: Any, max_length: int) -> list[Pair]:
    """A node's ``data.train`` or ``data.eval`` (a :class:`~fedlora.client.node.NodeData`)
    as tokenized pairs, cached while that data is."""
    key = (id(data), part, id(tokenizer), max_length)
    held = _PAIRS.get(key)
    if held is None or held[0] is not data:
        while len(_PAIRS) >= PAIR_CACHE:
            _PAIRS.pop(next(iter(_PAIRS)))
        examples = data.train if part == "train" else data.eval
        held = _PAIRS[key] = (data, encode_pairs(tokenizer, examples, max_length))
    return held[1]
