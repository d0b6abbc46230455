"""The node against a hostile server and a broken disk (issues 37 and 32, part 5): every failure
while decoding, validating, training or evaluating is a typed one-line error reply, never an
exception out of the ClientApp; absurd round settings are refused before anything is allocated,
with default node settings; a corrupted state file is refused and left as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlora.client import app as app_mod
from fedlora.client.app import DATA_FAILED, NODE_FAILED, REFUSED, make_client_app
from fedlora.lora import LoraSettings, adapter_shapes, initial_adapter
from fedlora.protocol.messages import ARRAYS, CONFIG, to_array_record
from hostile import raw_set
from test_node_app import _call, _content

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)


@pytest.fixture(scope="module")
def start(tiny_model_dir: Path) -> dict[str, np.ndarray]:
    return initial_adapter(adapter_shapes(tiny_model_dir, LORA), seed=0)


@pytest.fixture
def node(tiny_model_dir: Path) -> dict[str, str]:
    return {"base-model": str(tiny_model_dir), "quantization": "auto", "site": "pain"}


def _error(reply, code: int) -> str:
    assert reply.has_error(), "the node answered instead of refusing"
    assert reply.error.code == code, reply.error
    assert "\n" not in reply.error.reason
    return reply.error.reason


def _with_arrays(content: RecordDict, arrays: dict[str, np.ndarray]) -> RecordDict:
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return RecordDict({ARRAYS: record, CONFIG: content.config_records[CONFIG]})


def _hostile_messages(start: dict[str, np.ndarray]) -> dict[str, RecordDict]:
    name = sorted(start)[0]
    good = _content(start)
    return {
        "wrong shape": _with_arrays(good, start | {name: np.zeros((3, 3), np.float32)}),
        "NaN adapter": _with_arrays(good, start | {name: np.full_like(start[name], np.nan)}),
        "float64 adapter": _with_arrays(good, {k: v.astype(np.float64) for k, v in start.items()}),
        "missing tensor": _with_arrays(good, {k: v for k, v in start.items() if k != name}),
        "no arrays": RecordDict({CONFIG: good.config_records[CONFIG]}),
        "no config": RecordDict({ARRAYS: to_array_record(start)}),
        "config of strings": RecordDict(
            {ARRAYS: to_array_record(start), CONFIG: ConfigRecord({"server-round": "x"})}
        ),
        "downlink from a version the node lacks": _content(
            start, down_codec="int8", down_base=3, down_version=4
        ),
        "target modules the model lacks": _content(start, target_modules="none,wq"),
        "downlink digest of another adapter": _content(
            start, down_codec="fp16", down_base=-1, down_version=2, down_digest="ab" * 32
        ),
    }


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_hostile_server_messages_are_refused_with_an_error_reply(node, start, kind):
    app = make_client_app()
    for what, content in _hostile_messages(start).items():
        reply = _call(app, content, kind, node)
        assert reply.has_error(), what
        assert reply.error.code == REFUSED, (what, reply.error)


# Beyond any run (refused by the wire's bounds, fedlora.ranges) and within the wire's bounds but
# beyond this node's model (context 1024, hidden 64, 2 layers) or its defaults.
ABSURD = {
    "batch_size": 2**31,
    "max_length": 10**9,
    "codec_block": 2**63 - 1,
    "lora_r": 2**20,
    "local_steps": 10**9,
}
BEYOND_THE_NODE = {
    "batch_size": (65_536, {"max_length": 1024}, "does not fit this node's"),
    "max_length": (2048, {}, "exceeds the model's context of 1024"),
    "codec_block": (2**24, {}, "exceeds the adapter's"),
    "lora_r": (65, {}, "exceeds the model's hidden size 64"),
    "lora_layers": (3, {}, "exceeds the model's 2 layers"),
    "local_steps": (20_000, {}, "max-local-steps=10000"),
}


def _raw_content(start: dict[str, np.ndarray], **values) -> RecordDict:
    """A message whose round config holds ``values`` as a hostile server would send them."""
    content = _content(start)
    for key, value in values.items():
        raw_set(content.config_records[CONFIG], key.replace("_", "-"), value)
    return content


@pytest.fixture
def no_allocation(monkeypatch):
    def allocate(*args, **kwargs):
        raise AssertionError("the node allocated for a round it should have refused")

    monkeypatch.setattr(app_mod, "warm_model", allocate)


@pytest.mark.parametrize("field", sorted(ABSURD))
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_absurd_round_settings_are_refused_before_allocation(
    node, start, field, kind, no_allocation
):
    content = _raw_content(start, **{field: ABSURD[field]})
    reason = _error(_call(make_client_app(), content, kind, node), REFUSED)
    assert field.replace("_", "-") in reason


@pytest.mark.parametrize("field", sorted(BEYOND_THE_NODE))
def test_settings_beyond_the_node_are_refused_before_allocation_by_default(
    node, start, field, no_allocation
):
    value, others, expected = BEYOND_THE_NODE[field]
    content = _content(start, **{field: value}, **others)
    reason = _error(_call(make_client_app(), content, "train", node), REFUSED)
    assert expected in reason


def test_a_batch_beyond_the_nodes_memory_is_refused_naming_the_largest(node, start):
    reason = _error(
        _call(
            make_client_app(), _content(start, batch_size=4096), "train", node | {"memory-gib": 1}
        ),
        REFUSED,
    )
    assert "does not fit this node's 1.0 GiB" in reason and "at most batch" in reason


def test_node_settings_tighten_the_limits(node, start):
    reason = _error(
        _call(
            make_client_app(), _content(start, batch_size=8), "train", node | {"max-batch-size": 4}
        ),
        REFUSED,
    )
    assert "max-batch-size=4" in reason


def test_a_failure_inside_training_is_an_error_reply_without_details(node, start, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory at /data/patients/ward-7.jsonl")

    monkeypatch.setattr(app_mod, "train_lora", broken)
    reason = _error(_call(make_client_app(), _content(start), "train", node), NODE_FAILED)
    assert "RuntimeError" in reason and "patients" not in reason


def test_a_corrupted_personal_state_refuses_the_round_and_is_kept(node, start, tmp_path):
    app = make_client_app()
    node = node | {"personal-state-dir": str(tmp_path)}
    fedsa = {"train_factors": "AB", "send_factors": "A"}
    assert not _call(app, _content(start, **fedsa), "train", node).has_error()
    path = tmp_path / "pain.npz"
    path.write_bytes(path.read_bytes()[:80])
    before = path.read_bytes()
    reason = _error(
        _call(app, _content(start, server_round=2, **fedsa), "train", node), NODE_FAILED
    )
    assert "FileFormatError" in reason and str(tmp_path) not in reason
    assert path.read_bytes() == before


def test_a_corrupted_dp_ledger_refuses_the_round_and_is_kept(node, start, tmp_path):
    ledger = tmp_path / "dp-ledger.json"
    ledger.write_text('{"version": 1, "charges": "all of them"}')
    node = node | {"dp-ledger": str(ledger), "dp-max-epsilon": 10.0}
    content = _content(start, dp_noise_multiplier=1.0, dp_clip_norm=1.0, dp_expected_clients=2)
    _error(_call(make_client_app(), content, "train", node), NODE_FAILED)
    assert ledger.read_text() == '{"version": 1, "charges": "all of them"}'


def test_bad_node_data_still_says_nothing_of_it(node, start, tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text('{"prompt": ' + "[" * 3000 + "]" * 3000 + ', "response": "x"}\n')
    node = {k: v for k, v in node.items() if k != "site"} | {"data-path": str(data)}
    reason = _error(_call(make_client_app(), _content(start), "train", node), DATA_FAILED)
    assert "notes" not in reason
