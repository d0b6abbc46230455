"""The fast paths against the plain computations they replace (tiny fp32 model).

Training computes vocabulary logits from the first scored position only; packing puts several
examples in one row; evaluation runs each prompt once and scores every label from its KV cache.
Each must equal the straightforward computation.
"""

from pathlib import Path

import pytest
import torch

from fedlora.data.records import Example, Turn
from fedlora.encoding import encode_example, pack, prompt_and_answers
from fedlora.evaluate import (
    eval_loss,
    label_eval,
    label_scores,
    length_batches,
)
from fedlora.prompting import IGNORE, answer_logits, collate, review_example

REVIEWS = [
    "It worked well and I feel great.",
    "Awful, I could not sleep for a week " * 3,
    "No change at all.",
]
ANSWERS = ["positive", "negative", "neutral"]


def encode(tok, review, answer, max_length):
    return encode_example(tok, review_example(review, answer), max_length)[0]


def _loss(model, rows, pad_id):
    logits, targets = answer_logits(model, collate(rows, pad_id))
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    ).item()


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
        reference = model(
            **{
                k: v
                for k, v in collate(batch, tok.pad_token_id, "right").items()
                if k not in ("position_ids", "tokens")
            }
        ).loss
        logits, targets = answer_logits(model, collate(batch, tok.pad_token_id))
        fast = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE
        )
    assert abs(fast.item() - reference.item()) < 1e-5, (fast.item(), reference.item())


def test_answer_logits_gives_the_same_loss_for_right_padded_batches(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = [encode(tok, r, a, 256) for r, a in zip(REVIEWS, ANSWERS, strict=True)]
    losses = []
    with torch.no_grad():
        for side in ("left", "right"):
            logits, targets = answer_logits(model, collate(batch, tok.pad_token_id, side))
            losses.append(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE
                ).item()
            )
    assert abs(losses[0] - losses[1]) < 1e-5, losses


def test_cached_label_scores_equal_one_forward_per_label(model_and_tokenizer):
    model, tok = model_and_tokenizer
    labels = ["negative", "neutral", "positive"]
    examples = [review_example(r, "positive") for r in REVIEWS]
    with torch.no_grad():
        prompts = [prompt_and_answers(tok, ex, labels, 512) for ex in examples]
        fast = label_scores(model, [p for p, _ in prompts], prompts[0][1], tok.pad_token_id)
        for i, review in enumerate(REVIEWS):
            for j, label in enumerate(labels):
                enc = encode(tok, review, label, 512)
                ids = torch.tensor([enc.input_ids])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
                target = torch.tensor(enc.labels[1:])
                keep = target != IGNORE
                slow = logp[keep].gather(-1, target[keep][:, None]).sum()
                assert abs(fast[i, j].item() - slow.item()) < 1e-4, (i, j)


def test_packed_rows_give_the_same_loss_as_separate_rows(model_and_tokenizer):
    # Packed examples must not attend to each other: the summed loss over a packed batch equals
    # the summed loss over the same examples one per row.
    model, tok = model_and_tokenizer
    rows = [encode(tok, r, a, 256) for r, a in zip(REVIEWS, ANSWERS, strict=True)]
    packed = pack(rows, max_length=512)
    assert len(packed) < len(rows) and packed[0].position_ids.count(0) >= 2
    leaky = [
        type(p)(p.input_ids, p.labels, p.truncated, list(range(len(p.input_ids)))) for p in packed
    ]  # same rows, positions not restarted: examples see each other
    with torch.no_grad():
        separate = _loss(model, rows, tok.pad_token_id)
        together = _loss(model, packed, tok.pad_token_id)
        leaking = _loss(model, leaky, tok.pad_token_id)
    assert abs(separate - together) < 1e-3, (separate, together)
    assert abs(separate - leaking) > 5e-3, (separate, leaking)  # the check can tell


def test_full_loss_scores_every_token_and_completion_only_the_answer(model_and_tokenizer):
    _, tok = model_and_tokenizer
    ex = review_example("It helped.", "positive")
    completion = encode_example(tok, ex, 256)[0]
    full = encode_example(tok, ex, 256, loss="full")[0]
    assert full.labels == full.input_ids
    answer = [t for t in completion.labels if t != IGNORE]
    assert tok.decode(answer).startswith("positive<|im_end|>")


