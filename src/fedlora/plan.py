"""Plan a node's run before it starts: memory, traffic and time per round, from the config alone.

``fedlora plan`` answers "does this base model, quantization, rank and sequence length fit my
node, and how long will a round take?" without loading any weights. The model's shapes come
from its ``config.json`` (Llama-style decoders: Llama, Mistral, Qwen2, SmolLM, ...), the LoRA
tensors from :func:`fedlora.lora.adapter_shapes` (peft on the meta device), the bytes on the
wire from the wire format itself (``protocol/compression.py``, numpy only, imported inside
:func:`traffic`). No Flower; torch only inside :func:`fedlora.lora.adapter_shapes`.

Memory is the peak of a training step, counted tensor by tensor (what autograd saves for the
backward pass of one decoder layer, :func:`layer_activation_bytes`; the logits and their
cross-entropy, :func:`logits_bytes`), plus the weights, the LoRA tensors with their gradients
and AdamW's two moments, plus the Python/torch runtime (:data:`RUNTIME_BYTES`), plus on CPU an
allowance for what glibc's allocator keeps (:data:`HEAP_KEPT`). Loading has its own peak (the
safetensors file is mapped while the weights are converted out of it). The
activation formula follows the accounting of Korthikanti et al. (2022, "Reducing Activation
Recomputation in Large Transformer Models", arXiv:2205.05198), redone for a frozen base with
LoRA (a frozen linear layer saves no input; its LoRA path does) and for fedlora's training loop
(eager attention on CPU up to 512 tokens; logits only from the first scored column on).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError

GIB = 2**30
# Resident memory of a node process before any model is loaded: Python, torch, transformers,
# peft and fedlora's client modules imported (benchmarks/plan_check.py measures it in every run
# as its "runtime" row: 414 MiB on the 2-core Xeon of docs/plan.md).
RUNTIME_BYTES = 414 * 2**20
# Achieved training throughput, FLOP/s, by device and compute dtype: model FLOPs (4 x the linear
# weights per token, bench_client.py's count) per second of fedlora's training loop, from the
# README's `make bench-client` run (SmolLM2-135M, batch 4, max-length 256, alone on the 2-core
# Xeon with AMX): bf16 294 tok/s, fp32 195 tok/s. Matmul peaks are far higher (STACK: bf16 about
# 2.3 TFLOP/s on large products), but a step of small shapes on 2 cores reaches a fraction of
# them. No CUDA figure is assumed: pass --tflops.
THROUGHPUT: dict[tuple[str, str], float] = {("cpu", "bf16"): 0.125e12, ("cpu", "fp32"): 0.083e12}
THROUGHPUT_SOURCE = "fedlora's CPU training loop on a 2-core Xeon with AMX (README, bench-client)"
# glibc's malloc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which
# activation-sized tensors come from the heap, whose freed pages it keeps. Measured peaks with
# the default allocator exceeded those with a fixed threshold (MALLOC_MMAP_THRESHOLD_=131072,
# where RSS follows the live tensors) by 0.64x to 1.93x the activations (docs/plan.md: 135M bf16
# and fp32, 0.5B and 1B bf16). Not derived: an allowance just above the largest excess seen.
# allocator="fixed" (the node runs with that threshold) removes it.
HEAP_KEPT = 2.0
ALLOCATORS = ("glibc", "fixed")
EAGER_MAX_LENGTH = 512  # client/train.py: CPU rows up to this width train with eager attention
# Bytes per weight of a quantized decoder linear layer (payload + scales); embeddings, norms and
# lm_head stay in the compute dtype. bitsandbytes nf4: 4 bits + an fp32 absmax per 64 (no double
# quantization); int8: 1 byte + an fp32 scale per row (~1); optimum-quanto int4: 4 bits + a
# 16-bit scale and shift per 128; quanto int8: 1 byte + a scale per row (~1).
QUANTIZED_BYTES = {
    "nf4": 0.5 + 4 / 64,
    "int8": 1.0,
    "quanto-int4": 0.5 + 4 / 128,
    "quanto-int8": 1.0,
}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_ATTN, _MLP = ("q_proj", "k_proj", "v_proj", "qkv_proj"), ("gate_proj", "up_proj", "gate_up_proj")
LINEARS = (*_ATTN, "o_proj", *_MLP, "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a Llama-style decoder, read from its config.json."""

    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim (hidden / heads unless given)
    intermediate: int  # intermediate_size (MLP width)
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings: lm_head shares the embedding matrix
    file_bytes_per_param: int  # bytes per weight in the saved files ("dtype" / "torch_dtype")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in (*need, "vocab_size") if k not in config]
        if missing:
            raise ConfigError(
                f"config.json lacks {', '.join(missing)}: fedlora plan knows Llama-style "
                f"decoders (Llama, Mistral, Qwen2, SmolLM); give such a model's config"
            )
        heads = int(config["num_attention_heads"])
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        return cls(
            hidden=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            file_bytes_per_param=_DTYPE_BYTES.get(dtype.removeprefix("torch."), 4),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        """Weights of every decoder linear layer (what quantization backends compress)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings (and an untied lm_head) and norms: kept in the compute dtype."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def adapted_layers(names: Iterable[str]) -> tuple[str, ...]:
    """The linear layers an adapter's LoRA tensor names adapt (``q_proj``, ...), sorted."""
    return tuple(sorted({n.split(".lora_")[0].rsplit(".", 1)[1] for n in names}))


def read_shape(path: Path) -> ModelShape:
    """The shape of the model whose config.json is ``path`` or lies in the folder ``path``."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no config.json there; give a model folder or its config.json")
    try:
        return ModelShape.from_config(json.loads(file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not valid JSON ({exc})") from None


@dataclass(frozen=True)
class StepSettings:
    """What one training step of a node looks like (flat, from the run config)."""

    compute: str  # "bf16" or "fp32": the dtype activations are computed in
    batch_size: int  # rows per micro-batch
    length: int  # tokens per row (plan for max-length: every row full)
    scored: int  # columns that get vocabulary logits (completion loss: the answer's width)
    lora_r: int
    targets: tuple[str, ...]  # adapted linear layers of each decoder layer (e.g. LINEARS)
    dropout: bool = False  # LoRA dropout > 0 (saves the dropped input and its mask)
    checkpointing: bool = False  # gradient checkpointing (recompute each layer in backward)
    device: str = "cpu"  # "cpu" or "cuda" (CUDA runs sdpa attention: no s x s probabilities)
    grad_layers: int = 0  # layers backward runs through, from the lowest adapted one up; 0 = all
    allocator: str = "glibc"  # CPU: "glibc" (its defaults) or "fixed" (MALLOC_MMAP_THRESHOLD_ set)

    @property
    def act_bytes(self) -> int:
        return 2 if self.compute == "bf16" else 4

    @property
    def tokens(self) -> int:
        return self.batch_size * self.length

    @property
    def eager(self) -> bool:
        return self.device == "cpu" and self.length <= EAGER_MAX_LENGTH


def layer_activation_bytes(shape: ModelShape, step: StepSettings) -> int:
    """Bytes autograd saves in one decoder layer's forward pass, for its backward pass.

    Per token (e = bytes of the compute dtype): both RMSNorms keep an fp32 copy of their input
    and its 1 / rms (2 x (4h + 4)); the SwiGLU MLP keeps gate, up and silu(gate) (3ie); attention
    keeps q and the repeated k and v (3 heads x head_dim x e) and, eager, the fp32 softmax and its
    cast to e (heads x length x (4 + e), once when e = 4). A frozen linear layer keeps nothing;
    LoRA on it keeps its input (shared by q/k/v and by gate/up), and A's output (r x e); with
    LoRA dropout, the dropped input and its mask per adapted layer.
    """
    e, t = step.act_bytes, set(step.targets)
    h, i, a, d = shape.hidden, shape.intermediate, shape.heads, shape.head_dim
    per_token = 2 * (4 * h + 4) + 3 * i * e + 3 * a * d * e
    if step.eager:
        per_token += a * step.length * (4 + (e if e != 4 else 0))
    inputs = {
        "attn": (h, _ATTN),
        "o": (a * d, ("o_proj",)),
        "mlp": (h, _MLP),
        "down": (i, ("down_proj",)),
    }
    for width, names in inputs.values():
        if t & set(names):
            per_token += width * e
    for name in t:
        per_token += step.lora_r * e
        if step.dropout:  # fused layers (Phi-3's qkv_proj, gate_up_proj) read the hidden state
            per_token += shape.linear_shapes().get(name, (h, 0))[0] * (e + 1)
    return per_token * step.tokens


def activation_bytes(shape: ModelShape, step: StepSettings) -> int:
    """Saved activations of the whole forward pass (with checkpointing: each layer's input, plus
    one layer recomputed during backward), the final norm's fp32 copy and the rotary tables.

    Backward stops at the lowest adapted layer: layers below it save nothing, and its first norm
    saves nothing either (its input needs no gradient).
    """
    shared = (4 * shape.hidden + 4 + 2 * shape.head_dim * step.act_bytes) * step.tokens
    layer = layer_activation_bytes(shape, step)
    layers = step.grad_layers or shape.layers
    if step.checkpointing:
        return layers * shape.hidden * step.act_bytes * step.tokens + layer + shared
    return layers * layer - (4 * shape.hidden + 4) * step.tokens + shared


def logits_bytes(shape: ModelShape, step: StepSettings) -> int:
    """The loss's peak: logits in the compute dtype (kept through backward), and in fp32 the
    log-softmax output, its gradient and the gradient of its input, all live at once."""
    return step.batch_size * step.scored * shape.vocab * (step.act_bytes + 12)


def weight_bytes(shape: ModelShape, quantization: str, compute: str) -> int:
    """Resident weights of the frozen base: linears quantized or not, the rest in ``compute``."""
    plain = 2 if compute == "bf16" else 4
    if quantization == "fp32":
        return shape.params * 4
    if quantization == "bf16":
        return shape.params * 2
    per = QUANTIZED_BYTES.get(quantization, plain)
    return math.ceil(shape.linear_params * per) + shape.other_params * plain


@dataclass(frozen=True)
class Memory:
    """Peak bytes of one node, part by part."""

    runtime: int  # Python, torch and libraries (RUNTIME_BYTES)
    weights: int  # the frozen base as loaded
    adapter: int  # LoRA tensors (fp32)
    optimizer: int  # gradients and AdamW's two moments of the trained LoRA tensors (fp32)
    activations: int  # saved for backward (all layers, or layer inputs with checkpointing)
    logits: int  # the loss's peak (logits, log-softmax and their gradients)
    load_peak: int  # while loading: runtime, weights, and the mapped files if converted
    heap_kept: int = 0  # freed tensors' pages glibc's allocator may keep (CPU; HEAP_KEPT)

    @property
    def live_peak(self) -> int:
        """The training peak of live tensors (the RSS with a fixed mmap threshold)."""
        parts = (self.runtime, self.weights, self.adapter, self.optimizer, self.activations)
        return sum(parts) + self.logits

    @property
    def train_peak(self) -> int:
        """The training step's peak RSS: live tensors and what the allocator keeps."""
        return self.live_peak + self.heap_kept

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.load_peak)


