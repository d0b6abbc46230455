"""Label accuracy by log-likelihood: the answer is the label whose tokens the model finds likeliest.

Each candidate label (plus the end-of-turn token) is scored by the sum of its token
log-probabilities after the chat-templated prompt; the prediction is the best-scoring label. No
generation, no parsing, the same for a base model and a tuned one. The prompt is run once per
example and the labels are scored from its KV cache, so the cost is one prompt, not one per label.
Loss and perplexity cover the tokens the training loss covers (the answers, by default).

Both batch rows of similar length together (:func:`length_batches`): a batch is padded to its
longest row, so ordering by length spends the forward passes on tokens, not padding. Results
come back in the input order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.data.records import Example
from fedlora.encoding import prompt_and_answers
from fedlora.prompting import IGNORE, Encoded, answer_logits, collate, model_device


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

    @classmethod
    def of(cls, total: float, tokens: int, rows: int) -> LossEval:
        """From a summed cross-entropy over ``tokens`` scored tokens."""
        loss = total / max(tokens, 1)
        return cls(loss=loss, perplexity=float(math.exp(min(loss, 50.0))), tokens=tokens, rows=rows)


def length_batches(lengths: Sequence[int], per_batch: int) -> list[list[int]]:
    """Indices into ``lengths`` in batches of at most ``per_batch``, longest rows first, so
    that each batch holds rows of similar length (ties keep their input order)."""
    if per_batch < 1:
        raise ValueError(f"per_batch={per_batch}: must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + per_batch] for i in range(0, len(order), per_batch)]


def label_scores(
    model: Any, prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int
) -> Any:
    """``[len(prompts), len(answers)]`` summed log-probabilities of each answer after each prompt.

    Every prompt is run once; the answers are scored from its KV cache.
    """
    import torch

    width = max(len(a) for a in answers)
    n_lab = len(answers)
    dev = model_device(model)
    rows = collate([Encoded(list(p), [0] * len(p), False) for p in prompts], pad_id)
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in rows.items()}
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
    cont = torch.full((len(prompts) * n_lab, width), pad_id, dtype=torch.long, device=dev)
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
        position_ids=lengths[:, None] + torch.arange(width, device=dev)[None],
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
    return picked.sum(-1).view(len(prompts), n_lab).cpu()


def label_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    max_length: int = 512,
    per_batch: int = 8,
) -> LabelEval:
    """Accuracy of picking the likeliest of ``labels`` as each example's last answer."""
    return label_eval(model, tokenizer, examples, labels, max_length, per_batch)[0]


def label_eval(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    max_length: int = 512,
    per_batch: int = 8,
) -> tuple[LabelEval, LossEval | None]:
    """Label accuracy and, when every example's last answer is exactly one of ``labels``, the
    answer loss from the same forward passes (the gold label's tokens, after the context cut to
    fit the longest label); None otherwise.

    Prompts are batched by length (:func:`length_batches`); results are in input order.
    """
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [prompt_and_answers(tokenizer, ex, labels, max_length) for ex in examples]
    scores = torch.zeros(len(examples), len(labels), dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in length_batches([len(p) for p, _ in encoded], per_batch):
            prompts = [encoded[i][0] for i in batch]
            scores[batch] = label_scores(model, prompts, encoded[batch[0]][1], pad_id).double()
    model.train(was_training)
    gold = [ex.turns[-1].content.strip() for ex in examples]
    preds = [labels[i] for i in scores.argmax(-1).tolist()] if examples else []
    correct = sum(p == g for p, g in zip(preds, gold, strict=True))
    accuracy = LabelEval(accuracy=correct / max(len(gold), 1), n=len(gold), predictions=preds)
    answers = [ex.turns[-1].content for ex in examples]
    if not examples or any(a not in labels for a in answers):
        return accuracy, None
    picks = [list(labels).index(a) for a in answers]
    total = -float(sum(scores[i, j] for i, j in enumerate(picks)))
    tokens = sum(len(encoded[i][1][j]) for i, j in enumerate(picks))
    return accuracy, LossEval.of(total, tokens, len(examples))


def eval_loss(model: Any, rows: Sequence[Encoded], pad_id: int, per_batch: int = 8) -> LossEval:
    """Mean loss per scored token (and perplexity) over ``rows``, with the model's own labels."""
    import torch

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for indices in length_batches([len(r.input_ids) for r in rows], per_batch):
            batch = collate([rows[i] for i in indices], pad_id)
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
    return LossEval.of(total, tokens, len(rows))
