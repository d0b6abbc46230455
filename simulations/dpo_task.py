"""A preference task whose preference a program checks, built offline from the packaged reviews.

The prompt asks for the review's sentiment in one fixed form, ``Sentiment: <word>`` with the
word in lower case; the chosen answer is that form with the review's rating, the rejected one
breaks the form (its rating is the same, so only the form is preferred). Each site breaks it its
own way, so the clients' rejected answers are non-IID, and two of the ways are what the default
model itself answers before tuning: ``reproductive`` capitalises the word (``Sentiment:
Positive``, the base's usual answer), ``mental`` answers with a sentence (``The sentiment of this
review is positive.``, its other one), ``pain`` adds a comment after the right form. The held-out
pairs come from the test split and mix the three. :func:`complies` is the rule a generation is
checked against.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from fedlora.data.drugreview import load_split, site_of

INSTRUCTION = (
    "What is the sentiment of this drug review? Reply exactly in the form "
    "'Sentiment: <positive, neutral or negative>', in lower case, and nothing else."
)
RULE = re.compile(r"Sentiment: (positive|neutral|negative)")
LABEL = re.compile(r"\b(positive|neutral|negative)\b", re.IGNORECASE)
SITES = ("reproductive", "mental", "pain")  # one way of breaking the form each


def complies(answer: str) -> bool:
    """Whether an answer is exactly ``Sentiment: <label>`` (surrounding spaces aside)."""
    return RULE.fullmatch(answer.strip()) is not None


def label_in(answer: str) -> str | None:
    """The first rating word an answer names, in any case (None when it names none): what
    the answer says, whatever its form."""
    found = LABEL.search(answer)
    return found.group(1).lower() if found else None


def rejected_answer(site: str, label: str, rng: np.random.Generator) -> str:
    """An answer that breaks the form, the way ``site``'s annotators did."""
    if site == "reproductive":
        word = label.capitalize()
        return str(
            rng.choice([f"Sentiment: {word}", f"Sentiment: {word}.", f"Sentiment: {word.upper()}"])
        )
    if site == "mental":
        return str(
            rng.choice(
                [
                    f"The sentiment of this review is {label}.",
                    f"This review is {label}.",
                    f"I would say the review is {label}.",
                ]
            )
        )
    return str(
        rng.choice(
            [
                f"Sentiment: {label}. The patient describes their experience with the drug.",
                f"Sentiment: {label} (based on the side effects and the relief described).",
                f"Sentiment: {label}\nReason: the tone of the review.",
            ]
        )
    )


def pair(text: str, label: str, site: str, rng: np.random.Generator) -> dict[str, str]:
    """One preference record (prompt, chosen, rejected, site)."""
    return {
        "prompt": f"{INSTRUCTION}\n\nReview: {text}",
        "chosen": f"Sentiment: {label}",
        "rejected": rejected_answer(site, label, rng),
        "site": site,
    }


def write_task(folder: Path, max_chars: int = 400, test_pairs: int = 40, seed: int = 0) -> Path:
    """Write ``train.jsonl`` (the three sites' reviews of at most ``max_chars`` characters) and
    ``test.jsonl`` (``test_pairs`` held-out pairs from the test split, violations mixed) into
    ``folder``; returns it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train = [
        pair(r.text, r.label, site_of(r.condition), rng)
        for r in load_split("train")
        if site_of(r.condition) in SITES and len(r.text) <= max_chars
    ]
    pool = [r for r in load_split("test") if len(r.text) <= max_chars]
    chosen = rng.permutation(len(pool))[:test_pairs]
    test = [pair(pool[i].text, pool[i].label, SITES[k % 3], rng) for k, i in enumerate(chosen)]
    for name, records in (("train.jsonl", train), ("test.jsonl", test)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


__all__ = ["INSTRUCTION", "SITES", "complies", "label_in", "write_task"]
