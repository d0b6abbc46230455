"""Turn a review into a chat-templated prompt and a one-word answer, tokenized for training.

Training is completion-only: the loss covers the answer tokens (and the end-of-turn token), never
the prompt. Over-long reviews are cut on the token level so the question and the answer always fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INSTRUCTION = ("Is the sentiment of this drug review positive, neutral or negative? "
               "Answer with one word.")
END_OF_TURN = "<|im_end|>"
IGNORE = -100  # label id that the loss skips


def messages(review: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{INSTRUCTION}\n\nReview: {review}"}]


def render_prompt(tokenizer: Any, review: str) -> str:
    """The prompt text up to and including the assistant header."""
    return str(tokenizer.apply_chat_template(messages(review), tokenize=False,
                                             add_generation_prompt=True))


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_prompt(tokenizer: Any, review: str, max_length: int) -> tuple[list[int], bool]:
    """Prompt token ids of at most ``max_length``, cutting the review (not the question) if needed.

    Returns the ids and whether the review was cut.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, review), add_special_tokens=False)["input_ids"]
    if len(prompt_ids) <= max_length:
        return prompt_ids, False
    review_ids = tokenizer(review, add_special_tokens=False)["input_ids"]
    budget = max_length - (len(prompt_ids) - len(review_ids)) - 2
    if budget < 8:
        raise ValueError(f"max_length={max_length} leaves no room for the review: raise it")
    review = tokenizer.decode(review_ids[:budget], skip_special_tokens=True)
    prompt_ids = tokenizer(render_prompt(tokenizer, review), add_special_tokens=False)["input_ids"]
    return prompt_ids[:max_length], True


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    return list(tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"])


def encode(tokenizer: Any, review: str, answer: str, max_length: int) -> Encoded:
    """Tokenize prompt + answer with labels on the answer only, cutting the review if needed."""
    answer_ids = encode_answer(tokenizer, answer)
    prompt_ids, truncated = encode_prompt(tokenizer, review, max_length - len(answer_ids))
    return Encoded(input_ids=prompt_ids + answer_ids,
                   labels=[IGNORE] * len(prompt_ids) + answer_ids, truncated=truncated)


def collate(batch: list[Encoded], pad_id: int, side: str = "left") -> dict[str, Any]:
    """Pad a batch into tensors: input_ids, attention_mask, position_ids, labels.

    Left padding (the default) puts every answer at the end of its row, so the answer tokens of
    the whole batch lie in the last few columns (see :func:`answer_logits`).
    """
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols] = torch.tensor(e.input_ids)
        labels[i, cols] = torch.tensor(e.labels)
        mask[i, cols] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def answer_logits(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Logits and targets for the answer tokens of a left-padded completion-only batch.

    Only the last ``k + 1`` positions (k: the longest answer) get vocabulary logits, instead of
    every prompt token: the same loss as the full computation for a fraction of the lm_head work.
    Returns ``(logits [b, k, vocab], targets [b, k])``; targets hold IGNORE where not scored.
    """
    labels = batch["labels"]
    scored = labels != IGNORE
    k = int(scored.sum(-1).max())
    if k == 0 or bool(scored[:, : labels.shape[1] - k].any()):
        raise ValueError("answer_logits needs left-padded, completion-only labels")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=k + 1)
    return out.logits[:, :-1], labels[:, -k:]
