"""Model families: a federated round, merge, ONNX export, gates and the edge runtime on each.

One tiny random model per family (tests/tiny.py ``FAMILIES``, with the same tokenizer as the
session model): the three the fused graph claims (Llama; Mistral with a 32-token sliding window;
Qwen2 with q/k/v biases) and two it does not (Phi-3 with fused ``qkv_proj``/``gate_up_proj``;
Gemma-2 with soft-capping, alternating sliding windows and head_dim != hidden/heads), which go
through optimum's traced graph. Per family: a FedIT round (2 sites x 2 steps on an NF4 base)
then ``export_adapter`` with its parity gate and the int8 variant's task gates, and the edge
runtime answering as PyTorch does; one FedEx-LoRA round (dense residuals, merged by module
name) and one Fed-SB round (an r x r matrix folded into A), each merged and exported with
parity. These rounds run the real ServerApp loop (``run_federation``) and the real ClientApp in
this process, over a Grid that hands each message to the app (no Ray start per family); one
Phi-3 round on Flower's simulation engine (Ray) checks that path too.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from safetensors.numpy import load_file

from fedlora.config import RunConfig
from fedlora.prompting import messages

REVIEW = "It worked and I had no side effects, but I felt dizzy for a week."
LLAMA_LAYERS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# family -> the ONNX graph its export must choose, and the layers "all-linear" adapts
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "llama": ("fused", LLAMA_LAYERS),
    "mistral": ("fused", LLAMA_LAYERS),
    "qwen2": ("fused", LLAMA_LAYERS),
    "phi3": ("traced", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),  # fused layers
    "gemma2": ("traced", LLAMA_LAYERS),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from tiny import make_tiny_model

    name = request.param
    return name, make_tiny_model(tmp_path_factory.mktemp(f"tiny-{name}"), family=name)


def _config(base: Path, out: Path, **extra: Any) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "base-model": str(base),
            "quantization": "nf4",
            "num-server-rounds": 1,
            "local-steps": 2,
            "batch-size": 2,
            "max-length": 64,
            "lr": 5e-3,
            "sites": "mental,pain",
            "output-dir": str(out),
            "evaluate-every": 0,  # the nodes' own evaluation is not what differs by family
        }
        | extra
    )


def _layers(adapter: dict[str, np.ndarray]) -> set[str]:
    """The adapted layers' names (``...self_attn.qkv_proj.lora_A.weight`` -> ``qkv_proj``)."""
    return {k.split(".")[-3] for k in adapter}


def _gate_data():
    from fedlora.server.central import central_examples

    return central_examples("drugreview", 12, ())


class LocalGrid(Grid):
    """A Flower Grid in this process: each message goes straight to the real ClientApp, one
    node per site (the contexts a simulation engine would hold)."""

    def __init__(self, app: Any, cfg: RunConfig, defaults: dict[str, Any]) -> None:
        run_config = cfg.to_mapping() | {"min-available-nodes": len(cfg.site_names)}
        self.app = app
        self.contexts = {
            10 + p: Context(
                run_id=1,
                node_id=10 + p,
                node_config=defaults | {"partition-id": p},
                state=RecordDict(),
                run_config=run_config,
            )
            for p in range(len(cfg.site_names))
        }

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> Any:
        raise NotImplementedError

    def pull_messages(self, message_ids: Any) -> Any:
        raise NotImplementedError

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


def _local_federation(cfg: RunConfig) -> tuple[Path, list[dict[str, Any]]]:
    """One federation of ``cfg`` in this process: the global adapter's folder and the rounds'
    records (metrics.jsonl)."""
    from fedlora.client.app import make_client_app
    from fedlora.server.app import run_federation

    defaults = {"base-model": cfg.base_model, "quantization": cfg.quantization, "seed": cfg.seed}
    defaults |= {"sites": cfg.sites, "eval-fraction": cfg.eval_fraction}
    run_federation(LocalGrid(make_client_app(defaults), cfg, defaults), cfg)
    out = Path(cfg.output_dir)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out / "global-adapter", history


