"""Federated preference alignment (issue 36, part 3): the preference-pair data form, the DPO
loss (against TRL's ``DPOTrainer`` and the paper's formula), DPO training of a tiny model and a
secure federated DPO round."""

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedlora.config import RunConfig
from fedlora.data.formats import DataSpec, load_examples
from fedlora.data.records import Example, Turn
from fedlora.errors import ConfigError, DataError

BETA = 0.3


def _logps():
    """Fixed per-token log-probs of 4 pairs (chosen rows, then rejected), response masks with
    different lengths, and reference sums chosen so that some pairs are ranked wrong."""
    import torch

    gen = torch.Generator().manual_seed(0)
    per_token = -torch.rand(8, 6, generator=gen) * 3
    mask = torch.ones(8, 7, dtype=torch.long)
    mask[:, :2] = 0  # the prompt
    mask[1, 2:4] = 0
    mask[6, 2] = 0
    ref = -torch.rand(8, generator=gen) * 12
    return per_token, mask, ref


def test_dpo_loss_is_the_papers_formula():
    """Rafailov et al. (2023), eq. 7, per pair in plain floats: -log sigmoid(beta * ((pi_c -
    ref_c) - (pi_r - ref_r))); the rewards are beta * (pi - ref)."""
    import torch

    from fedlora.client.dpo import dpo_loss

    per_token, mask, ref = _logps()
    logps = (per_token * mask[:, 1:]).sum(1)
    loss, reward_c, reward_r = dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], BETA)
    pi, rf = logps.tolist(), ref.tolist()
    by_hand = [
        math.log1p(math.exp(-BETA * ((pi[i] - rf[i]) - (pi[i + 4] - rf[i + 4])))) for i in range(4)
    ]
    assert float(loss) == pytest.approx(sum(by_hand) / 4, rel=1e-5)
    assert reward_c.tolist() == pytest.approx([BETA * (pi[i] - rf[i]) for i in range(4)], rel=1e-5)
    assert reward_r.tolist() == pytest.approx(
        [BETA * (pi[i + 4] - rf[i + 4]) for i in range(4)], rel=1e-5
    )
    assert not reward_c.requires_grad and isinstance(loss, torch.Tensor)


@pytest.mark.integration  # imports TRL (and transformers' Trainer): a few seconds
@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_dpo_loss_and_metrics_match_trls_dpo_trainer(sft_weight):
    """TRL 1.16's DPOTrainer._compute_loss on the same fixed per-token log-probs (its model
    forward stubbed to return them, reference log-probs precomputed): same loss, reward
    accuracy and mean margin as fedlora's; with an SFT weight, TRL's loss_type ["sigmoid",
    "sft"] weighted [1, w] against fedlora's dpo_loss + w * sft_loss."""
    import torch
    from trl.trainer.dpo_trainer import DPOTrainer

    from fedlora.client.dpo import dpo_loss, sft_loss

    per_token, mask, ref = _logps()
    shape = per_token.shape

    class Model:
        training = True

        def __call__(self, **_: object) -> SimpleNamespace:
            return SimpleNamespace(
                log_probs=per_token * mask[:, 1:],  # TRL zeroes non-completion tokens this way
                entropy=torch.zeros(shape),
                mean_logits=torch.zeros(shape),
                is_top1=torch.zeros(shape, dtype=torch.bool),
            )

    same = lambda x: x  # noqa: E731 - one process: gathering is the identity
    trainer = SimpleNamespace(
        model=Model(),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=same, gather=same),
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid", "sft"] if sft_weight else ["sigmoid"],
        loss_weights=[1.0, sft_weight] if sft_weight else [1.0],
        beta=BETA,
        use_weighting=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(8, 7, dtype=torch.long),
        "attention_mask": torch.ones(8, 7, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:4],
        "ref_rejected_logps": ref[4:],
    }
    theirs = DPOTrainer._compute_loss(trainer, trainer.model, inputs, False)
    logps = (per_token * mask[:, 1:]).sum(1)
    ours, reward_c, reward_r = dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], BETA)
    if sft_weight:
        ours = ours + sft_weight * sft_loss(logps[:4], int(mask[:4, 1:].sum()))
    seen = trainer._metrics["train"]
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    accuracy = float((reward_c > reward_r).float().mean())
    assert 0 < accuracy < 1  # the fixture ranks some pairs wrong
    assert seen["rewards/accuracies"] == [pytest.approx(accuracy)]
    assert seen["rewards/margins"] == [pytest.approx(float((reward_c - reward_r).mean()))]


