"""A fused decoder graph for Llama-family models, written from the merged weights.

optimum's export traces transformers' eager code, so each decoded token runs thousands of small
ONNX nodes (shape arithmetic, masks, rotary halves) around a few large products; on a 135M model
the products are a fifth of the kernel time. This module writes instead the graph onnxruntime's
own LLM tooling targets, one fused operator per block (the layout onnxruntime-genai's model builder
uses; learned from its design, not copied):

- ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (RMSNorm, with the
  residual add folded in and the running residual as its fourth output);
- one packed ``q|k|v`` ``MatMul`` and one ``GroupQueryAttention`` (rotary embedding, causal
  softmax, a layer's sliding window as its ``local_window_size``, and the KV cache in one kernel);
- the SwiGLU MLP as three ``MatMul`` and a ``Sigmoid``/``Mul`` pair;
- a tied language-model head that reads the embedding table (``Gemm`` with ``transB``), so the
  fp32 model holds it once.

Inputs and outputs are the names optimum's ``ORTModelForCausalLM``, onnxruntime-genai and
:class:`fedlora.export.runtime.EdgeModel` speak: ``input_ids``, ``attention_mask`` (int64
``[batch, total]``: the sequence lengths ``GroupQueryAttention`` takes), ``position_ids`` (int64
``[batch, sequence]``: the rotary embedding's positions) and ``past_key_values.{i}.key|value``
``[batch, kv_heads, past, head_dim]`` in, ``logits`` and ``present.{i}.key|value`` out.
Every ``MatMul`` has a constant ``[in, out]`` weight, so
onnxruntime's ``MatMulNBitsQuantizer`` quantizes the graph unchanged
(:mod:`fedlora.export.quantize`).

Supported: decoder-only Llama, Mistral and Qwen2 checkpoints with SiLU MLPs, full or
sliding-window attention per layer (:func:`layer_windows`) and a rotary embedding whose
frequencies do not depend on the sequence length; :func:`unsupported_reason` says why another
model falls back to the traced export.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.errors import FedloraError

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' config.layer_types
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # frequencies fixed at export time
LM_HEAD = "lm_head"  # node name of the tied head (Gemm) or untied head (MatMul)
EMBEDDING = "embed_tokens"  # node name of the embedding Gather
EMBEDDING_WEIGHT = "model.embed_tokens.weight"
POSITIONS = "position_ids"  # the rotary embedding's positions, an input as optimum names it
OPSET = 17
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class DecoderShape:
    """What the graph needs from ``config.json``."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    tied: bool
    max_positions: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DecoderShape:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            eps=float(config.get("rms_norm_eps", 1e-6)),
            tied=bool(config.get("tie_word_embeddings", False)),
            max_positions=int(config.get("max_position_embeddings") or 4096),
        )


def _rope_type(config: dict[str, Any]) -> str:
    scaling = config.get("rope_scaling") or {}
    return str(scaling.get("rope_type") or scaling.get("type") or "default")


def unsupported_reason(config: dict[str, Any]) -> str | None:
    """Why the fused graph cannot express this model (None when it can)."""
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        return f"architecture {architectures or '(none)'} is not one of {', '.join(ARCHITECTURES)}"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {config.get('hidden_act')!r} (the fused MLP is SiLU-gated)"
    window = config.get("sliding_window")
    if window is not None and config.get("use_sliding_window", True):
        if not isinstance(window, int) or window < 1:
            return f"sliding_window={window!r} is not a positive integer"
        kinds = set(config.get("layer_types") or ()) - set(LAYER_TYPES)
        if kinds:
            return f"layer types {sorted(kinds)} (the fused graph has {', '.join(LAYER_TYPES)})"
    rope_type = _rope_type(config)
    if rope_type not in ROPE_TYPES:
        return f"rope type {rope_type!r} changes with the sequence length"
    if config.get("pretraining_tp", 1) not in (None, 1):
        return f"pretraining_tp={config['pretraining_tp']}"
    for key in ("num_attention_heads", "hidden_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(config.get(key), int):
            return f"config.json has no integer {key}"
    return None


def layer_windows(config: dict[str, Any]) -> list[int | None]:
    """Each layer's sliding attention window (None: full causal attention), as transformers
    reads ``config.json``: Mistral's ``sliding_window`` applies to every layer; Qwen2 only
    with ``use_sliding_window``, on the layers ``layer_types`` marks ``sliding_attention``."""
    layers = int(config["num_hidden_layers"])
    window = config.get("sliding_window")
    if window is None or not config.get("use_sliding_window", True):
        return [None] * layers
    types = config.get("layer_types") or ["sliding_attention"] * layers
    return [int(window) if kind == "sliding_attention" else None for kind in types]


def _rotary_caches(model_dir: Path, rows: int) -> tuple[Any, Any]:
    """cos and sin ``[rows, rotary_dim / 2]`` in float32, computed as transformers does (fp32
    angles, its own frequency initialisation, attention scaling folded in)."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[_rope_type(config.to_dict())](
        config, torch.device("cpu")
    )
    positions = torch.arange(rows, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq.float())
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
    return cos.float().numpy(), sin.float().numpy()


class _Weights:
    """The merged model's safetensors, read as float32 numpy arrays by name."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FedloraError(f"{model_dir} has no *.safetensors: give a merged model folder")
        self._where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="np") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self._where[name] = file
        self.model_dir = model_dir

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> Any:
        import numpy as np
        from safetensors import safe_open

        if name not in self._where:
            raise FedloraError(
                f"{self.model_dir} has no tensor {name!r}: is it a merged "
                f"Llama-family model written by merge_adapter?"
            )
        with safe_open(str(self._where[name]), framework="np") as handle:
            return np.ascontiguousarray(handle.get_tensor(name), dtype=np.float32)