def memory(
    shape: ModelShape,
    step: StepSettings,
    quantization: str,
    adapter_params: int,
    trained_params: int,
    file_bytes: int | None = None,
) -> Memory:
    """The memory plan of one node; ``file_bytes``: the weight files' size (default: the
    parameters in the config's dtype).

    Loading maps the safetensors files: weights kept in the files' dtype stay those mapped pages
    (no copy), any other dtype is a copy made while the whole file is mapped.
    """
    weights = weight_bytes(shape, quantization, step.compute)
    files = shape.params * shape.file_bytes_per_param if file_bytes is None else file_bytes
    same = quantization in ("auto", "bf16", "fp32") and weights == shape.params * (
        shape.file_bytes_per_param
    )
    return Memory(
        runtime=RUNTIME_BYTES,
        weights=weights,
        adapter=4 * adapter_params,
        optimizer=3 * 4 * trained_params,
        activations=activation_bytes(shape, step),
        logits=logits_bytes(shape, step),
        heap_kept=_heap_kept(shape, step),
        load_peak=RUNTIME_BYTES + weights + (0 if same else files),
    )


def _heap_kept(shape: ModelShape, step: StepSettings) -> int:
    if step.device != "cpu" or step.allocator == "fixed":
        return 0
    return int(HEAP_KEPT * activation_bytes(shape, step))


