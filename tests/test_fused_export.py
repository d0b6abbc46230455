"""The fused decoder graph (fedlora.export.fused) against the merged PyTorch model.

On the tiny session model plus a real LoRA adapter with non-zero B matrices: the fused graph's
logits match PyTorch in float64 as closely as optimum's traced graph does, its KV cache gives the
same logits as a full recompute (prompt, one token at a time, and several tokens at once on a
cache), a broken fused graph (rotary embedding dropped) is refused by the parity gate, and the
quantized variants read one quantized embedding table for the lookup and the tied head.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedlora.errors import FedloraError
from fedlora.prompting import messages

pytestmark = pytest.mark.integration  # tiny exports: seconds each

REVIEW = "This drug worked well for my pain, but I felt dizzy for a week."


@pytest.fixture(scope="module")
def merged_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedlora.export.merge import merge_adapter
    from test_export import _make_adapter

    root = tmp_path_factory.mktemp("fused")
    _make_adapter(tiny_model_dir, root / "lora", r=4, b_scale=0.5, seed=3)
    return merge_adapter(tiny_model_dir, root / "lora", root / "merged")


@pytest.fixture(scope="module")
def fused_dir(merged_dir: Path) -> Path:
    from fedlora.export.onnx import export_onnx

    return export_onnx(merged_dir, merged_dir.parent / "fused", graph="fused")


@pytest.fixture(scope="module")
def traced_dir(merged_dir: Path) -> Path:
    from fedlora.export.onnx import export_onnx

    return export_onnx(merged_dir, merged_dir.parent / "traced", graph="traced")


def _torch_logits(model_dir: Path, ids: list[int], dtype: str = "float64") -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="eager"
    ).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits.double().numpy()


def test_fused_graph_has_one_attention_op_per_layer_and_matches_pytorch(
    merged_dir: Path, fused_dir: Path
) -> None:
    # Prepare
    import onnx

    from fedlora.export.runtime import EdgeModel

    graph = onnx.load(str(fused_dir / "model.onnx")).graph
    layers = json.loads((merged_dir / "config.json").read_text())["num_hidden_layers"]
    edge = EdgeModel(fused_dir)
    ids = edge.encode(edge.render(messages(REVIEW)))

    # Execute
    onnx_logits = edge.logits(np.asarray([ids])).astype(np.float64)
    reference = _torch_logits(merged_dir, ids)

    # Assert
    ops = [node.op_type for node in graph.node]
    assert ops.count("GroupQueryAttention") == layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers  # residual adds folded
    assert len(ops) < 15 * layers + 20  # against thousands of node runs in the traced graph
    # the inputs optimum's ORTModelForCausalLM and onnxruntime-genai feed, position_ids included
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    # The tied embedding is stored once: the Gather and the head's Gemm read one initializer.
    assert sum(t.name == "model.embed_tokens.weight" for t in graph.initializer) == 1
    assert onnx_logits.shape == reference.shape
    assert np.max(np.abs(onnx_logits - reference)) < 1e-4
    assert np.max(np.abs(reference)) > 1000 * np.max(np.abs(onnx_logits - reference))


def test_fused_kv_cache_matches_a_full_recompute(fused_dir: Path) -> None:
    # Prepare
    from fedlora.export.runtime import EdgeModel

    edge = EdgeModel(fused_dir)
    prompt = edge.encode(edge.render(messages(REVIEW)))
    tokens = edge.generate_ids(prompt, max_new_tokens=12)
    full = edge.logits(np.asarray([prompt + tokens]))[0]

    # Execute: the prompt, then one token at a time on the cache; then 4 tokens at once on a cache.
    logits, past = edge._run(np.asarray([prompt]), edge._empty_past(1), 0)
    steps = [logits[0, -1]]
    length = len(prompt)
    for token in tokens[:-1]:
        logits, past = edge._run(np.asarray([[token]]), past, length)
        length += 1
        steps.append(logits[0, -1])
    _, past = edge._run(np.asarray([prompt]), edge._empty_past(1), 0)
    chunk, _ = edge._run(np.asarray([tokens[:4]]), past, len(prompt))

    # Assert
    assert len(set(tokens)) > 1, "greedy output is one repeated token: a weak test"
    expected = full[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    assert np.max(np.abs(np.stack(steps) - expected)) < 1e-4
    assert np.max(np.abs(chunk[0] - full[len(prompt) : len(prompt) + 4])) < 1e-4


def test_export_adapter_ships_the_fused_graph_and_passes_parity(
    tiny_model_dir: Path, merged_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    from fedlora.export.card import CARD_JSON
    from fedlora.export.pipeline import export_adapter

    # Execute
    report = export_adapter(
        tiny_model_dir, merged_dir.parent / "lora", tmp_path / "bundle", messages(REVIEW)
    )

    # Assert
    assert report.graph == "fused"
    assert report.parity.ok and report.parity.max_abs_logits_diff < 1e-4
    card = json.loads((tmp_path / "bundle" / CARD_JSON).read_text())
    assert card["variants"][0]["graph"] == "fused"
    figures = card["variants"][0]["gates"]["parity"]["figures"]
    assert figures["cached-decode-diff-vs-fp64"] == report.parity.cache_logits_diff < 1e-4


def test_a_fused_graph_without_its_rotary_embedding_fails_the_parity_gate(
    merged_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: positions dropped (cos 1, sin 0): a plausible builder bug that still runs.
    from fedlora.export import fused
    from fedlora.export.parity import ParityError, check_parity

    def no_rotation(model_dir: Path, rows: int) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = real(model_dir, rows)
        return np.ones_like(cos), np.zeros_like(sin)

    real = fused._rotary_caches
    monkeypatch.setattr(fused, "_rotary_caches", no_rotation)
    broken = fused.export_fused(merged_dir, tmp_path / "broken")

    # Execute
    with pytest.raises(ParityError) as exc:
        check_parity(merged_dir, broken, messages(REVIEW))

    # Assert
    report = exc.value.report
    assert report is not None and report.max_abs_logits_diff > 1e-2
    assert report.max_abs_logits_diff > 100 * report.torch_fp32_vs_fp64


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_quantized_fused_graph_shares_one_quantized_embedding_table(
    fused_dir: Path, traced_dir: Path, tmp_path: Path, variant: str
) -> None:
    # Prepare
    import onnx

    from fedlora.export.quantize import quantize_variant
    from fedlora.export.runtime import EdgeModel

    # Execute
    folder = quantize_variant(fused_dir, tmp_path / variant, variant)

    # Assert: the head is MatMulNBits, the lookup GatherBlockQuantized, over the same bytes.
    graph = onnx.load(str(folder / "model.onnx")).graph
    nodes = {node.name: node for node in graph.node}
    head, lookup = nodes["lm_head/MatMulNBits"], nodes["embed_tokens/GatherBlockQuantized"]
    view = nodes["embed_tokens/rows"]
    assert view.input[0] == head.input[1] and lookup.input[0] == view.output[0]
    assert "model.embed_tokens.weight" not in {t.name for t in graph.initializer}
    assert all(node.op_type != "Gemm" for node in graph.node)
    fp32, quantized = EdgeModel(fused_dir), EdgeModel(folder)
    ids = np.asarray([fp32.encode(fp32.render(messages(REVIEW)))])
    ref, got = fp32.logits(ids), quantized.logits(ids)
    # Against the same variant of the traced graph, whose head stays fp32: quantizing the head
    # too may move logits somewhat more (1.2-1.4x measured here), never wildly.
    traced = quantize_variant(traced_dir, tmp_path / f"traced-{variant}", variant)
    traced_diff = float(np.mean(np.abs(EdgeModel(traced).logits(ids) - ref)))
    mean_diff = float(np.mean(np.abs(got - ref)))
    agree = float(np.mean(np.argmax(got[0], -1) == np.argmax(ref[0], -1)))
    assert 0 < mean_diff < 2 * traced_diff
    assert mean_diff < (0.02 if variant == "int8" else 0.1) * np.max(np.abs(ref))
    # Top-token agreement over every prompt position; the tiny random model has many near-ties.
    assert agree >= (0.9 if variant == "int8" else 0.5)


def test_auto_falls_back_to_the_traced_export_and_fused_names_the_reason(
    merged_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the same weights, declared with a GELU MLP the fused graph does not model.
    import shutil

    from fedlora.export.onnx import choose_graph

    other = tmp_path / "gelu"
    shutil.copytree(merged_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    config["hidden_act"] = "gelu_pytorch_tanh"
    (other / "config.json").write_text(json.dumps(config))

    # Execute / Assert
    assert choose_graph(merged_dir, "auto") == "fused"
    assert choose_graph(other, "auto") == "traced"
    assert choose_graph(merged_dir, "traced") == "traced"
    with pytest.raises(FedloraError) as exc:
        choose_graph(other, "fused")
    assert "hidden_act 'gelu_pytorch_tanh' (the fused MLP is SiLU-gated)" in str(exc.value)
    assert "--graph traced" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(FedloraError, match="use one of auto, fused, traced"):
        choose_graph(merged_dir, "fast")


def test_traced_export_still_passes_parity(merged_dir: Path, traced_dir: Path) -> None:
    # Prepare
    from fedlora.export.parity import check_parity

    # Execute
    report = check_parity(merged_dir, traced_dir, messages(REVIEW))

    # Assert
    assert report.ok and report.max_abs_logits_diff < 1e-4


def test_a_cut_kv_cache_fails_the_parity_gate_by_its_cached_logits(
    merged_dir: Path, fused_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: every decode step loses the oldest cached position. On the default model's
    # label answers ("negative" + eos) the greedy tokens alone missed this; the cached-decode
    # logits, compared with the fp64 model over the same tokens, do not.
    from fedlora.export.parity import ParityError, check_parity
    from fedlora.export.runtime import EdgeModel

    real_run = EdgeModel._run

    def cut(self, ids, past, past_len):  # type: ignore[no-untyped-def]
        if past_len > 1:
            past = {name: value[:, :, 1:, :] for name, value in past.items()}
            past_len = next(iter(past.values())).shape[2]
        return real_run(self, ids, past, past_len)

    sound = check_parity(merged_dir, fused_dir, messages(REVIEW))
    monkeypatch.setattr(EdgeModel, "_run", cut)

    # Execute
    with pytest.raises(ParityError) as exc:
        check_parity(merged_dir, fused_dir, messages(REVIEW))

    # Assert
    report = exc.value.report
    assert sound.cache_steps == 16 and sound.cache_logits_diff < 1e-4 and sound.cache_ok
    assert report is not None and report.cache_steps == 16 and not report.cache_ok
    assert report.cache_logits_diff > 100 * sound.cache_logits_diff
    assert report.max_abs_logits_diff < 1e-4  # the prompt's own logits are still right
    assert "over the tolerance: KV cache" in str(exc.value)
