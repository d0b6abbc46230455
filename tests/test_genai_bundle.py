"""Bundles onnxruntime-genai and optimum run (issue 34, part 3), on the tiny model.

The fused fp32, int8 and int4 folders get a ``genai_config.json`` (fedlora.export.genai) with
which ``onnxruntime_genai.Model(folder)`` decodes greedily the same tokens as EdgeModel, and
the same prompt logits; the fused graph takes ``position_ids`` and its rotary embedding reads
them, so optimum's ORTModelForCausalLM loads it without its legacy warning and answers the same;
a bundle exported before (no ``position_ids``) still loads in both runtimes; a graph the runtime
cannot feed gets no config and one line; a byte-level tokenizer whose decoder looks like
sentencepiece (SmolLM2's, as transformers converts it from GGUF) is tokenized alike.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlora.export.genai import GENAI_CONFIG, GraphIO, genai_status, unsupported_reason

pytestmark = pytest.mark.integration  # tiny exports: seconds each

REVIEW = "This drug worked well for my pain, but I felt dizzy for a week."
VARIANTS = ("onnx", "onnx-int8", "onnx-int4")
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, int8 and int4 fused folders of a tiny model whose weights are large enough
    (initializer_range 0.2) that its greedy answer is not one token repeated."""
    from fedlora.export.onnx import export_onnx
    from fedlora.export.quantize import quantize_variant
    from tiny import make_tiny_model

    root = tmp_path_factory.mktemp("genai")
    model_dir = make_tiny_model(root / "model", initializer_range=0.2)
    export_onnx(model_dir, root / "onnx", graph="fused")
    for name in ("int8", "int4"):
        quantize_variant(root / "onnx", root / f"onnx-{name}", name)
    return root


def _prompt(folder: Path) -> tuple[Any, list[int]]:
    from fedlora.export.runtime import EdgeModel

    edge = EdgeModel(folder)
    return edge, edge.encode(edge.render([{"role": "user", "content": REVIEW}]))


def _genai_greedy(folder: Path, ids: list[int], new: int) -> tuple[list[int], np.ndarray]:
    """onnxruntime-genai's greedy tokens after ``ids`` and its logits at the prompt's end."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    first = np.asarray(generator.get_logits()).reshape(-1)
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, first


def _strip_position_ids(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as the fused export wrote it before position_ids (positions from the
    mask alone)."""
    import onnx

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            del node.input[9:]
    kept = [i for i in model.graph.input if i.name != "position_ids"]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.save(model, str(dst / "model.onnx"))
    return dst


