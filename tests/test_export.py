"""Adapter -> merged fp32 model -> ONNX with KV cache -> edge runtime, on real components.

The fast tests use the tiny session model (conftest) and a real PEFT LoRA adapter whose B
matrices are set to random non-zero values, so merging visibly changes the model and the greedy
continuation is varied (which exercises the KV cache). The slow test exports the real default
model with a zero-effect adapter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from fedlora.errors import FedloraError
from fedlora.prompting import messages

pytestmark = pytest.mark.integration  # Ray federations / tiny exports: tens of seconds

if TYPE_CHECKING:
    from fedlora.export.pipeline import ExportReport

REVIEW = "This drug worked well for my pain, but I felt dizzy for a week."
B_SCALE = 0.5  # large enough that the tiny model's greedy tokens vary (not one repeated token)


def _make_adapter(base_dir: Path, out: Path, r: int, b_scale: float, seed: int = 1) -> Path:
    """A real PEFT LoRA adapter (all linear layers) saved with save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and b_scale:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
    peft_model.save_pretrained(out)
    return out


def _prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return list(tokenizer.apply_chat_template(messages(REVIEW), add_generation_prompt=True))


def _torch_logits(model: object, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits.float().numpy()  # type: ignore[operator]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_adapter(
        tiny_model_dir, tmp_path_factory.mktemp("adapter") / "lora", r=4, b_scale=B_SCALE
    )


@pytest.fixture(scope="module")
def exported(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> ExportReport:
    from fedlora.export.pipeline import export_adapter

    return export_adapter(
        tiny_model_dir,
        adapter_dir,
        tmp_path_factory.mktemp("export"),
        messages(REVIEW),
        max_new_tokens=16,
        atol=1e-4,
    )


def test_merged_model_equals_unmerged_adapter_and_differs_from_base(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.export.merge import merge_adapter

    ids = _prompt_ids(tiny_model_dir)
    base_logits = _torch_logits(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), ids
    )
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter_dir
    ).eval()
    unmerged_logits = _torch_logits(unmerged, ids)

    # Execute
    merged_dir = merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "merged")

    # Assert
    assert (merged_dir / "model.safetensors").is_file()
    assert (merged_dir / "tokenizer.json").is_file()
    assert (merged_dir / "generation_config.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    merged_logits = _torch_logits(merged, ids)
    assert np.max(np.abs(merged_logits - unmerged_logits)) <= 1e-5
    assert np.max(np.abs(merged_logits - base_logits)) > 1e-2


def test_export_adapter_writes_onnx_that_matches_pytorch(exported: ExportReport) -> None:
    # Prepare: the module fixture ran merge -> ONNX export -> parity check.
    report = exported

    # Execute
    parity = report.parity

    # Assert
    assert report.onnx_file.is_file()
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config.json",
        "generation_config.json",
    ):
        assert (report.onnx_dir / name).is_file(), name
    assert "chat_template" in json.loads((report.onnx_dir / "tokenizer_config.json").read_text())
    assert (report.merged_dir / "model.safetensors").is_file()
    assert parity.max_abs_logits_diff <= 1e-4  # vs the merged model in float64
    assert parity.vs_torch_fp32 <= 1e-4  # 2 layers: fp32 rounding is far below 1e-4 here
    assert 0.0 <= parity.torch_fp32_vs_fp64 < 1e-4
    assert parity.same_tokens
    assert parity.onnx_tokens == parity.torch_tokens
    assert len(parity.torch_tokens) == 16
    assert len(set(parity.torch_tokens)) > 1, "greedy output is one repeated token: a weak test"
    assert report.answer == parity.onnx_text
    assert 0 < report.onnx_mib < 10
    assert set(report.seconds) == {"merge", "onnx", "parity"}


