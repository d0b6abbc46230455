"""NF4 on CPU: evaluating must not change the gradients training computes afterwards.

bitsandbytes 0.50 repacks a Linear4bit weight in place for a faster CPU kernel the first time
it runs in eval mode without gradients (on CPUs with AVX512-BF16), and its training path then
reads the repacked layout as if it were the original: on the default model the training loss
went from 2.9 to 17 after one evaluation. fedlora turns that repacking off at load.
"""

from pathlib import Path

import torch

from fedlora.client.quantization import load_base
from fedlora.encoding import encode_examples
from fedlora.evaluate import eval_loss
from fedlora.lora import LoraSettings
from fedlora.prompting import answer_logits, collate, review_example

REVIEWS = [("It worked well and I feel great.", "positive"), ("Awful side effects.", "negative")]


def _gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    logits, targets = answer_logits(model, batch)
    torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100
    ).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_nf4_training_after_evaluation_sees_the_same_weights(tiny_model_dir: Path):
    from peft import get_peft_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0)
    model = get_peft_model(load_base(tiny_model_dir, "nf4"), settings.peft_config(tiny_model_dir))
    rows, _ = encode_examples(tok, [review_example(r, a) for r, a in REVIEWS], 128)
    batch = collate(rows, tok.pad_token_id)
    for p in model.parameters():  # B = 0 would give A no gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    before = _gradients(model, batch)
    eval_loss(model, rows, tok.pad_token_id)  # eval mode, no gradients
    after = _gradients(model, batch)
    assert before and set(before) == set(after)
    worst = max(float((before[k] - after[k]).abs().max() / before[k].abs().max()) for k in before)
    assert worst < 1e-2, worst
