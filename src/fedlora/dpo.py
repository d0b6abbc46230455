"""Direct preference optimization (Rafailov et al., 2023): the maths nodes and the server share.

The policy is the base with the adapter; the reference is the same base with the adapter
switched off (peft's ``disable_adapter()``), so the frozen base is the reference and no second
model is loaded. A sequence's log-probability is summed over its response tokens only (the
answer and its end-of-turn tokens, after the chat template's assistant header). For a pair the
implicit rewards are ``beta * (log pi(y) - log ref(y))`` for the chosen and the rejected answer
and the loss is ``-log sigmoid(reward_chosen - reward_rejected)``, TRL's ``sigmoid`` DPO loss
(tests/test_dpo.py checks it against TRL's ``DPOTrainer`` on fixed log-probabilities). With
``dpo-sft-weight`` alpha > 0 the chosen answers' next-token loss is added, alpha times
(:func:`sft_loss`: TRL's ``loss_type=["sigmoid", "sft"]``, RPO): DPO alone can lower both
answers' likelihood while it separates them, and the generations drift from both.

A batch of ``b`` pairs is one padded batch of ``2b`` rows: the chosen answers, then the
rejected ones, each after the same prompt. A node trains with :mod:`fedlora.client.dpo`; the
server's central evaluation scores held-out pairs with :func:`evaluate_pairs`.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def sft_loss(chosen: Any, chosen_tokens: int) -> Any:
    """The chosen answers' next-token loss: minus their summed log-probs over their response
    tokens, a mean per token of the batch (TRL's ``sft`` DPO loss term; with weight alpha this
    is RPO, Pang et al., 2024, which keeps the chosen answers likely while DPO separates the
    pair)."""
    return -chosen.sum() / max(1, chosen_tokens)


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
