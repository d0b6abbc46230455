"""Weight-only quantized variants of an exported ONNX model, with onnxruntime's own tools.

Each linear layer's ``MatMul`` with a constant weight becomes a ``MatMulNBits`` node
(onnxruntime's ``MatMulNBitsQuantizer``): the weight is stored in ``bits`` (8 or 4) per value in
blocks of ``block_size`` values along the input dimension, each block with its own fp32 scale
(symmetric by default: asymmetric int4 is the setting reported to produce garbage on small
decoders), and the product runs on int8 activations at ``accuracy_level`` 4 (onnxruntime's
fastest CPU path) or in fp32 at level 1. Everything else (embeddings, norms, attention) stays
fp32; the tied embedding, which the export reads through a ``Gather`` and a transposed
``MatMul``, stays one shared fp32 tensor.

The int4 variant is mixed by default: the attention projections (``QuantSettings.int4_8bit``),
the language-model head and the tied embedding it shares (``int4_head_bits``) stay at 8 bits, the
MLP's three matrices (two thirds of the weights) at 4. On the default model with the demo's
adapter, all-4-bit MatMuls cost 7.3 points of held-out accuracy, the attention projections at 8
bits none (figures: docs/edge.md, "int4 that keeps accuracy").

A variant lands in its own folder beside the fp32 one, with the tokenizer and config files the
edge runtime reads, so every folder of a bundle is a complete model for
:class:`fedlora.export.runtime.EdgeModel`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError, FedloraError

log = logging.getLogger(__name__)

BITS = {"int8": 8, "int4": 4}  # variant name -> bits per weight
DEFAULT_VARIANTS = ("int8",)  # what `fedlora export` ships unless --quantize says otherwise


@dataclass(frozen=True)
class QuantSettings:
    """How weights are quantized (``fedlora export --block-size --accuracy-level``)."""

    block_size: int = 32  # values per scale along the input dimension (16, 32, 64, 128, 256)
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (fast), 1 = fp32
    symmetric: bool = True  # zero point fixed at 0
    # Bits of the language-model head (and the tied embedding it shares) in the int4 variant:
    # 8 keeps the most sensitive matrix at 8 bits (a mixed scheme), 4 quantizes it like the rest.
    int4_head_bits: int = 8
    # MatMuls of the int4 variant kept at 8 bits, by a regular expression over node names: the
    # attention projections (q|k|v packed, o), the matrices whose 4-bit rounding cost the default
    # model its accuracy (docs/edge.md, "int4 that keeps accuracy"); "" keeps none.
    int4_8bit: str = "attn"

    def __post_init__(self) -> None:
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ConfigError(
                f"block-size={self.block_size}: use 16, 32, 64, 128 or 256 (values per scale)"
            )
        try:
            re.compile(self.int4_8bit)
        except re.error as exc:
            raise ConfigError(
                f"int4-8bit={self.int4_8bit!r} is not a regular expression ({exc})"
            ) from None
        if self.int4_head_bits not in (4, 8):
            raise ConfigError(f"int4-head-bits={self.int4_head_bits}: use 4 or 8")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(
                f"accuracy-level={self.accuracy_level}: use 0-4 (4 = int8 compute, 1 = fp32)"
            )


def parse_variants(text: str) -> tuple[str, ...]:
    """``"int8,int4"`` -> ("int8", "int4"); ConfigError naming the bad entry otherwise."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in BITS]
    if unknown:
        raise ConfigError(
            f"--quantize {text!r}: unknown variant {unknown[0]!r}; use a comma-separated "
            f"subset of {', '.join(BITS)} (or 'none')"
        )
    return names


