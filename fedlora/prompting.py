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


def encode(tokenizer: Any, review: str, answer: str, max_length: int) -> Encoded:
    """Tokenize prompt + answer with labels on the answer only, cutting the review if needed."""
    answer_ids = tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(render_prompt(tokenizer, review), add_special_tokens=False)["input_ids"]
    truncated = False
    if len(prompt_ids) + len(answer_ids) > max_length:
        overhead = len(prompt_ids) - len(tokenizer(review, add_special_tokens=False)["input_ids"])
        budget = max_length - len(answer_ids) - overhead - 2
        if budget < 8:
            raise ValueError(f"max_length={max_length} leaves no room for the review: raise it")
        review_ids = tokenizer(review, add_special_tokens=False)["input_ids"][:budget]
        review = tokenizer.decode(review_ids, skip_special_tokens=True)
        prompt_ids = tokenizer(render_prompt(tokenizer, review),
                               add_special_tokens=False)["input_ids"]
        prompt_ids = prompt_ids[: max_length - len(answer_ids)]
        truncated = True
    return Encoded(input_ids=prompt_ids + answer_ids,
                   labels=[IGNORE] * len(prompt_ids) + answer_ids, truncated=truncated)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch into tensors: input_ids, attention_mask, labels."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
