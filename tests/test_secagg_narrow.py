"""SecAgg+ on a narrow wire (16- or 32-bit masked vectors): weighted before quantizing,
rounded stochastically, summed modulo the wire's width; the secure mean stays within the stated
tolerance of the plain example-weighted mean.

Full protocol in process (the LocalGrid double of secagg_transcript) at 3, 10 and 100 nodes;
the encode / mask / sum / decode arithmetic alone where a seed must be fixed.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, RecordDict

from fedlora.clipping import clip_l2
from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.protocol import secagg_crypto as crypto
from fedlora.protocol.secagg import (
    Key,
    SecAggProtocolError,
    SecAggSettings,
    Stage,
    decode_sum,
    encode_update,
    flatten,
    quantize_stochastic,
    to_wire,
    unflatten,
    vector_length,
    weighted_vector,
)
from fedlora.server.app import NARROW_MAX_WEIGHT, secagg_settings
from fedlora.server.secagg import secure_weighted_sum
from fedlora.server.secagg_stages import parse_masked_vector
from secagg_transcript import LocalGrid, max_diff

SPEC = {"a": (4, 8), "b": (40,)}  # vectors of 1 + scalar limbs + 72 values
CLIP = 8.0  # above every update's norm (about 4.9): nothing clips


# Messages built outside a ServerApp need a task identity (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("task_identity")


def update_of(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: rng.uniform(-1, 1, size=s) for k, s in SPEC.items()}


def weight_of(node: int) -> int:
    """Unequal example counts, 1..500."""
    return 1 + (node * 37) % 500


def nodes_of(n: int) -> list[int]:
    return list(range(101, 101 + n))


def narrow(n: int, bits: int, nodes: list[int], **rest) -> SecAggSettings:
    """The largest quantization that cannot overflow, weights capped at the round's largest."""
    most = max(weight_of(x) for x in nodes)
    return SecAggSettings.for_nodes(CLIP, n, wire_bits=bits, max_weight=most, **rest)


def plain_mean(nodes: list[int]) -> dict[str, np.ndarray]:
    """The reference: example-weighted mean of the clipped updates, float64."""
    vecs = [clip_l2({"v": flatten(update_of(x), SPEC)}, CLIP)[0]["v"] for x in nodes]
    w = np.array([weight_of(x) for x in nodes], dtype=np.float64)
    return unflatten((w[:, None] * np.stack(vecs)).sum(0) / w.sum(), SPEC)


def local_grid(nodes: list[int], **kwargs) -> LocalGrid:
    def train_fn(node: int):
        return lambda content: (update_of(node), weight_of(node), {"train-loss": 0.25})

    return LocalGrid(nodes, train_fn=train_fn, **kwargs)


# ---- settings -------------------------------------------------------------------------------


