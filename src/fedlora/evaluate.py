"""Label accuracy by log-likelihood: the answer is the label whose tokens the model finds likeliest.

Each candidate label (plus the end-of-turn token) is scored by the sum of its token
log-probabilities after the chat-templated prompt; the prediction is the best-scoring label. No
generation, no parsing, the same for a base model and a tuned one. The prompt is run once per
example and the labels are scored from its KV cache, so the cost is one prompt, not one per label.
Loss and perplexity cover the tokens the training loss covers (the answers, by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.data.records import Example
from fedlora.encoding import prompt_and_answers
from fedlora.prompting import IGNORE, Encoded, answer_logits, collate


@dataclass
class LabelEval:
    accuracy: float
    n: int
    predictions: list[str]


@dataclass
class LossEval:
    loss: float  # mean cross-entropy per scored token
    perplexity: float  # exp(loss)
    tokens: int  # scored tokens
    rows: int


def label_scores(
    model: Any, prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int
) -> Any:
    """``[len(prompts), len(answers)]`` summed log-probabilities of each answer after each prompt.

    Every prompt is run once; the answers are scored from its KV cache.
    """
    import torch

    width = max(len(a) for a in answers)
    n_lab = len(answers)
    batch = collate([Encoded(list(p), [0] * len(p), False) for p in prompts], pad_id)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=True,
        logits_to_keep=1,
    )
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # predicts each answer's 1st token
    cache = out.past_key_values
    cache.batch_repeat_interleave(n_lab)
    cont = torch.full((len(prompts) * n_lab, width), pad_id, dtype=torch.long)
    cont_mask = torch.zeros_like(cont)
    for j, ids in enumerate(answers):
        cont[j::n_lab, : len(ids)] = torch.tensor(ids)
        cont_mask[j::n_lab, : len(ids)] = 1
    lengths = batch["attention_mask"].sum(-1).repeat_interleave(n_lab)
    rest = model(
        input_ids=cont,
        attention_mask=torch.cat(
            [batch["attention_mask"].repeat_interleave(n_lab, 0), cont_mask], dim=1
        ),
        position_ids=lengths[:, None] + torch.arange(width)[None],
        past_key_values=cache,
        use_cache=False,
    )
    logp = torch.cat(
        [
            first.repeat_interleave(n_lab, 0)[:, None],
            torch.log_softmax(rest.logits[:, :-1].float(), -1),
        ],
        dim=1,
    )
    picked = logp.gather(-1, cont.unsqueeze(-1)).squeeze(-1) * cont_mask
    return picked.sum(-1).view(len(prompts), n_lab)


def label_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    max_length: int = 512,
    per_batch: int = 8,
) -> LabelEval:
    """Accuracy of picking the likeliest of ``labels`` as each example's last answer."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gold = [ex.turns[-1].content.strip() for ex in examples]
    was_training = model.training
    model.eval()
    preds: list[str] = []
    with torch.no_grad():
        for start in range(0, len(examples), per_batch):
            encoded = [
                prompt_and_answers(tokenizer, ex, labels, max_length)
                for ex in examples[start : start + per_batch]
            ]
            scores = label_scores(model, [p for p, _ in encoded], encoded[0][1], pad_id)
            preds += [labels[i] for i in scores.argmax(-1).tolist()]
    model.train(was_training)
    correct = sum(p == g for p, g in zip(preds, gold, strict=True))
    return LabelEval(accuracy=correct / max(len(gold), 1), n=len(gold), predictions=preds)


def eval_loss(model: Any, rows: Sequence[Encoded], pad_id: int, per_batch: int = 8) -> LossEval:
    """Mean loss per scored token (and perplexity) over ``rows``, with the model's own labels."""
    import torch

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), per_batch):
            batch = collate(list(rows[start : start + per_batch]), pad_id)
            logits, targets = answer_logits(model, batch)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.float().flatten(0, 1),
                    targets.flatten(),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
            )
            tokens += int((targets != IGNORE).sum())
    model.train(was_training)
    loss = total / max(tokens, 1)
    return LossEval(
        loss=loss, perplexity=float(math.exp(min(loss, 50.0))), tokens=tokens, rows=len(rows)
    )
