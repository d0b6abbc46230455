"""The planner (fedlora.plan, fedlora.planner, ``fedlora plan``) against the real things it
predicts: the model's parameters, peft's trainable tensors, the wire encoders' output, the
tensors autograd saves, and a measured peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedlora.config import RunConfig
from fedlora.plan import (
    RUNTIME_BYTES,
    Budget,
    activation_bytes,
    largest_batch,
    memory,
    needs_gradient_checkpointing,
    read_shape,
    traffic,
)
from fedlora.planner import make_plan, with_budget

ROOT = Path(__file__).resolve().parents[1]


def _peft_model(model_dir: Path, cfg: RunConfig, quantization: str = "fp32") -> Any:
    from peft import get_peft_model

    from fedlora.client.quantization import load_base

    return get_peft_model(load_base(model_dir, quantization), cfg.lora.peft_config(model_dir))


def test_shape_counts_the_real_models_parameters(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    real = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert read_shape(tiny_model_dir).params == real
    assert read_shape(tiny_model_dir / "config.json").params == real


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_adapter_values_are_peft_trainable_count(tiny_model_dir: Path, targets: str) -> None:
    cfg = RunConfig(quantization="fp32", lora_r=4, target_modules=targets)
    model = _peft_model(tiny_model_dir, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = make_plan(cfg, tiny_model_dir)
    assert plan.budget.adapter_params == trainable
    assert plan.budget.trained_params == trainable  # fedit trains A and B
    ffa = make_plan(replace(cfg, strategy="ffa-lora"), tiny_model_dir)
    b_only = sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n)
    assert ffa.budget.trained_params == b_only == ffa.traffic.values


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "int8-block"])
def test_plain_bytes_are_the_encoders_output(tiny_model_dir: Path, codec: str) -> None:
    from fedlora.lora import adapter_shapes, initial_adapter
    from fedlora.protocol.compression import encode, nbytes

    cfg = RunConfig(lora_r=4, codec=codec, codec_block=16, down_codec=codec)
    adapter = initial_adapter(adapter_shapes(tiny_model_dir, cfg.lora), seed=0)
    planned = make_plan(cfg, tiny_model_dir).traffic
    real = nbytes(encode(adapter, codec, block=16))
    assert planned.up_plain == real
    assert planned.down == real
    assert planned.down_first == (real if codec == "none" else 0)


@pytest.mark.parametrize("wire_bits", [16, 32, 64])
def test_secure_bytes_are_the_masked_vector(tiny_model_dir: Path, wire_bits: int) -> None:
    from fedlora.lora import adapter_shapes, initial_adapter
    from fedlora.protocol.secagg_encoding import (
        encode_update,
        flatten,
        scalar_slots,
        to_wire,
        weighted_vector,
    )
    from fedlora.server.app import secagg_settings

    cfg = RunConfig(lora_r=4, secure_aggregation=True, min_nodes=3, secagg_wire_bits=wire_bits)
    shapes = adapter_shapes(tiny_model_dir, cfg.lora)
    settings = secagg_settings(cfg, 3)
    vec = flatten(initial_adapter(shapes, seed=0), shapes)
    masked = to_wire(
        weighted_vector(encode_update(vec, 1, settings, seed=1), 1, settings), settings
    )
    limbs = scalar_slots(settings) * wire_bits // 8  # the summed scalars, not in the plan
    assert make_plan(cfg, tiny_model_dir).traffic.up_secure == masked.nbytes - limbs


def _saved_bytes(model: Any, batch: dict[str, Any], autocast: Any) -> int:
    """Bytes of the distinct tensors autograd saves in a forward pass (parameters excluded)."""
    import torch

    from fedlora.prompting import answer_logits

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        answer_logits(model, batch)
    return sum(seen.values())


@pytest.mark.parametrize(("quantization", "lora_layers"), [("fp32", 0), ("bf16", 0), ("fp32", 1)])
def test_activations_are_what_autograd_saves(
    tiny_model_dir: Path, quantization: str, lora_layers: int
) -> None:
    import torch

    from fedlora.client.train import _lora_in_compute_dtype, _training_attention
    from fedlora.prompting import Encoded, collate

    cfg = RunConfig(quantization=quantization, batch_size=3, max_length=96, lora_layers=lora_layers)
    model = _peft_model(tiny_model_dir, cfg, quantization)
    params = [p for p in model.parameters() if p.requires_grad]
    _training_attention(model, "cpu").use(cfg.max_length)  # eager, as train_lora on CPU
    model.train()
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 400, (cfg.max_length,), generator=gen).tolist() for _ in range(3)]
    batch = collate([Encoded(r, r, False) for r in rows], 0)
    measured = _saved_bytes(model, batch, _lora_in_compute_dtype(model, params))
    plan = make_plan(cfg, tiny_model_dir)
    assert plan.step.compute == quantization
    assert plan.step.grad_layers == (lora_layers or plan.shape.layers)
    planned = activation_bytes(plan.shape, plan.step)
    # not counted: the mask and, in bf16, autocast's copies of the LoRA weights (1%)
    assert planned == pytest.approx(measured, rel=0.015 if quantization == "bf16" else 1e-6)


def test_budget_answers_agree_with_the_memory_model(tiny_model_dir: Path) -> None:
    plan = make_plan(RunConfig(quantization="fp32", max_length=512), tiny_model_dir)
    b = plan.budget

    def peak(batch: int, ckpt: bool = False) -> int:
        step = replace(plan.step, batch_size=batch, checkpointing=ckpt)
        return memory(plan.shape, step, "fp32", b.adapter_params, b.trained_params).peak

    budget = (peak(37) + peak(38)) // 2
    fitted = with_budget(plan, budget)
    assert fitted.largest_batch == 37
    assert fitted.largest_batch_checkpointed > 37  # checkpointing saves activations
    assert largest_batch(lambda n: peak(n) <= RUNTIME_BYTES) == 0
    between = (peak(4, ckpt=True) + peak(4)) // 2
    step = replace(plan.step, batch_size=4)
    sized = Budget(between, b.adapter_params, b.trained_params)
    assert needs_gradient_checkpointing(plan.shape, step, "fp32", sized)
    assert not needs_gradient_checkpointing(plan.shape, step, "fp32", replace(sized, bytes=peak(4)))
    assert not needs_gradient_checkpointing(plan.shape, step, "fp32", replace(sized, bytes=1))


def test_cli_prints_a_table_and_answers_memory(tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from fedlora.cli import cli

    args = ["plan", "--base-model", str(tiny_model_dir), "--quantization", "fp32", "--plain"]
    result = CliRunner().invoke(cli, [*args, "--memory", "0.6", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    for item in ("weights", "activations", "optimizer", "PEAK", "up per round (SecAgg+)"):
        assert item in result.output
    cfg = RunConfig(quantization="fp32", batch_size=8)
    expected = with_budget(make_plan(cfg, tiny_model_dir), int(0.6 * 2**30))
    line = next(x for x in result.output.splitlines() if "largest batch " in x)
    assert line.split()[-1] == str(expected.largest_batch) and expected.largest_batch > 8
    table = CliRunner().invoke(cli, ["plan", "--base-model", str(tiny_model_dir)])
    assert table.exit_code == 0 and "fedlora plan" in table.output
    bad = CliRunner().invoke(cli, ["plan", "--base-model", str(tiny_model_dir / "nope")])
    assert bad.exit_code != 0


def test_planner_constants_follow_the_client() -> None:
    from fedlora.client.quantization import resolve_auto as client_auto
    from fedlora.client.train import EAGER_MAX_LENGTH
    from fedlora.plan import EAGER_MAX_LENGTH as PLANNED
    from fedlora.planner import resolve_auto

    assert PLANNED == EAGER_MAX_LENGTH
    for device in ("cpu", "cuda"):
        assert resolve_auto("auto", device) == client_auto(device)


def test_secagg_limbs_are_all_the_plan_leaves_out() -> None:
    """The plan's secure bytes omit only the scalar limbs: a few hundred bytes at most."""
    shapes = {"base_model.model.x.lora_A.weight": (4, 8)}
    t = traffic(shapes, "none", "none", 64, 16)
    assert t.up_secure == (1 + 32) * 2 and t.values == 32 and t.up_plain == 32 * 4