def _write(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_preference_records_read_in_plain_and_chat_form(tmp_path):
    data = _write(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No.", "site": "a"},
            {
                "prompt": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say hi"},
                ],
                "chosen": [{"role": "assistant", "content": "Hi!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}],
            },
        ],
    )
    plain, chat = load_examples(DataSpec(str(data))).examples
    assert plain.kind == chat.kind == "preference"
    assert plain.turns == (Turn("user", "Say hi"), Turn("assistant", "Hi!"))
    assert plain.rejected == "No." and dict(plain.fields) == {"site": "a"}
    assert [t.role for t in chat.turns] == ["system", "user", "assistant"]
    assert chat.rejected == "Go away."
    table = tmp_path / "pairs.csv"
    table.write_text("prompt,chosen,rejected\nq,good,bad\n")
    (row,) = load_examples(DataSpec(str(table))).examples
    assert (row.turns[-1].content, row.rejected, row.source) == ("good", "bad", f"{table}:2")


def test_bad_preference_records_are_named_by_file_and_line(tmp_path):
    data = _write(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "ok", "chosen": "a", "rejected": "b"},
            {"prompt": "x", "chosen": "same", "rejected": " same "},
            {"prompt": "x", "chosen": "a"},
            {"prompt": "x", "chosen": 3, "rejected": "b"},
            {"prompt": "", "chosen": "a", "rejected": "b"},
            {"prompt": "x", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
            | {"chosen": "a", "rejected": "b"},
        ],
    )
    with pytest.raises(DataError) as err:
        load_examples(DataSpec(str(data)))
    lines = str(err.value).splitlines()[1:-1]
    expect = [
        (2, "'chosen' and 'rejected' are the same answer"),
        (3, "missing field 'rejected'"),
        (4, "'chosen' is a number, not text"),
        (5, "'prompt' is empty"),
        (6, "'rejected' is not an assistant message"),
        (7, "'prompt' ends with an assistant message"),
    ]
    assert len(lines) == len(expect), lines
    for line, (number, what) in zip(lines, expect, strict=True):
        assert line.startswith(f"{data}:{number}: {what}"), line
        assert ":" in line.split(what, 1)[1]  # ... and what to do


def test_objective_and_dpo_beta_are_validated():
    assert RunConfig().objective == "sft"
    assert RunConfig.from_mapping({"objective": "dpo", "dpo-beta": 0.5}).dpo_beta == 0.5
    with pytest.raises(ConfigError, match="objective='ppo'"):
        RunConfig.from_mapping({"objective": "ppo"})
    with pytest.raises(ConfigError, match="dpo-beta=0"):
        RunConfig.from_mapping({"dpo-beta": 0.0})


def _toy_pairs(n: int) -> list[Example]:
    """Pairs whose preferred answer is always the short 'yes' over the long refusal."""
    return [
        Example(
            source=f"toy:{i}",
            turns=(Turn("user", f"Is item {i} in stock?"), Turn("assistant", "yes")),
            rejected="I cannot tell you anything about that item.",
        )
        for i in range(n)
    ]