def test_multi_turn_chat_scores_every_assistant_turn(model_and_tokenizer):
    _, tok = model_and_tokenizer
    ex = Example(
        "chat.jsonl:1",
        turns=(
            Turn("system", "Be brief."),
            Turn("user", "Hi"),
            Turn("assistant", "Hello."),
            Turn("user", "Dose?"),
            Turn("assistant", "Ask your doctor."),
        ),
    )
    enc = encode_example(tok, ex, 256)[0]
    scored = tok.decode([t for t in enc.labels if t != IGNORE])
    assert "Hello." in scored and "Ask your doctor." in scored
    assert "Be brief." not in scored and "Dose?" not in scored


def test_long_examples_keep_instruction_header_and_answer(model_and_tokenizer):
    _, tok = model_and_tokenizer
    enc = encode(tok, "terrible side effects " * 200, "negative", max_length=128)
    assert enc.truncated and len(enc.input_ids) == 128
    text = tok.decode(enc.input_ids)
    assert "Answer with one word." in text
    assert text.endswith("<|im_start|>assistant\nnegative<|im_end|>\n")


def test_eval_loss_is_the_mean_over_scored_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    rows = [encode(tok, r, a, 256) for r, a in zip(REVIEWS, ANSWERS, strict=True)]
    with torch.no_grad():
        total = _loss(model, rows, tok.pad_token_id)
    tokens = sum(sum(t != IGNORE for t in r.labels) for r in rows)
    result = eval_loss(model, rows, tok.pad_token_id, per_batch=2)
    assert result.tokens == tokens
    assert abs(result.loss - total / tokens) < 1e-4
    assert abs(result.perplexity - torch.tensor(result.loss).exp().item()) < 1e-3


def test_length_batches_cover_every_row_once_longest_first():
    lengths = [3, 9, 1, 9, 5, 7, 2]
    batches = length_batches(lengths, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert batches[0][:2] == [1, 3]  # ties keep their input order
    assert length_batches([], 4) == []
    with pytest.raises(ValueError, match="per_batch"):
        length_batches(lengths, 0)


def test_label_eval_comes_back_in_input_order_with_the_answer_loss(model_and_tokenizer):
    # Batches are formed by prompt length, but each prediction must be its own example's
    # (compared with scoring every example alone), and the loss taken from the same passes must
    # equal eval_loss on the same examples encoded for training.
    model, tok = model_and_tokenizer
    labels = ["negative", "neutral", "positive"]
    reviews = [r * k for k in (1, 4, 2) for r in REVIEWS]  # lengths out of order
    examples = [review_example(r, labels[i % 3]) for i, r in enumerate(reviews)]
    result, loss = label_eval(model, tok, examples, labels, 512, per_batch=4)
    alone = []
    with torch.no_grad():
        for ex in examples:
            prompt, answers = prompt_and_answers(tok, ex, labels, 512)
            alone.append(label_scores(model, [prompt], answers, tok.pad_token_id)[0])
    margins = [sorted(a.tolist())[-1] - sorted(a.tolist())[-2] for a in alone]
    assert min(margins) > 1e-3  # no near-tie that batching noise could flip
    assert result.predictions == [labels[int(a.argmax())] for a in alone]
    assert len({tuple(a.tolist()) for a in alone}) == len(alone)
    gold = [ex.turns[-1].content for ex in examples]
    hits = sum(p == g for p, g in zip(result.predictions, gold, strict=True))
    assert result.accuracy == hits / len(gold)
    reference = eval_loss(
        model,
        [encode(tok, r, g, 512) for r, g in zip(reviews, gold, strict=True)],
        tok.pad_token_id,
    )
    assert loss is not None and loss.tokens == reference.tokens
    assert abs(loss.loss - reference.loss) < 1e-5, (loss.loss, reference.loss)
    # an answer that is not exactly a label: accuracy only
    odd = [*examples[:2], review_example(REVIEWS[0], " positive")]
    assert label_eval(model, tok, odd, labels, 512)[1] is None


def test_eval_loss_does_not_depend_on_the_batch_size(model_and_tokenizer):
    model, tok = model_and_tokenizer
    rows = [
        encode(tok, r * k, a, 256) for k in (3, 1, 2) for r, a in zip(REVIEWS, ANSWERS, strict=True)
    ]
    losses = [eval_loss(model, rows, tok.pad_token_id, per_batch=b).loss for b in (1, 4, 9)]
    assert max(losses) - min(losses) < 1e-5, losses
