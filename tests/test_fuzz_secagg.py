"""Fuzzing SecAgg+: no server reply and no server message may crash either side.

Inputs are mostly *mutations of valid messages*: an honest round among four in-process nodes is
recorded once (fixed session, complete graph); each example replays one stage from the recorded
state with one field of one message changed (dropped, retyped, truncated, a byte flipped, ids
swapped, entries added), then runs the rest of the round live. The rest are random messages.
Acceptance or a FedloraError (SecAggError, SecAggProtocolError...) is fine; an accepted server
round must also be right: the sum of its contributors (not checked where the masked vector
itself was changed: no server can tell it from an honest one within the clip range).
"""

from __future__ import annotations

import copy
import functools
import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given
from hypothesis import strategies as st

from fedlora.client.secagg import handle_secagg
from fedlora.protocol.secagg import SECURE_METRICS, Key, SecAggSettings, Stage
from fuzzing import outcome
from secagg_transcript import (
    ReplayGrid,
    Transcript,
    expected_mean,
    honest_transcript,
    max_diff,
    memoized_crypto,
    run_from,
    stage_message,
    train_fn_for,
    weight_of,
)

pytestmark = pytest.mark.fuzz

INT64 = st.integers(-(2**63), 2**63 - 1)
SCALAR = st.one_of(INT64, st.floats(), st.text(max_size=12), st.binary(max_size=80), st.booleans())
CONFIG_VALUE = st.one_of(
    SCALAR,
    st.lists(INT64, max_size=6),
    st.lists(st.binary(max_size=80), max_size=6),
    st.lists(st.text(max_size=8), max_size=4),
    st.lists(st.floats(), max_size=4),
    st.lists(st.booleans(), max_size=4),
)
METRIC_VALUE = st.one_of(
    INT64, st.floats(), st.lists(INT64, max_size=4), st.lists(st.floats(), max_size=4)
)
KEYS = [v for k, v in vars(Key).items() if not k.startswith("_") and isinstance(v, str)]
FIELD_NAME = st.one_of(st.sampled_from(KEYS + sorted(SECURE_METRICS)), st.text(max_size=10))
FIVE = SecAggSettings(
    clip_norm=4.0, num_shares=5, reconstruction_threshold=4, modulus_bits=40, quantization_bits=16
)