@pytest.mark.integration  # trains the tiny model a few steps: seconds
def test_dpo_steps_raise_preference_accuracy_and_margin(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.client.dpo import encode_pairs, evaluate_pairs, pair_batches, train_dpo
    from fedlora.client.train import TrainOptions

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    pairs = encode_pairs(tok, _toy_pairs(12), max_length=64)
    before = evaluate_pairs(model, pairs, tok.pad_token_id, BETA)
    assert before.margin == 0 and before.accuracy == 0  # the adapter starts as a no-op (B = 0)
    batches = pair_batches(pairs, 4, 6, seed=(0,), pad_id=tok.pad_token_id)
    stats = train_dpo(model, batches, TrainOptions(lr=5e-3, steps=6), BETA)
    after = evaluate_pairs(model, pairs, tok.pad_token_id, BETA)
    assert stats.first_loss == pytest.approx(math.log(2), rel=1e-4)  # -log sigmoid(0)
    assert after.accuracy == 1.0 and after.margin > 0.1 and after.loss < math.log(2)
    with model.disable_adapter():  # the reference stayed the base: the adapter off is the start
        again = evaluate_pairs(model, pairs, tok.pad_token_id, BETA)
    assert again.margin == 0


@pytest.mark.integration  # trains the tiny model a few steps, twice: seconds
def test_the_sft_weight_adds_the_chosen_answers_loss_and_keeps_them_likely(tiny_model_dir):
    """dpo-sft-weight w: the first step's loss is log 2 + w x the chosen answers' mean
    next-token loss under the base, and after the same steps on the same batches the chosen
    answers are more likely than after DPO alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.client.dpo import pair_batch, pair_batches, pair_logps, sft_loss, train_dpo
    from fedlora.client.train import TrainOptions
    from fedlora.dpo import encode_pairs
    from fedlora.prompting import IGNORE

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = encode_pairs(tok, _toy_pairs(12), max_length=64)
    whole = pair_batch(pairs, tok.pad_token_id)

    def chosen_logp(model):
        with torch.no_grad():
            return float(pair_logps(model, whole)[0].mean())

    results = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        first = next(pair_batches(pairs, 4, 1, seed=(0,), pad_id=tok.pad_token_id))
        with torch.no_grad():
            own = int((first["labels"][:4, 1:] != IGNORE).sum())
            nll = float(sft_loss(pair_logps(model, first)[0], own))
        batches = pair_batches(pairs, 4, 6, seed=(0,), pad_id=tok.pad_token_id)
        stats = train_dpo(model, batches, TrainOptions(lr=5e-3, steps=6), BETA, weight)
        assert stats.first_loss == pytest.approx(math.log(2) + weight * nll, rel=1e-4)
        results[weight] = chosen_logp(model)
    assert nll > 0.1  # the base does not already give the chosen answers probability 1
    assert results[1.0] > results[0.0] + 0.1


def test_dpo_sft_weight_is_validated_in_the_run_and_the_round_config():
    from fedlora.protocol.messages import ProtocolError, RoundConfig

    dpo = {"objective": "dpo"}
    assert RunConfig.from_mapping(dpo | {"dpo-sft-weight": 1.0}).dpo_sft_weight == 1.0
    with pytest.raises(ConfigError, match="dpo-sft-weight"):
        RunConfig.from_mapping(dpo | {"dpo-sft-weight": -1.0})
    with pytest.raises(ConfigError, match='applies to objective = "dpo" only'):
        RunConfig.from_mapping({"dpo-sft-weight": 0.5})  # the default objective is sft
    from fedlora.server.app import round_config

    rc = round_config(RunConfig.from_mapping({"objective": "dpo", "dpo-sft-weight": 0.5}))
    assert rc.dpo_sft_weight == 0.5
    record = rc.to_record()
    record["dpo-sft-weight"] = -1.0
    with pytest.raises(ProtocolError, match="dpo-sft-weight=-1.0"):
        RoundConfig.from_record(record)


@pytest.mark.integration  # a 3-node Ray federation of the tiny model: tens of seconds
def test_a_secure_federated_dpo_round_reports_preference_metrics(tiny_model_dir, tmp_path):
    """Three nodes train with the DPO loss under SecAgg+; the nodes' held-out pairs and the
    server's central evaluation both report preference accuracy and margin."""
    from fedlora.simulations.partition import PartitionSpec, prepare
    from fedlora.simulations.run import simulate

    records = [
        {"prompt": e.turns[0].content, "chosen": e.turns[1].content, "rejected": e.rejected}
        for e in _toy_pairs(36)
    ]
    data = _write(tmp_path / "pairs.jsonl", records)
    part = prepare(str(data), tmp_path / "part", 3, PartitionSpec.parse("iid"), test_fraction=0.1)
    cfg = RunConfig.from_mapping(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "auto",
            "objective": "dpo",
            "dpo-beta": BETA,
            "num-server-rounds": 1,
            "local-steps": 3,
            "lr": 5e-3,
            "max-length": 64,
            "eval-fraction": 0.25,
            "min-nodes": 3,
            "output-dir": str(tmp_path / "run"),
            "secure-aggregation": True,
            "secagg-num-shares": 3,
            "secagg-threshold": 2,
            "secagg-clip-norm": 50.0,
            "central-eval": part.test,  # the server's held-out pairs
        }
    )
    result = simulate(cfg, partition=part)
    (record,) = result.history
    assert record["secure-aggregation"] and record["replies"] == 3
    assert record["eval-pref-accuracy"] > 0.5 and record["eval-reward-margin"] > 0
    assert all("eval-pref-accuracy" in site for site in record["sites"].values())
    assert record["central-eval-pref-accuracy"] > 0.5 and record["central-eval-reward-margin"] > 0