def quantize_variant(
    fp32_dir: Path, out_dir: Path, variant: str, settings: QuantSettings | None = None
) -> Path:
    """Write ``out_dir/model.onnx``: ``fp32_dir``'s model with weight-only ``variant`` MatMuls.

    Returns ``out_dir``. FedloraError if the quantizer changed no MatMul (nothing to quantize).
    """
    import onnx

    from fedlora.export.onnx import MODEL_FILE, copy_runtime_files

    if variant not in BITS:
        raise ConfigError(f"quantized variant {variant!r}: use one of {', '.join(BITS)}")
    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    source = fp32_dir / MODEL_FILE
    if not source.is_file():
        raise FedloraError(f"{fp32_dir} has no {MODEL_FILE}: export the fp32 model first")
    bits = BITS[variant]
    settings = settings or QuantSettings()
    model = onnx.load(str(source))
    head_bits = settings.int4_head_bits if bits == 4 else bits
    # an adaptable base's LoRA slots stay fp32 (fedlora.export.slots); in the int4 variant the
    # sensitive MatMuls and an untied head take 8 bits (tied heads: _quantize_tied_head)
    eight = _eight_bit_nodes(model, settings) if bits == 4 else []
    lora = [n.name for n in model.graph.node if "/lora_" in n.name]
    quantizer = _run_quantizer(model, bits, settings, exclude=lora + eight)
    quantized = quantizer.model.model
    if eight:
        quantizer = _run_quantizer(quantized, 8, settings, include=eight)
        quantized = quantizer.model.model
    tied = _quantize_tied_head(quantized, head_bits, settings)
    count = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    if count == 0:
        raise FedloraError(
            f"{source}: no MatMul with a constant weight to quantize; is it a decoder export?"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MODEL_FILE
    for stale in out_dir.glob(MODEL_FILE + "*"):
        stale.unlink()
    large = quantized.ByteSize() > 1_900_000_000  # protobuf's 2 GB limit: external data above
    quantizer.model.save_model_to_file(str(target), use_external_data_format=large)
    copy_runtime_files(fp32_dir, out_dir)
    log.info(
        "Quantized %s to %s: %d MatMulNBits (%d bits, head %d, block %d, accuracy level %d)%s",
        source,
        target,
        count,
        bits,
        head_bits,
        settings.block_size,
        settings.accuracy_level,
        "; the tied embedding is one quantized table for the lookup and the head" if tied else "",
    )
    return out_dir


def _eight_bit_nodes(model: Any, settings: QuantSettings) -> list[str]:
    """The int4 variant's MatMuls kept at 8 bits: those ``int4_8bit`` names, and an untied head
    when ``int4_head_bits`` is 8 (LoRA slots excluded: they stay fp32)."""
    from fedlora.export.fused import LM_HEAD

    names = [n.name for n in model.graph.node if n.op_type == "MatMul" and "/lora_" not in n.name]
    picked = [n for n in names if settings.int4_8bit and re.search(settings.int4_8bit, n)]
    if settings.int4_head_bits == 8:
        picked += [n for n in names if n == f"{LM_HEAD}/MatMul"]
    return picked


def _run_quantizer(
    model: Any,
    bits: int,
    settings: QuantSettings,
    exclude: list[str] | None = None,
    include: list[str] | None = None,
) -> Any:
    """onnxruntime's ``MatMulNBitsQuantizer`` over ``model`` (all constant-weight MatMuls but
    ``exclude``, or only ``include``); returns the quantizer (its ``model.model``: the result)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        bits=bits,
    )
    quantizer = MatMulNBitsQuantizer(
        model,
        nodes_to_exclude=exclude,
        nodes_to_include=include,
        bits=bits,
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        algo_config=config,
    )
    quantizer.process()
    return quantizer


def _quantize_tied_head(model: Any, bits: int, settings: QuantSettings) -> bool:
    """Quantize a fused graph's tied embedding once, for both of its readers.

    The fused graph (:mod:`fedlora.export.fused`) reads the embedding table twice: a ``Gather``
    for the input lookup and a ``Gemm`` with ``transB`` for the language-model head, which
    ``MatMulNBitsQuantizer`` leaves in fp32 (it only rewrites ``MatMul``). On a small model
    that head is the largest product of a decoded token. Here the table is block-quantized
    once, with onnxruntime's own routine, into the layout ``MatMulNBits`` reads
    (``[vocab, blocks, blob]``, symmetric); the head becomes ``MatMulNBits`` and the lookup
    ``GatherBlockQuantized`` over a ``Reshape`` view of the same bytes, so the file holds one
    table. Returns False (graph unchanged) when the graph has no such pair.
    """
    import numpy as np
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    from fedlora.export.fused import EMBEDDING, LM_HEAD, MS_DOMAIN

    graph = model.graph
    by_name = {node.name: node for node in graph.node}
    head, lookup = by_name.get(f"{LM_HEAD}/Gemm"), by_name.get(f"{EMBEDDING}/Gather")
    if head is None or lookup is None or head.input[1] != lookup.input[0]:
        return False
    initializers = {t.name: t for t in graph.initializer}
    table_proto = initializers.get(head.input[1])
    if table_proto is None:
        return False
    table = numpy_helper.to_array(table_proto).astype(np.float32)  # [vocab, hidden]
    vocab, hidden = table.shape
    if hidden % settings.block_size:
        return False  # padded blocks: the lookup's view would not line up; keep fp32
    config = DefaultWeightOnlyQuantConfig(
        block_size=settings.block_size,
        is_symmetric=True,
        accuracy_level=settings.accuracy_level,
        bits=bits,
    )
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(table.T)
    )  # packed [vocab, blocks, blob] uint8, scales [vocab, blocks]
    blocks = scales.shape[1]
    name = table_proto.name
    data = numpy_helper.from_array(packed, name=f"{name}_Q{bits}")
    flat_scales = numpy_helper.from_array(
        np.ascontiguousarray(scales.reshape(-1)), name=f"{name}_scales"
    )
    row_shape = numpy_helper.from_array(np.array([vocab, -1], dtype=np.int64), f"{name}_rows")
    scale_shape = numpy_helper.from_array(
        np.array([vocab, blocks], dtype=np.int64), f"{name}_scale_rows"
    )
    graph.initializer.remove(table_proto)
    graph.initializer.extend([data, flat_scales, row_shape, scale_shape])
    new_head = helper.make_node(
        "MatMulNBits",
        [head.input[0], data.name, flat_scales.name],
        list(head.output),
        name=f"{LM_HEAD}/MatMulNBits",
        domain=MS_DOMAIN,
        K=hidden,
        N=vocab,
        bits=bits,
        block_size=settings.block_size,
        accuracy_level=settings.accuracy_level,
    )
    views = [
        helper.make_node(
            "Reshape", [data.name, row_shape.name], [f"{name}_Q{bits}_rows"], f"{EMBEDDING}/rows"
        ),
        helper.make_node(
            "Reshape",
            [flat_scales.name, scale_shape.name],
            [f"{name}_scales_rows"],
            f"{EMBEDDING}/scale_rows",
        ),
    ]
    new_lookup = helper.make_node(
        "GatherBlockQuantized",
        [views[0].output[0], lookup.input[1], views[1].output[0]],
        list(lookup.output),
        name=f"{EMBEDDING}/GatherBlockQuantized",
        domain=MS_DOMAIN,
        bits=bits,
        block_size=settings.block_size,
        gather_axis=0,
        quantize_axis=1,
    )
    nodes = list(graph.node)
    at_head, at_lookup = nodes.index(head), nodes.index(lookup)
    nodes[at_head] = new_head
    nodes[at_lookup : at_lookup + 1] = [*views, new_lookup]
    del graph.node[:]
    graph.node.extend(nodes)
    return True
