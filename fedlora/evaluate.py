"""Label accuracy by log-likelihood: the answer is the label whose tokens the model finds likeliest.

For each review, every candidate label is appended to the chat-templated prompt and scored by the
sum of its token log-probabilities; the prediction is the best-scoring label. This needs no
generation and no parsing, and works the same for a base model and a tuned one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.prompting import encode


@dataclass
class LabelEval:
    accuracy: float
    n: int
    predictions: list[str]


def label_accuracy(model: Any, tokenizer: Any, texts: Sequence[str], gold: Sequence[str],
                   labels: Sequence[str], max_length: int = 512,
                   reviews_per_batch: int = 4) -> LabelEval:
    """Accuracy of picking the likeliest of ``labels`` for each text."""
    import torch

    from fedlora.prompting import collate

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    preds: list[str] = []
    with torch.no_grad():
        for start in range(0, len(texts), reviews_per_batch):
            chunk = texts[start:start + reviews_per_batch]
            batch = [encode(tokenizer, t, lab, max_length) for t in chunk for lab in labels]
            tensors = collate(batch, pad_id)
            logits = model(input_ids=tensors["input_ids"],
                           attention_mask=tensors["attention_mask"]).logits.float()
            target = tensors["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores = (picked * (target >= 0)).sum(-1).view(len(chunk), len(labels))
            preds += [labels[i] for i in scores.argmax(-1).tolist()]
    model.train(was_training)
    correct = sum(p == g for p, g in zip(preds, gold, strict=True))
    return LabelEval(accuracy=correct / max(len(gold), 1), n=len(gold), predictions=preds)
