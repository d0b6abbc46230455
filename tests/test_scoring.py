"""The fast paths against the plain computations they replace (tiny fp32 model).

Training computes vocabulary logits at the answer positions only; evaluation runs each prompt
once and scores every label from its KV cache. Both must equal the straightforward computation.
"""

from pathlib import Path

import pytest
import torch

from fedlora.evaluate import label_scores
from fedlora.prompting import IGNORE, answer_logits, collate, encode

REVIEWS = ["It worked well and I feel great.", "Awful, I could not sleep for a week " * 3,
           "No change at all."]
ANSWERS = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_answer_only_loss_equals_the_full_sequence_loss(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = [encode(tok, r, a, 256) for r, a in zip(REVIEWS, ANSWERS, strict=True)]
    with torch.no_grad():
        reference = model(**{k: v for k, v in collate(batch, tok.pad_token_id, "right").items()
                             if k != "position_ids"}).loss
        logits, targets = answer_logits(model, collate(batch, tok.pad_token_id))
        fast = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                 ignore_index=IGNORE)
    assert abs(fast.item() - reference.item()) < 1e-5, (fast.item(), reference.item())


def test_answer_logits_refuses_right_padded_batches(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = [encode(tok, r, a, 256) for r, a in zip(REVIEWS, ANSWERS, strict=True)]
    with pytest.raises(ValueError, match="left-padded"):
        answer_logits(model, collate(batch, tok.pad_token_id, "right"))


def test_cached_label_scores_equal_one_forward_per_label(model_and_tokenizer):
    model, tok = model_and_tokenizer
    labels = ["negative", "neutral", "positive"]
    with torch.no_grad():
        fast = label_scores(model, tok, REVIEWS, labels)
        for i, review in enumerate(REVIEWS):
            for j, label in enumerate(labels):
                enc = encode(tok, review, label, 512)
                ids = torch.tensor([enc.input_ids])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
                target = torch.tensor(enc.labels[1:])
                keep = target != IGNORE
                slow = logp[keep].gather(-1, target[keep][:, None]).sum()
                assert abs(fast[i, j].item() - slow.item()) < 1e-4, (i, j)
