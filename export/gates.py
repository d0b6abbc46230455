"""Task gates for quantized exports: a variant ships only if it still does the run's task.

Each variant (int8, int4) is measured beside the fp32 ONNX model, which the parity gate has
already tied to the merged PyTorch model (:mod:`fedlora.export.parity`), on held-out examples of
the run's own task, with the edge runtime alone (no torch):

- **task accuracy**: on a label task, the likeliest label by log-likelihood (as
  :mod:`fedlora.evaluate` scores the PyTorch model); otherwise exact match of the greedy answer;
- **answer perplexity**: exp of the mean negative log-likelihood of the reference answers'
  tokens; the gate is the ratio to fp32's;
- **greedy agreement**: over the first ``greedy_prompts`` prompts, the mean share of fp32's
  greedy tokens that the variant reproduces before its first different token (1.0: identical
  output on every prompt; a flip at the first token of every prompt scores 0);
- **degeneration**: greedy outputs that are empty, mostly repeated 3-grams, or not text
  (replacement characters, control characters); a variant may not produce more than fp32.

A variant that misses any threshold raises :class:`GateError`, whose message prints every
measured number of every variant, so the failed export can be judged without rerunning it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fedlora.errors import ConfigError, FedloraError

log = logging.getLogger(__name__)

REPEAT_MIN_TOKENS = 12  # outputs shorter than this are not judged for repetition
REPEAT_MAX_SHARE = 0.5  # more than half of the 3-grams repeated: degenerate


class GateError(FedloraError):
    """A quantized variant failed a task gate; the message holds every measured figure."""


@dataclass(frozen=True)
class GateThresholds:
    """What a variant may lose against the fp32 ONNX model on the run's held-out data."""

    max_accuracy_drop: float  # points (percentage points of accuracy)
    max_perplexity_ratio: float  # answer perplexity / fp32's
    min_greedy_agreement: float  # mean share of fp32's greedy tokens matched before a difference

    def __post_init__(self) -> None:
        if not self.max_accuracy_drop >= 0 or not self.max_perplexity_ratio >= 1:
            raise ConfigError(
                f"gate thresholds {self}: accuracy drop must be >= 0 points and the perplexity "
                f"ratio >= 1"
            )
        if not 0 <= self.min_greedy_agreement <= 1:
            raise ConfigError(f"greedy agreement {self.min_greedy_agreement}: must be in [0, 1]")


# Defaults: int8 must be nearly lossless (the bar: <= 1 point of accuracy); int4 states
# its loss and is held to a looser bar that still catches a broken model.
DEFAULT_THRESHOLDS = {
    "int8": GateThresholds(
        max_accuracy_drop=1.0, max_perplexity_ratio=1.05, min_greedy_agreement=0.9
    ),
    "int4": GateThresholds(
        max_accuracy_drop=5.0, max_perplexity_ratio=1.3, min_greedy_agreement=0.6
    ),
}


@dataclass(frozen=True)
class TaskItem:
    """One held-out example, tokenized by the edge runtime: the context before the answer, the
    candidate answers' tokens (the labels, or just the reference) and which one is right."""

    context: list[int]
    options: list[list[int]]
    gold: int
    reference: str  # the reference answer's text


@dataclass
class TaskFigures:
    """One model's measurements on the held-out items."""

    n: int
    accuracy: float  # 0-1: label accuracy, or exact match of the greedy answer
    metric: str  # "label accuracy" | "exact match"
    answer_perplexity: float
    greedy: list[list[int]] = field(default_factory=list)
    degenerate: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("greedy")
        out["greedy-prompts"] = len(self.greedy)
        return out


@dataclass
class GateResult:
    variant: str
    figures: TaskFigures
    accuracy_drop: float  # points vs fp32
    perplexity_ratio: float
    greedy_agreement: float
    thresholds: GateThresholds
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_card(self) -> dict[str, Any]:
        """The model card's record of this gate."""
        return {
            "passed": self.passed,
            "figures": {
                "metric": self.figures.metric,
                "examples": self.figures.n,
                "accuracy": self.figures.accuracy,
                "accuracy-drop-points-vs-fp32": self.accuracy_drop,
                "answer-perplexity": self.figures.answer_perplexity,
                "perplexity-ratio-vs-fp32": self.perplexity_ratio,
                "greedy-agreement-vs-fp32": self.greedy_agreement,
                "greedy-prompts": len(self.figures.greedy),
                "degenerate-outputs": self.figures.degenerate,
            },
            "thresholds": asdict(self.thresholds),
            "failures": self.failures,
        }