def step_flops(shape: ModelShape, step: StepSettings, adapter_params: int) -> float:
    """FLOPs of one micro-batch: forward and input gradients through the frozen base (2 + 2 per
    weight and token), LoRA's forward, input and weight gradients (6), attention scores and
    their gradients (2 products forward, 4 backward), the lm_head on scored columns (2 + 2); a
    checkpointed layer runs its forward twice."""
    n = step.tokens
    layers = 2.0 * n * shape.linear_params
    attn = 4.0 * step.batch_size * step.length**2 * shape.heads * shape.head_dim * shape.layers
    again = 1.0 if step.checkpointing else 0.0
    head = 4.0 * step.batch_size * step.scored * shape.hidden * shape.vocab
    return layers * (2 + again) + attn * (3 + again) + 6.0 * n * adapter_params + head


def largest_batch(fits: Callable[[int], bool], limit: int = 1 << 16) -> int:
    """The largest batch size ``b`` in [1, limit] for which ``fits(b)``; 0 if not even 1
    (peak memory grows with the batch size, so a binary search suffices)."""
    if not fits(1):
        return 0
    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


@dataclass(frozen=True)
class Budget:
    """What a node has to train in: the bytes it may use and the adapter it trains."""

    bytes: int  # memory the node may use (RAM on CPU, GPU memory on CUDA)
    adapter_params: int  # LoRA values in the model
    trained_params: int  # those the strategy trains (gradients and AdamW moments)


