"""Compressed deltas: round-trip error bounds per codec, sizes, stochastic rounding, bad wires.

Bounds checked (deterministic rounding): fp16 ``|err| <= |x| 2^-11 + 2^-25``; int8 and
int8-block ``|err| <= scale / 2`` of the value's tensor / block (plus float32 rounding of the
product, ``|x| 2^-23``). Stochastic rounding: ``|err| < ulp`` / ``scale`` and mean error ~ 0.
"""

import math
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedlora.protocol.adapter import spec_of
from fedlora.protocol.compression import CODECS, SCALE_SUFFIX, CodecError, decode, encode, nbytes

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
LOSSY = ("fp16", "int8", "int8-block")
FULL_MODEL_PARAMS = 134_515_008  # SmolLM2-135M, tied embeddings (538 MB model.safetensors)


def delta(seed: int = 0, outlier: float | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {
        A: rng.normal(0, 1e-3, (8, 576)).astype(np.float32),
        B: rng.normal(0, 1e-3, (576, 8)).astype(np.float32),
    }
    if outlier is not None:
        out[A][3, 100] = outlier
        out[B][7, 2] = -outlier
    return out


def spec(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in arrays.items()}


def round_trip(arrays, codec, block=64, rng=None):
    wire = encode(arrays, codec, block=block, rng=rng)
    return wire, decode(wire, codec, spec(arrays), block=block)


def block_scales(x: np.ndarray, block: int) -> np.ndarray:
    """Reference: the scale that applies to each value (max |x| of its block / 127)."""
    flat = x.reshape(-1).astype(np.float64)
    pad = np.concatenate([flat, np.zeros((-flat.size) % block)]).reshape(-1, block)
    per_block = np.abs(pad).max(axis=1) / 127
    return np.repeat(per_block, block)[: flat.size].reshape(x.shape)


# ---- round trips -------------------------------------------------------------------------------


def test_none_is_exact():
    arrays = delta()
    wire, back = round_trip(arrays, "none")
    for k in arrays:
        assert wire[k].dtype == np.float32 and np.array_equal(back[k], arrays[k])


def test_fp16_error_within_half_ulp():
    arrays = delta()
    arrays[A][0, :5] = [1e-7, -3e-6, 0.5, 1000.0, -65504.0]  # subnormal, normal, fp16 max
    _, back = round_trip(arrays, "fp16")
    for k, x in arrays.items():
        err = np.abs(back[k].astype(np.float64) - x)
        bound = np.abs(x) * 2.0**-11 + 2.0**-25
        assert back[k].dtype == np.float32 and (err <= bound).all(), k
        normal = np.abs(x) > 1e-4
        assert (err[normal] / np.abs(x[normal])).max() < 1e-3  # "fp16 relative ~1e-3"


@pytest.mark.parametrize("codec", ["int8", "int8-block"])
def test_int8_error_within_half_scale(codec):
    arrays = delta(outlier=0.05)
    wire, back = round_trip(arrays, codec)
    for k, x in arrays.items():
        scale = block_scales(x, 64) if codec == "int8-block" else np.abs(x).max() / 127
        err = np.abs(back[k].astype(np.float64) - x)
        assert (err <= scale / 2 * (1 + 1e-6) + np.abs(x) * 2.0**-23).all(), k
        assert wire[k].dtype == np.int8 and wire[k + SCALE_SUFFIX].dtype == np.float32
        np.testing.assert_allclose(wire[k + SCALE_SUFFIX].max(), np.abs(x).max() / 127, rtol=1e-6)


def test_blockwise_is_tighter_than_per_tensor_with_outliers():
    # Prepare: typical LoRA-delta values with one large outlier per tensor
    arrays = delta(outlier=0.05)
    # Execute
    _, per_tensor = round_trip(arrays, "int8")
    _, blockwise = round_trip(arrays, "int8-block")
    # Assert: the outlier costs per-tensor int8 most of its resolution (scale 0.05/127 ~ 4e-4,
    # close to the values' own spread 1e-3); blockwise confines it to one block of 64, so the
    # RMS error falls ~7x (the outlier's block dominates it) and the median error ~20x.
    for k, x in arrays.items():
        err_tensor, err_block = np.abs(per_tensor[k] - x), np.abs(blockwise[k] - x)
        assert np.sqrt(np.mean(err_block**2)) < np.sqrt(np.mean(err_tensor**2)) / 5, k
        assert np.median(err_block) < np.median(err_tensor) / 10, k


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize(
    "values",
    [
        np.zeros((4, 3)),
        np.full((4, 3), -0.25),
        np.zeros((0, 8)),
        np.array([[7e-4]]),
        np.array([[3.0, -3.0]]),
    ],
)
def test_zeros_constant_and_tiny_tensors_round_trip_exactly(codec, values):
    # int8 stores +-max|x| as q = +-127 (exact but for the float32 rounding of max|x| / 127 and
    # its product); zeros get scale 0; fp16 holds these values but 7e-4
    arrays = {A: values.astype(np.float32)}
    wire, back = round_trip(arrays, codec, block=4)
    assert back[A].shape == values.shape and back[A].dtype == np.float32
    tol = 2.0**-11 * 7e-4 if codec == "fp16" else 2.0**-22 * np.abs(values).max(initial=0)
    np.testing.assert_allclose(back[A], arrays[A], rtol=0, atol=tol)
    if codec.startswith("int8") and not values.any():
        assert not wire[A + SCALE_SUFFIX].any()


def test_block_size_sets_scale_count_and_last_block_may_be_short():
    arrays = {A: np.linspace(-1, 1, 70, dtype=np.float32).reshape(7, 10)}
    for block, count in [(64, 2), (7, 10), (1, 70), (100, 1)]:
        wire, back = round_trip(arrays, "int8-block", block=block)
        assert wire[A + SCALE_SUFFIX].shape == (count,)
        assert np.abs(back[A] - arrays[A]).max() <= 1 / 127 / 2 + 1e-7


# ---- stochastic rounding -----------------------------------------------------------------------


@pytest.mark.parametrize("codec", LOSSY)
def test_stochastic_rounding_is_unbiased(codec):
    # Prepare: values that sit between grid points (never on them)
    rng = np.random.default_rng(7)
    x = {A: rng.normal(0, 1e-3, (8, 64)).astype(np.float32)}
    x[A][0, 0] = 4e-3  # fixes the int8 scale across draws
    # Execute: many independent encodings of the same tensor
    draws = 400
    total = np.zeros(x[A].shape)
    for _ in range(draws):
        total += round_trip(x, codec, rng=rng)[1][A]
    mean_err = total / draws - x[A]
    _, nearest = round_trip(x, codec)
    step = np.abs(nearest[A] - x[A]).max() * 2  # the grid spacing, from the deterministic error
    # Assert: the average of draws converges to x (error of the mean ~ step / sqrt(draws))
    assert np.abs(mean_err).mean() < step / math.sqrt(draws)
    assert abs(mean_err.mean()) < step / math.sqrt(draws * x[A].size) * 4
    # ... while each single draw stays within one grid step
    single = round_trip(x, codec, rng=np.random.default_rng(1))[1][A]
    assert np.abs(single - x[A]).max() <= step * (1 + 1e-6) + 1e-12


def test_stochastic_rounding_is_reproducible_with_a_seed():
    a = encode(delta(), "int8-block", rng=np.random.default_rng(3))
    b = encode(delta(), "int8-block", rng=np.random.default_rng(3))
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ---- sizes -------------------------------------------------------------------------------------


def test_payload_sizes():
    arrays = delta()  # 2 tensors x 4608 values
    n = 2 * 4608
    assert nbytes(encode(arrays, "none")) == 4 * n
    assert nbytes(encode(arrays, "fp16")) == 2 * n
    assert nbytes(encode(arrays, "int8")) == n + 2 * 4  # one float32 scale per tensor
    assert nbytes(encode(arrays, "int8-block")) == n + 4 * n // 64
    assert 4 * n / nbytes(encode(arrays, "int8")) > 3.99


def smollm2_adapter_shapes(r: int = 8) -> dict[str, tuple[int, ...]]:
    """LoRA r on all linear layers of SmolLM2-135M (30 layers x 7 modules), as PEFT names them.

    Checked against fedlora.lora.adapter_shapes on the real model in the slow test below.
    """
    hidden, inter, kv = 576, 1536, 192
    modules = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    shapes = {}
    for layer in range(30):
        for module, (fan_in, fan_out) in modules.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (r, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, r)
    return shapes


def byte_table(shapes: dict[str, tuple[int, ...]]) -> dict[tuple[str, str], int]:
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(0, 1e-3, s).astype(np.float32) for k, s in shapes.items()}
    b_only = {k: v for k, v in arrays.items() if ".lora_B." in k}
    return {
        (factors, codec): nbytes(encode(part, codec))
        for factors, part in (("AB", arrays), ("B", b_only))
        for codec in CODECS
    }


