"""The mixed int4 variant (fedlora.export.quantize): the attention projections, the
language-model head and the tied embedding it shares at 8 bits, the MLP at 4.

On the tiny model (tied head) and its Mistral shape (untied head): by default the head and the
attention projections are 8-bit and the MLP 4-bit; with ``int4_head_bits=4, int4_8bit=""`` all
are 4-bit; the mixed variant's logits are closer to fp32 than the all-4-bit ones. (The accuracy
this buys on the default model is measured by ``make bench-edge``: docs/edge.md.)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedlora.prompting import messages

pytestmark = pytest.mark.integration

REVIEW = "This drug worked well for my pain, but I felt dizzy for a week."


def _bits(folder: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(folder / "model.onnx")).graph
    out = {}
    for node in graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            name = re.sub(r"_Q\d+$", "", node.name)  # the quantizer names a node by its bits
            out[name] = next(a.i for a in node.attribute if a.name == "bits")
    return out


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_int4_keeps_the_head_at_8_bits_and_follows_fp32_more_closely(
    tmp_path: Path, family: str
) -> None:
    # Prepare: a fused fp32 export of a tiny model of the family (tied head: llama; untied:
    # mistral)
    from fedlora.export.onnx import export_onnx
    from fedlora.export.quantize import QuantSettings, quantize_variant
    from fedlora.export.runtime import EdgeModel
    from tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "base", family=family)
    fp32 = export_onnx(base, tmp_path / "fp32", graph="fused")

    # Execute
    mixed = quantize_variant(fp32, tmp_path / "mixed", "int4")
    all4 = QuantSettings(int4_head_bits=4, int4_8bit="")
    plain = quantize_variant(fp32, tmp_path / "plain", "int4", all4)

    # Assert
    mixed_bits, plain_bits = _bits(mixed), _bits(plain)
    heads = [name for name in mixed_bits if name.startswith(("lm_head", "embed_tokens"))]
    assert heads and all(mixed_bits[n] == 8 for n in heads)
    assert all(plain_bits[n] == 4 for n in heads)
    attention = [name for name in mixed_bits if ".attn." in name]
    mlp = [name for name in mixed_bits if ".mlp." in name]
    assert attention and all(mixed_bits[n] == 8 for n in attention)
    assert mlp and all(mixed_bits[n] == 4 for n in mlp)
    assert all(plain_bits[n] == 4 for n in attention)
    reference = EdgeModel(fp32)
    ids = np.asarray([reference.encode(reference.render(messages(REVIEW)))])
    ref = reference.logits(ids)
    mixed_diff = np.mean(np.abs(EdgeModel(mixed).logits(ids) - ref))
    plain_diff = np.mean(np.abs(EdgeModel(plain).logits(ids) - ref))
    assert mixed_diff < plain_diff


def test_int4_settings_are_checked() -> None:
    from fedlora.errors import ConfigError
    from fedlora.export.quantize import QuantSettings

    with pytest.raises(ConfigError, match="int4-head-bits=6: use 4 or 8"):
        QuantSettings(int4_head_bits=6)
    with pytest.raises(ConfigError, match="is not a regular expression"):
        QuantSettings(int4_8bit="attn(")
