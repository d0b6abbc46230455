"""fp32 parity of the default model's export on adapters of several tasks and seeds, and two
broken exports.

Usage (after ``make demo``; 8 minutes on 2 cores, about 5 with ``--no-train``)::

    .venv/bin/python benchmarks/parity_sweep.py [--no-train]

Exports, with the graph ``fedlora export`` ships (``--graph auto``), the base model, the demo's
trained adapter (``runs/demo/global-adapter``, drug reviews) and two adapters with random B (r 8,
B ~ N(0, 0.02), seeds 1 and 2; A as PEFT initialises it), and checks each with
:func:`fedlora.export.parity.check_parity` on a held-out review. Then it trains adapters on two
tasks that are not drug reviews, as a user would: a chat JSONL file is written (numbers written
in words, seeds 0 and 1; two-number addition, seed 0), ``fedlora simulate --data`` trains on it
(2 clients, 2 rounds of 8 steps, the test file scored centrally) and ``fedlora export
--eval-data`` exports the global adapter with the parity gate on that task's own held-out prompt.
Then two deliberately broken exports must fail: the adapter lost in the merge (the base's ONNX
model checked against the merged demo model) and a KV cache that loses its oldest position at
every decode step. One line per case: PASS or FAIL and the gate's figures.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["-", "-", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def in_words(n: int) -> str:
    """0 <= n < 1000 in English words: 347 -> 'three hundred forty-seven'."""
    hundreds, rest = divmod(n, 100)
    parts = [f"{_ONES[hundreds]} hundred"] if hundreds else []
    if rest or not parts:
        unit = f"-{_ONES[rest % 10]}" if rest % 10 else ""
        parts.append(_ONES[rest] if rest < 20 else _TENS[rest // 10] + unit)
    return " ".join(parts)


def _numbers(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(1000)
    return f"Write the number {n} in words.", in_words(n)


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10, 500), rng.randrange(10, 500)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "numbers-in-words": _numbers,
    "addition": _addition,
}
TRAINED = (("numbers-in-words", 0), ("numbers-in-words", 1), ("addition", 0))
RECIPE = """quantization = "auto"
local-steps = 8
batch-size = 4
lr = 0.002
seed = {seed}
central-eval-samples = 40
"""


def write_task(path: Path, task: str, n: int, seed: int) -> Path:
    """``n`` one-turn chat examples of ``task`` as JSONL, drawn with ``seed``."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            question, answer = TASKS[task](rng)
            turns = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def _fedlora(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("fedlora")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)


def trained_case(root: Path, task: str, seed: int) -> str:
    """Train an adapter on ``task`` with ``fedlora simulate`` and export it with ``fedlora
    export`` on the task's own held-out data; one line: PASS/FAIL and the figures."""
    work = root / f"{task}-seed{seed}"
    work.mkdir()
    train = write_task(work / "train.jsonl", task, 240, seed)
    test = write_task(work / "test.jsonl", task, 40, 1000 + seed)
    (work / "run.toml").write_text(RECIPE.format(seed=seed))
    run = work / "run"
    sim = _fedlora(
        "simulate", "--config", str(work / "run.toml"), "--data", str(train), "--test",
        str(test), "--num-clients", "2", "--partition", "iid", "--rounds", "2", "-o", str(run),
    )  # fmt: skip
    name = f"{task} adapter, seed {seed} (trained)"
    if sim.returncode != 0:
        return f"{name}: ERROR simulate exited {sim.returncode}: {sim.stderr.strip()[-500:]}"
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = (
        "train loss per round "
        + "/".join(f"{rec['train-loss']:.2f}" for rec in history)
        + ", test loss "
        + "/".join(f"{rec['central-eval-loss']:.2f}" for rec in history)
    )
    exp = _fedlora(
        "export", "--adapter", str(run / "global-adapter"), "--eval-data", str(test),
        "--quantize", "none", "-o", str(work / "export"),
    )  # fmt: skip
    if exp.returncode != 0:
        tail = (exp.stdout + exp.stderr).strip().splitlines()[-3:]
        return f"{name}: FAIL ({losses}) " + " | ".join(tail)
    card = json.loads((work / "export" / "model-card.json").read_text())
    figures = card["variants"][0]["gates"]["parity"]["figures"]
    return (
        f"{name}: PASS ({losses}) "
        f"max |logits diff| vs fp64 {figures['max-abs-logits-diff-vs-fp64']:.2e}, cached "
        f"decode {figures['cached-decode-diff-vs-fp64']:.2e}, PyTorch fp32 "
        f"{figures['torch-fp32-vs-fp64']:.2e}, tolerance {figures['tolerance']:.2e}, "
        f"same greedy tokens {figures['same-greedy-tokens']}"
    )


def _random_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-train", action="store_true", help="skip the trained other tasks")
    args = parser.parse_args()
    from fedlora.basemodel import resolve_base_model
    from fedlora.data.drugreview import load_split
    from fedlora.export.merge import merge_adapter
    from fedlora.export.onnx import export_onnx
    from fedlora.export.parity import ParityError, check_parity
    from fedlora.export.runtime import EdgeModel
    from fedlora.prompting import messages

    demo = Path("runs/demo/global-adapter")
    if not demo.is_dir():
        print(f"{demo}: missing; run `make demo` first")
        return 2
    root = Path(tempfile.mkdtemp(prefix="parity-sweep-"))
    base = resolve_base_model("default")
    prompt = messages(load_split("test")[150].text)  # outside the demo's 150 scored reviews

    def case(name: str, merged: Path, onnx_dir: Path) -> None:
        try:
            print(f"{name}: PASS {check_parity(merged, onnx_dir, prompt).summary()}", flush=True)
        except ParityError as exc:
            print(f"{name}: FAIL {exc.report.summary() if exc.report else exc}", flush=True)

    try:
        base_onnx = export_onnx(base, root / "base-onnx")
        case("base model", base, base_onnx)
        merged = merge_adapter(base, demo, root / "demo-merged")
        demo_onnx = export_onnx(merged, root / "demo-onnx")
        case("demo adapter (drug reviews, trained)", merged, demo_onnx)
        for seed in (1, 2):
            adapter = _random_adapter(base, root / f"random-{seed}", seed)
            other = merge_adapter(base, adapter, root / f"random-{seed}-merged")
            case(
                f"random-B adapter, seed {seed}",
                other,
                export_onnx(other, root / f"random-{seed}-onnx"),
            )
        if not args.no_train:
            for task, seed in TRAINED:
                print(trained_case(root, task, seed), flush=True)
        case("BROKEN: adapter lost in the merge", merged, base_onnx)
        real_run = EdgeModel._run

        def cut(self: EdgeModel, ids: Any, past: Any, past_len: int) -> Any:
            if past_len > 1:
                past = {name: value[:, :, 1:, :] for name, value in past.items()}
                past_len = next(iter(past.values())).shape[2]
            return real_run(self, ids, past, past_len)

        EdgeModel._run = cut  # type: ignore[method-assign]
        case("BROKEN: KV cache losing its oldest position", merged, demo_onnx)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