class _Graph:
    """A small helper around onnx.helper: nodes, initializers, unique names. With
    ``lora_slots``, every linear layer gets an empty LoRA branch (:mod:`fedlora.export.slots`)."""

    def __init__(self, lora_slots: bool = False) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.lora_slots = lora_slots
        self.slot_inputs: list[Any] = []  # graph inputs of the overridable LoRA factors

    def node(
        self,
        op: str,
        inputs: list[str],
        outputs: list[str],
        name: str,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        from onnx import helper

        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs)
        )
        return outputs

    def const(self, name: str, array: Any) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name=name))
        return name

    def linear(self, x: str, weight: Any, bias: Any | None, name: str) -> str:
        """``x @ weight.T (+ bias)`` with ``weight`` in torch's ``[out, in]`` layout."""
        import numpy as np

        w = self.const(f"{name}.weight", np.ascontiguousarray(weight.T))
        (y,) = self.node("MatMul", [x, w], [f"{name}/MatMul_output"], f"{name}/MatMul")
        if self.lora_slots:
            y = self.lora_branch(x, y, weight.shape[1], weight.shape[0], name)
        if bias is None:
            return y
        b = self.const(f"{name}.bias", np.ascontiguousarray(bias))
        (y,) = self.node("Add", [y, b], [f"{name}/Add_output"], f"{name}/Add")
        return y

    def lora_branch(self, x: str, y: str, fan_in: int, fan_out: int, name: str) -> str:
        """``y + (x @ A) @ B`` with A ``[in, rank]`` and B ``[rank, out]`` overridable
        initializers (empty by default: rank 0 adds nothing), the slot an adapter file fills."""
        import numpy as np
        from onnx import TensorProto, helper

        from fedlora.export.slots import slot_names

        a, b = slot_names(name)
        rank = f"{name}.rank"
        self.const(a, np.zeros((fan_in, 0), dtype=np.float32))
        self.const(b, np.zeros((0, fan_out), dtype=np.float32))
        self.slot_inputs += [
            helper.make_tensor_value_info(a, TensorProto.FLOAT, [fan_in, rank]),
            helper.make_tensor_value_info(b, TensorProto.FLOAT, [rank, fan_out]),
        ]
        (low,) = self.node("MatMul", [x, a], [f"{name}/lora_A_output"], f"{name}/lora_A/MatMul")
        (delta,) = self.node("MatMul", [low, b], [f"{name}/lora_output"], f"{name}/lora_B/MatMul")
        (out,) = self.node("Add", [y, delta], [f"{name}/lora_Add_output"], f"{name}/lora/Add")
        return out