class _EdgeTokenizer:
    """An :class:`~fedlora.export.runtime.EdgeModel` behind the two tokenizer calls
    :func:`fedlora.encoding.prompt_and_answers` makes, so the edge runtime's own chat template
    and tokenizer cut the prompts and answers the gates score."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def apply_chat_template(
        self, turns: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool
    ) -> str:
        return str(self.model.render(turns, add_generation_prompt=add_generation_prompt))

    def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": self.model.encode(text)}


def task_items(
    model: Any, examples: Sequence[Any], labels: Sequence[str], max_length: int = 512
) -> list[TaskItem]:
    """Held-out ``examples`` (fedlora ``Example`` records) as :class:`TaskItem`, tokenized with
    ``model``'s own chat template and tokenizer (an :class:`~fedlora.export.runtime.EdgeModel`)
    as the PyTorch evaluation tokenizes them. With ``labels``, every label is a candidate;
    otherwise the reference answer alone."""
    from fedlora.encoding import prompt_and_answers

    tokenizer = _EdgeTokenizer(model)
    items = []
    for ex in examples:
        reference = ex.turns[-1].content
        if labels and reference.strip() not in labels:
            raise ConfigError(
                f"{ex.source}: answer {reference!r} is not one of the labels {list(labels)}"
            )
        answers = list(labels) if labels else [reference]
        context, options = prompt_and_answers(tokenizer, ex, answers, max_length)
        gold = answers.index(reference.strip()) if labels else 0
        items.append(TaskItem(context, options, gold, reference))
    return items


def prefix_share(reference: Sequence[int], other: Sequence[int]) -> float:
    """The share of ``reference``'s tokens that ``other`` matches before they first differ."""
    if not reference:
        return 1.0 if not other else 0.0
    same = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        same += 1
    return same / len(reference)


def degenerate(text: str, tokens: Sequence[int]) -> bool:
    """Empty, mostly repeated 3-grams, or not text."""
    if not text.strip():
        return True
    if "\ufffd" in text or any(ord(c) < 32 and c not in "\n\t\r" for c in text):
        return True
    if len(tokens) >= REPEAT_MIN_TOKENS:
        grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
        if 1 - len(set(grams)) / len(grams) > REPEAT_MAX_SHARE:
            return True
    return False


def best_option(logps: Sequence[Sequence[float]]) -> int:
    """The candidate answer a model picks: the highest total log-probability of its tokens."""
    return max(range(len(logps)), key=lambda j: sum(logps[j]))


def measure(
    model: Any,
    items: Sequence[TaskItem],
    labelled: bool,
    greedy_prompts: int = 20,
    max_new_tokens: int = 32,
) -> TaskFigures:
    """``model``'s (an EdgeModel) figures on ``items``."""
    start = time.perf_counter()
    correct, nll, scored = 0, 0.0, 0
    greedy: list[list[int]] = []
    bad = 0
    for k, item in enumerate(items):
        logps = model.continuation_logprobs(item.context, item.options)
        gold = logps[item.gold]
        nll -= sum(gold)
        scored += len(gold)
        tokens: list[int] | None = None
        if labelled:
            correct += best_option(logps) == item.gold
        else:
            limit = min(max_new_tokens * 4, len(item.options[0]) + 8)
            tokens = model.generate_ids(item.context, limit)
            correct += model.decode(tokens).strip() == item.reference.strip()
        if k < greedy_prompts:
            if tokens is None:
                tokens = model.generate_ids(item.context, max_new_tokens)
            greedy.append(tokens)
            bad += degenerate(model.decode(tokens), tokens)
    return TaskFigures(
        n=len(items),
        accuracy=correct / max(len(items), 1),
        metric="label accuracy" if labelled else "exact match",
        answer_perplexity=math.exp(nll / max(scored, 1)),
        greedy=greedy,
        degenerate=bad,
        seconds=time.perf_counter() - start,
    )


