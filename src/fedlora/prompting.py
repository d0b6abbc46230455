"""The drug-review task as chat examples, and batching of tokenized rows for training.

A review becomes a one-turn chat: the question plus the review from the user, the one-word rating
from the assistant. Tokenization (chat template, completion-only labels, cutting over-long
examples, packing) is generic and lives in :mod:`fedlora.encoding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.data.records import Example, Turn

INSTRUCTION = (
    "Is the sentiment of this drug review positive, neutral or negative? Answer with one word."
)
END_OF_TURN = "<|im_end|>"
IGNORE = -100  # label id that the loss skips


def messages(review: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{INSTRUCTION}\n\nReview: {review}"}]


def review_example(review: str, label: str, source: str = "drugreview") -> Example:
    """A review and its rating as a one-turn chat example."""
    return Example(
        source=source,
        turns=(Turn("user", messages(review)[0]["content"]), Turn("assistant", label)),
    )


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the loss does not look
    truncated: bool
    position_ids: list[int] | None = None  # packed rows only: restarting at 0 per example


def collate(batch: list[Encoded], pad_id: int, side: str = "left") -> dict[str, Any]:
    """Pad a batch into tensors: input_ids, attention_mask, position_ids, labels.

    Left padding (the default) puts every answer at the end of its row, so the answer tokens of
    the whole batch lie in the last few columns (see :func:`answer_logits`). Packed rows (with
    ``position_ids``) are padded on the right by one more "example" of pad tokens and carry no
    attention mask: the restarting position ids alone keep examples apart.
    """
    import torch

    width = max(len(e.input_ids) for e in batch)
    packed = any(e.position_ids is not None for e in batch)
    if packed:
        side = "right"
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols] = torch.tensor(e.input_ids)
        labels[i, cols] = torch.tensor(e.labels)
        mask[i, cols] = 1
        if packed:
            own = e.position_ids if e.position_ids is not None else list(range(n))
            positions[i] = torch.tensor(own + list(range(width - n)))
    if packed:
        return {
            "input_ids": ids,
            "attention_mask": None,
            "position_ids": positions,
            "labels": labels,
            "tokens": int(mask.sum()),
        }
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "labels": labels,
        "tokens": int(mask.sum()),
    }


def answer_logits(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Logits and targets for the scored tokens of a batch.

    Only positions from the first scored column on get vocabulary logits (``logits_to_keep``):
    for a left-padded completion-only batch that is the last few columns instead of every prompt
    token, the same loss for a fraction of the lm_head work; for full-sequence loss or packed
    rows it is (almost) every column. Returns ``(logits [b, k, vocab], targets [b, k])``;
    targets hold IGNORE where not scored. Batches are built on CPU and moved to the model's
    device here (a no-op on CPU); the targets come back on the logits' device.
    """
    labels = batch["labels"]
    scored = (labels != IGNORE).any(0)
    if not bool(scored.any()):
        raise ValueError("the batch has no scored tokens")
    first = int(scored.int().argmax())
    k = labels.shape[1] - max(first, 1)  # the first token is never a target
    # transformers hands the lm_head a strided slice of the hidden states; on CPU a matmul of a
    # strided 3-d tensor by the (tied, 49k x 576) embedding falls back to a batched matmul that
    # copies the whole weight once per row, forward and backward (a third of a training step).
    # A contiguous input keeps it one matrix product, with the same numbers.
    head = model.get_output_embeddings()
    dev = model_device(model)
    hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        out = model(
            input_ids=_on(batch["input_ids"], dev),
            attention_mask=_on(batch["attention_mask"], dev),
            position_ids=_on(batch["position_ids"], dev),
            logits_to_keep=k + 1,
            use_cache=False,
        )
    finally:
        if hook is not None:
            hook.remove()
    return out.logits[:, :-1], labels[:, -k:].to(out.logits.device)


def _on(tensor: Any, dev: Any) -> Any:
    return None if tensor is None else tensor.to(dev)


def model_device(model: Any) -> Any:
    """The device of the model's input embeddings: where its input ids must be."""
    return model.get_input_embeddings().weight.device


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])
