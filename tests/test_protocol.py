"""The wire format: names, shapes, dtypes, finiteness, metric whitelist, versions."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedlora.protocol.adapter import AdapterValidationError, problems, spec_of, validate
from fedlora.protocol.messages import (
    ARRAYS,
    METRICS,
    WIRE_VERSION,
    ProtocolError,
    RoundConfig,
    TrainReply,
    to_array_record,
)

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def adapter(value: float = 0.5) -> dict[str, np.ndarray]:
    return {A: np.full((2, 4), value, np.float32), B: np.full((4, 2), value, np.float32)}


def test_matching_adapter_has_no_problems():
    assert problems(adapter(), spec_of(adapter())) == []


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda a: a.pop(B), "missing 1 tensors"),
        (
            lambda a: a.update({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)}),
            "unexpected tensors",
        ),
        (lambda a: a.update({A: np.zeros((3, 4), np.float32)}), "shape (3, 4), expected (2, 4)"),
        (lambda a: a.update({A: np.zeros((2, 4), np.float64)}), "dtype float64"),
        (lambda a: a.update({A: np.zeros((2, 4), np.int64)}), "dtype int64"),
        (lambda a: a[A].__setitem__((0, 0), np.nan), "NaN or Inf"),
        (lambda a: a[B].__setitem__((1, 1), np.inf), "NaN or Inf"),
    ],
)
def test_each_kind_of_bad_adapter_is_named(mutate, expected):
    spec = spec_of(adapter())
    bad = adapter()
    mutate(bad)
    with pytest.raises(
        AdapterValidationError, match=expected.replace("(", r"\(").replace(")", r"\)")
    ):
        validate(bad, spec)


def test_non_lora_names_are_rejected_even_if_in_spec():
    arrays = {"model.layers.0.mlp.weight": np.zeros((2, 2), np.float32)}
    assert any("not a LoRA tensor name" in p for p in problems(arrays, spec_of(arrays)))


def test_round_config_round_trips_and_checks_version():
    rc = RoundConfig(
        server_round=3,
        local_steps=5,
        batch_size=4,
        lr=1e-3,
        max_length=128,
        seed=1,
        lora_r=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    assert RoundConfig.from_record(rc.to_record()) == rc
    record = rc.to_record()
    record["wire-version"] = WIRE_VERSION + 1
    with pytest.raises(ProtocolError, match="wire version"):
        RoundConfig.from_record(record)
    del record["lr"]
    with pytest.raises(ProtocolError, match="'lr'"):
        RoundConfig.from_record(record)


def test_train_reply_round_trips_with_only_whitelisted_metrics():
    reply = TrainReply(delta=adapter(0.25), num_examples=12, train_loss=1.5, site_id=2)
    content = reply.to_content()
    assert set(content.keys()) == {ARRAYS, METRICS}
    parsed = TrainReply.from_content(content, spec_of(adapter()))
    assert parsed.num_examples == 12 and parsed.train_loss == 1.5 and parsed.site_id == 2
    np.testing.assert_array_equal(parsed.delta[A], adapter(0.25)[A])


def _content(metrics: dict, arrays=None) -> RecordDict:
    return RecordDict(
        {ARRAYS: to_array_record(arrays or adapter()), METRICS: MetricRecord(metrics)}
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            _content({"num-examples": 3, "wire-version": WIRE_VERSION, "secret-score": 1.0}),
            "outside the whitelist",
        ),
        (_content({"num-examples": 0, "wire-version": WIRE_VERSION}), "positive integer"),
        (_content({"num-examples": 3, "wire-version": 99}), "wire version"),
        (
            RecordDict(
                {ARRAYS: ArrayRecord(), METRICS: MetricRecord({}), "extra": MetricRecord({})}
            ),
            "reply records",
        ),
    ],
)
def test_bad_replies_raise_protocol_error(content, expected):
    with pytest.raises(ProtocolError, match=expected):
        TrainReply.from_content(content, spec_of(adapter()))