def judge(
    variant: str, ref: TaskFigures, var: TaskFigures, thresholds: GateThresholds
) -> GateResult:
    """Compare a variant's figures with fp32's against ``thresholds``."""
    drop = 100.0 * (ref.accuracy - var.accuracy)
    ratio = var.answer_perplexity / ref.answer_perplexity
    pairs = list(zip(ref.greedy, var.greedy, strict=False))
    agreement = sum(prefix_share(a, b) for a, b in pairs) / max(len(pairs), 1)
    failures = []
    if drop > thresholds.max_accuracy_drop:
        failures.append(
            f"{var.metric} {100 * var.accuracy:.1f}% is {drop:.1f} points below fp32's "
            f"{100 * ref.accuracy:.1f}% (at most {thresholds.max_accuracy_drop:g})"
        )
    if not ratio <= thresholds.max_perplexity_ratio:
        failures.append(
            f"answer perplexity {var.answer_perplexity:.4f} is {ratio:.3f}x fp32's "
            f"{ref.answer_perplexity:.4f} (at most {thresholds.max_perplexity_ratio:g}x)"
        )
    if agreement < thresholds.min_greedy_agreement:
        failures.append(
            f"greedy agreement {agreement:.0%} of fp32's tokens over {len(pairs)} prompts "
            f"(at least {thresholds.min_greedy_agreement:.0%})"
        )
    if var.degenerate > ref.degenerate:
        failures.append(
            f"{var.degenerate} of {len(var.greedy)} greedy outputs degenerate (empty, repeated "
            f"or not text) against fp32's {ref.degenerate}"
        )
    return GateResult(variant, var, drop, ratio, agreement, thresholds, failures)


def gate(
    reference: Any,
    variants: Mapping[str, Any],
    examples: Sequence[Any],
    labels: Sequence[str],
    thresholds: Mapping[str, GateThresholds],
    greedy_prompts: int = 20,
) -> tuple[TaskFigures, list[GateResult]]:
    """fp32's figures (``reference``, an EdgeModel) and each variant's gate result on
    ``examples``; the variants are EdgeModels by name."""
    items = task_items(reference, examples, labels)
    ref = measure(reference, items, bool(labels), greedy_prompts)
    results = [
        judge(name, ref, measure(model, items, bool(labels), greedy_prompts), thresholds[name])
        for name, model in variants.items()
    ]
    return ref, results


def describe(ref: TaskFigures, results: Sequence[GateResult]) -> str:
    """Every measured figure, one line per model: the body of a GateError and of the log."""
    lines = [
        f"fp32: {ref.metric} {100 * ref.accuracy:.1f}% on {ref.n} held-out examples, answer "
        f"perplexity {ref.answer_perplexity:.4f}, {ref.degenerate} of {len(ref.greedy)} greedy "
        f"outputs degenerate ({ref.seconds:.0f} s)"
    ]
    for r in results:
        f = r.figures
        lines.append(
            f"{r.variant}: {f.metric} {100 * f.accuracy:.1f}% ({r.accuracy_drop:+.1f} points "
            f"below fp32), answer perplexity {f.answer_perplexity:.4f} "
            f"({r.perplexity_ratio:.3f}x), "
            f"greedy agreement {r.greedy_agreement:.0%}, {f.degenerate} degenerate "
            f"({f.seconds:.0f} s): {'passed' if r.passed else 'FAILED: ' + '; '.join(r.failures)}"
        )
    return "\n".join(lines)


_FIELDS = {
    "max-accuracy-drop": "max_accuracy_drop",
    "max-perplexity-ratio": "max_perplexity_ratio",
    "min-greedy-agreement": "min_greedy_agreement",
}


def parse_overrides(entries: Sequence[str]) -> dict[str, GateThresholds]:
    """``["int4.max-accuracy-drop=3", ...]`` -> the default thresholds with those changed."""
    from dataclasses import replace

    out = dict(DEFAULT_THRESHOLDS)
    for entry in entries:
        key, sep, value = entry.partition("=")
        variant, dot, name = key.strip().partition(".")
        if not sep or not dot or variant not in out or name not in _FIELDS:
            raise ConfigError(
                f"--gate {entry!r}: write VARIANT.NAME=VALUE with VARIANT in {', '.join(out)} "
                f"and NAME in {', '.join(_FIELDS)} (e.g. int4.max-accuracy-drop=3)"
            )
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--gate {entry!r}: {value!r} is not a number") from None
        out[variant] = replace(out[variant], **{_FIELDS[name]: number})
    return out
