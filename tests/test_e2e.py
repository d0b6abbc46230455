"""The whole pipeline on the tiny model: 3 simulated sites (Ray), 2 rounds, export, ONNX Runtime."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedlora.config import RunConfig
from fedlora.prompting import messages

pytestmark = pytest.mark.integration  # Ray federations / tiny exports: tens of seconds


@pytest.fixture(scope="module")
def federation(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from fedlora.simulations.run import simulate

    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig.from_mapping(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "nf4",
            "num-server-rounds": 2,
            "local-steps": 3,
            "lr": 5e-3,
            "sites": "reproductive,mental,pain",
            "output-dir": str(out),
            "central-eval": "drugreview",
            "central-eval-samples": 12,
        }
    )
    return cfg, simulate(cfg)


def test_every_site_trains_in_every_round(federation):
    _cfg, result = federation
    assert [r["round"] for r in result.history] == [1, 2]
    for record in result.history:
        assert set(record["sites"]) == {"reproductive", "mental", "pain"}
        assert record["dropped"] == 0 and np.isfinite(record["train-loss"])
        assert record["num-examples"] == 138 + 133 + 81  # 90 % of each site: 10 % held out


def test_every_site_evaluates_and_the_server_evaluates_centrally(federation):
    cfg, result = federation
    for record in result.history:
        assert record["eval-examples"] == 15 + 15 + 9
        assert np.isfinite(record["eval-loss"]) and 0 <= record["eval-accuracy"] <= 1
        assert all(0 <= s["eval-accuracy"] <= 1 for s in record["sites"].values())
        assert 0 <= record["central-eval-accuracy"] <= 1
    lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert "eval-accuracy" in json.loads(lines[-1])
    report = (Path(cfg.output_dir) / "report.md").read_text()
    assert "| 2 |" in report and "loss.png" in report and "accuracy.png" in report
    for plot in ("loss.png", "accuracy.png"):
        assert (Path(cfg.output_dir) / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((result.adapter_dir / "fedlora.json").read_text())
    assert meta["round"] == 2 and "eval-accuracy" in meta


def test_global_adapter_is_saved_each_round_and_moves(federation, tiny_model_dir):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    cfg, result = federation
    rounds = sorted(p.name for p in (Path(cfg.output_dir) / "rounds").iterdir())
    assert rounds == ["round-001", "round-002"]

    def b_tensors(folder: Path):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        state = get_peft_model_state_dict(PeftModel.from_pretrained(base, folder))
        return {k: v for k, v in state.items() if "lora_B" in k}

    r1 = b_tensors(Path(cfg.output_dir) / "rounds" / "round-001")
    final = b_tensors(result.adapter_dir)
    assert all(v.abs().max() > 0 for v in r1.values())  # B starts at zero: training moved it
    assert any(not torch.equal(r1[k], final[k]) for k in r1)


def test_export_of_the_federated_adapter_matches_pytorch(federation, tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from fedlora.export.pipeline import export_adapter

    _, result = federation
    report = export_adapter(
        tiny_model_dir,
        result.adapter_dir,
        tmp_path / "export",
        messages("It worked and I had no side effects."),
        max_new_tokens=8,
    )
    assert report.parity.max_abs_logits_diff <= 1e-4
    assert report.parity.same_tokens
    # The edge runtime answers from the exported folder in a process without torch.
    code = (
        "import sys; from fedlora.export.runtime import EdgeModel; "
        f"m = EdgeModel({str(report.onnx_dir)!r}); "
        "r = m.generate([{'role': 'user', 'content': 'Review: fine.'}], max_new_tokens=4); "
        "assert 'torch' not in sys.modules; print(len(r.token_ids))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert 1 <= int(done.stdout.strip()) <= 4


@pytest.mark.parametrize("strategy, optimizer", [("ffa-lora", "adam"), ("fedsa-lora", "sgd")])
def test_strategy_runs_on_the_simulation_engine(tiny_model_dir, tmp_path, strategy, optimizer):
    from safetensors.numpy import load_file

    from fedlora.lora import adapter_shapes, initial_adapter
    from fedlora.simulations.run import simulate

    cfg = RunConfig.from_mapping(
        {
            "base-model": str(tiny_model_dir),
            "quantization": "auto",
            "num-server-rounds": 2,
            "local-steps": 2,
            "lr": 5e-3,
            "sites": "mental,pain",
            "output-dir": str(tmp_path),
            "strategy": strategy,
            "server-optimizer": optimizer,
        }
    )
    result = simulate(cfg)
    assert [r["replies"] for r in result.history] == [2, 2]
    final = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    init = initial_adapter(adapter_shapes(tiny_model_dir, cfg.lora), cfg.seed)
    frozen = "lora_A" if strategy == "ffa-lora" else "lora_B"  # FFA: A shared; FedSA: B local
    for k, v in final.items():
        if frozen in k:
            np.testing.assert_array_equal(v, init[k])
    assert any(not np.array_equal(v, init[k]) for k, v in final.items() if frozen not in k)