def test_default_adapter_bytes_meet_the_400x_goal():
    # Prepare: the default adapter (2,442,240 values; B alone 1,244,160)
    shapes = smollm2_adapter_shapes()
    assert len(shapes) == 420
    assert sum(math.prod(s) for s in shapes.values()) == 2_442_240
    # Execute
    table = byte_table(shapes)
    # Assert: FFA-LoRA's B-only int8 update is >= 400x smaller than the fp32 model
    full = 4 * FULL_MODEL_PARAMS
    assert table["AB", "none"] == 4 * 2_442_240
    assert table["B", "int8"] == 1_244_160 + 210 * 4
    assert table["B", "int8-block"] == 1_244_160 + 4 * 1_244_160 // 64
    assert full / table["B", "int8"] >= 400  # 432x
    assert full / table["B", "int8-block"] >= 400  # 407x


@pytest.mark.slow
def test_hand_built_shapes_match_the_default_model():
    from fedlora.basemodel import resolve_base_model
    from fedlora.lora import LoraSettings, adapter_shapes

    assert adapter_shapes(resolve_base_model("default"), LoraSettings()) == smollm2_adapter_shapes()


# ---- on the wire -------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", list(CODECS))
def test_wire_tensors_survive_a_flower_array_record(codec):
    arrays = delta()
    wire = encode(arrays, codec)
    record = ArrayRecord({k: Array(v) for k, v in wire.items()})
    received = {k: v.numpy() for k, v in record.items()}
    assert nbytes(received) == nbytes(wire)
    back = decode(received, codec, spec_of(arrays))  # a protocol AdapterSpec works as spec
    expected = decode(wire, codec, spec(arrays))
    assert all(np.array_equal(back[k], expected[k]) for k in arrays)