def test_the_bundle_carries_a_model_card(exported: ExportReport, adapter_dir: Path) -> None:
    import hashlib

    from fedlora.export.card import CARD_JSON, CARD_MD

    bundle = exported.onnx_dir.parent
    card = json.loads((bundle / CARD_JSON).read_text())
    weights = adapter_dir / "adapter_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert card["adapter"]["sha256"] == {"adapter_model.safetensors": digest}
    assert card["adapter"]["r"] == 4
    assert list(card["base-model"]["sha256"]) == ["model.safetensors"]
    assert "not recorded" in card["base-model"]["licence"]  # a config-built base, not the default
    (fp32,) = card["variants"]
    assert fp32["name"] == "fp32" and fp32["folder"] == "onnx"
    assert fp32["size_mib"] == pytest.approx(exported.onnx_mib)
    gate = fp32["gates"]["parity"]
    assert gate["passed"] is True and gate["figures"]["same-greedy-tokens"] is True
    assert gate["figures"]["max-abs-logits-diff-vs-fp64"] == exported.parity.max_abs_logits_diff
    assert fp32["decode_tokens_per_s"] > 0
    md = (bundle / CARD_MD).read_text()
    assert digest in md and "| fp32 | fused | `onnx` |" in md and "parity: pass" in md


def test_edge_model_kv_cache_matches_full_recompute_and_stops_at_eos(
    exported: ExportReport,
) -> None:
    # Prepare
    from fedlora.export.runtime import EdgeModel

    edge = EdgeModel(exported.onnx_dir)
    prompt_ids = edge.encode(edge.render(messages(REVIEW)))
    recomputed: list[int] = []
    for _ in range(8):  # greedy without a cache: one full forward per token
        logits = edge.logits(np.asarray([prompt_ids + recomputed]))
        recomputed.append(int(np.argmax(logits[0, -1])))

    # Execute
    cached = edge.generate_ids(prompt_ids, max_new_tokens=8)
    edge.eos_token_ids = [cached[-1]]  # generation must stop at its first occurrence
    stopped = edge.generate_ids(prompt_ids, max_new_tokens=8)

    # Assert
    assert cached == recomputed
    assert stopped == cached[: cached.index(cached[-1]) + 1]


@pytest.mark.parametrize(
    ("file", "key", "value"),
    [
        ("generation_config.json", "eos_token_id", "two"),
        ("generation_config.json", "eos_token_id", [2, 1.5]),
        ("config.json", "eos_token_id", True),
        ("config.json", "num_key_value_heads", "4"),
        ("config.json", "hidden_size", -64),
    ],
)
def test_a_bundle_with_a_bad_id_or_size_is_refused_naming_its_file_and_key(
    exported: ExportReport, tmp_path: Path, file: str, key: str, value: object
) -> None:
    # Prepare: a copy of the bundle whose json file holds a value of the wrong kind
    import shutil

    from fedlora.export.runtime import EdgeModel

    bundle = shutil.copytree(exported.onnx_dir, tmp_path / "bundle")
    saved = json.loads((bundle / file).read_text()) if (bundle / file).is_file() else {}
    saved[key] = value
    if key == "hidden_size":  # head_dim from hidden_size only when head_dim is absent
        saved.pop("head_dim", None)
    if file == "config.json" and key == "eos_token_id":  # reached only without the other
        gen = json.loads((bundle / "generation_config.json").read_text())
        gen.pop("eos_token_id", None)
        (bundle / "generation_config.json").write_text(json.dumps(gen))
    (bundle / file).write_text(json.dumps(saved))

    # Execute / Assert: a one-line FedloraError, not a ValueError or TypeError from int()
    with pytest.raises(FedloraError, match=rf"{file} '{key}' is .*re-export the model"):
        EdgeModel(bundle)


def test_edge_runtime_runs_without_torch_or_transformers(exported: ExportReport) -> None:
    # Prepare
    script = textwrap.dedent("""
        import json, sys
        from fedlora.export.runtime import EdgeModel
        edge = EdgeModel(sys.argv[1])
        result = edge.generate([{"role": "user", "content": sys.argv[2]}], max_new_tokens=16)
        heavy = [m for m in ("torch", "transformers", "flwr", "optimum", "peft")
                 if m in sys.modules]
        print(json.dumps({"heavy": heavy, "text": result.text, "ids": result.token_ids}))
    """)
    expected = messages(REVIEW)[0]["content"]

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", script, str(exported.onnx_dir), expected],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert "torch" not in out["heavy"] and "transformers" not in out["heavy"]
    assert out["ids"] == exported.parity.onnx_tokens
    assert out["text"] == exported.answer