@pytest.mark.parametrize("strategy", ["fedex-lora", "fed-sb"])
@pytest.mark.integration  # tiny federations and exports: seconds each
def test_strategy_round_merges_and_exports_with_parity(family, strategy, tmp_path, task_identity):
    # Prepare
    from fedlora.export.pipeline import export_adapter
    from fedlora.lora import RESIDUAL_FILE

    name, base = family
    graph, layers = FAMILIES[name]
    # an fp32 base and one step: the strategy's maths, not NF4 training, is under test here
    cfg = _config(
        base, tmp_path / "run", strategy=strategy, quantization="fp32", **{"local-steps": 1}
    )

    # Execute
    adapter_dir, _ = _local_federation(cfg)
    report = export_adapter(
        base, adapter_dir, tmp_path / "export", messages(REVIEW), max_new_tokens=8
    )

    # Assert
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert _layers(adapter) == layers and not any("lora_R" in k for k in adapter)
    # trained: FedEx-LoRA's B and Fed-SB's R (folded into A) left zero; A, B start non-zero
    assert all(np.abs(v).max() > 0 for v in adapter.values())
    if strategy == "fedex-lora":  # dense residuals, keyed by this family's module names
        residuals = load_file(str(adapter_dir / RESIDUAL_FILE))
        assert {k.split(".")[-1] for k in residuals} == layers
        assert any(np.abs(v).max() > 0 for v in residuals.values())
    assert report.graph == graph
    assert report.parity.ok and report.parity.same_tokens


@pytest.mark.integration  # tiny federations and exports: seconds each
def test_fedit_round_merges_exports_passes_gates_and_answers_on_the_edge(
    family, tmp_path, task_identity
):
    # Prepare
    from fedlora.export.gates import DEFAULT_THRESHOLDS, GateThresholds
    from fedlora.export.pipeline import export_adapter
    from fedlora.export.runtime import EdgeModel

    name, base = family
    graph, layers = FAMILIES[name]
    examples, labels = _gate_data()
    prompt = messages(REVIEW)

    int8 = DEFAULT_THRESHOLDS["int8"]
    # A random tiny model's logits are nearly flat, so its greedy text flips on any rounding:
    # agreement is not gated here (as in test_quantized_export); accuracy and perplexity are,
    # at the defaults.
    thresholds = {"int8": GateThresholds(int8.max_accuracy_drop, int8.max_perplexity_ratio, 0.0)}
    cfg = _config(base, tmp_path / "run")

    # Execute: one federated round, then the whole export pipeline
    adapter_dir, history = _local_federation(cfg)
    report = export_adapter(
        base,
        adapter_dir,
        tmp_path / "export",
        prompt,
        max_new_tokens=8,
        quantize=("int8",),
        eval_examples=examples,
        labels=labels,
        thresholds=thresholds,
        greedy_prompts=4,
    )
    edge = EdgeModel(report.onnx_dir)
    answer = edge.generate(prompt, max_new_tokens=8)
    int8_answer = EdgeModel(tmp_path / "export" / "onnx-int8").generate(prompt, max_new_tokens=8)

    # Assert
    [record] = history
    assert record["replies"] == 2 and record["dropped"] == 0
    assert np.isfinite(record["train-loss"])
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert _layers(adapter) == layers
    assert all(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B moved
    assert report.graph == graph
    assert report.parity.ok and report.parity.same_tokens
    assert report.parity.max_abs_logits_diff <= report.parity.tolerance
    window = json.loads((base / "config.json").read_text()).get("sliding_window")
    assert window is None or report.parity.prompt_tokens > 2 * window  # the window binds
    assert [v.name for v in report.variants] == ["fp32", "int8"]
    assert report.gates and all(g.passed for g in report.gates), [g.failures for g in report.gates]
    assert answer.token_ids == report.parity.torch_tokens  # the edge answers as PyTorch does
    assert 1 <= len(int8_answer.token_ids) <= 8


@pytest.mark.integration  # a Ray federation: tens of seconds
def test_the_simulation_engine_trains_a_phi3_base(tmp_path_factory, tmp_path):
    """The same round on Flower's simulation engine (Ray actors load the Phi-3 base)."""
    # Prepare
    from fedlora.simulations.run import simulate
    from tiny import make_tiny_model

    base = make_tiny_model(tmp_path_factory.mktemp("tiny-phi3-ray"), family="phi3")

    # Execute
    result = simulate(_config(base, tmp_path / "run"))

    # Assert
    [record] = result.history
    assert record["replies"] == 2 and record["dropped"] == 0
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert _layers(adapter) == FAMILIES["phi3"][1]
    assert all(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k)


def _random_adapter_export(base: Path, tmp_path: Path, graph: str = "auto") -> Any:
    """A PEFT adapter with large random B (the model moves far from its init: attention logits
    grow), merged and exported by the pipeline."""
    from fedlora.export.pipeline import export_adapter
    from test_export import _make_adapter

    adapter = _make_adapter(base, tmp_path / "lora", r=4, b_scale=0.5)
    return export_adapter(
        base, adapter, tmp_path / "export", messages(REVIEW), max_new_tokens=8, graph=graph
    )


@pytest.mark.integration  # tiny exports: seconds
def test_traced_gemma2_keeps_its_attention_soft_capping(tmp_path: Path) -> None:
    # Prepare: a Gemma-2 whose soft-capping changes its logits (eager applies it, SDPA not)
    import torch
    from transformers import AutoModelForCausalLM

    from tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "gemma2", family="gemma2")

    # Execute
    report = _random_adapter_export(base, tmp_path)
    ids = torch.tensor([report.parity.torch_tokens[:1] * 4 + list(range(40))])
    logits = {}
    for attention in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(
            report.merged_dir, dtype=torch.float64, attn_implementation=attention
        )
        with torch.inference_mode():
            logits[attention] = model(input_ids=ids).logits

    # Assert: the capping matters 100 x the tolerance, and the ONNX graph keeps it
    capping = float((logits["eager"] - logits["sdpa"]).abs().max())
    assert capping > 100 * report.parity.tolerance
    assert report.graph == "traced"
    assert report.parity.max_abs_logits_diff <= report.parity.tolerance
    assert report.parity.ok and report.parity.same_tokens