def build_fused_model(model_dir: Path, lora_slots: bool = False) -> Any:
    """The fused decoder of ``model_dir`` (a merged fp32 folder) as an ``onnx.ModelProto``;
    with ``lora_slots``, a LoRA slot on every linear layer (:mod:`fedlora.export.slots`)."""
    import numpy as np
    from onnx import TensorProto, helper

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    reason = unsupported_reason(config)
    if reason:
        raise FedloraError(f"{model_dir}: no fused graph for this model: {reason}")
    shape = DecoderShape.from_config(config)
    weights = _Weights(model_dir)
    g = _Graph(lora_slots)
    kv_names = [
        (f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(shape.layers)
    ]

    # Sequence lengths from the mask: GroupQueryAttention takes them as int32.
    one = g.const("one_i64", np.array(1, dtype=np.int64))
    axis1 = g.const("axis1_i64", np.array([1], dtype=np.int64))
    (mask_sum,) = g.node(
        "ReduceSum", ["attention_mask", axis1], ["mask_sum"], "mask/ReduceSum", keepdims=0
    )
    (lens,) = g.node("Sub", [mask_sum, one], ["seqlens_k_i64"], "mask/Sub")
    (seqlens_k,) = g.node("Cast", [lens], ["seqlens_k"], "mask/Cast", to=TensorProto.INT32)
    (mask_shape,) = g.node("Shape", ["attention_mask"], ["mask_shape"], "mask/Shape")
    (total64,) = g.node("Gather", [mask_shape, one], ["total_i64"], "mask/Gather", axis=0)
    (total,) = g.node(
        "Cast", [total64], ["total_sequence_length"], "mask/Cast_total", to=TensorProto.INT32
    )
    cos, sin = _rotary_caches(model_dir, shape.max_positions)
    cos_cache, sin_cache = g.const("cos_cache", cos), g.const("sin_cache", sin)

    embedding = g.const(EMBEDDING_WEIGHT, weights.get(EMBEDDING_WEIGHT))
    (residual,) = g.node(
        "Gather", [embedding, "input_ids"], ["embeddings"], f"{EMBEDDING}/Gather", axis=0
    )
    pending: str | None = None  # the last block's output, added to the residual by the next norm

    def norm(weight: str, name: str) -> str:
        nonlocal residual, pending
        gamma = g.const(weight, weights.get(weight))
        if pending is None:
            (out,) = g.node(
                "SimplifiedLayerNormalization",
                [residual, gamma],
                [f"{name}/output"],
                f"{name}/SimplifiedLayerNorm",
                axis=-1,
                epsilon=shape.eps,
                stash_type=1,
            )
            return out
        out, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization",
            [pending, residual, gamma],
            [f"{name}/output", "", "", f"{name}/residual"],
            f"{name}/SkipSimplifiedLayerNorm",
            domain=MS_DOMAIN,
            epsilon=shape.eps,
        )
        return out

    def bias(name: str) -> Any | None:
        return weights.get(name) if name in weights else None

    presents: list[tuple[str, str]] = []
    windows = layer_windows(config)
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        x = norm(f"{p}.input_layernorm.weight", f"layers.{i}.input_layernorm")
        qkv_w = np.concatenate(
            [weights.get(f"{p}.self_attn.{n}_proj.weight") for n in ("q", "k", "v")], axis=0
        )
        # Biases are whatever the checkpoint holds (Qwen2: q, k and v; Llama: attention_bias).
        parts = [bias(f"{p}.self_attn.{n}_proj.bias") for n in ("q", "k", "v")]
        held = [b for b in parts if b is not None]
        qkv_b = np.concatenate(held) if len(held) == len(parts) else None
        qkv = g.linear(x, qkv_w, qkv_b, f"layers.{i}.attn.qkv_proj")
        past_k, past_v = kv_names[i]
        attn, present_k, present_v = g.node(
            "GroupQueryAttention",
            [qkv, "", "", past_k, past_v, seqlens_k, total, cos_cache, sin_cache, POSITIONS],
            [f"layers.{i}.attn/output", f"present.{i}.key", f"present.{i}.value"],
            f"layers.{i}.attn/GroupQueryAttention",
            domain=MS_DOMAIN,
            num_heads=shape.heads,
            kv_num_heads=shape.kv_heads,
            scale=1.0 / math.sqrt(shape.head_dim),
            do_rotary=1,
            rotary_interleaved=0,
            # a window of w keys (the query's own and w - 1 before it) in both transformers and
            # onnxruntime (measured: w - 1 is 0.66 off in logits); -1: full attention
            local_window_size=-1 if windows[i] is None else windows[i],
        )
        presents.append((present_k, present_v))
        pending = g.linear(
            attn,
            weights.get(f"{p}.self_attn.o_proj.weight"),
            bias(f"{p}.self_attn.o_proj.bias"),
            f"layers.{i}.attn.o_proj",
        )
        x = norm(f"{p}.post_attention_layernorm.weight", f"layers.{i}.post_attention_layernorm")
        mlp = f"{p}.mlp"
        gate = g.linear(
            x, weights.get(f"{mlp}.gate_proj.weight"), bias(f"{mlp}.gate_proj.bias"),
            f"layers.{i}.mlp.gate_proj",
        )  # fmt: skip
        up = g.linear(
            x, weights.get(f"{mlp}.up_proj.weight"), bias(f"{mlp}.up_proj.bias"),
            f"layers.{i}.mlp.up_proj",
        )  # fmt: skip
        (sig,) = g.node("Sigmoid", [gate], [f"layers.{i}.mlp/sigmoid"], f"layers.{i}.mlp/Sigmoid")
        (silu,) = g.node("Mul", [gate, sig], [f"layers.{i}.mlp/silu"], f"layers.{i}.mlp/SiLU")
        (act,) = g.node("Mul", [silu, up], [f"layers.{i}.mlp/act"], f"layers.{i}.mlp/Mul")
        pending = g.linear(
            act, weights.get(f"{mlp}.down_proj.weight"), bias(f"{mlp}.down_proj.bias"),
            f"layers.{i}.mlp.down_proj",
        )  # fmt: skip
    hidden = norm("model.norm.weight", "final_norm")

    if shape.tied or "lm_head.weight" not in weights:
        # One table for both ends: [B*S, H] x E^T through Gemm(transB), then back to [B, S, V].
        flat_shape = g.const("flat_shape", np.array([-1, shape.hidden], dtype=np.int64))
        (flat,) = g.node("Reshape", [hidden, flat_shape], ["final_norm/flat"], "lm_head/Flatten")
        (logits2d,) = g.node("Gemm", [flat, embedding], ["logits_2d"], f"{LM_HEAD}/Gemm", transB=1)
        vocab = g.const("vocab_dim", np.array([shape.vocab], dtype=np.int64))
        (ids_shape,) = g.node("Shape", ["input_ids"], ["ids_shape"], "lm_head/Shape")
        (out_shape,) = g.node(
            "Concat", [ids_shape, vocab], ["logits_shape"], "lm_head/Concat", axis=0
        )
        g.node("Reshape", [logits2d, out_shape], ["logits"], "lm_head/Reshape")
    else:
        head = g.linear(hidden, weights.get("lm_head.weight"), None, LM_HEAD)
        g.node("Identity", [head], ["logits"], "lm_head/Identity")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv_shape: list[str | int | None] = ["batch", shape.kv_heads, "past_sequence", shape.head_dim]
    present_shape: list[str | int | None] = [
        "batch",
        shape.kv_heads,
        "total_sequence",
        shape.head_dim,
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info(POSITIONS, i64, ["batch", "sequence"]),
    ]
    for past_k, past_v in kv_names:
        inputs.append(helper.make_tensor_value_info(past_k, f32, kv_shape))
        inputs.append(helper.make_tensor_value_info(past_v, f32, kv_shape))
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "sequence", shape.vocab])]
    for present_k, present_v in presents:
        outputs.append(helper.make_tensor_value_info(present_k, f32, present_shape))
        outputs.append(helper.make_tensor_value_info(present_v, f32, present_shape))
    inputs += g.slot_inputs
    graph = helper.make_graph(g.nodes, "fedlora_fused_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="fedlora",
    )
    model.ir_version = 8
    return model


def export_fused(merged_dir: Path, out_dir: Path, base_id: str | None = None) -> Path:
    """Write ``out_dir/model.onnx`` (the fused graph of ``merged_dir``) and the runtime files.
    With ``base_id`` (see :func:`fedlora.export.slots.base_id`) the graph is an adaptable base:
    LoRA slots on every linear layer, and the id in its metadata for adapters to match."""
    import onnx

    from fedlora.export.onnx import MODEL_FILE, copy_runtime_files

    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    model = build_fused_model(merged_dir, lora_slots=base_id is not None)
    if base_id is not None:
        from fedlora.export.slots import BASE_ID_KEY

        onnx.helper.set_model_props(model, {BASE_ID_KEY: base_id})
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(MODEL_FILE + "*"):
        stale.unlink()
    large = model.ByteSize() > 1_900_000_000  # protobuf's 2 GB limit: external data above
    onnx.save_model(
        model,
        str(out_dir / MODEL_FILE),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=MODEL_FILE + "_data",
    )
    copy_runtime_files(merged_dir, out_dir)
    log.info(
        "Wrote the fused decoder graph of %s: %d nodes, %d initializers",
        merged_dir,
        len(model.graph.node),
        len(model.graph.initializer),
    )
    return out_dir
