"""Quantized ONNX variants (int8, int4) with task gates, on the tiny model and a foreign task.

The held-out task here is not drug reviews: a chat JSONL of sums written in words ("What is two
plus three?" -> "five"), scored as a label task; the gates run on it with the edge runtime alone.
A variant whose weights are corrupted after quantization must stop the export with GateError and
every measured number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedlora.errors import ConfigError
from fedlora.export.gates import (
    DEFAULT_THRESHOLDS,
    GateError,
    GateThresholds,
    TaskFigures,
    degenerate,
    judge,
    parse_overrides,
)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STEPS = 40  # LoRA steps on the task before export


def _sums_jsonl(path: Path, n: int = 24) -> Path:
    rows = []
    for k in range(n):
        a, b = k % 5, (k * 3) % 5
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {WORDS[a]} plus {WORDS[b]}?"},
                    {"role": "assistant", "content": WORDS[a + b]},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _adapter(base_dir: Path, out: Path, examples) -> Path:
    """A LoRA adapter trained a little on the task: the tiny model's answer perplexity falls from
    about 560 (uniform over its vocabulary) to about 200, so a broken variant stands out."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.client.train import TrainOptions, sample_batches, train_lora
    from fedlora.encoding import encode_examples

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    rows, _ = encode_examples(tok, list(examples), 128)
    batches = sample_batches(rows, 8, STEPS, seed=(0,), pad_id=tok.pad_token_id)
    train_lora(peft_model, batches, TrainOptions(lr=1e-2, steps=STEPS))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory):
    from fedlora.data.formats import DataSpec, load_examples

    path = _sums_jsonl(tmp_path_factory.mktemp("sums") / "sums.jsonl")
    return load_examples(DataSpec(str(path))).examples


@pytest.mark.integration
def test_int8_and_int4_variants_are_built_gated_and_carded(
    tiny_model_dir: Path, task, tmp_path: Path
) -> None:
    import onnx

    from fedlora.export.pipeline import export_adapter

    adapter = _adapter(tiny_model_dir, tmp_path / "lora", task)
    prompt = [{"role": "user", "content": task[0].turns[0].content}]
    report = export_adapter(
        tiny_model_dir,
        adapter,
        tmp_path / "bundle",
        prompt,
        quantize=("int8", "int4"),
        eval_examples=task,
        labels=WORDS,
        # A random tiny model's logits are nearly flat, so its greedy text flips on any
        # rounding: agreement is not gated here (the real model's is, in bench-edge); accuracy
        # and answer perplexity are.
        thresholds={
            "int8": GateThresholds(1.0, 1.05, 0.0),
            "int4": GateThresholds(25.0, 1.5, 0.0),
        },
        greedy_prompts=8,
    )
    names = [v.name for v in report.variants]
    assert names == ["fp32", "int8", "int4"]
    sizes = {v.name: v.size_mib for v in report.variants}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
    for name in ("int8", "int4"):
        graph = onnx.load(str(tmp_path / "bundle" / f"onnx-{name}" / "model.onnx")).graph
        ops = [n.op_type for n in graph.node]
        assert "MatMulNBits" in ops
        assert (tmp_path / "bundle" / f"onnx-{name}" / "tokenizer.json").is_file()
    assert report.reference is not None and report.reference.n == len(task)
    assert report.reference.metric == "label accuracy"
    assert all(g.passed for g in report.gates), [g.failures for g in report.gates]
    int8 = report.gates[0]
    assert int8.variant == "int8" and abs(int8.perplexity_ratio - 1) < 0.05
    card = json.loads((tmp_path / "bundle" / "model-card.json").read_text())
    carded = {v["name"]: v for v in card["variants"]}
    assert set(carded) == {"fp32", "int8", "int4"}
    figures = carded["int8"]["gates"]["task"]["figures"]
    assert figures["examples"] == len(task) and figures["perplexity-ratio-vs-fp32"] > 0
    assert carded["int4"]["gates"]["quantization"]["block_size"] == 32
    # every variant folder runs in onnxruntime-genai too (tests/test_genai_bundle.py)
    for name, folder in (("fp32", "onnx"), ("int8", "onnx-int8"), ("int4", "onnx-int4")):
        assert (tmp_path / "bundle" / folder / "genai_config.json").is_file()
        assert carded[name]["genai"] == "genai_config.json"
    assert "int8" in (tmp_path / "bundle" / "MODEL_CARD.md").read_text()