def test_edge_chat_template_matches_transformers(
    tiny_model_dir: Path, exported: ExportReport
) -> None:
    # Prepare
    from transformers import AutoTokenizer

    from fedlora.export.runtime import EdgeModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = [
        {"role": "system", "content": "Be brief."},
        *messages(REVIEW),
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "Why?"},
    ]

    # Execute
    rendered = EdgeModel(exported.onnx_dir).render(chat, add_generation_prompt=True)

    # Assert
    assert rendered == tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )


def test_missing_adapter_folder_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    from fedlora.export.merge import merge_adapter

    missing = tmp_path / "no-such-adapter"
    empty = tmp_path / "empty-adapter"
    empty.mkdir()

    # Execute / Assert
    with pytest.raises(FedloraError, match=str(missing)) as exc:
        merge_adapter(tiny_model_dir, missing, tmp_path / "merged")
    assert "does not exist" in str(exc.value)
    with pytest.raises(FedloraError, match="adapter_config.json"):
        merge_adapter(tiny_model_dir, empty, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_adapter_for_another_base_is_a_clear_error(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a base of another width (hidden 32) with the tiny model's tokenizer.
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.export.merge import merge_adapter

    other = tmp_path / "other-base"
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size, config.head_dim = 32, 64, 8
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(other)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, other / name)

    # Execute
    with pytest.raises(FedloraError) as exc:
        merge_adapter(other, adapter_dir, tmp_path / "merged")

    # Assert
    message = str(exc.value)
    assert "does not fit" in message and str(adapter_dir) in message and "size mismatch" in message
    assert "\n" not in message


def test_parity_error_when_tolerance_is_zero(exported: ExportReport) -> None:
    # Prepare: ONNX Runtime and PyTorch kernels round differently, so the fp32 logits differ in
    # the last bits; a zero tolerance must therefore fail (and this test fails if it does not).
    from fedlora.export.parity import ParityError, check_parity

    # Execute
    with pytest.raises(ParityError) as exc:
        check_parity(
            exported.merged_dir, exported.onnx_dir, messages(REVIEW), atol=0.0, noise_factor=0.0
        )

    # Assert
    report = exc.value.report
    assert report is not None
    assert 0.0 < report.max_abs_logits_diff <= 1e-4
    assert "tolerance 0.00e+00 = max(atol 0.0e+00, 0 x the fp32 noise floor)" in str(exc.value)
    assert f"{report.max_abs_logits_diff:.3e}" in str(exc.value)


def test_parity_error_when_onnx_is_a_different_model(
    tiny_model_dir: Path, exported: ExportReport
) -> None:
    # Prepare: compare the base model against the ONNX export of base + adapter.
    from fedlora.export.parity import ParityError, check_parity

    # Execute
    with pytest.raises(ParityError) as exc:
        check_parity(tiny_model_dir, exported.onnx_dir, messages(REVIEW), atol=1e-4)

    # Assert
    report = exc.value.report
    assert report is not None
    assert report.max_abs_logits_diff > 1e-2
    assert "max abs logits diff" in str(exc.value) and "atol 1.0e-04" in str(exc.value)
    assert report.max_abs_logits_diff > 100 * report.torch_fp32_vs_fp64  # far past the noise


@pytest.mark.slow
def test_real_default_model_exports_with_parity(tmp_path: Path) -> None:
    # Prepare: a fresh adapter (B = 0) on the packaged SmolLM2, so merged == base.
    from fedlora.basemodel import resolve_base_model
    from fedlora.export.pipeline import export_adapter

    base_dir = resolve_base_model("default")
    adapter = _make_adapter(base_dir, tmp_path / "lora", r=8, b_scale=0.0)

    # Execute
    report = export_adapter(
        base_dir, adapter, tmp_path / "export", messages(REVIEW), max_new_tokens=16, atol=1e-4
    )

    # Assert
    print(
        f"\nSmolLM2 export: {report.parity.summary()}; {report.onnx_mib:.0f} MiB; "
        f"{ {k: round(v, 1) for k, v in report.seconds.items()} }; answer {report.answer!r}"
    )
    assert report.onnx_file.is_file()
    assert report.parity.max_abs_logits_diff <= 1e-4
    assert report.parity.same_tokens
    assert report.parity.torch_tokens
