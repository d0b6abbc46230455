"""The local training loop: AdamW on the LoRA tensors for a fixed number of steps."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.prompting import IGNORE, Encoded, answer_logits, collate


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the steps
    steps: int
    seconds: float


def sample_batches(examples: Sequence[Encoded], batch_size: int, steps: int,
                   seed: Sequence[int], pad_id: int) -> Iterator[dict[str, Any]]:
    """``steps`` batches drawn without replacement, reshuffling when the data runs out."""
    rng = np.random.default_rng(list(seed))
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += rng.permutation(len(examples)).tolist()
        take, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in take], pad_id)


def train_lora(model: Any, batches: Iterator[dict[str, Any]], lr: float,
               max_grad_norm: float = 1.0) -> TrainStats:
    """One AdamW step per batch on the trainable (LoRA) parameters; returns the mean loss.

    The loss is completion-only cross-entropy on the answer tokens (the mean over all answer
    tokens of the batch, as transformers computes it), from answer-position logits only.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters: was LoRA added?")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start, losses = time.perf_counter(), []
    for batch in batches:
        logits, targets = answer_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                 ignore_index=IGNORE)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {len(losses)}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return TrainStats(loss=float(np.mean(losses)), steps=len(losses),
                      seconds=time.perf_counter() - start)
