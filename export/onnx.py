"""Export a merged causal-LM folder to a single ONNX file with a KV cache, tokenizer beside it.

Two graph forms. ``fused`` (:mod:`fedlora.export.fused`, the default wherever the model is a
Llama-family decoder it can express) writes one attention operator per layer straight from the
weights. ``traced`` runs optimum's ONNX exporter (task ``text-generation-with-past``) on the
model loaded from a local folder (``local_files_only``: nothing is fetched) with eager attention,
tracing transformers' code.
Either way the result is one ``model.onnx`` with inputs ``input_ids``, ``attention_mask``
(``position_ids`` too when traced), ``past_key_values.{i}.key|value`` and outputs ``logits``,
``present.{i}.key|value``, plus the files the edge runtime needs: tokenizer.json,
tokenizer_config.json (with the chat template), special_tokens_map.json, chat_template.jinja,
config.json and generation_config.json.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from fedlora.errors import FedloraError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# Files the edge runtime reads beside model.onnx; the first ones are required.
REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")
OPTIONAL_FILES = ("special_tokens_map.json", "generation_config.json", "chat_template.jinja")
TASK = "text-generation-with-past"


GRAPHS = ("auto", "fused", "traced")


def choose_graph(merged_dir: Path, graph: str = "auto") -> str:
    """``fused`` or ``traced``: what ``graph`` (auto, fused, traced) means for this model.

    ``auto`` is the fused decoder (:mod:`fedlora.export.fused`) wherever it can express the
    model, else optimum's traced export; ``fused`` refuses a model it cannot express.
    """
    from fedlora.export.fused import unsupported_reason

    if graph not in GRAPHS:
        raise FedloraError(f"graph={graph!r}: use one of {', '.join(GRAPHS)}")
    if graph == "traced":
        return graph
    config = json.loads((Path(merged_dir) / "config.json").read_text(encoding="utf-8"))
    reason = unsupported_reason(config)
    if reason is None:
        return "fused"
    if graph == "fused":
        raise FedloraError(
            f"{merged_dir}: the fused graph cannot express this model ({reason}); "
            f"use --graph traced (optimum's export) or auto"
        )
    log.info("No fused graph for %s (%s): using optimum's traced export", merged_dir, reason)
    return "traced"


def export_onnx(
    merged_dir: Path, out_dir: Path, validate: bool = False, graph: str = "auto"
) -> Path:
    """Export ``merged_dir`` (a plain HF causal-LM folder) to ``out_dir/model.onnx``.

    ``graph`` picks the fused decoder (``fused``; ``auto`` where the model allows it) or
    optimum's trace of transformers' code (``traced``). ``validate`` runs optimum's own output
    check as well (traced only; slower, and the pipeline's parity check compares logits and
    greedy tokens more strictly). Returns ``out_dir``.
    """
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    for name in ("config.json", "tokenizer.json"):
        if not (merged_dir / name).is_file():
            raise FedloraError(
                f"{merged_dir} has no {name}: export a folder written by "
                f"merge_adapter (model + tokenizer)"
            )
    if choose_graph(merged_dir, graph) == "fused":
        from fedlora.export.fused import export_fused

        export_fused(merged_dir, out_dir)
        log.info("Exported %s (%.1f MiB)", out_dir / MODEL_FILE, onnx_size_mib(out_dir))
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("Exporting %s to ONNX (%s) in %s", merged_dir, TASK, out_dir)
    _traced_export(merged_dir, out_dir, validate)
    if not (out_dir / MODEL_FILE).is_file():
        raise FedloraError(
            f"the ONNX export wrote no {MODEL_FILE} to {out_dir}: check the exporter's log above"
        )
    copy_runtime_files(merged_dir, out_dir)
    log.info("Exported %s (%.1f MiB)", out_dir / MODEL_FILE, onnx_size_mib(out_dir))
    return out_dir


def _traced_export(merged_dir: Path, out_dir: Path, validate: bool) -> None:
    """optimum's export of ``merged_dir``, traced through transformers' eager attention.

    What ``optimum.exporters.onnx.main_export`` does for this task, except the model is loaded
    with ``attn_implementation="eager"``, the computation the parity check runs as its
    reference: transformers' default (SDPA) drops what only the eager code applies, e.g.
    Gemma-2's attention-logit soft-capping (its traced graph was 6.7e-3 off in logits).
    """
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.tasks import TasksManager
    from optimum.utils.save_utils import maybe_load_preprocessors

    model = TasksManager.get_model_from_task(
        TASK,
        str(merged_dir),
        framework="pt",
        device="cpu",
        local_files_only=True,
        library_name="transformers",
        attn_implementation="eager",
    )
    model.config.use_cache = True
    onnx_export_from_model(
        model,
        output=out_dir,
        task=TASK,
        device="cpu",
        do_validation=validate,
        preprocessors=maybe_load_preprocessors(str(merged_dir)),
    )


def copy_runtime_files(src: Path, dst: Path) -> None:
    """Make sure the tokenizer/config files sit beside model.onnx, chat template included."""
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        if not (dst / name).is_file() and (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    missing = [name for name in REQUIRED_FILES if not (dst / name).is_file()]
    if missing:
        raise FedloraError(
            f"{dst} lacks {', '.join(missing)} after export and {src} has none to "
            f"copy: save the tokenizer with the merged model"
        )
    # transformers >= 4.47 keeps the template in chat_template.jinja only; also put it into
    # tokenizer_config.json so that any reader (older transformers, other runtimes) finds it.
    template_file = dst / "chat_template.jinja"
    config_file = dst / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if "chat_template" not in config and template_file.is_file():
        config["chat_template"] = template_file.read_text(encoding="utf-8")
        config_file.write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def onnx_size_mib(onnx_dir: Path) -> float:
    """Size of model.onnx plus any external-data files, in MiB."""
    files = [
        p
        for p in Path(onnx_dir).iterdir()
        if p.is_file()
        and (
            p.name == MODEL_FILE or p.name.startswith(MODEL_FILE + "_") or p.suffix == ".onnx_data"
        )
    ]
    return sum(p.stat().st_size for p in files) / 2**20
