"""Fuzzing the real ClientApp (tiny model) as a hostile server would (issues 37 and 32 part 5):
train and evaluate messages with round-config fields of any type and size, adapters of the
wrong shape, dtype, bytes or values, downlink fields that do not match what the node holds.
Every message must be answered: with a reply, or with a typed error reply; an exception out of
the ClientApp is a crash. The node runs with its default limits, tightened (max-batch-size,
max-local-steps) only so that the rounds it accepts stay short. Harness: tests/fuzzing.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from fedlora.client.app import make_client_app
from fedlora.errors import FedloraError
from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
from fedlora.protocol.messages import ARRAYS, CONFIG, RoundConfig, to_array_record
from fuzzing import outcome
from hostile import ARRAY_MUTATIONS, raw_set
from test_node_app import _call

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)
VALID = {
    "server-round": 1,
    "local-steps": 1,
    "batch-size": 2,
    "lr": 5e-3,
    "max-length": 96,
    "seed": 0,
    "lora-r": LORA.r,
    "lora-alpha": LORA.alpha,
    "lora-dropout": 0.0,
    "target-modules": LORA.target_modules,
}
KEYS = sorted({f.replace("_", "-") for f in RoundConfig.__dataclass_fields__})
sizes = st.sampled_from([0, 1, 2, 3, 7, 64, 1000, 2**20, 2**31, 10**9, 2**53, 2**63 - 1])
hostile_values = st.one_of(
    sizes,
    st.integers(),
    st.sampled_from([-1, 2**63, 2**70]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["none", "fp16", "int8", "int8-block", "AB", "A", "B", "R", "cosine"]),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.lists(st.integers(0, 5), max_size=3),
    st.binary(max_size=6),
)
changes = st.lists(
    st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), hostile_values), max_size=3
)
array_kinds = st.sampled_from(
    ["valid", "valid", "valid", "nan", "inf", "huge", "missing", "extra", *sorted(ARRAY_MUTATIONS)]
)


class Refused(FedloraError):
    """The ClientApp answered with an error reply (counted as a refusal)."""


@pytest.fixture(scope="module")
def node_setup(tiny_model_dir):
    start = initial_adapter(adapter_shapes(tiny_model_dir, LORA), seed=0)
    node = {
        "base-model": str(tiny_model_dir),
        "quantization": "auto",
        "site": "pain",
        "max-batch-size": 8,
        "max-local-steps": 4,
    }
    return make_client_app(), start, node


def _arrays(start: dict[str, np.ndarray], kind: str, index: int) -> RecordDict:
    name = sorted(start)[index % len(start)]
    arrays = dict(start)
    if kind in ("nan", "inf", "huge"):
        arrays[name] = np.full_like(start[name], {"nan": np.nan, "inf": np.inf, "huge": 3e38}[kind])
    elif kind == "missing":
        arrays.pop(name)
    elif kind == "extra":
        arrays["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)
    record = to_array_record(arrays)
    if kind in ARRAY_MUTATIONS:
        record[name] = ARRAY_MUTATIONS[kind](record[name])
    return record


@pytest.mark.fuzz
@given(
    kind=st.sampled_from(["train", "evaluate"]),
    config_changes=changes,
    array_kind=array_kinds,
    index=st.integers(0, 100),
)
def test_fuzz_node_clientapp(node_setup, kind, config_changes, array_kind, index):
    app, start, node = node_setup
    config = ConfigRecord(dict(VALID))
    for key, value in config_changes:
        raw_set(config, key, value)
    content = RecordDict({ARRAYS: _arrays(start, array_kind, index), CONFIG: config})
    with outcome("node-clientapp"):
        reply = _call(app, content, kind, node)
        if reply.has_error():
            assert "\n" not in reply.error.reason
            raise Refused(reply.error.reason)