WORKER = """
import json, sys
from pathlib import Path
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss keeps the forking parent's)
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(l for l in status if l.startswith("VmHWM:")).split()[1]) * 1024
import torch
from peft import get_peft_model
from fedlora.client.quantization import load_base
from fedlora.client.train import TrainOptions, train_lora
from fedlora.config import RunConfig
from fedlora.prompting import Encoded, collate
runtime = peak()
folder, cfg = Path(sys.argv[1]), RunConfig(quantization="fp32", batch_size=8, max_length=256)
model = get_peft_model(load_base(folder, "fp32"), cfg.lora.peft_config(folder))
gen = torch.Generator().manual_seed(0)
def batches():
    while True:
        rows = [torch.randint(3, 8000, (256,), generator=gen).tolist() for _ in range(8)]
        yield collate([Encoded(r, r, False) for r in rows], 0)
train_lora(model, batches(), TrainOptions(lr=1e-3, steps=1))
print(json.dumps({"runtime": runtime, "peak": peak()}))
"""


@pytest.mark.integration
def test_planned_peak_matches_a_measured_training_step(tmp_path: Path) -> None:
    """A small model whose activations and logits outweigh the runtime, trained for one step in
    a fresh process (glibc's mmap threshold fixed, so RSS follows the live tensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    plan = make_plan(RunConfig(quantization="fp32", batch_size=8, max_length=256), tmp_path)
    live = max(plan.memory.live_peak, plan.memory.load_peak)
    planned = live - RUNTIME_BYTES + measured["runtime"]  # this machine's runtime
    assert plan.memory.activations + plan.memory.logits > 0.4 * measured["peak"]  # not runtime
    assert planned == pytest.approx(measured["peak"], rel=0.15)


@pytest.mark.integration  # a subprocess that imports torch and transformers (8 s)
def test_planner_loads_no_flower(tiny_model_dir: Path) -> None:
    code = (
        "import sys\nfrom pathlib import Path\nfrom fedlora.config import RunConfig\n"
        "from fedlora.planner import make_plan, plain\n"
        f"print(plain(make_plan(RunConfig(secure_aggregation=True, min_nodes=2), "
        f"Path({str(tiny_model_dir)!r}))))\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'flwr'], 'flwr imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PEAK" in done.stdout
