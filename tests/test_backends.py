"""Quantization backends: each one that runs here trains LoRA on the tiny model; errors say what
to use instead; the run config's list of names does not import torch.

The first quanto-int4 run on a fresh installation compiles quanto's C++ extension (30-70 s,
once; later runs find it built). Everything else takes a few seconds.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora import precision
from fedlora.client import quantization
from fedlora.client.quantization import BACKEND_NAMES, BACKENDS, load_base
from fedlora.errors import ConfigError
from fedlora.lora import LoraSettings

pytestmark = pytest.mark.integration  # Ray federations / tiny exports: tens of seconds


def _train(model_dir: Path, name: str, steps: int = 8) -> tuple[list[float], object]:
    import torch
    from peft import get_peft_model

    torch.manual_seed(0)
    base = load_base(model_dir, name)
    model = get_peft_model(base, LoraSettings(r=4, alpha=8.0, dropout=0.0).peft_config(model_dir))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = torch.randint(
        0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)
    )
    before = [p.detach().clone() for p in trainable]
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # B starts at zero, so A gets no gradient in step 1; after that every LoRA tensor must move.
    assert all(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True))
    return losses, model


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_backend_trains_lora_with_falling_loss(tiny_model_dir, name):
    reason = BACKENDS[name].available()
    if reason is not None:
        pytest.skip(reason)

    losses, model = _train(tiny_model_dir, name)

    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # the base stays frozen


def test_unknown_backend_lists_the_names(tiny_model_dir):
    with pytest.raises(ConfigError, match="quantization='int3'") as err:
        load_base(tiny_model_dir, "int3")

    assert all(name in str(err.value) for name in BACKEND_NAMES)


def test_unavailable_backend_names_the_reason_and_the_alternatives(tiny_model_dir, monkeypatch):
    real = quantization.Backend.available

    def fake(self):
        return "it needs a CUDA GPU (none is visible)" if self.name == "nf4" else real(self)

    monkeypatch.setattr(quantization.Backend, "available", fake)
    monkeypatch.setattr(quantization, "available_backends", lambda: ["nf4", "bf16", "fp32"])

    with pytest.raises(ConfigError) as err:
        load_base(tiny_model_dir, "nf4")

    message = str(err.value)
    assert "quantization='nf4' cannot run here: it needs a CUDA GPU" in message
    assert message.endswith("Available here: bf16, fp32")


def test_compute_dtype_is_bf16_only_where_native(monkeypatch):
    import torch

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.compute_dtype("cpu") == torch.float32
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.compute_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize(("native", "expected"), [(False, "float32"), (True, "bfloat16")])
def test_auto_loads_the_machines_fast_dtype(tiny_model_dir, monkeypatch, caplog, native, expected):
    import torch

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with caplog.at_level("WARNING", logger="fedlora.precision"):
        model = load_base(tiny_model_dir, "auto")

    assert {str(p.dtype) for p in model.parameters()} == {f"torch.{expected}"}
    assert not caplog.records  # auto never picks an emulated dtype


def test_bf16_on_a_cpu_without_native_bf16_warns(tiny_model_dir, monkeypatch, caplog):
    import torch

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with caplog.at_level("WARNING", logger="fedlora.precision"):
        model = load_base(tiny_model_dir, "bf16")

    assert {str(p.dtype) for p in model.parameters()} == {"torch.bfloat16"}  # as asked
    [record] = caplog.records
    assert 'quantization="bf16"' in record.getMessage()
    assert 'quantization="auto" picks fp32 here' in record.getMessage()


def test_run_config_names_the_backends_without_importing_torch():
    code = (
        "import sys, fedlora.config as c; print('torch' in sys.modules, ','.join(c.QUANTIZATIONS))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()

    assert out == ["False", ",".join(BACKEND_NAMES)]


def test_bnb_without_cpu_kernels_says_it_needs_cuda(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from fedlora.client import quant_bnb

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(quant_bnb, "_has_kernel", lambda op, key: False)

    assert "needs a CUDA GPU" in quant_bnb.available("nf4")


def test_quanto_int4_without_a_compiler_says_so(monkeypatch):
    pytest.importorskip("optimum.quanto")
    from fedlora.client import quant_quanto

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(quant_quanto, "_extension_built", lambda ext: False)
    monkeypatch.setattr(quant_quanto.shutil, "which", lambda name: None)

    assert "needs a C++ compiler" in quant_quanto.available("int4")
    assert quant_quanto.available("int8") is None
