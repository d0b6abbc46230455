"""Tokenize user examples for training: chat template, completion-only labels, packing.

A chat example is rendered with the tokenizer's own chat template; by default the loss covers the
assistant turns only (completion-only), each with its end-of-turn token, found by rendering the
conversation turn by turn and taking the tokens each assistant turn adds. ``loss="full"`` scores
every token. A plain-text example (continued pre-training) scores every token and is cut into
``max_length`` chunks. An over-long chat example keeps its final answer whole and loses tokens
from the middle of its context (the start, with the instruction, and the last few tokens before
the answer, with the assistant header, stay); if the answer alone does not fit, the example keeps
its first ``max_length`` tokens. Cut examples are counted and reported; one left with no scored
token is dropped (counted, and its ``file:line`` reported).

Packing (optional) concatenates examples into rows of at most ``max_length`` tokens with position
ids that restart at 0 for each example; transformers then builds a block-diagonal causal mask
from the position ids, so packed examples never attend to each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlora.data.records import Example
from fedlora.errors import ConfigError
from fedlora.prompting import IGNORE, Encoded

LOSSES = ("completion", "full")


@dataclass
class EncodeReport:
    """What tokenization did to a node's examples (logged and shown in reports)."""

    examples: int = 0  # examples given
    rows: int = 0  # training rows produced (text chunks count separately)
    truncated: int = 0  # chat examples cut to max_length
    dropped: int = 0  # chat examples with no assistant token left after the cut
    dropped_sources: list[str] = field(default_factory=list)  # "file:line" of the dropped


def encode_example(
    tokenizer: Any, example: Example, max_length: int, loss: str = "completion"
) -> list[Encoded]:
    """One example as training rows (one for chat, one per chunk for text); [] if dropped."""
    if loss not in LOSSES:
        raise ConfigError(f"loss={loss!r}: use one of {LOSSES}")
    if example.kind == "text":
        ids = list(tokenizer(example.text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return [
            Encoded(ids[i : i + max_length], ids[i : i + max_length], False)
            for i in range(0, len(ids), max_length)
            if len(ids[i : i + max_length]) > 1
        ]
    ids, labels, answer_at = _chat_ids(tokenizer, example)
    if loss == "full":
        labels = list(ids)
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = middle_cut(ids, labels, answer_at, max_length)
    if all(t == IGNORE for t in labels[1:]):  # nothing to learn: the first token is never scored
        return []
    return [Encoded(ids, labels, truncated)]


def middle_cut(
    ids: list[int], labels: list[int], answer_at: int, max_length: int
) -> tuple[list[int], list[int]]:
    """Fit ``ids`` into ``max_length`` keeping ``ids[answer_at:]`` (the answer) whole.

    The context loses tokens from its middle: the first ones (instruction) and the last
    ``tail`` ones (the end of the user's text and the assistant header) stay. An answer too long
    to leave room for context falls back to keeping the first ``max_length`` tokens.
    """
    answer = len(ids) - answer_at
    budget = max_length - answer
    if budget < 16:
        return ids[:max_length], labels[:max_length]
    tail = min(32, budget // 4)
    head = budget - tail
    keep = list(range(head)) + list(range(answer_at - tail, len(ids)))
    return [ids[i] for i in keep], [labels[i] for i in keep]


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int, loss: str = "completion"
) -> tuple[list[Encoded], EncodeReport]:
    report = EncodeReport(examples=len(examples))
    rows: list[Encoded] = []
    for ex in examples:
        encoded = encode_example(tokenizer, ex, max_length, loss)
        if not encoded:
            report.dropped += 1
            report.dropped_sources.append(ex.source)
        report.truncated += sum(e.truncated for e in encoded)
        rows += encoded
    report.rows = len(rows)
    return rows, report


def _chat_ids(tokenizer: Any, example: Example) -> tuple[list[int], list[int], int]:
    """Token ids of the conversation, labels on the assistant turns, and where the last answer
    starts.

    The conversation is rendered turn by turn; each piece of text a turn adds is tokenized on its
    own, so the context/answer boundary is exact on the token level.
    """
    turns = [{"role": t.role, "content": t.content} for t in example.turns]
    ids: list[int] = []
    labels: list[int] = []
    done, answer_at = "", 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant" or i == 0:
            continue
        head = _render(tokenizer, turns[:i], generation_prompt=True)
        full = _render(tokenizer, turns[: i + 1], generation_prompt=False)
        if not (head.startswith(done) and full.startswith(head)):
            raise ConfigError(
                f"{example.source}: the tokenizer's chat template does not render "
                f"a conversation as a prefix of its continuation; use loss='full'"
            )
        context = _tokens(tokenizer, head[len(done) :])
        answer = _tokens(tokenizer, full[len(head) :])
        ids += context
        labels += [IGNORE] * len(context)
        answer_at = len(ids)
        ids += answer
        labels += answer
        done = full
    return ids, labels, answer_at


def prompt_and_answers(
    tokenizer: Any, example: Example, answers: Sequence[str], max_length: int
) -> tuple[list[int], list[list[int]]]:
    """The context before ``example``'s last answer, and each candidate answer's tokens.

    For label tasks: the candidates are scored after the same context (see
    :mod:`fedlora.evaluate`). The context is middle-cut so that it fits with any candidate.
    """
    turns = [{"role": t.role, "content": t.content} for t in example.turns[:-1]]
    head = _render(tokenizer, turns, generation_prompt=True)
    options = []
    for answer in answers:
        full = _render(
            tokenizer, [*turns, {"role": "assistant", "content": answer}], generation_prompt=False
        )
        if not full.startswith(head):
            raise ConfigError(
                f"{example.source}: the chat template does not render the "
                f"answer after the assistant header"
            )
        options.append(_tokens(tokenizer, full[len(head) :]))
    context = _tokens(tokenizer, head)
    width = max(len(o) for o in options)
    if len(context) + width > max_length:
        context, _ = middle_cut(
            context + [0] * width, [IGNORE] * (len(context) + width), len(context), max_length
        )
        context = context[:-width]
    return context, options


def _render(tokenizer: Any, turns: list[dict[str, str]], generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def pack(rows: Sequence[Encoded], max_length: int) -> list[Encoded]:
    """Greedy first-fit-decreasing packing into rows of at most ``max_length`` tokens.

    Each packed row carries ``position_ids`` restarting at 0 per example, which keeps examples
    from attending to each other (see the module docstring). Order is deterministic.
    """
    bins: list[list[Encoded]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda e: -len(e.input_ids)):
        n = len(row.input_ids)
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(row)
                room[b] -= n
                break
        else:
            bins.append([row])
            room.append(max_length - n)
    packed = []
    for members in bins:
        packed.append(
            Encoded(
                input_ids=[t for e in members for t in e.input_ids],
                labels=[t for e in members for t in e.labels],
                truncated=any(e.truncated for e in members),
                position_ids=[p for e in members for p in range(len(e.input_ids))],
            )
        )
    return packed