def test_settings_refuse_a_wire_width_they_cannot_carry():
    with pytest.raises(ConfigError, match=r"wire_bits=24: use one of 16, 32, 64"):
        SecAggSettings(clip_norm=1.0, wire_bits=24)
    with pytest.raises(ConfigError, match=r"wire_bits=32 with modulus_bits=64.*modulus_bits=32"):
        SecAggSettings(clip_norm=1.0, wire_bits=32, quantization_bits=8)
    with pytest.raises(ConfigError, match="wire_bits='16': must be an integer"):
        SecAggSettings(clip_norm=1.0, wire_bits="16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="overflow.*lower max_weight to 65535"):
        SecAggSettings(clip_norm=1.0, wire_bits=16, modulus_bits=16, quantization_bits=8)
    s = SecAggSettings(
        clip_norm=1.0, wire_bits=16, modulus_bits=16, quantization_bits=8, max_weight=100
    )
    assert s.narrow and s.wire_dtype == np.dtype(np.uint16)
    assert SecAggSettings.from_record(s.to_record()) == s
    record = s.to_record()
    del record["wire-bits"]
    with pytest.raises(ConfigError, match="lack 'wire-bits'"):
        SecAggSettings.from_record(record)
    wide = SecAggSettings(clip_norm=1.0)
    assert not wide.narrow and wide.wire_dtype == np.dtype(np.uint64)
    assert wide.tolerance_for(7, 3) == wide.tolerance  # the 64-bit bound ignores n and W


def test_run_config_takes_16_32_or_64_wire_bits():
    assert RunConfig().secagg_wire_bits == 64
    assert RunConfig.from_mapping({"secagg-wire-bits": 16}).secagg_wire_bits == 16
    with pytest.raises(ConfigError, match="secagg-wire-bits=8: use 16, 32 or 64"):
        RunConfig.from_mapping({"secagg-wire-bits": 8})


def test_run_settings_weigh_equally_on_16_bits_and_cap_weights_on_32():
    cfg = RunConfig(secure_aggregation=True, min_nodes=2, secagg_wire_bits=16, local_steps=10)
    s = secagg_settings(cfg, 10)
    assert (s.wire_bits, s.modulus_bits, s.max_weight) == (16, 16, 1)  # equal weights
    assert 10 * s.levels < 2**16 <= 10 * (2 * s.levels + 1)  # the most bits that fit
    # five holders and one colluder assumed: 2t > 5 + 1
    assert s.num_shares == 5 and s.reconstruction_threshold == 4
    assert secagg_settings(RunConfig(), 10) == SecAggSettings(clip_norm=10.0)  # 64: as before
    wide = RunConfig(secure_aggregation=True, min_nodes=2, secagg_wire_bits=32)
    assert secagg_settings(wide, 10).max_weight == NARROW_MAX_WEIGHT
    dp = RunConfig(
        secure_aggregation=True, min_nodes=2, secagg_wire_bits=32, dp_noise_multiplier=1.0
    )
    assert secagg_settings(dp, 10).max_weight == 1  # under DP every node weighs 1 anyway


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("n", [3, 10, 100])
def test_for_nodes_picks_the_most_bits_that_cannot_overflow(bits, n):
    s = SecAggSettings.for_nodes(1.0, n, wire_bits=bits, max_weight=500)
    assert s.modulus_bits == bits and s.max_weight == 500
    assert n * s.levels < 2**bits <= n * (2 * s.levels + 1)  # one more bit would wrap
    assert n * s.max_weight < 2**bits
    s.check_overflow(n)
    assert s.max_clients() >= n


def test_a_node_count_that_could_wrap_is_refused():
    s = SecAggSettings.for_nodes(1.0, 100, wire_bits=16, max_weight=600)
    most = s.max_clients()
    assert most * s.max_weight < 2**16 and most * s.levels < 2**16
    s.check_overflow(most)
    with pytest.raises(ConfigError, match=f"sample at most {most} nodes per round.*wire_bits 32"):
        s.check_overflow(most + 1)
    with pytest.raises(ConfigError, match="lower max_weight to 327 and quantization_bits to 8"):
        s.check_overflow(200)
    with pytest.raises(ConfigError, match="overflow"):  # caught before any message is sent
        secure_weighted_sum(local_grid([]), range(most + 1), RecordDict(), s, SPEC)
    with pytest.raises(ConfigError, match="overflow"):  # 2**20 examples do not fit 16 bits
        SecAggSettings.for_nodes(1.0, 3, wire_bits=16)


# ---- encoding --------------------------------------------------------------------------------


def test_stochastic_rounding_is_reproducible_per_seed_and_unbiased():
    s = SecAggSettings(
        clip_norm=1.0, wire_bits=16, modulus_bits=16, quantization_bits=4, max_weight=100
    )
    x = np.linspace(-1.0, 1.0, 1001)
    a, b = quantize_stochastic(x, s, seed=7), quantize_stochastic(x, s, seed=7)
    assert np.array_equal(a, b) and a.dtype == np.uint64
    assert not np.array_equal(a, quantize_stochastic(x, s, seed=8))
    assert a.min() >= 0 and a.max() <= s.levels
    # Every draw errs by less than one step; the mean error over many draws is near 0.
    draws = np.stack([quantize_stochastic(x, s, seed) for seed in range(400)])
    err = draws * s.step - s.clip_norm - x
    assert np.abs(err).max() < s.step
    # Per value the mean error has std <= step / 2 / sqrt(400) = step / 40: 6 sigma is 0.15 step.
    assert np.abs(err.mean(0)).max() < 0.15 * s.step
    assert abs(err.mean()) < 0.01 * s.step  # over all 400 x 1001 draws
    with pytest.raises(ValueError, match="clip"):
        quantize_stochastic(x * 2, s, seed=0)


@pytest.mark.parametrize("bits", [16, 32])
def test_encode_decode_round_trip(bits):
    nodes = nodes_of(5)
    s = narrow(5, bits, nodes)
    x = flatten(update_of(nodes[0]), SPEC)
    w = weight_of(nodes[0])
    q = encode_update(x, w, s, seed=1)
    assert np.array_equal(q, encode_update(x, w, s, seed=1))
    vec = to_wire(weighted_vector(q, w, s), s)
    assert vec.dtype == np.dtype(f"uint{bits}") and vec[0] == w
    assert vec.size == vector_length(SPEC, s)
    summed, weight = decode_sum(vec.astype(np.uint64), s, SPEC, contributors=1)
    assert weight == w
    err = np.abs(flatten(summed, SPEC) - w * x).max()
    assert err < s.max_weight * s.step * (1 + 1e-9)  # one step of y, scaled back
    with pytest.raises(ValueError, match="contributors"):
        decode_sum(vec.astype(np.uint64), s, SPEC)
    with pytest.raises(ValueError, match="seed"):
        encode_update(x, w, s)
    with pytest.raises(ValueError, match="max_weight"):
        encode_update(x, s.max_weight + 1, s, seed=1)


@pytest.mark.parametrize("bits", [16, 32])
def test_masked_arithmetic_at_100_nodes_is_within_the_bound(bits):
    # Prepare: 100 nodes with fixed rounding seeds, each masked by its own self mask and by
    # pair masks that cancel, all in the wire dtype
    nodes = nodes_of(100)
    s = narrow(100, bits, nodes)
    pair, self_seeds = bytes(range(32)), [crypto.new_seed() for _ in nodes]
    total = np.zeros(vector_length(SPEC, s), dtype=s.wire_dtype)
    for i, node in enumerate(nodes):
        x = clip_l2({"v": flatten(update_of(node), SPEC)}, CLIP)[0]["v"]
        vec = weighted_vector(encode_update(x, weight_of(node), s, seed=node), weight_of(node), s)
        crypto.add_mask(vec, self_seeds[i], bits, +1)
        crypto.add_mask(vec, pair, bits, +1 if i % 2 else -1)
        wire = to_wire(vec, s)
        assert wire.dtype == s.wire_dtype
        np.add(total, wire, out=total)  # wraps modulo 2**bits
    # Execute: remove the self masks (as the server does once it rebuilds the seeds), decode
    for seed in self_seeds:
        crypto.add_mask(total, seed, bits, -1)
    summed, weight = decode_sum(total.astype(np.uint64), s, SPEC, contributors=100)
    # Assert: exact weights, mean within the stated bound, and the bound is not vacuous
    assert weight == sum(weight_of(x) for x in nodes)
    err = max_diff({k: v / weight for k, v in summed.items()}, plain_mean(nodes))
    bound = s.tolerance_for(100, weight)
    assert err <= bound, (err, bound)
    assert err > bound / 200, (err, bound)
    assert s.tolerance >= bound  # the static bound covers any round with weights >= 1


def test_masks_cancel_in_narrow_accumulators():
    seed = crypto.new_seed()
    for dtype, bits in ((np.uint16, 16), (np.uint32, 32), (np.uint64, 16)):
        acc = np.arange(50, dtype=dtype)
        crypto.add_mask(acc, seed, bits, +1)
        assert not np.array_equal(acc, np.arange(50))
        crypto.add_mask(acc, seed, bits, -1)
        assert np.array_equal(acc, np.arange(50, dtype=dtype))
    with pytest.raises(ValueError, match="unsigned integers that wide"):
        crypto.add_mask(np.zeros(4, np.uint16), seed, 32, +1)


# ---- the protocol in process -------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("n", [3, 10, 100])
def test_narrow_secure_mean_matches_the_plain_weighted_mean(n, bits):
    # Prepare
    nodes = nodes_of(n)
    s = narrow(n, bits, nodes, num_shares=5, reconstruction_threshold=3 if n == 3 else 4)
    grid = local_grid(nodes, record=n <= 10)
    # Execute
    result = secure_weighted_sum(grid, nodes, RecordDict(), s, SPEC)
    # Assert
    assert result.contributors == tuple(nodes) and not result.rejected
    assert result.total_weight == sum(weight_of(x) for x in nodes)
    assert result.tolerance == s.tolerance_for(n, result.total_weight)
    err = max_diff(result.mean(), plain_mean(nodes))
    assert err <= result.tolerance, (err, result.tolerance)
    for reply in grid.replies.get(Stage.COLLECT, {}).values():
        arr = reply.array_records[Key.MASKED][Key.VECTOR]
        assert arr.dtype == f"uint{bits}" and list(arr.shape) == [vector_length(SPEC, s)]


def test_masked_vectors_travel_at_their_real_size():
    nodes = nodes_of(4)
    received = {}
    for bits in (64, 32, 16):
        s = (
            SecAggSettings(clip_norm=CLIP, num_shares=4, reconstruction_threshold=3)
            if bits == 64
            else narrow(4, bits, nodes, num_shares=4, reconstruction_threshold=3)
        )
        result = secure_weighted_sum(local_grid(nodes), nodes, RecordDict(), s, SPEC)
        received[bits] = result.bytes_received[Stage.COLLECT]
    # .npy headers of <u8, <u4 and <u2 are equally long: only the values differ, per node.
    assert received[64] - received[32] == 4 * (4 * 73)
    assert received[32] - received[16] == 4 * (2 * 73)


def test_a_uint64_vector_in_a_32_bit_round_drops_its_node():
    nodes, bad = nodes_of(4), 102
    s = narrow(4, 32, nodes, num_shares=4, reconstruction_threshold=3)

    def widen(node: int, stage: str, content: RecordDict) -> None:
        if node == bad and stage == Stage.COLLECT:
            arr = content.array_records[Key.MASKED][Key.VECTOR]
            content.array_records[Key.MASKED][Key.VECTOR] = Array(arr.numpy().astype(np.uint64))

    grid = local_grid(nodes, corrupt=widen)
    result = secure_weighted_sum(grid, nodes, RecordDict(), s, SPEC)
    others = [x for x in nodes if x != bad]
    assert list(result.contributors) == others and set(result.rejected) == {bad}
    assert f"expected a numpy uint32 ({vector_length(SPEC, s)},)" in result.rejected[bad]
    assert result.total_weight == sum(weight_of(x) for x in others)
    assert max_diff(result.mean(), plain_mean(others)) <= result.tolerance


def test_the_server_checks_the_wire_dtype_before_loading():
    vec = np.arange(73, dtype=np.uint16)
    assert parse_masked_vector(Array(vec), 73, 16, "t", "uint16").dtype == np.uint16
    for bad in (vec.astype(np.uint32), vec.astype(np.uint64), vec[:72]):
        with pytest.raises(SecAggProtocolError, match="expected a numpy uint16"):
            parse_masked_vector(Array(bad), 73, 16, "t", "uint16")
    lying = Array("uint16", (73,), "numpy.ndarray", _npy(vec.astype(np.uint32)))
    with pytest.raises(SecAggProtocolError, match="bytes, expected"):
        parse_masked_vector(lying, 73, 16, "t", "uint16")


def _npy(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, arr, allow_pickle=False)
    return buffer.getvalue()