def test_the_checkable_task_prefers_only_the_rules_form_and_is_non_iid(tmp_path):
    """benchmarks/bench_dpo.py's task: every chosen answer follows the rule, no rejected one
    does, each site breaks it its own way (one of them the base's capitalised answer), and the
    held-out pairs mix the three."""
    from fedlora.simulations.dpo_task import SITES, complies, label_in, write_task

    folder = write_task(tmp_path / "task", max_chars=250, test_pairs=12, seed=0)
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    assert len(test) == 12 and {r["site"] for r in test} == set(SITES)
    assert all(complies(r["chosen"]) and not complies(r["rejected"]) for r in train + test)
    by_site = {s: [r["rejected"] for r in train if r["site"] == s] for s in SITES}
    assert all(len(v) >= 10 for v in by_site.values())
    assert all(a.startswith("Sentiment: ") and a[11].isupper() for a in by_site["reproductive"])
    assert all(a.startswith(("The", "This", "I ")) for a in by_site["mental"])
    assert all(
        a.lower().startswith(("sentiment: positive", "sentiment: neutral", "sentiment: negative"))
        for a in by_site["pain"]
    )
    assert not complies("Sentiment: Positive") and complies(" Sentiment: neutral ")
    assert label_in("The review is Negative, mostly") == "negative" and label_in("Sent") is None


def test_the_round_line_shows_the_preference_figures_of_a_dpo_evaluation(caplog):
    """A DPO round's console line gives the held-out pairs' preference accuracy and reward
    margin (weighted by pairs), not an accuracy it does not have."""
    import logging

    from fedlora.protocol.messages import EvalReply
    from fedlora.server.replies import record_evaluation

    replies = [
        ("a", EvalReply(3, 0.5, 1.6, 30, pref_accuracy=1.0, reward_margin=0.4)),
        ("b", EvalReply(1, 0.7, 2.0, 10, pref_accuracy=0.0, reward_margin=-0.4)),
    ]
    with caplog.at_level(logging.INFO, logger="fedlora"):
        record_evaluation(2, replies, {"sites": {}})
    (line,) = [r.getMessage() for r in caplog.records if "federated eval" in r.getMessage()]
    assert "preference accuracy 0.7500 | reward margin +0.2000" in line and "n/a" not in line