@pytest.mark.integration  # tiny exports: seconds
def test_fused_graph_keeps_qwen2s_per_layer_sliding_windows(tmp_path: Path) -> None:
    # Prepare: layer 0 full attention, layer 1 a 16-token window (binds on the chat prompt)
    import json as json_

    from tiny import make_tiny_model

    base = make_tiny_model(
        tmp_path / "qwen2",
        family="qwen2",
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,
    )

    # Execute
    report = _random_adapter_export(base, tmp_path, graph="fused")

    # Assert
    config = json_.loads((base / "config.json").read_text())
    assert config["layer_types"] == ["full_attention", "sliding_attention"]
    assert report.parity.prompt_tokens > 2 * 16
    assert report.parity.ok and report.parity.same_tokens


def test_target_modules_that_name_no_layer_are_a_config_error_naming_the_layers(
    tmp_path: Path,
) -> None:
    # Prepare: the usual Llama recipe's names, on a Phi-3 (fused qkv_proj and gate_up_proj)
    from fedlora.errors import ConfigError
    from fedlora.lora import LoraSettings, adapter_shapes
    from tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "phi3", family="phi3")

    # Execute / Assert
    with pytest.raises(ConfigError, match="Phi3ForCausalLM") as caught:
        adapter_shapes(base, LoraSettings(target_modules="q_proj,v_proj"))
    assert "down_proj, gate_up_proj, o_proj, qkv_proj" in str(caught.value)
    shapes = adapter_shapes(base, LoraSettings(target_modules="qkv_proj"))
    assert {k.split(".")[-3] for k in shapes} == {"qkv_proj"}
