"""onnxruntime-genai's ``genai_config.json`` for an exported model folder.

onnxruntime-genai (``onnxruntime_genai.Model(folder)``, with Python, C#, Java and Objective-C
bindings) runs a folder holding an ONNX decoder, ``genai_config.json`` and the tokenizer files
(``tokenizer.json``, ``tokenizer_config.json``, which every export already writes). The config
says what its model builder writes for its own graphs (``onnxruntime_genai.models.builder``,
``make_genai_config``): the model type, the decoder's input and output names with the
``%d`` patterns of the KV cache, head counts, the context length, bos/eos/pad ids and the search
defaults. The runtime feeds ``input_ids``, ``attention_mask`` ``[batch, total]`` and
``position_ids`` ``[batch, new]`` (past length onwards) when the graph has them, which is what
:class:`fedlora.export.runtime.EdgeModel` feeds.

- The fused graph (:mod:`fedlora.export.fused`) runs with ``past_present_share_buffer``: its
  ``GroupQueryAttention`` reads the sequence lengths from the mask, so past and present can be
  one buffer of ``max_length`` positions (no copy per token), as for the builder's graphs.
- optimum's traced graph concatenates past and new keys, so its present grows each step: it runs
  with separate past and present buffers, and the generic ``decoder`` model type.
- A graph that needs anything else (an input the runtime does not feed, a KV cache without its
  present outputs, no eos id) gets no config: :func:`write_genai_config` returns the reason in one
  line and the export's card records it.

The search defaults are greedy (``do_sample`` false), the decoding the export's gates check;
a caller changes them per request (``GeneratorParams.set_search_options``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
MODEL_FILE = "model.onnx"
FEEDS = ("input_ids", "attention_mask", "position_ids")  # what the runtime feeds by name
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# model types of onnxruntime-genai's decoder-only path that the fused graph writes; anything
# else (optimum's traced graphs) is its generic "decoder", which adds no type-specific behaviour
FUSED_TYPES = ("llama", "mistral", "qwen2")
_INT64, _FLOAT, _FLOAT16 = 7, 1, 10  # onnx.TensorProto element types


@dataclass(frozen=True)
class GraphIO:
    """What a decoder graph takes and gives: name -> onnx element type."""

    inputs: dict[str, int]  # required inputs only (an input with an initializer is optional)
    outputs: dict[str, int]
    shared_kv: bool  # all attention is GroupQueryAttention: past and present may share a buffer

    @classmethod
    def read(cls, model_file: Path) -> GraphIO:
        import onnx

        graph = onnx.load(str(model_file), load_external_data=False).graph
        defaults = {t.name for t in graph.initializer}
        return cls(
            inputs={
                i.name: i.type.tensor_type.elem_type for i in graph.input if i.name not in defaults
            },
            outputs={o.name: o.type.tensor_type.elem_type for o in graph.output},
            shared_kv=_kv_producers(graph) == {"GroupQueryAttention"},
        )

    def layers(self) -> int:
        return len({m.group(1) for m in map(PAST.match, self.inputs) if m})


def _kv_producers(graph: Any) -> set[str]:
    """The op types that write the graph's present outputs."""
    wanted = {o.name for o in graph.output if o.name.startswith("present.")}
    return {node.op_type for node in graph.node if wanted & set(node.output)}


def unsupported_reason(
    io: GraphIO, config: dict[str, Any], generation: dict[str, Any]
) -> str | None:
    """Why onnxruntime-genai cannot run this graph (None when it can), given the folder's
    ``config.json`` and ``generation_config.json``."""
    if "input_ids" not in io.inputs:
        return "the graph has no input_ids input"
    layers = io.layers()
    if not layers:
        return "the graph has no KV cache (past_key_values.N.key and .value inputs)"
    unknown = [n for n in io.inputs if n not in FEEDS and not PAST.match(n)]
    if unknown:
        return (
            f"input {unknown[0]!r} is not one onnxruntime-genai feeds "
            f"({', '.join(FEEDS)}, past_key_values.N.key and .value)"
        )
    for i in range(layers):
        for part in ("key", "value"):
            if f"past_key_values.{i}.{part}" not in io.inputs:
                return f"the KV cache has no past_key_values.{i}.{part} input"
            if f"present.{i}.{part}" not in io.outputs:
                return f"the KV cache has no present.{i}.{part} output"
    if "logits" not in io.outputs:
        return "the graph has no logits output"
    ints = {io.inputs[n] for n in ("attention_mask", "position_ids") if n in io.inputs}
    if len(ints) > 1:
        return "attention_mask and position_ids differ in type (the runtime feeds one type)"
    if io.outputs["logits"] not in (_FLOAT, _FLOAT16):
        return "logits are neither float32 nor float16"
    if not _token_ids(config, generation)[1]:
        return "config.json and generation_config.json give no eos_token_id"
    return None


def _token_ids(config: dict[str, Any], generation: dict[str, Any]) -> tuple[Any, list[int], int]:
    """(bos, eos list, pad) as generation_config.json overrides config.json."""

    def pick(key: str) -> Any:
        value = generation.get(key)
        return config.get(key) if value is None else value

    eos = pick("eos_token_id")
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad = pick("pad_token_id")
    pad_id = int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0)
    return pick("bos_token_id"), eos_ids, pad_id