@pytest.mark.integration
def test_a_corrupted_quantized_model_stops_the_export_with_its_numbers(
    tiny_model_dir: Path, task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx
    from onnx import numpy_helper

    import fedlora.export.pipeline as pipeline

    real = pipeline.quantize_variant

    def corrupting(fp32_dir, out_dir, variant, settings=None):
        folder = real(fp32_dir, out_dir, variant, settings)
        path = folder / "model.onnx"
        model = onnx.load(str(path))
        rng = np.random.default_rng(0)
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.UINT8:  # packed MatMulNBits weights
                values = numpy_helper.to_array(init)
                noise = rng.integers(0, 256, values.shape, dtype=np.uint8)
                init.CopyFrom(numpy_helper.from_array(noise, init.name))
        onnx.save(model, str(path))
        return folder

    monkeypatch.setattr(pipeline, "quantize_variant", corrupting)
    adapter = _adapter(tiny_model_dir, tmp_path / "lora", task)
    prompt = [{"role": "user", "content": task[0].turns[0].content}]
    with pytest.raises(GateError) as caught:
        pipeline.export_adapter(
            tiny_model_dir,
            adapter,
            tmp_path / "bundle",
            prompt,
            quantize=("int8",),
            eval_examples=task,
            labels=WORDS,
            thresholds={"int8": GateThresholds(1.0, 1.05, 0.0)},  # as in the passing test
            greedy_prompts=8,
        )
    text = str(caught.value)
    assert "x fp32's" in text  # the answer perplexity gate caught it
    assert "int8" in text and "FAILED" in text and "fp32: label accuracy" in text
    assert "answer perplexity" in text and "greedy agreement" in text
    assert "leave int8 out (--quantize none" in text  # what to do next
    assert "--gate int8.max-accuracy-drop=N" in text
    assert not (tmp_path / "bundle" / "model-card.json").exists()  # nothing ships


def _figures(acc: float, ppl: float, greedy: list[list[int]], bad: int = 0) -> TaskFigures:
    return TaskFigures(10, acc, "label accuracy", ppl, greedy, bad)


def test_judge_applies_every_threshold() -> None:
    ref = _figures(0.80, 2.0, [[1, 2], [3, 4]])
    ok = judge("int8", ref, _figures(0.80, 2.05, [[1, 2], [3, 4]]), DEFAULT_THRESHOLDS["int8"])
    assert ok.passed and ok.accuracy_drop == pytest.approx(0.0)
    worse = _figures(0.70, 2.5, [[1, 2], [3, 9]], bad=1)
    bad = judge("int8", ref, worse, GateThresholds(1, 1.05, 0.9))
    assert bad.greedy_agreement == pytest.approx(0.75)  # (2/2 + 1/2) / 2
    assert not bad.passed and len(bad.failures) == 4
    assert "10.0 points below" in bad.failures[0] and "1.250x" in bad.failures[1]


def test_degeneration_check() -> None:
    assert degenerate("", [])
    assert degenerate("   ", [5])
    assert degenerate("ok \ufffd", [1, 2])
    assert degenerate("la la la", [7, 8] * 10)
    assert not degenerate("negative", [1, 2])
    assert not degenerate("a varied sentence", list(range(20)))


def test_gate_overrides_parse_and_name_bad_input() -> None:
    out = parse_overrides(["int4.max-accuracy-drop=3", "int8.min-greedy-agreement=0.5"])
    assert out["int4"].max_accuracy_drop == 3 and out["int8"].min_greedy_agreement == 0.5
    assert out["int8"].max_accuracy_drop == DEFAULT_THRESHOLDS["int8"].max_accuracy_drop
    for bad in ("int4=3", "int9.max-accuracy-drop=1", "int4.speed=2", "int4.max-accuracy-drop=x"):
        with pytest.raises(ConfigError, match="--gate"):
            parse_overrides([bad])
    with pytest.raises(ConfigError):
        GateThresholds(-1, 1.0, 0.5)


def _cli(*args: str, cwd: Path):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.integration
def test_cli_exports_a_foreign_task_with_gates_on_its_own_data(
    tiny_model_dir: Path, task, tmp_path: Path
) -> None:
    # A chat JSONL that is not drug reviews: the gates and the parity prompt come from it.
    data = _sums_jsonl(tmp_path / "held-out.jsonl")
    adapter = _adapter(tiny_model_dir, tmp_path / "lora", task)
    args = ["export", "--adapter", str(adapter), "--base-model", str(tiny_model_dir)]
    args += ["--output", "bundle", "--eval-data", str(data), "--eval-labels", ",".join(WORDS)]
    args += ["--quantize", "int8,int4", "--gate", "int8.min-greedy-agreement=0"]
    args += ["--gate", "int4.min-greedy-agreement=0", "--gate", "int4.max-accuracy-drop=25"]
    args += ["--gate", "int4.max-perplexity-ratio=1.5"]
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "What is zero plus zero?" in result.stdout  # the parity prompt is the data's own
    assert "int8: label accuracy" in result.stdout and "int4: label accuracy" in result.stdout
    card = json.loads((tmp_path / "bundle" / "model-card.json").read_text())
    assert [v["name"] for v in card["variants"]] == ["fp32", "int8", "int4"]
    assert card["evaluation-data"]["name"] == str(data)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--quantize", "int3"], "unknown variant 'int3'"),
        (["--gate", "int8.speed=1"], "--gate 'int8.speed=1'"),
        (["--block-size", "48"], "block-size=48"),
        (["--eval-samples", "0"], "--eval-samples 0"),
    ],
)
def test_cli_export_options_fail_in_one_line(tmp_path: Path, args, expected) -> None:
    result = _cli("export", "--adapter", str(tmp_path), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
