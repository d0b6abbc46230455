"""Central evaluation: the server scores the global adapter on test data it holds itself.

Optional (``central-eval``): the packaged drug-review test split (``drugreview``) or a data file
or folder of chat examples. The base model is loaded once, on the GPU when one is visible
(:func:`fedlora.precision.device`; ``FEDLORA_DEVICE`` pins it), in bf16 where native, else fp32,
with the LoRA layers; each evaluation only swaps the adapter weights (and, for FedEx-LoRA, adds the
residuals to the base weights they belong to). Reports loss and perplexity on the answers, and
label accuracy when the task has labels. When every answer is one of the labels (the drug
reviews), one pass gives both: the loss is the gold label's, from the label scores
(fedlora.evaluate.label_eval), with the context cut to fit the longest label.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.data.records import Example
from fedlora.errors import ConfigError
from fedlora.lora import LoraSettings, fold_sb

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def central_examples(
    source: str,
    n: int,
    labels: tuple[str, ...],
    option: str = "central-eval",
    spec: Mapping[str, Any] | None = None,
) -> tuple[list[Example], tuple[str, ...]]:
    """The first ``n`` server-held test examples, and the labels to score (may be empty).
    ``option`` names the setting in errors (``fedlora export`` reads its data here too);
    ``spec`` is the data description (format, columns: :class:`~fedlora.data.formats.DataSpec`'s
    fields), the defaults when None."""
    if source == "drugreview":
        from fedlora.data.drugreview import LABELS, load_split
        from fedlora.prompting import review_example

        reviews = load_split("test")[:n]
        return (
            [
                review_example(r.text, r.label, f"drugreview:test:{i}")
                for i, r in enumerate(reviews)
            ],
            labels or LABELS,
        )
    from fedlora.data.formats import DataSpec, load_examples

    if not Path(source).exists():
        raise ConfigError(f"{option}={source!r}: not 'drugreview' and no such file or folder")
    loaded = load_examples(DataSpec(path=source, **(spec or {})))
    examples = [ex for ex in loaded.examples if ex.kind in ("chat", "preference")]
    if not examples:
        raise ConfigError(
            f"{option}={source!r}: no chat examples or preference pairs to evaluate on"
        )
    return examples[:n], labels


def make_central_eval(
    base_dir: Path,
    lora: LoraSettings,
    source: str,
    n: int,
    labels: tuple[str, ...],
    max_length: int,
    residuals: Callable[[], Arrays],
    dpo_beta: float = 0.0,
) -> Callable[[int, Arrays], dict[str, float]]:
    """A function (round, global adapter) -> metrics; the model loads on first use. With
    ``dpo_beta`` > 0 (objective dpo) the preference pairs among the examples are scored
    (fedlora.dpo): DPO loss, preference accuracy and reward margin."""
    examples, labels = central_examples(source, n, labels)
    state: dict[str, object] = {}

    def evaluate(server_round: int, adapter: Arrays) -> dict[str, float]:
        import torch
        from peft import get_peft_model, set_peft_model_state_dict
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fedlora.encoding import encode_examples
        from fedlora.evaluate import eval_loss, label_eval
        from fedlora.precision import compute_dtype, device

        start = time.perf_counter()
        if not state:
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            dev = device()
            base = AutoModelForCausalLM.from_pretrained(
                base_dir, dtype=compute_dtype(dev), device_map=dev
            )
            state.update(
                model=get_peft_model(base, lora.peft_config(base_dir)).eval(),
                tokenizer=tokenizer,
                originals={},
            )
        model, tokenizer = state["model"], state["tokenizer"]
        set_peft_model_state_dict(
            model,
            {k: torch.from_numpy(np.array(v)) for k, v in fold_sb(adapter).items()},
        )
        _apply_residuals(model, residuals(), state["originals"])  # type: ignore[arg-type]
        pairs = [ex for ex in examples if ex.rejected] if dpo_beta > 0 else []
        if pairs:
            scores = _pair_scores(model, tokenizer, pairs, max_length, dpo_beta, state)
            log.info("Central eval after round %d on %d pairs", server_round, len(pairs))
            return scores
        result: dict[str, float] = {}
        loss = None
        if labels:
            labelled = [ex for ex in examples if ex.turns[-1].content.strip() in labels]
            accuracy, loss = label_eval(model, tokenizer, labelled, labels, max_length)
            if len(labelled) < len(examples):
                loss = None  # the loss covers every example
            result["eval-accuracy"] = accuracy.accuracy
        if loss is None:
            if "rows" not in state:  # encoded once, and only when the label pass gives no loss
                state["rows"] = encode_examples(tokenizer, examples, max_length)[0]
            loss = eval_loss(model, state["rows"], tokenizer.pad_token_id)  # type: ignore
        result.update({"eval-loss": loss.loss, "eval-perplexity": loss.perplexity})
        log.info(
            "Central eval after round %d on %d examples in %.1f s",
            server_round,
            len(examples),
            time.perf_counter() - start,
        )
        return result

    return evaluate


def _pair_scores(
    model: Any,
    tokenizer: Any,
    pairs: list[Example],
    max_length: int,
    beta: float,
    state: dict[str, object],
) -> dict[str, float]:
    """The DPO loss (as eval-loss), preference accuracy and reward margin of held-out pairs."""
    from fedlora.dpo import encode_pairs, evaluate_pairs

    if "pairs" not in state:
        state["pairs"] = encode_pairs(tokenizer, pairs, max_length)
    scores = evaluate_pairs(model, state["pairs"], tokenizer.pad_token_id, beta)  # type: ignore
    return {
        "eval-loss": scores.loss,
        "eval-perplexity": float(np.exp(min(scores.loss, 50.0))),
        "eval-pref-accuracy": scores.accuracy,
        "eval-reward-margin": scores.margin,
    }


def _apply_residuals(model: object, residuals: Arrays, originals: dict[str, Any]) -> None:
    """Set each residual's base weight to its original value plus the residual."""
    import torch

    modules = dict(model.named_modules())  # type: ignore[attr-defined]
    for name, residual in residuals.items():
        layer = modules[name].base_layer if hasattr(modules[name], "base_layer") else modules[name]
        if name not in originals:
            originals[name] = layer.weight.detach().float().clone()
        original = originals[name]
        delta = torch.from_numpy(residual).to(original.device)
        layer.weight.data = (original + delta).to(layer.weight.dtype)