EA, EB = re.escape(A), re.escape(B)  # tensor names as regular expressions


@pytest.mark.parametrize(
    "codec, mutate, pattern",
    [
        ("int8", lambda w: w.pop(A + SCALE_SUFFIX), f"{EA}: scale tensor {EA}::scale missing"),
        ("int8", lambda w: w.pop(B), f"{EB}: payload missing"),
        (
            "int8",
            lambda w: w.update({"extra": np.zeros(2, np.int8)}),
            "unexpected wire tensor extra",
        ),
        (
            "fp16",
            lambda w: w.update({A + SCALE_SUFFIX: np.ones(1, np.float32)}),
            f"unexpected wire tensor {EA}::scale",
        ),
        (
            "int8",
            lambda w: w.update({A: w[A].astype(np.float32)}),
            f"{EA}: payload dtype float32, expected int8",
        ),
        (
            "fp16",
            lambda w: w.update({B: w[B].astype(np.float32)}),
            f"{EB}: payload dtype float32, expected float16",
        ),
        (
            "int8",
            lambda w: w.update({A: w[A].reshape(576, 8)}),
            rf"{EA}: payload shape \(576, 8\), expected \(8, 576\)",
        ),
        (
            "int8",
            lambda w: w.update({A + SCALE_SUFFIX: np.ones(1, np.float64)}),
            f"{EA}: scale dtype float64, expected float32",
        ),
        (
            "int8-block",
            lambda w: w.update({B + SCALE_SUFFIX: w[B + SCALE_SUFFIX][:-1]}),
            rf"{EB}: scale shape \(71,\), expected \(72,\) \(block 64\)",
        ),
        (
            "int8",
            lambda w: w[A + SCALE_SUFFIX].__setitem__(0, np.nan),
            f"{EA}: scale holds NaN or Inf",
        ),
        (
            "int8-block",
            lambda w: w[B + SCALE_SUFFIX].__setitem__(3, np.inf),
            f"{EB}: scale holds NaN or Inf",
        ),
        (
            "int8",
            lambda w: w[A + SCALE_SUFFIX].__setitem__(0, -1.0),
            f"{EA}: scale holds a negative",
        ),
        ("int8", lambda w: w[A].__setitem__((0, 0), -128), f"{EA}: payload holds -128"),
        ("fp16", lambda w: w[A].__setitem__((0, 0), np.inf), f"{EA}: payload holds NaN or Inf"),
        ("none", lambda w: w[B].__setitem__((0, 0), np.nan), f"{EB}: payload holds NaN or Inf"),
    ],
)
def test_malformed_wire_is_rejected_with_the_tensor_named(codec, mutate, pattern):
    wire = encode(delta(), codec)
    mutate(wire)
    with pytest.raises(CodecError, match=pattern):
        decode(wire, codec, spec(delta()))


def test_wrong_block_size_is_caught_by_scale_length():
    wire = encode(delta(), "int8-block", block=32)
    with pytest.raises(CodecError, match=r"scale shape \(144,\), expected \(72,\)"):
        decode(wire, "int8-block", spec(delta()), block=64)


def test_unknown_codec_and_bad_inputs():
    with pytest.raises(CodecError, match="unknown codec 'int4'"):
        encode(delta(), "int4")
    with pytest.raises(CodecError, match="unknown codec 'int4'"):
        decode({}, "int4", {})
    with pytest.raises(CodecError, match="block=0"):
        encode(delta(), "int8-block", block=0)
    bad = delta()
    bad[A][0, 0] = np.nan
    with pytest.raises(CodecError, match=f"{EA}: holds NaN or Inf"):
        encode(bad, "int8")
    big = delta()
    big[B][0, 0] = 1e5
    with pytest.raises(CodecError, match=f"{EB}: .*exceeds the fp16 range"):
        encode(big, "fp16")
    with pytest.raises(CodecError, match="may not contain"):
        encode({A + SCALE_SUFFIX: np.zeros(2, np.float32)}, "none")