@pytest.mark.parametrize("variant", VARIANTS)
def test_genai_decodes_the_same_greedy_tokens_as_edge_model(bundle: Path, variant: str) -> None:
    # Prepare
    import onnxruntime_genai as og

    folder = bundle / variant
    edge, ids = _prompt(folder)

    # Execute
    status = genai_status(folder)
    tokens, first = _genai_greedy(folder, ids, NEW_TOKENS)

    # Assert
    assert status == GENAI_CONFIG
    config = json.loads((folder / GENAI_CONFIG).read_text())
    assert config["model"]["type"] == "llama"
    assert config["search"]["past_present_share_buffer"] is True
    assert config["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    tokenizer = og.Tokenizer(og.Model(str(folder)))
    text = edge.render([{"role": "user", "content": REVIEW}])
    assert [int(t) for t in tokenizer.encode(text)] == ids
    reference = edge.generate_ids(ids, NEW_TOKENS)
    assert len(set(reference)) > 3  # a real answer, not one id repeated
    assert tokens == reference
    assert np.max(np.abs(first - edge.logits(np.asarray([ids]))[0, -1])) < 1e-4


def test_genai_runs_optimums_traced_graph_on_separate_past_and_present(
    bundle: Path, tmp_path: Path
) -> None:
    # Prepare: optimum's trace concatenates past and new keys, so present outgrows past
    from fedlora.export.onnx import export_onnx

    folder = export_onnx(bundle / "model", tmp_path / "traced", graph="traced")
    edge, ids = _prompt(folder)

    # Execute
    status = genai_status(folder)
    tokens, first = _genai_greedy(folder, ids, NEW_TOKENS)

    # Assert
    config = json.loads((folder / GENAI_CONFIG).read_text())
    assert status == GENAI_CONFIG
    assert config["model"]["type"] == "decoder"
    assert config["search"]["past_present_share_buffer"] is False
    assert tokens == edge.generate_ids(ids, NEW_TOKENS)
    assert np.max(np.abs(first - edge.logits(np.asarray([ids]))[0, -1])) < 1e-4


def test_fused_graph_feeds_position_ids_to_its_rotary_embedding(bundle: Path) -> None:
    # Prepare
    import onnx

    from fedlora.export.runtime import EdgeModel

    edge = EdgeModel(bundle / "onnx")
    ids = np.asarray([[5, 6, 7, 8, 9, 10]], dtype=np.int64)
    graph = onnx.load(str(bundle / "onnx" / "model.onnx")).graph
    inputs = {i.name: i for i in graph.input}

    # Execute: the last token on the cache of the first five, at its position and 3 further
    full = edge.logits(ids)[0, -1]
    _, past = edge._run(ids[:, :5], edge._empty_past(1), past_len=0)
    feed = {"input_ids": ids[:, 5:], "attention_mask": np.ones((1, 6), dtype=np.int64)}
    feed |= {name: past[name] for name in past}
    right = edge.session.run(["logits"], feed | {"position_ids": np.asarray([[5]])})[0]
    wrong = edge.session.run(["logits"], feed | {"position_ids": np.asarray([[8]])})[0]

    # Assert
    assert inputs["position_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert np.max(np.abs(right[0, -1] - full)) < 1e-5
    assert np.max(np.abs(wrong[0, -1] - full)) > 1e-3


def test_optimum_loads_the_fused_graph_without_its_legacy_warning(
    bundle: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    edge, ids = _prompt(bundle / "onnx")
    old = _strip_position_ids(bundle / "onnx", tmp_path / "old")

    name = "optimum.onnxruntime.modeling_decoder"
    optimum_log = logging.getLogger(name)  # not propagated
    optimum_log.addHandler(caplog.handler)
    # heard whatever an earlier test in this process did to it (quieted, or disabled by a
    # logging configuration)
    monkeypatch.setattr(optimum_log, "disabled", False)

    # Execute
    try:
        with caplog.at_level(logging.WARNING, logger=name):
            model = ORTModelForCausalLM.from_pretrained(bundle / "onnx", use_cache=True)
            fused_log, _ = caplog.text, caplog.clear()
            ORTModelForCausalLM.from_pretrained(old, use_cache=True)
            old_log = caplog.text
    finally:
        optimum_log.removeHandler(caplog.handler)
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
    )

    # Assert
    assert "legacy ONNX model with no `position_ids`" in old_log  # the warning is caught here
    assert "legacy" not in fused_log
    assert out[0, len(ids) :].tolist() == edge.generate_ids(ids, NEW_TOKENS)


def test_a_bundle_without_position_ids_still_runs_in_both_runtimes(
    bundle: Path, tmp_path: Path
) -> None:
    # Prepare
    old = _strip_position_ids(bundle / "onnx-int8", tmp_path / "old")
    (old / GENAI_CONFIG).unlink(missing_ok=True)
    edge, ids = _prompt(old)

    # Execute
    status = genai_status(old)
    tokens, _ = _genai_greedy(old, ids, NEW_TOKENS)

    # Assert
    assert "position_ids" not in {i.name for i in edge.session.get_inputs()}
    assert status == GENAI_CONFIG
    assert (
        "position_ids"
        not in json.loads((old / GENAI_CONFIG).read_text())["model"]["decoder"]["inputs"]
    )
    assert tokens == edge.generate_ids(ids, NEW_TOKENS)
    assert tokens == _genai_greedy(bundle / "onnx-int8", ids, NEW_TOKENS)[0]


def test_a_graph_the_runtime_cannot_feed_gets_no_config_and_one_line(
    bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: an input onnxruntime-genai does not feed, and a stale config from before
    import onnx
    from onnx import TensorProto, helper

    folder = shutil.copytree(bundle / "onnx-int4", tmp_path / "odd")
    (folder / GENAI_CONFIG).write_text("{}")
    model = onnx.load(str(folder / "model.onnx"))
    model.graph.input.append(
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"])
    )
    onnx.save(model, str(folder / "model.onnx"))

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedlora.export.genai"):
        status = genai_status(folder)

    # Assert
    assert status.startswith("not written: input 'token_type_ids' is not one onnxruntime-genai")
    assert not (folder / GENAI_CONFIG).exists()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "token_type_ids" in lines[0] and "\n" not in lines[0]


@pytest.mark.parametrize(
    "inputs,outputs,config,expected",
    [
        ({"input_ids": 7}, {"logits": 1}, {"eos_token_id": 2}, "no KV cache"),
        (
            {"input_ids": 7, "past_key_values.0.key": 1, "past_key_values.0.value": 1},
            {"logits": 1, "present.0.key": 1},
            {"eos_token_id": 2},
            "no present.0.value output",
        ),
        (
            {"input_ids": 7, "attention_mask": 7, "position_ids": 6}
            | {"past_key_values.0.key": 1, "past_key_values.0.value": 1},
            {"logits": 1, "present.0.key": 1, "present.0.value": 1},
            {"eos_token_id": 2},
            "differ in type",
        ),
        (
            {"input_ids": 7, "past_key_values.0.key": 1, "past_key_values.0.value": 1},
            {"logits": 1, "present.0.key": 1, "present.0.value": 1},
            {},
            "no eos_token_id",
        ),
    ],
)
def test_unsupported_graphs_are_named(inputs, outputs, config, expected) -> None:
    reason = unsupported_reason(GraphIO(inputs, outputs, shared_kv=True), config, {})
    assert reason is not None and expected in reason


def test_a_byte_level_tokenizer_with_a_sentencepiece_decoder_tokenizes_alike(
    bundle: Path, tmp_path: Path
) -> None:
    # Prepare: the tokenizer.json decoder transformers writes for SmolLM2 from its GGUF file
    import onnxruntime_genai as og

    folder = shutil.copytree(bundle / "onnx-int8", tmp_path / "spm-decoder")
    (folder / GENAI_CONFIG).unlink()
    data = json.loads((folder / "tokenizer.json").read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True}
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            byte_level | {"use_regex": True},
        ],
    }
    (folder / "tokenizer.json").write_text(json.dumps(data))
    edge, _ = _prompt(folder)
    text = "Ünïcode 😀, tabs\tand  two  spaces\n\nend"

    # Execute
    status = genai_status(folder)
    tokenizer = og.Tokenizer(og.Model(str(folder)))

    # Assert
    ids = edge.encode(text)
    assert status == GENAI_CONFIG
    assert json.loads((folder / "tokenizer.json").read_text())["decoder"]["type"] == "ByteLevel"
    assert [int(t) for t in tokenizer.encode(text)] == ids
    assert tokenizer.decode(ids) == edge.decode(ids) == text