def genai_config(folder: Path, io: GraphIO) -> dict[str, Any]:
    """The ``genai_config.json`` of ``folder`` (its ``config.json`` and graph ``io``)."""
    folder = Path(folder)
    config = _read(folder / "config.json")
    bos, eos, pad = _token_ids(config, _read(folder / "generation_config.json"))
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    context = int(config.get("max_position_embeddings") or 4096)
    model_type = str(config.get("model_type", ""))
    inputs = {name: name for name in FEEDS if name in io.inputs}
    inputs |= {"past_key_names": "past_key_values.%d.key"}
    inputs |= {"past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key"}
    outputs |= {"present_value_names": "present.%d.value"}
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": MODEL_FILE,
        "head_size": int(config.get("head_dim") or hidden // heads),
        "hidden_size": hidden,
        "inputs": inputs,
        "outputs": outputs,
        "num_attention_heads": heads,
        "num_hidden_layers": io.layers(),
        "num_key_value_heads": int(config.get("num_key_value_heads") or heads),
    }
    model = {
        "bos_token_id": bos,
        "context_length": context,
        "decoder": decoder,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": pad,
        "type": model_type if io.shared_kv and model_type in FUSED_TYPES else "decoder",
        "vocab_size": int(config["vocab_size"]),
    }
    search = {
        "do_sample": False,
        "early_stopping": True,
        "max_length": context,
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": io.shared_kv,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
    }
    return {"model": model, "search": search}


def write_genai_config(folder: Path) -> str | None:
    """Write ``folder/genai_config.json`` for onnxruntime-genai; returns None when written, or
    why the runtime cannot run the graph (one line; then no config, and a stale one is removed)."""
    folder = Path(folder)
    target = folder / GENAI_CONFIG
    io = GraphIO.read(folder / MODEL_FILE)
    config = _read(folder / "config.json")
    reason = unsupported_reason(io, config, _read(folder / "generation_config.json"))
    reason = reason or align_tokenizer(folder)
    if reason is None:
        written = genai_config(folder, io)
        target.write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
        log.info("Wrote %s (model type %s)", target, written["model"]["type"])
        return None
    target.unlink(missing_ok=True)
    log.warning(
        "onnxruntime-genai cannot run %s: %s; no %s written (fedlora-edge runs it)",
        folder,
        reason,
        GENAI_CONFIG,
    )
    return reason


def _byte_level_decoder(tokenizer: dict[str, Any]) -> dict[str, Any] | None:
    """The bare ``ByteLevel`` decoder of a byte-level BPE whose decoder wraps it in
    sentencepiece steps (``ByteFallback``, ``Fuse``, ``Replace`` of U+2581), as transformers'
    GGUF conversion writes SmolLM2's; None for any other tokenizer. onnxruntime-genai's
    tokenizer takes such a decoder for a sentencepiece model and maps every space to -1."""
    decoder = tokenizer.get("decoder") or {}
    pre = json.dumps(tokenizer.get("pre_tokenizer"))
    if decoder.get("type") != "Sequence" or '"ByteLevel"' not in pre:
        return None
    steps = decoder.get("decoders") or []
    kinds = [step.get("type") for step in steps]
    if kinds.count("ByteLevel") != 1 or not set(kinds) <= {
        "ByteFallback",
        "Fuse",
        "Replace",
        "ByteLevel",
    }:
        return None
    replaced = [step for step in steps if step.get("type") == "Replace"]
    if any(step.get("pattern") != {"String": "\u2581"} for step in replaced):
        return None
    return dict(next(step for step in steps if step.get("type") == "ByteLevel"))


def align_tokenizer(folder: Path) -> str | None:
    """Give ``folder/tokenizer.json`` the bare ``ByteLevel`` decoder where the sentencepiece
    steps around it change nothing (every token of the vocabulary, alone and all together,
    decodes the same; :func:`_byte_level_decoder`), so onnxruntime-genai's tokenizer reads it
    as the byte-level BPE it is. Returns why not when the steps would change a decoding."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    decoder = _byte_level_decoder(data)
    if decoder is None:
        return None
    before = Tokenizer.from_str(json.dumps(data))
    after = Tokenizer.from_str(json.dumps(data | {"decoder": decoder}))
    ids = [[i] for i in range(before.get_vocab_size(with_added_tokens=True))]
    ids.append([i for (i,) in ids])
    if before.decode_batch(ids, skip_special_tokens=False) != after.decode_batch(
        ids, skip_special_tokens=False
    ):
        return "tokenizer.json's decoder reads as sentencepiece to onnxruntime-genai"
    text = json.dumps(data | {"decoder": decoder}, indent=2, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    log.info("%s: the byte-level decoder without its no-op sentencepiece steps", path)
    return None


def genai_status(folder: Path) -> str:
    """What the model card records for ``folder``: the config written, or why not."""
    reason = write_genai_config(folder)
    return GENAI_CONFIG if reason is None else f"not written: {reason}"


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


__all__ = [
    "GENAI_CONFIG",
    "GraphIO",
    "genai_config",
    "genai_status",
    "unsupported_reason",
    "write_genai_config",
]
