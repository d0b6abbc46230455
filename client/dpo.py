"""Direct preference optimization (Rafailov et al., 2023) of a node's LoRA adapter.

The policy is the base with the adapter; the reference is the same base with the adapter
switched off (peft's ``disable_adapter()``), so the frozen base is the reference and no second
model is loaded. A sequence's log-probability is summed over its response tokens only (the
answer and its end-of-turn tokens, after the chat template's assistant header). For a pair the
implicit rewards are ``beta * (log pi(y) - log ref(y))`` for the chosen and the rejected answer
and the loss is ``-log sigmoid(reward_chosen - reward_rejected)``, TRL's ``sigmoid`` DPO loss
(tests/test_dpo.py checks it against TRL's ``DPOTrainer`` on fixed log-probabilities).

A batch of ``b`` pairs is one padded batch of ``2b`` rows: the chosen answers, then the
rejected ones, each after the same prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.data.records import Example
from fedlora.encoding import prompt_and_answers
from fedlora.errors import DataError
from fedlora.prompting import IGNORE, Encoded, answer_logits, collate


@dataclass(frozen=True)
class Pair:
    """A preference pair tokenized: prompt + chosen answer, prompt + rejected answer."""

    chosen: Encoded
    rejected: Encoded


@dataclass(frozen=True)
class PreferenceEval:
    """Held-out pairs scored by the implicit reward of the adapter against the base."""

    loss: float  # mean DPO loss
    accuracy: float  # share of pairs whose reward prefers the chosen answer (strictly)
    margin: float  # mean reward_chosen - reward_rejected
    pairs: int
    tokens: int  # response tokens scored (both answers)


def encode_pair(tokenizer: Any, example: Example, max_length: int) -> Pair:
    """``example``'s prompt with each of its answers; the prompt is middle-cut to fit, and an
    answer longer than half of ``max_length`` keeps its first half-``max_length`` tokens."""
    answers = [example.turns[-1].content, example.rejected]
    context, options = prompt_and_answers(tokenizer, example, answers, max_length)
    rows = []
    for answer in options:
        keep = answer[: max(1, min(len(answer), max_length - len(context), max_length // 2))]
        rows.append(Encoded(context + keep, [IGNORE] * len(context) + keep, keep != answer))
    return Pair(rows[0], rows[1])


def encode_pairs(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[Pair]:
    """The preference pairs among ``examples``, tokenized; DataError when there are none."""
    pairs = [encode_pair(tokenizer, ex, max_length) for ex in examples if ex.rejected]
    if examples and not pairs:
        raise DataError(
            f"objective=dpo, but none of the {len(examples)} examples (first: "
            f"{examples[0].source}) is a preference pair: give records with 'prompt', "
            "'chosen' and 'rejected'"
        )
    return pairs


def pair_batch(pairs: Sequence[Pair], pad_id: int) -> dict[str, Any]:
    """One left-padded batch: the chosen rows, then the rejected rows."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


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


def sequence_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Each row's log-probability of its scored (response) tokens, summed: a [rows] tensor."""
    import torch

    logits, targets = answer_logits(model, batch)
    scored = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1)


def dpo_loss(
    chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float
) -> tuple[Any, Any, Any]:
    """The mean DPO loss and each pair's rewards (chosen, rejected), from summed log-probs."""
    import torch

    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    loss = -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def pair_logps(model: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """Policy log-probs (with gradients) and reference log-probs (the adapter off, no_grad) of
    a pair batch's chosen and rejected rows."""
    import torch

    with torch.no_grad(), model.disable_adapter():
        ref = sequence_logps(model, batch)
    policy = sequence_logps(model, batch)
    half = policy.shape[0] // 2
    return policy[:half], policy[half:], ref[:half], ref[half:]


def evaluate_pairs(
    model: Any, pairs: Sequence[Pair], pad_id: int, beta: float, per_batch: int = 8
) -> PreferenceEval:
    """The DPO loss, preference accuracy and mean reward margin of ``pairs``."""
    import torch

    was_training = model.training
    model.eval()
    losses, margins, tokens = [], [], 0
    with torch.no_grad():
        for start in range(0, len(pairs), per_batch):
            batch = pair_batch(pairs[start : start + per_batch], pad_id)
            chosen, rejected, ref_c, ref_r = pair_logps(model, batch)
            _, reward_c, reward_r = dpo_loss(chosen, rejected, ref_c, ref_r, beta)
            margin = reward_c - reward_r
            losses += (-torch.nn.functional.logsigmoid(margin)).tolist()
            margins += margin.tolist()
            tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    if not margins:
        raise DataError("no held-out preference pairs to evaluate")
    return PreferenceEval(
        loss=float(np.mean(losses)),
        accuracy=float(np.mean([m > 0 for m in margins])),
        margin=float(np.mean(margins)),
        pairs=len(margins),
        tokens=tokens,
    )


def train_dpo(model: Any, batches: Iterator[dict[str, Any]], options: Any, beta: float) -> Any:
    """``options.steps`` AdamW steps of the DPO loss (``options`` a
    :class:`~fedlora.client.train.TrainOptions`); returns its TrainStats, the loss being the
    DPO loss and the scored tokens the response tokens of both answers."""
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
                with low_precision():
                    loss, _, _ = dpo_loss(*pair_logps(model, batch), beta)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"DPO loss became {loss.item()} at step {step}")
                (loss / options.grad_accum).backward()
                step_loss += loss.item() / options.grad_accum
                tokens += batch["tokens"]
                scored += int((batch["labels"][:, 1:] != IGNORE).sum())
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
