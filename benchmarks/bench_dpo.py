"""Federated DPO on a task whose preference a program checks (issue 36, part 3).

The pairs come from the packaged drug reviews (simulations/dpo_task.py): the prompt asks for
``Sentiment: <label>`` in lower case, the chosen answer has that form, the rejected one breaks
it, a different way on each of the three sites (non-IID, partitioned by site; two of the ways are
the base model's own answers). It trains the default model's adapter with ``objective = "dpo"``
and ``dpo-sft-weight`` 1 (``--sft-weight 0``: DPO alone) federated over the three sites with
secure aggregation (3 rounds x 4 steps of 2 pairs per site), and centralized on the pooled pairs
at the same total client steps, then scores the base and both adapters on held-out pairs from
the test split:

- preference accuracy: the share of pairs whose implicit reward beta * (log pi - log ref)
  prefers the chosen answer (0 for the base, whose reward is 0), and the mean reward margin;
- log-prob preference: the share of pairs whose chosen answer the model itself finds more
  likely (meaningful for the base too);
- compliance: the share of greedy generations that follow the rule exactly;
- rating named: the share of greedy generations naming the review's rating, in any form.

    .venv/bin/python benchmarks/bench_dpo.py --out runs/dpo-bench   # prints a table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ROW = "| {model} | {pref} | {margin} | {lp} | {comply} | {label} | {seconds} |"


def run_methods(args: argparse.Namespace, task: Path, out: Path) -> dict[str, Path]:
    """Federated (3 sites, SecAgg+) and centralized DPO; the adapter folder of each."""
    from fedlora.config import RunConfig
    from fedlora.simulations.compare import merged_partition
    from fedlora.simulations.partition import PartitionSpec, prepare
    from fedlora.simulations.run import simulate

    part = prepare(
        str(task / "train.jsonl"),
        out / "partition",
        0,
        PartitionSpec.parse("column:site"),
        test=str(task / "test.jsonl"),
    )
    fed = {
        "base-model": args.base_model,
        "quantization": "auto",
        "objective": "dpo",
        "dpo-beta": args.beta,
        "dpo-sft-weight": args.sft_weight,
        "num-server-rounds": args.rounds,
        "local-steps": args.steps,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "max-length": 256,
        "lora-layers": args.lora_layers,
        "eval-fraction": 0.15,  # each node's held-out pairs: the per-round preference metrics
        "evaluate-every": 1,
        "min-nodes": 3,
        "secure-aggregation": True,
        "secagg-num-shares": 3,
        "secagg-threshold": 2,
        "seed": args.seed,
        "output-dir": str(out / "federated"),
    }
    total = args.rounds * args.steps * part.num_clients  # the same client steps, pooled
    central = fed | {
        "num-server-rounds": 1,
        "local-steps": total,
        "min-nodes": 1,
        "secure-aggregation": False,  # one node: no sum to hide it in
        "output-dir": str(out / "centralized"),
    }
    timings: dict[str, float] = {}
    adapters: dict[str, Path] = {}
    pooled = merged_partition(part, list(range(part.num_clients)), out / "pooled")
    for name, values, partition in (("federated", fed, part), ("centralized", central, pooled)):
        start = time.perf_counter()
        result = simulate(RunConfig.from_mapping(values, source=name), partition=partition)
        timings[name] = time.perf_counter() - start
        adapters[name] = result.adapter_dir
        (out / f"{name}-history.json").write_text(json.dumps(result.history, indent=1))
    (out / "timings.json").write_text(json.dumps(timings))
    return adapters


def score(model: Any, tok: Any, examples: list[Any], beta: float) -> dict[str, float]:
    """Preference accuracy, margin, log-prob preference and greedy compliance."""
    import torch

    from fedlora.client.dpo import encode_pairs, pair_batch, pair_logps

    pairs = encode_pairs(tok, examples, 256)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rewards, own, ref_own = [], [], []
    with torch.no_grad():
        for i in range(0, len(pairs), 8):
            chosen, rejected, ref_c, ref_r = pair_logps(model, pair_batch(pairs[i : i + 8], pad))
            rewards += (beta * ((chosen - ref_c) - (rejected - ref_r))).tolist()
            own += (chosen > rejected).tolist()
            ref_own += (ref_c > ref_r).tolist()
    answers = generate(model, tok, examples)
    return answer_scores(answers, examples) | {
        "pref": sum(r > 0 for r in rewards) / len(rewards),
        "margin": sum(rewards) / len(rewards),
        "lp": sum(own) / len(own),
        "base-lp": sum(ref_own) / len(ref_own),
    }


def answer_scores(answers: list[str], examples: list[Any]) -> dict[str, Any]:
    """Compliance with the rule, and the share of answers naming the review's rating (in any
    form: what they say, not how)."""
    from fedlora.simulations.dpo_task import complies, label_in

    gold = [label_in(e.turns[-1].content) for e in examples]
    return {
        "comply": sum(complies(a) for a in answers) / len(answers),
        "label": sum(label_in(a) == g for a, g in zip(answers, gold, strict=True)) / len(answers),
        "answers": answers[:6],
    }


def generate(model: Any, tok: Any, examples: list[Any], per_batch: int = 8) -> list[str]:
    """Greedy answers to the examples' prompts (8 new tokens: enough to show a broken form)."""
    import torch

    tok.padding_side = "left"
    answers: list[str] = []
    for i in range(0, len(examples), per_batch):
        chats = [
            [{"role": "user", "content": e.turns[0].content}] for e in examples[i : i + per_batch]
        ]
        enc = tok.apply_chat_template(
            chats, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
        )
        with torch.no_grad():
            ids, mask = enc["input_ids"], enc["attention_mask"]
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False
            )
        answers += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def evaluate(
    adapters: dict[str, Path], task: Path, beta: float, base_model: str
) -> dict[str, dict[str, Any]]:
    """The base and each adapter on the held-out pairs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.basemodel import resolve_base_model
    from fedlora.data.formats import DataSpec, load_examples
    from fedlora.precision import compute_dtype

    base_dir = resolve_base_model(base_model)
    tok = AutoTokenizer.from_pretrained(base_dir)
    examples = load_examples(DataSpec(str(task / "test.jsonl"))).examples
    results: dict[str, dict[str, Any]] = {}
    # bf16 where the CPU has it natively, fp32 elsewhere (bf16 is emulated, and slow, on AVX2)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=compute_dtype("cpu"))
    for name, folder in adapters.items():
        start = time.perf_counter()
        model = PeftModel.from_pretrained(base, str(folder))
        model.eval()
        results[name] = score(model, tok, examples, beta) | {"seconds": 0.0}
        results[name]["eval-seconds"] = time.perf_counter() - start
        base = model.unload()  # the base without this adapter, for the next one
    start = time.perf_counter()
    answers = generate(base, tok, examples)
    first = next(iter(results.values()))
    results = {
        "base": answer_scores(answers, examples)
        | {
            "pref": 0.0,
            "margin": 0.0,
            "lp": first["base-lp"],
            "eval-seconds": time.perf_counter() - start,
        }
    } | results
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/dpo-bench"))
    parser.add_argument("--base-model", default="default")  # a tiny folder for a smoke run
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    # the chosen answers' next-token loss added to DPO's (RPO); 0 = DPO alone
    parser.add_argument("--sft-weight", type=float, default=1.0)
    parser.add_argument("--lora-layers", type=int, default=8)
    parser.add_argument("--max-chars", type=int, default=250)
    parser.add_argument("--test-pairs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate-only", action="store_true", help="score an earlier run's")
    args = parser.parse_args()
    from fedlora.simulations.dpo_task import write_task

    start = time.perf_counter()
    task = write_task(args.out / "task", args.max_chars, args.test_pairs, args.seed)
    if args.evaluate_only:  # score the adapters an earlier run of the same --out trained
        adapters = {n: args.out / n / "global-adapter" for n in ("federated", "centralized")}
        missing = [str(a) for a in adapters.values() if not (a / "adapter_config.json").is_file()]
        if missing:
            parser.error(f"--evaluate-only: no adapter in {', '.join(missing)}; train first")
    else:
        adapters = run_methods(args, task, args.out)
    results = evaluate(adapters, task, args.beta, args.base_model)
    timings = json.loads((args.out / "timings.json").read_text())
    for name, res in results.items():
        res["seconds"] = timings.get(name, 0.0)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"bench_dpo {vars(args)} ({time.perf_counter() - start:.0f} s in all)")
    print(
        "| model | preference accuracy | reward margin | log-prob preference | "
        "compliance | rating named | train s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        print(
            ROW.format(
                model=name,
                pref=f"{res['pref']:.1%}",
                margin=f"{res['margin']:+.3f}",
                lp=f"{res['lp']:.1%}",
                comply=f"{res['comply']:.1%}",
                label=f"{res['label']:.1%}",
                seconds=f"{res['seconds']:.0f}",
            )
        )
    for name, res in results.items():
        print(f"{name} answers: {res['answers']}")


if __name__ == "__main__":
    main()
