"""Fuzzing the plain path's network entry points: acceptance or a typed error, never a crash.

Train replies (every codec), eval replies, round configs, the codec decoders and the ``.npy``
header reader get fully random inputs and valid inputs with one field corrupted (so the fuzzer
reaches the checks behind the first ones). Harness: tests/fuzzing.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlora.protocol.compression import decode, encode, wire_spec
from fedlora.protocol.gate import METRIC_SPECS, npy_layout, read_arrays
from fedlora.protocol.messages import ARRAYS, CONFIG, METRICS, EvalReply, RoundConfig, TrainReply
from fuzzing import outcome
from hostile import (
    BLOCK,
    CODECS,
    SPEC,
    VALID_ROUND,
    copy_content,
    delta,
    eval_content,
    huge_header,
    raw_set,
    train_content,
)

DTYPE_NAMES = ["float32", "float16", "float64", "int8", "int64", "uint8", "bool", "object", "<U3"]
STYPES = ["numpy.ndarray", "torch.Tensor", "", "pickle"]

# Strategies are built once, here: building them inside a draw costs more than the test itself.

small_ints = st.integers(min_value=-3, max_value=12)
any_ints = st.one_of(small_ints, st.integers(), st.sampled_from([2**31, 2**53 + 1, 2**63, 2**70]))
any_floats = st.floats(allow_nan=True, allow_infinity=True)
metric_values = st.one_of(
    any_ints,
    any_floats,
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
    st.lists(any_floats, max_size=3),
)
hostile_values = st.one_of(
    metric_values, st.text(max_size=6), st.none(), st.booleans(), st.binary(max_size=6)
)
shapes = st.lists(st.integers(min_value=0, max_value=9), max_size=3).map(tuple)
huge_shapes = st.one_of(
    shapes, st.lists(st.integers(min_value=0, max_value=2**40), max_size=3).map(tuple)
)
booleans = st.booleans()
seeds = st.integers(0, 3)
dtype_names = st.one_of(st.sampled_from(DTYPE_NAMES), st.text(max_size=6))
stypes = st.one_of(st.sampled_from(STYPES), st.text(max_size=6))
names = st.one_of(st.sampled_from([*SPEC, *(k + "::scale" for k in SPEC)]), st.text(max_size=10))
metric_names = st.one_of(st.sampled_from(sorted(METRIC_SPECS)), st.text(max_size=6))
record_names = st.one_of(st.sampled_from([ARRAYS, METRICS, CONFIG]), st.text(max_size=6))
config_values = st.one_of(
    any_ints, any_floats, st.text(max_size=10), st.binary(max_size=8), st.booleans()
)
numpy_arrays = st.one_of(
    hnp.arrays(
        dtype=hnp.scalar_dtypes(),
        shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4),
    ),
    st.just(np.array([{"pickled": 1}, None], dtype=object)),
)
spec_like_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float16, np.int8]),
    shape=st.sampled_from([(2, 4), (4, 2), (2,), (1,), (3, 3), (0,)]),
)
npy_kinds = st.sampled_from(["valid", "header", "random", "cut", "grown", "flipped"])
header_dtypes = st.sampled_from(["<f4", "<f2", "|i1", "|O", "<f8", ">f4", "x"])
header_values = st.integers(min_value=0, max_value=2**62)
random_bytes = st.binary(max_size=300)
tails = st.binary(min_size=1, max_size=64)
flips = st.integers(1, 255)


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype.hasobject)
    return buf.getvalue()


@st.composite
def npy_payloads(draw: st.DrawFn) -> bytes:
    """Bytes that are, or nearly are, a .npy file."""
    kind = draw(npy_kinds)
    if kind == "random":
        return draw(random_bytes)
    if kind == "header":
        return huge_header(draw(header_dtypes), draw(header_values))
    data = npy(draw(spec_like_arrays if kind == "valid" else numpy_arrays))
    if kind == "cut":
        return data[: draw(st.integers(min_value=0, max_value=len(data)))]
    if kind == "grown":
        return data + draw(tails)
    if kind == "flipped":
        at = draw(st.integers(min_value=0, max_value=len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(flips)]) + data[at + 1 :]
    return data


payloads = npy_payloads()


@st.composite
def flwr_arrays(draw: st.DrawFn) -> Array:
    """An Array with any metadata and any (mostly .npy-like) bytes."""
    return Array(draw(dtype_names), draw(huge_shapes), draw(stypes), draw(payloads))


any_flwr_arrays = flwr_arrays()
name_lists = st.lists(names, max_size=4, unique=True)
metric_name_lists = st.lists(metric_names, max_size=8, unique=True)


@st.composite
def array_records(draw: st.DrawFn) -> ArrayRecord:
    record = ArrayRecord()
    for name in draw(name_lists):
        record[name] = draw(any_flwr_arrays)
    return record


@st.composite
def metric_records(draw: st.DrawFn) -> MetricRecord:
    record = MetricRecord()
    for key in draw(metric_name_lists):
        if draw(booleans):
            record[key] = draw(metric_values)
        else:
            raw_set(record, key, draw(hostile_values))
    return record


any_array_records, any_metric_records = array_records(), metric_records()
record_kinds = st.sampled_from(["arrays", "metrics", "config"])
record_name_lists = st.lists(record_names, max_size=3, unique=True)


@st.composite
def random_contents(draw: st.DrawFn) -> RecordDict:
    """A RecordDict of any records under likely and unlikely names."""
    content = RecordDict()
    for key in draw(record_name_lists):
        kind = draw(record_kinds)
        if kind == "arrays":
            content[key] = draw(any_array_records)
        elif kind == "metrics":
            content[key] = draw(any_metric_records)
        else:
            content[key] = ConfigRecord({"x": draw(config_values)})
    return content


# ----------------------------------------------------------------------------- mutations of valid

VALID_TRAIN = {(codec, seed): train_content(codec, seed) for codec in CODECS for seed in range(4)}
train_wheres = st.sampled_from(["array-bytes", "array-meta", "array-set", "metric", "record"])
meta_fields = st.sampled_from(["dtype", "shape", "stype"])
record_targets = st.sampled_from([ARRAYS, METRICS, "extra"])
any_records = st.one_of(any_array_records, any_metric_records)


def _mutate_metric(draw: st.DrawFn, metrics: MetricRecord) -> None:
    key = draw(metric_names)
    if key in metrics and draw(booleans):
        del metrics[key]
    else:
        raw_set(metrics, key, draw(hostile_values))


@st.composite
def mutated_train(draw: st.DrawFn, codec: str) -> RecordDict:
    """A valid train reply with one array, one metric or one record corrupted."""
    content = copy_content(VALID_TRAIN[codec, draw(seeds)])
    arrays, metrics = content.array_records[ARRAYS], content.metric_records[METRICS]
    where = draw(train_wheres)
    wire_names = st.sampled_from(sorted(arrays))
    if where == "array-bytes":
        name = draw(wire_names)
        old = arrays[name]
        arrays[name] = Array(old.dtype, tuple(old.shape), old.stype, draw(payloads))
    elif where == "array-meta":
        name = draw(wire_names)
        old = arrays[name]
        field = draw(meta_fields)
        dtype = draw(dtype_names) if field == "dtype" else old.dtype
        shape = draw(huge_shapes) if field == "shape" else tuple(old.shape)
        stype = draw(stypes) if field == "stype" else old.stype
        arrays[name] = Array(dtype, shape, stype, old.data)
    elif where == "array-set":
        name = draw(names)
        if name in arrays and draw(booleans):
            del arrays[name]
        else:
            arrays[name] = draw(any_flwr_arrays)
    elif where == "metric":
        _mutate_metric(draw, metrics)
    else:
        content[draw(record_targets)] = draw(any_records)
    return content


MUTATED_TRAIN = {codec: mutated_train(codec) for codec in CODECS}
VALID_EVAL = [eval_content(acc) for acc in (None, 0.0, 0.5, 1.0)]
eval_indexes = st.integers(0, len(VALID_EVAL) - 1)


@st.composite
def mutated_eval(draw: st.DrawFn) -> RecordDict:
    content = copy_content(VALID_EVAL[draw(eval_indexes)])
    _mutate_metric(draw, content.metric_records[METRICS])
    return content


VALID_CONFIG = VALID_ROUND.to_record()
config_keys = st.one_of(st.sampled_from(sorted(VALID_CONFIG)), st.text(max_size=6))
config_key_lists = st.lists(st.sampled_from(sorted(VALID_CONFIG)), max_size=30)
mutation_counts = st.integers(1, 3)
one_in_ten = st.integers(0, 9)
config_or_list = st.one_of(config_values, st.lists(st.integers(), max_size=2))


@st.composite
def round_configs(draw: st.DrawFn) -> ConfigRecord:
    if draw(booleans):  # fully random
        record = ConfigRecord()
        for key in draw(config_key_lists):
            record[key] = draw(config_values)
        return record
    record = ConfigRecord(dict(VALID_CONFIG))
    for _ in range(draw(mutation_counts)):
        key = draw(config_keys)
        if key in record and draw(booleans):
            del record[key]
        elif draw(one_in_ten) == 0:
            raw_set(record, key, draw(hostile_values))
        else:
            record[key] = draw(config_or_list)
    return record


VALID_WIRES = {(c, seed): encode(delta(seed), c, BLOCK) for c in CODECS for seed in range(4)}
wire_edits = st.integers(0, 2)
wire_values = st.one_of(numpy_arrays, spec_like_arrays)


@st.composite
def wires(draw: st.DrawFn, codec: str) -> dict[str, np.ndarray]:
    """Wire tensors for a codec: a valid encoding with tensors replaced, dropped or added."""
    wire = {k: v.copy() for k, v in VALID_WIRES[codec, draw(seeds)].items()}
    own = st.sampled_from(sorted(wire))
    for _ in range(draw(wire_edits)):
        name = draw(st.one_of(own, names))
        if name in wire and draw(booleans):
            del wire[name]
        else:
            wire[name] = draw(wire_values)
    return wire


WIRES = {codec: wires(codec) for codec in CODECS}
blocks = st.one_of(st.just(BLOCK), st.integers(min_value=-2, max_value=2**40))


# ----------------------------------------------------------------------------- the entry points


@pytest.mark.fuzz
@given(content=random_contents(), codec=st.sampled_from(CODECS))
def test_fuzz_random_train_replies(content, codec):
    with outcome("train-reply (random)"):
        TrainReply.from_content(content, SPEC, codec, BLOCK)


@pytest.mark.fuzz
@pytest.mark.parametrize("codec", CODECS)
@given(data=st.data())
def test_fuzz_mutated_train_replies(codec, data):
    content = data.draw(MUTATED_TRAIN[codec])
    with outcome(f"train-reply ({codec}, mutated)"):
        TrainReply.from_content(content, SPEC, codec, BLOCK)


@pytest.mark.fuzz
@given(content=st.one_of(random_contents(), mutated_eval()))
def test_fuzz_eval_replies(content):
    with outcome("eval-reply"):
        EvalReply.from_content(content)


@pytest.mark.fuzz
@given(record=round_configs())
def test_fuzz_round_config(record):
    with outcome("round-config"):
        RoundConfig.from_record(record)


@pytest.mark.fuzz
@pytest.mark.parametrize("codec", CODECS)
@given(data=st.data())
def test_fuzz_codec_decode(codec, data):
    wire = data.draw(WIRES[codec])
    block = data.draw(blocks)
    with outcome(f"codec-decode ({codec})"):
        decode(wire, codec, SPEC, block)


@pytest.mark.fuzz
@given(record=st.one_of(array_records(), st.just(ArrayRecord())), codec=st.sampled_from(CODECS))
def test_fuzz_array_gate(record, codec):
    with outcome("array-gate"):
        read_arrays(record, wire_spec(codec, SPEC, BLOCK))


@pytest.mark.fuzz
@given(data=npy_payloads())
def test_fuzz_npy_header(data):
    with outcome("npy-header"):
        npy_layout(data)
