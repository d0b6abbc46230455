"""Hostile replies for tests: valid train/eval replies on a tiny adapter, and ways to corrupt them.

Each corruption is one kind of malformed reply a node may send (issue 10): array bytes that are
empty, truncated, pickled, of another ``stype``, a valid ``.npy`` of the wrong shape, 100x the
adapter's size, a 256-byte header claiming 4 GiB; metrics as lists, NaN, inf or out of range.
Shared by the unit tests, the fuzz tests and the simulated federation.
"""

from __future__ import annotations

import io
import pickle
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Metadata, MetricRecord, RecordDict

from fedlora.protocol.adapter import spec_of
from fedlora.protocol.messages import ARRAYS, METRICS, EvalReply, RoundConfig, TrainReply

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
BLOCK = 4  # int8-block: 2 scales per tiny tensor
CODECS = ("none", "fp16", "int8", "int8-block")
FOUR_GIB = 2**30  # float32 values in 4 GiB

# A valid round config of the tiny model: the starting point of every corruption.
VALID_ROUND = RoundConfig(
    server_round=1,
    local_steps=2,
    batch_size=4,
    lr=1e-3,
    max_length=64,
    seed=0,
    lora_r=4,
    lora_alpha=8.0,
    lora_dropout=0.0,
    target_modules="all-linear",
)


def delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        A: rng.standard_normal((2, 4)).astype(np.float32),
        B: rng.standard_normal((4, 2)).astype(np.float32),
    }


SPEC = spec_of(delta())


def train_content(codec: str = "none", seed: int = 0) -> RecordDict:
    reply = TrainReply(
        delta=delta(seed),
        num_examples=12,
        train_loss=1.5,
        site_id=1,
        train_tokens=300,
        codec=codec,
        codec_block=BLOCK,
    )
    return reply.to_content()


def eval_content(accuracy: float | None = 0.5) -> RecordDict:
    reply = EvalReply(
        num_examples=5, loss=1.2, perplexity=float(np.exp(1.2)), tokens=40, accuracy=accuracy
    )
    return reply.to_content()


def reply_metadata(node: int, kind: str = "train") -> Metadata:
    """The metadata of a reply from ``node`` (a message of type ``kind``) to the server."""
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="m",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )


def copy_content(content: RecordDict) -> RecordDict:
    out = RecordDict()
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            out[key] = ArrayRecord(
                {k: Array(v.dtype, v.shape, v.stype, v.data) for k, v in record.items()}
            )
        elif isinstance(record, MetricRecord):
            out[key] = MetricRecord(dict(record))
        else:
            out[key] = record
    return out


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def huge_header(dtype: str = "<f4", values: int = FOUR_GIB, size: int = 256) -> bytes:
    """A ``size``-byte .npy file whose header claims ``values`` values (4 GiB of float32)."""
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': ({values},), }}"
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")
    return raw + b"\x00" * (size - len(raw))


# --- array corruptions: (Array that passes the gate) -> a malformed Array of the same name --------

ArrayMutation = Callable[[Array], Array]


def _with(array: Array, **fields: object) -> Array:
    values = {"dtype": array.dtype, "shape": tuple(array.shape), "stype": array.stype}
    values["data"] = array.data
    values.update(fields)
    return Array(values["dtype"], values["shape"], values["stype"], values["data"])


ARRAY_MUTATIONS: dict[str, ArrayMutation] = {
    "empty-bytes": lambda a: _with(a, data=b""),
    "truncated-bytes": lambda a: _with(a, data=a.data[: len(a.data) - 3]),
    "truncated-header": lambda a: _with(a, data=a.data[:20]),
    "trailing-bytes": lambda a: _with(a, data=a.data + b"\x00" * 4),
    "pickled": lambda a: _with(
        a, data=npy_bytes(np.array([{"x": 1}] * 2, dtype=object), allow_pickle=True)
    ),
    "pickle-blob": lambda a: _with(a, data=pickle.dumps(np.zeros(tuple(a.shape), np.float32))),
    "other-stype": lambda a: _with(a, stype="torch.Tensor"),
    "other-dtype": lambda a: _with(
        a, dtype="float64", data=npy_bytes(np.zeros(tuple(a.shape), np.float64))
    ),
    "lying-dtype": lambda a: _with(a, data=npy_bytes(np.zeros(tuple(a.shape), np.float64))),
    "wrong-shape-npy": lambda a: _with(a, data=npy_bytes(np.zeros((3, 3), np.dtype(a.dtype)))),
    "wrong-shape-meta": lambda a: _with(a, shape=(3, 3)),
    "oversize-100x": lambda a: _with(
        a,
        data=npy_bytes(np.zeros((100 * int(np.prod(a.shape)),), np.dtype(a.dtype))),
    ),
    "huge-header": lambda a: _with(a, data=huge_header(np.dtype(a.dtype).str)),
    "big-endian": lambda a: _with(
        a, data=npy_bytes(np.zeros(tuple(a.shape), np.dtype(a.dtype).newbyteorder(">")))
    ),
    "bad-magic": lambda a: _with(a, data=b"\x93NUMPZ" + a.data[6:]),
}


def corrupt_array(content: RecordDict, kind: str, name: str = A) -> RecordDict:
    """A copy of a train reply with array ``name`` corrupted in way ``kind``."""
    out = copy_content(content)
    out.array_records[ARRAYS][name] = ARRAY_MUTATIONS[kind](out.array_records[ARRAYS][name])
    return out


# --- metric corruptions: metric name and the bad value ------------------------------------------

METRIC_MUTATIONS: dict[str, tuple[str, object]] = {
    "site-id-list": ("site-id", [1, 2]),
    "site-id-float": ("site-id", 1.5),
    "site-id-below": ("site-id", -2),
    "train-loss-nan": ("train-loss", float("nan")),
    "train-loss-inf": ("train-loss", float("inf")),
    "train-loss-negative": ("train-loss", -0.5),
    "train-loss-list": ("train-loss", [1.0, 2.0]),
    "train-tokens-negative": ("train-tokens", -5),
    "train-tokens-float": ("train-tokens", 3.0),
    "train-seconds-nan": ("train-seconds", float("nan")),
    "num-examples-huge": ("num-examples", 2**70),
    "num-examples-float": ("num-examples", 12.0),
    "dp-noised-two": ("dp-noised", 2),
    "bytes-sent-inf": ("bytes-sent", float("inf")),
}
EVAL_METRIC_MUTATIONS: dict[str, tuple[str, object]] = {
    "eval-accuracy-seven": ("eval-accuracy", 7.0),
    "eval-accuracy-nan": ("eval-accuracy", float("nan")),
    "eval-tokens-inf": ("eval-tokens", float("inf")),
    "eval-tokens-negative": ("eval-tokens", -1),
    "eval-tokens-list": ("eval-tokens", [1, 2]),
    "eval-loss-nan": ("eval-loss", float("nan")),
    "eval-perplexity-below-one": ("eval-perplexity", 0.5),
    "site-id-list": ("site-id", [3]),
    "num-examples-zero": ("num-examples", 0),
}


def corrupt_metric(content: RecordDict, name: str, value: object) -> RecordDict:
    """A copy of a reply with metric ``name`` set to ``value`` (bypassing MetricRecord's types)."""
    out = copy_content(content)
    raw_set(out.metric_records[METRICS], name, value)
    return out


def raw_set(record: object, key: str, value: object) -> None:
    """Put ``value`` into a Flower record without its type check (what a hostile peer can do)."""
    record.__dict__["_data"][key] = value