def activations_fit(
    shape: ModelShape, step: StepSettings, quantization: str, budget: Budget
) -> bool:
    """Whether a training step as ``step`` says (activations, logits, weights, adapter,
    optimizer and runtime) peaks within ``budget.bytes``."""
    found = memory(shape, step, quantization, budget.adapter_params, budget.trained_params)
    return found.train_peak <= budget.bytes


def needs_gradient_checkpointing(
    shape: ModelShape, step: StepSettings, quantization: str, budget: Budget
) -> bool:
    """True when the step does not fit ``budget`` without gradient checkpointing but does with
    it. When it fits neither way checkpointing is no cure: False (a smaller batch is; see
    :func:`largest_batch`)."""
    if activations_fit(shape, replace(step, checkpointing=False), quantization, budget):
        return False
    return activations_fit(shape, replace(step, checkpointing=True), quantization, budget)


@dataclass(frozen=True)
class Traffic:
    """Payload bytes of one node in one round (adapter tensors; SecAgg+'s key and share stages
    and the scalar limbs of its masked vector are not counted: a few KB)."""

    values: int  # adapter values a node sends (the strategy's sent factors)
    up_plain: int  # encoded delta with the run's codec
    up_secure: int  # SecAgg+ masked vector: weight + values, secagg-wire-bits each
    down: int  # the global adapter's sent factors, down-codec (steady state)
    down_first: int  # round 1 (a down codec sends nothing: nodes derive the seeded start)


def traffic(
    sent: Mapping[str, tuple[int, ...]], codec: str, down_codec: str, block: int, wire_bits: int
) -> Traffic:
    """Bytes on the wire for the sent tensors ``sent`` (name -> shape), from the wire format's
    own layout (:func:`fedlora.protocol.compression.wire_spec`)."""
    import numpy as np

    from fedlora.protocol.compression import wire_spec

    def size(name: str) -> int:
        spec = wire_spec(name, sent, block)
        return sum(np.dtype(d).itemsize * math.prod(s) for d, s in spec.values())

    values = sum(math.prod(s) for s in sent.values())
    return Traffic(
        values=values,
        up_plain=size(codec),
        up_secure=(1 + values) * wire_bits // 8,
        down=size(down_codec),
        down_first=0 if down_codec != "none" else size("none"),
    )