@pytest.fixture(scope="module", autouse=True)
def _environment():
    """Task identity for Messages built outside a run; cached crypto for repeated inputs."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    with pytest.MonkeyPatch.context() as mp:
        memoized_crypto(mp)
        yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@functools.cache
def honest() -> Transcript:
    return honest_transcript()


@functools.cache
def with_a_dropout() -> Transcript:
    """Five nodes, complete graph, node 55 vanishes at collect: unmask rebuilds its mask key."""
    return honest_transcript((11, 22, 33, 44, 55), FIVE, vanish={55: Stage.COLLECT})


# ---- mutations --------------------------------------------------------------------------


def edit_bytes(data, value: bytes) -> bytes:
    op = data.draw(st.sampled_from(["flip", "truncate", "empty", "extend", "random"]))
    if op == "flip" and value:
        i = data.draw(st.integers(0, len(value) - 1))
        bit = data.draw(st.integers(1, 255))
        return value[:i] + bytes([value[i] ^ bit]) + value[i + 1 :]
    if op == "truncate" and value:
        return value[: data.draw(st.integers(0, len(value) - 1))]
    if op == "extend":
        return value + data.draw(st.binary(min_size=1, max_size=32))
    if op == "random":
        return data.draw(st.binary(max_size=400))
    return b""


def edit_scalar(data, value, ids):
    if isinstance(value, bool):
        return not value
    if isinstance(value, bytes):
        return edit_bytes(data, value)
    if isinstance(value, int):
        return data.draw(
            st.one_of(st.sampled_from([*ids, 0, -1, 2**63 - 1, value + 1, value - 1]), INT64)
        )
    if isinstance(value, float):
        return data.draw(
            st.one_of(st.sampled_from([float("nan"), float("inf"), -1.0, 1e300]), st.floats())
        )
    return data.draw(st.text(max_size=12))


def edit_value(data, value, ids, metric: bool):
    if data.draw(st.integers(0, 9)) == 0:  # another type altogether
        return data.draw(METRIC_VALUE if metric else CONFIG_VALUE)
    if not isinstance(value, list):
        return edit_scalar(data, value, ids)
    out = list(value)
    op = data.draw(st.sampled_from(["drop", "dup", "swap", "edit", "edit", "empty", "reverse"]))
    if not out or op == "empty":
        return []
    i = data.draw(st.integers(0, len(out) - 1))
    j = data.draw(st.integers(0, len(out) - 1))
    if op == "drop":
        del out[i]
    elif op == "dup":
        out.append(out[i])
    elif op == "swap":
        out[i], out[j] = out[j], out[i]
    elif op == "reverse":
        out.reverse()
    else:
        out[i] = edit_scalar(data, out[i], ids)
        if type(out[i]) is not type(value[i]):  # lists stay of one type
            out[i] = value[i]
    return out


def edit_array(data, arr: Array) -> Array:
    dtype, shape, stype, blob = arr.dtype, list(arr.shape), arr.stype, arr.data
    what = data.draw(st.sampled_from(["dtype", "shape", "stype", "data", "data", "other"]))
    if what == "dtype":
        dtype = data.draw(st.sampled_from(["uint32", "float64", "int64", ">u8", "object", ""]))
    elif what == "shape":
        shape = data.draw(st.lists(st.integers(-2, 9), max_size=3))
    elif what == "stype":
        stype = data.draw(st.sampled_from(["torch.Tensor", "", "numpy.ndarray "]))
    elif what == "data":
        blob = edit_bytes(data, blob)
    else:  # a well-formed array of another kind
        buf = io.BytesIO()
        kind = data.draw(st.sampled_from(["f8", "u4", "i8", ">u8", "u8-short", "u8-2d"]))
        n = int(shape[0]) if shape else 1
        arr_np = {
            "f8": np.zeros(n, "f8"),
            "u4": np.zeros(n, "u4"),
            "i8": -np.ones(n, "i8"),
            ">u8": np.ones(n, ">u8"),
            "u8-short": np.ones(n - 1, "u8"),
            "u8-2d": np.ones((1, n), "u8"),
        }[kind]
        np.save(buf, arr_np, allow_pickle=False)
        return (
            Array(arr_np)
            if data.draw(st.booleans())
            else Array(dtype=dtype, shape=tuple(shape), stype=stype, data=buf.getvalue())
        )
    try:
        return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=blob)
    except Exception:  # noqa: BLE001 - an Array Flower cannot even build: keep the original
        return arr


def mutate(data, content: RecordDict, others: list[RecordDict], ids) -> RecordDict:
    """One change to ``content`` (or a whole other node's message in its place)."""
    op = data.draw(
        st.sampled_from(
            ["field"] * 6 + ["drop-field", "extra-field", "drop-record", "extra-record", "swap"]
        )
    )
    if op == "swap" and others:
        return copy.deepcopy(data.draw(st.sampled_from(others)))
    names = sorted(content.keys())
    if op == "drop-record" and names:
        del content[data.draw(st.sampled_from(names))]
        return content
    if op == "extra-record":
        name = data.draw(st.sampled_from([Key.MASKED, Key.METRICS, Key.CONFIG, "x", "arrays"]))
        if name not in content:
            content[name] = data.draw(
                st.sampled_from([ConfigRecord({"k": 1}), MetricRecord({"m": 1.0}), ArrayRecord()])
            )
        return content
    fields = [
        (name, key)
        for name in names
        for key in sorted(content[name].keys())
        if key not in (Key.STAGE, Key.SESSION) or data.draw(st.integers(0, 20)) == 0
    ]
    if not fields:
        return content
    name, key = data.draw(st.sampled_from(fields))
    record = content[name]
    if op == "drop-field":
        del record[key]
    elif op == "extra-field":
        extra = data.draw(FIELD_NAME)
        value = data.draw(METRIC_VALUE if isinstance(record, MetricRecord) else CONFIG_VALUE)
        _assign(record, extra, value)
    elif isinstance(record, ArrayRecord):
        record[key] = edit_array(data, record[key])
    else:
        metric = isinstance(record, MetricRecord)
        _assign(record, key, edit_value(data, record[key], ids, metric))
    return content


def _assign(record, key, value) -> None:
    try:
        record[key] = value
    except Exception:  # noqa: BLE001 - a value Flower's record refuses: drop the field instead
        if key in record:
            del record[key]


def random_content(data, stage: str, session: str) -> RecordDict:
    """A message of random fields (usually with the right stage and session to get in)."""
    cfg = ConfigRecord()
    for key in data.draw(st.lists(FIELD_NAME, max_size=6, unique=True)):
        _assign(cfg, key, data.draw(CONFIG_VALUE))
    if data.draw(st.integers(0, 9)):
        cfg[Key.STAGE], cfg[Key.SESSION] = stage, session
    content = RecordDict({Key.CONFIG: cfg})
    if data.draw(st.booleans()):
        metrics = MetricRecord()
        for key in data.draw(st.lists(FIELD_NAME, max_size=4, unique=True)):
            _assign(metrics, key, data.draw(METRIC_VALUE))
        content[Key.METRICS] = metrics
    if data.draw(st.booleans()):
        blob = data.draw(st.binary(max_size=200))
        arr = Array(dtype="uint64", shape=(6,), stype="numpy.ndarray", data=blob)
        content[Key.MASKED] = ArrayRecord({Key.VECTOR: arr})
    return content


# ---- the server: each stage's replies and the reconstruction ---------------------------


def fuzz_server(tr: Transcript, stage: str, data, shares_only: bool = False) -> None:
    replies = tr.grid.replies[stage]
    bad = data.draw(st.lists(st.sampled_from(sorted(replies)), min_size=1, max_size=2, unique=True))
    changed = {}  # everything is drawn before the run: hypothesis' own exceptions stay outside
    for node in bad:
        content = copy.deepcopy(replies[node])
        if shares_only:
            changed[node] = flip_shares(data, content)
        elif data.draw(st.integers(0, 9)) == 0:
            changed[node] = random_content(data, stage, tr.sessions[stage].session)
        else:
            others = [r for n, r in replies.items() if n != node]
            changed[node] = mutate(data, content, others, tr.nodes)

    def edit(node: int, content: RecordDict) -> None:
        if node in changed:
            for name in list(content.keys()):
                del content[name]
            for name, record in changed[node].items():
                content[name] = record

    with outcome(f"secagg-server-{stage}" if not shares_only else "secagg-reconstruction"):
        result = run_from(tr, stage, ReplayGrid(tr, stage, edit))
        if stage != Stage.COLLECT:
            assert result.total_weight == sum(weight_of(n) for n in result.contributors)
            err = max_diff(result.mean(), expected_mean(result.contributors))
            assert err <= result.tolerance, (err, result.tolerance)
        assert set(result.rejected) <= set(bad)


def flip_shares(data, content: RecordDict) -> RecordDict:
    cfg = content.config_records[Key.CONFIG]
    key = data.draw(st.sampled_from([Key.B_SHARES, Key.SK_SHARES]))
    shares = list(cfg[key])
    if shares:
        i = data.draw(st.integers(0, len(shares) - 1))
        shares[i] = edit_bytes(data, shares[i]) or b"\x01"
        cfg[key] = shares
    return content


@given(data=st.data())
def test_server_survives_malformed_setup_replies(data):
    fuzz_server(honest(), Stage.SETUP, data)


@given(data=st.data())
def test_server_survives_malformed_share_keys_replies(data):
    fuzz_server(honest(), Stage.SHARE_KEYS, data)


@given(data=st.data())
def test_server_survives_malformed_masked_vector_replies(data):
    fuzz_server(honest(), Stage.COLLECT, data)


@given(data=st.data())
def test_server_survives_malformed_unmask_replies(data):
    tr = data.draw(st.sampled_from([honest, with_a_dropout]))()
    fuzz_server(tr, Stage.UNMASK, data)


@given(data=st.data())
def test_reconstruction_survives_wrong_shares(data):
    fuzz_server(with_a_dropout(), Stage.UNMASK, data, shares_only=True)


# ---- the node: each stage's message from the server -------------------------------------


def fuzz_node(stage: str, data) -> None:
    tr = honest()
    node = data.draw(st.sampled_from(tr.nodes))
    sent = tr.grid.sent[stage]
    if data.draw(st.integers(0, 9)) == 0:
        content = random_content(data, stage, tr.sessions[stage].session)
    else:
        others = [c for n, c in sent.items() if n != node]
        content = mutate(data, copy.deepcopy(sent[node]), others, tr.nodes)
    context = copy.deepcopy(tr.grid.states[stage][node])
    with outcome(f"secagg-node-{stage}"):
        handle_secagg(stage_message(content, node), context, train_fn_for(node))


@given(data=st.data())
def test_node_survives_malformed_setup_messages(data):
    fuzz_node(Stage.SETUP, data)


@given(data=st.data())
def test_node_survives_malformed_share_keys_messages(data):
    fuzz_node(Stage.SHARE_KEYS, data)


@given(data=st.data())
def test_node_survives_malformed_collect_messages(data):
    fuzz_node(Stage.COLLECT, data)


@given(data=st.data())
def test_node_survives_malformed_unmask_messages(data):
    fuzz_node(Stage.UNMASK, data)
