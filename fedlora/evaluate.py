"""Label accuracy by log-likelihood: the answer is the label whose tokens the model finds likeliest.

Each candidate label (plus the end-of-turn token) is scored by the sum of its token
log-probabilities after the chat-templated prompt; the prediction is the best-scoring label. No
generation, no parsing, the same for a base model and a tuned one. The prompt is run once per
review and the labels are scored from its KV cache, so the cost is one prompt, not one per label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.prompting import Encoded, collate, encode_answer, encode_prompt


@dataclass
class LabelEval:
    accuracy: float
    n: int
    predictions: list[str]


def label_scores(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[str],
                 max_length: int = 512) -> Any:
    """``[len(texts), len(labels)]`` summed log-probabilities of each label after each prompt."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers = [encode_answer(tokenizer, lab) for lab in labels]
    width = max(len(a) for a in answers)
    n_lab = len(labels)
    prompts = [encode_prompt(tokenizer, t, max_length - width)[0] for t in texts]
    batch = collate([Encoded(p, [0] * len(p), False) for p in prompts], pad_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # predicts each answer's 1st token
    cache = out.past_key_values
    cache.batch_repeat_interleave(n_lab)
    cont = torch.full((len(texts) * n_lab, width), pad_id, dtype=torch.long)
    cont_mask = torch.zeros_like(cont)
    for j, ids in enumerate(answers):
        cont[j::n_lab, : len(ids)] = torch.tensor(ids)
        cont_mask[j::n_lab, : len(ids)] = 1
    lengths = batch["attention_mask"].sum(-1).repeat_interleave(n_lab)
    rest = model(input_ids=cont,
                 attention_mask=torch.cat([batch["attention_mask"].repeat_interleave(n_lab, 0),
                                           cont_mask], dim=1),
                 position_ids=lengths[:, None] + torch.arange(width)[None],
                 past_key_values=cache, use_cache=False)
    logp = torch.cat([first.repeat_interleave(n_lab, 0)[:, None],
                      torch.log_softmax(rest.logits[:, :-1].float(), -1)], dim=1)
    picked = logp.gather(-1, cont.unsqueeze(-1)).squeeze(-1) * cont_mask
    return picked.sum(-1).view(len(texts), n_lab)


def label_accuracy(model: Any, tokenizer: Any, texts: Sequence[str], gold: Sequence[str],
                   labels: Sequence[str], max_length: int = 512,
                   reviews_per_batch: int = 8) -> LabelEval:
    """Accuracy of picking the likeliest of ``labels`` for each text."""
    import torch

    was_training = model.training
    model.eval()
    preds: list[str] = []
    with torch.no_grad():
        for start in range(0, len(texts), reviews_per_batch):
            scores = label_scores(model, tokenizer, texts[start:start + reviews_per_batch],
                                  labels, max_length)
            preds += [labels[i] for i in scores.argmax(-1).tolist()]
    model.train(was_training)
    correct = sum(p == g for p, g in zip(preds, gold, strict=True))
    return LabelEval(accuracy=correct / max(len(gold), 1), n=len(gold), predictions=preds)
