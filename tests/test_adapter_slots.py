"""On-device adapters (fedlora.export.slots, .adapter, .adaptable): a base exported once with LoRA
slots, each adapter one small file applied per request.

On the tiny model with real PEFT adapters (non-zero B): the adapter applied to the base equals a
full re-export of the merged model within the parity tolerance, on the prompt and over a cached
decode, with the same greedy tokens; switching adapters (and back to none) needs no reload; the
quantized base takes the same file; a file for another base, or a merged model given an adapter,
is refused in one line, also by ``fedlora-edge``. The slow tier repeats the gate on the default
model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlora.errors import FedloraError
from fedlora.prompting import messages

pytestmark = pytest.mark.integration  # tiny exports: seconds each

REVIEW = "This drug worked well for my pain, but I felt dizzy for a week."
STEPS = 12


def _merged_export(base: Path, adapter: Path, out: Path) -> Path:
    from fedlora.export.merge import merge_adapter
    from fedlora.export.onnx import export_onnx

    merge_adapter(base, adapter, out / "merged")
    return export_onnx(out / "merged", out / "onnx", graph="fused")


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fedlora.export.adaptable import export_adapter_only, export_base
    from fedlora.export.quantize import quantize_variant
    from test_export import _make_adapter

    root = tmp_path_factory.mktemp("slots")
    msgs = messages(REVIEW)
    export_base(tiny_model_dir, root / "bundle", msgs)
    quantize_variant(root / "bundle" / "onnx", root / "bundle" / "onnx-int8", "int8")
    paths = {"root": root, "bundle": root / "bundle"}
    for name, seed in (("a", 3), ("b", 7)):
        lora = _make_adapter(tiny_model_dir, root / f"lora-{name}", r=4, b_scale=0.5, seed=seed)
        export_adapter_only(tiny_model_dir, lora, root / "bundle", root / f"adapter-{name}", msgs)
        paths[f"adapter-{name}"] = root / f"adapter-{name}"
        paths[f"merged-{name}"] = _merged_export(tiny_model_dir, lora, root / f"merged-{name}")
    return paths


def _prompt(edge: object) -> list[int]:
    return edge.encode(edge.render(messages(REVIEW)))  # type: ignore[attr-defined]


def test_adapter_on_the_base_equals_the_merged_export(setup: dict[str, Path]) -> None:
    # Prepare
    from fedlora.export.parity import ATOL
    from fedlora.export.runtime import EdgeModel

    merged = EdgeModel(setup["merged-a"])
    applied = EdgeModel(setup["bundle"] / "onnx", adapter=setup["adapter-a"])
    bare = EdgeModel(setup["bundle"] / "onnx")
    ids = _prompt(merged)

    # Execute
    prompt_diff = np.abs(applied.logits(np.asarray([ids])) - merged.logits(np.asarray([ids])))
    tokens, rows = merged.decode_logits(ids, STEPS)
    tokens_applied, rows_applied = applied.decode_logits(ids, STEPS)
    bare_diff = np.abs(bare.logits(np.asarray([ids])) - merged.logits(np.asarray([ids])))

    # Assert: within the parity tolerance floor, and the adapter does matter
    assert prompt_diff.max() <= ATOL
    assert np.abs(rows_applied - rows).max() <= ATOL
    assert tokens_applied == tokens
    assert applied.generate_ids(ids, STEPS) == merged.generate_ids(ids, STEPS)
    assert bare_diff.max() > 100 * ATOL


def test_the_card_records_the_base_and_the_gate(setup: dict[str, Path]) -> None:
    base_card = json.loads((setup["bundle"] / "model-card.json").read_text())
    card = json.loads((setup["adapter-a"] / "model-card.json").read_text())
    assert card["fits-base"]["base-id"] == base_card["adaptable"]["base-id"]
    assert card["fits-base"]["sha256"] == base_card["base-model"]["sha256"]
    assert card["gates"]["merged-export-parity"]["passed"] is True
    assert card["file"]["slots"] == base_card["adaptable"]["lora-slots"] == 10
    assert not (setup["adapter-a"] / "merged-check").exists()  # the re-export is removed
    assert "fits base id" in (setup["adapter-a"] / "MODEL_CARD.md").read_text()


def test_adapters_switch_between_requests_without_a_reload(setup: dict[str, Path]) -> None:
    # Prepare
    from fedlora.export.parity import ATOL
    from fedlora.export.runtime import EdgeModel

    model = EdgeModel(setup["bundle"] / "onnx")
    ids = np.asarray([_prompt(model)])
    bare = model.logits(ids)
    session = model.session

    # Execute
    seconds = model.set_adapter(setup["adapter-a"])
    with_a = model.logits(ids)
    model.set_adapter(setup["adapter-b"])
    with_b = model.logits(ids)
    model.set_adapter(None)
    again = model.logits(ids)

    # Assert
    assert model.session is session and seconds >= 0
    assert np.abs(with_a - EdgeModel(setup["merged-a"]).logits(ids)).max() <= ATOL
    assert np.abs(with_b - EdgeModel(setup["merged-b"]).logits(ids)).max() <= ATOL
    assert np.abs(with_a - with_b).max() > 100 * ATOL
    assert np.array_equal(again, bare)


def test_the_quantized_base_takes_the_same_file(setup: dict[str, Path]) -> None:
    from fedlora.export.runtime import EdgeModel

    merged = EdgeModel(setup["merged-a"])
    ids = np.asarray([_prompt(merged)])
    reference = merged.logits(ids)
    int8 = EdgeModel(setup["bundle"] / "onnx-int8")
    bare = np.abs(int8.logits(ids) - reference).max()
    int8.set_adapter(setup["adapter-a"] / "adapter.onnx_adapter")
    applied = np.abs(int8.logits(ids) - reference).max()
    assert applied < bare / 10  # int8 rounding of W remains, the adapter's effect is there


def _other_base(tmp_path: Path) -> Path:
    from fedlora.export.adaptable import export_base
    from tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "other-base", seed=1)
    export_base(base, tmp_path / "other-bundle", messages(REVIEW))
    return base


def test_a_file_for_another_base_is_refused_in_one_line(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Prepare
    from fedlora.edge_cli import main
    from fedlora.export.runtime import EdgeModel

    _other_base(tmp_path)
    other = tmp_path / "other-bundle" / "onnx"

    # Execute / Assert: the runtime, the command line, and a merged model given an adapter
    with pytest.raises(FedloraError, match="exported for another base") as exc:
        EdgeModel(other, adapter=setup["adapter-a"])
    assert "\n" not in str(exc.value) and "--adapter-only --base" in str(exc.value)
    args = ["generate", "--model", str(other), "--adapter", str(setup["adapter-a"]), "hi"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another base" in err[0]
    with pytest.raises(FedloraError, match="no LoRA slots"):
        EdgeModel(setup["merged-a"], adapter=setup["adapter-a"])


def test_an_adapter_for_a_bundle_of_another_base_is_refused_at_export(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    from fedlora.export.adaptable import export_adapter_only

    other = _other_base(tmp_path)
    with pytest.raises(FedloraError, match="exported from another base") as exc:
        export_adapter_only(
            other, setup["root"] / "lora-a", setup["bundle"], tmp_path / "x", messages(REVIEW)
        )
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "x").exists()


def test_what_a_slot_cannot_hold_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from fedlora.export.slots import adapter_factors
    from fedlora.lora import RESIDUAL_FILE

    dora = shutil.copytree(setup["root"] / "lora-a", tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(FedloraError, match="use_dora is set.*without --adapter-only"):
        adapter_factors(dora)
    fedex = shutil.copytree(setup["root"] / "lora-a", tmp_path / "fedex")
    shutil.copy(fedex / "adapter_model.safetensors", fedex / RESIDUAL_FILE)
    with pytest.raises(FedloraError, match="dense residuals"):
        adapter_factors(fedex)


def test_the_command_line_exports_a_base_and_an_adapter_file(
    setup: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Execute
    from test_config import _cli

    common = ["--base-model", str(tiny_model_dir), "--quantize", "none", "--eval-samples", "2"]
    base = _cli("export", "--base-only", "--output", "base", *common, cwd=tmp_path)
    adapter = _cli(
        "export", "--adapter-only", "--base", "base", "--adapter", str(setup["root"] / "lora-a"),
        "--output", "ad", *common, cwd=tmp_path,
    )  # fmt: skip
    neither = _cli("export", "--adapter-only", "--base", "base", *common, cwd=tmp_path)

    # Assert
    assert base.returncode == 0, base.stderr[-2000:]
    assert adapter.returncode == 0, adapter.stderr[-2000:]
    assert (tmp_path / "ad" / "adapter.onnx_adapter").is_file()
    assert "fits base" in adapter.stdout and "same greedy tokens" in adapter.stdout
    lines = neither.stderr.strip().splitlines()
    assert neither.returncode == 2 and len(lines) == 1 and "--adapter FOLDER" in lines[0]


@pytest.mark.slow
def test_default_model_adapter_only_equals_the_merged_export(tmp_path: Path) -> None:
    # Prepare: the packaged SmolLM2 and an adapter with non-zero B on every linear layer
    from fedlora.basemodel import resolve_base_model
    from fedlora.export.adaptable import export_adapter_only, export_base
    from test_export import _make_adapter

    base = resolve_base_model("default")
    lora = _make_adapter(base, tmp_path / "lora", r=8, b_scale=0.02, seed=5)
    export_base(base, tmp_path / "bundle", messages(REVIEW))

    # Execute
    report = export_adapter_only(
        base, lora, tmp_path / "bundle", tmp_path / "adapter", messages(REVIEW)
    )

    # Assert
    print(f"\nSmolLM2 adapter-only: {report.summary()}; {report.info['size_mib']:.2f} MiB")
    assert report.ok and report.same_tokens
    assert report.logits_diff <= report.parity.tolerance
    assert report.cache_diff <= report.parity.tolerance


def test_the_runtime_applies_an_adapter_without_torch(setup: dict[str, Path]) -> None:
    # Execute: a fresh interpreter loads the int8 base, applies the file and answers
    base, adapter = str(setup["bundle"] / "onnx-int8"), str(setup["adapter-a"])
    heavy = ("torch", "transformers", "flwr", "peft", "onnx")
    code = (
        "import sys\n"
        "from fedlora.export.runtime import EdgeModel\n"
        f"m = EdgeModel({base!r}, adapter={adapter!r})\n"
        "m.generate([{'role': 'user', 'content': 'hi'}], 4)\n"
        f"print(sorted(n for n in {heavy!r} if n in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )

    # Assert
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_onnxruntime_genai_applies_the_same_adapter_file(setup: dict[str, Path]) -> None:
    # Prepare: onnxruntime-genai's own LoRA adapters (og.Adapters) on the adaptable int8 base
    import onnxruntime_genai as og

    from fedlora.export.genai import GENAI_CONFIG, genai_status
    from fedlora.export.parity import ATOL
    from fedlora.export.runtime import EdgeModel

    folder = setup["bundle"] / "onnx-int8"
    assert genai_status(folder) == GENAI_CONFIG
    edge = EdgeModel(folder, adapter=setup["adapter-a"])
    ids = _prompt(edge)
    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    adapters.load(str(setup["adapter-a"] / "adapter.onnx_adapter"), "a")

    # Execute
    runs = {}
    for name in (None, "a"):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + STEPS)
        generator = og.Generator(model, params)
        if name:
            generator.set_active_adapter(adapters, name)
        generator.append_tokens(ids)
        first = np.asarray(generator.get_logits()).reshape(-1)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        runs[name] = first, tokens

    # Assert
    applied = edge.logits(np.asarray([ids]))[0, -1]
    assert np.abs(runs["a"][0] - applied).max() <= ATOL
    assert np.abs(runs[None][0] - applied).max() > 100 * ATOL  # the file changed the answer
    assert runs["a"][1] == edge.generate_ids(ids, STEPS)
