"""The local training loop: AdamW on the LoRA tensors, with warmup and a decay schedule.

One optimizer step takes ``grad_accum`` micro-batches; its loss is the mean over every scored
token of those micro-batches (as if they were one large batch). Gradients are clipped by global
L2 norm. The learning-rate schedule comes from transformers (``get_scheduler``) and runs over the
round's steps. Gradient checkpointing trades compute for activation memory.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.errors import ConfigError
from fedlora.prompting import IGNORE, Encoded, answer_logits, collate

SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
EAGER_MAX_LENGTH = 512  # on CPU, rows up to this width train with eager attention


@dataclass(frozen=True)
class TrainOptions:
    """How a node trains in one round (the server's round config sets these)."""

    lr: float = 3e-4  # AdamW peak learning rate for the LoRA tensors
    steps: int = 5  # optimizer steps this round
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 0  # linear warmup from 0 to lr over the first steps
    schedule: str = "constant"  # after warmup: constant | cosine | linear (decay to 0)
    max_grad_norm: float = 1.0  # global L2 gradient clip; 0 = off
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)

    def __post_init__(self) -> None:
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr={self.lr}: must be in (0, 1), e.g. 3e-4")
        if self.steps < 1 or self.grad_accum < 1:
            raise ConfigError(f"steps={self.steps}, grad-accum={self.grad_accum}: must be >= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"warmup-steps={self.warmup_steps}: must be in [0, steps={self.steps}]"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"lr-schedule={self.schedule!r}: use one of {sorted(SCHEDULES)}")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("max-grad-norm and weight-decay must be >= 0")


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the steps
    steps: int
    seconds: float
    tokens: int  # tokens processed (padding excluded)
    scored_tokens: int  # tokens the loss covered (the "useful" ones)
    first_loss: float = float("nan")
    last_loss: float = float("nan")


def steps_for_epochs(examples: int, epochs: float, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps that cover ``epochs`` passes over ``examples`` (at least one)."""
    return max(1, math.ceil(epochs * examples / (batch_size * grad_accum)))


def sample_batches(
    examples: Sequence[Encoded],
    batch_size: int,
    count: int,
    seed: Sequence[int],
    pad_id: int,
    length_grouping: int = 1,
) -> Iterator[dict[str, Any]]:
    """``count`` micro-batches drawn without replacement, reshuffling when the data runs out.

    With ``length_grouping`` = G > 1, the examples of each G consecutive batches (the same
    examples, drawn in the same order as with G = 1) are sorted by length before they are cut
    into batches, and those G batches come in a seeded random order: rows of a batch have similar
    lengths, so little of each batch is padding (on the drug reviews, padding falls from 23% of
    the batch to 5% at G = 8; ``benchmarks/bench_client.py``). Every window of G batches covers
    exactly the examples it covers without grouping; only their grouping into batches changes.
    """
    if not examples:
        raise ValueError("no training examples")
    if length_grouping < 1:
        raise ConfigError(f"length-grouping={length_grouping}: must be >= 1 (1 = off)")
    rng = np.random.default_rng(list(seed))
    shuffle = np.random.default_rng([*seed, 0x6C656E])  # its own stream: the draw is unchanged
    order: list[int] = []
    done = 0
    while done < count:
        window = min(length_grouping, count - done)
        while len(order) < window * batch_size:
            order += rng.permutation(len(examples)).tolist()
        take, order = order[: window * batch_size], order[window * batch_size :]
        if window > 1:
            take.sort(key=lambda i: len(examples[i].input_ids))
        groups = [take[i : i + batch_size] for i in range(0, len(take), batch_size)]
        if window > 1:
            groups = [groups[i] for i in shuffle.permutation(window)]
        for group in groups:
            yield collate([examples[i] for i in group], pad_id)
        done += window


def train_lora(model: Any, batches: Iterator[dict[str, Any]], options: TrainOptions) -> TrainStats:
    """``options.steps`` AdamW steps of ``options.grad_accum`` micro-batches each."""
    import torch
    from transformers import get_scheduler

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
    attention = _training_attention(model, params[0].device.type)
    model.train()
    start, losses, tokens, scored = time.perf_counter(), [], 0, 0
    try:
        for step in range(options.steps):
            micro = [next(batches) for _ in range(options.grad_accum)]
            total = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
            step_loss = 0.0
            for batch in micro:
                if attention is not None:
                    attention.use(batch["input_ids"].shape[1])
                with low_precision():
                    logits, targets = answer_logits(model, batch)
                loss = torch.nn.functional.cross_entropy(
                    logits.float().flatten(0, 1),
                    targets.flatten(),
                    ignore_index=IGNORE,
                    reduction="sum",
                ) / max(total, 1)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
                loss.backward()
                step_loss += loss.item()
                tokens += batch["tokens"]
            scored += total
            if options.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
    finally:
        model.eval()
        _checkpointing(model, False)
        if attention is not None:
            attention.restore()
    return TrainStats(
        loss=float(np.mean(losses)),
        steps=len(losses),
        seconds=time.perf_counter() - start,
        tokens=tokens,
        scored_tokens=scored,
        first_loss=losses[0],
        last_loss=losses[-1],
    )


def _lora_in_compute_dtype(model: Any, params: list[Any]) -> Any:
    """A context in which the LoRA path computes in the base's half precision.

    PEFT keeps the LoRA tensors in fp32 and, by default, casts each LoRA layer's input (the
    base's bf16 activations) up to fp32 and the result back: on CPU those copies and the fp32
    matrix products cost more than the LoRA maths itself. Under ``torch.autocast`` with PEFT's
    input casting off, the activations stay in bf16 and only the small LoRA weights are cast;
    the weights, their gradients and AdamW's state stay fp32. With an fp32 base, nothing changes.
    """
    import torch
    from peft.helpers import disable_input_dtype_casting

    half = model.get_input_embeddings().weight.dtype
    if half not in (torch.bfloat16, torch.float16) or params[0].dtype != torch.float32:
        return contextlib.nullcontext
    device = params[0].device.type

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with torch.autocast(device, dtype=half), disable_input_dtype_casting(model):
            yield

    return context


@dataclass
class _AttentionSwitch:
    """Eager attention for rows up to ``EAGER_MAX_LENGTH`` tokens, the model's own above."""

    model: Any
    original: str

    def use(self, width: int) -> None:
        want = "eager" if width <= EAGER_MAX_LENGTH else self.original
        if self.model.config._attn_implementation != want:
            self.model.set_attn_implementation(want)

    def restore(self) -> None:
        self.use(EAGER_MAX_LENGTH + 1)


def _training_attention(model: Any, device: str) -> _AttentionSwitch | None:
    """On CPU, eager attention for training rows of up to ``EAGER_MAX_LENGTH`` tokens.

    PyTorch's CPU flash-attention kernel (what ``sdpa`` runs there) is fast forward but slow
    backward: on the default model's shapes (batch 4, 9 heads, ~230 tokens, bf16) one layer's
    forward plus backward took 34.5 ms with ``sdpa`` and 20.3 ms with the plain matmul-softmax
    (eager) path, a training step 7-9% less (README, "Client training"). Eager keeps each layer's
    attention probabilities for backward (batch x heads x width^2 values), so longer rows keep
    ``sdpa``. None when there is nothing to switch; :func:`train_lora` calls ``restore`` after
    training, so evaluation and generation keep ``sdpa``.
    """
    original = getattr(model.config, "_attn_implementation", None)
    if device != "cpu" or original != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    return _AttentionSwitch(model, original)


def _checkpointing(model: Any, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
