"""No reply can end a run: every malformed reply is a ProtocolError naming the field (issue 10).

Unit tests for each kind of malformed train/eval reply and round config, a tracemalloc test
that an oversized reply is refused before anything of its size is allocated, the strategy's
drop-and-count, and a simulated federation (integration) in which one node sends a different
malformed reply each round while the global adapter ends exactly as if it had sent nothing.
"""

from __future__ import annotations

import json
import logging
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.errors import WireError
from fedlora.protocol.compression import SCALE_SUFFIX
from fedlora.protocol.gate import EVAL_METRICS, METRIC_SPECS, TRAIN_METRICS, npy_layout
from fedlora.protocol.messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    EvalReply,
    ProtocolError,
    RoundConfig,
    TrainReply,
)
from fedlora.server.settings import StrategySettings
from fedlora.server.strategy import LoraFedAvg
from hostile import (
    ARRAY_MUTATIONS,
    BLOCK,
    CODECS,
    EVAL_METRIC_MUTATIONS,
    METRIC_MUTATIONS,
    SPEC,
    VALID_ROUND,
    A,
    B,
    corrupt_array,
    corrupt_metric,
    delta,
    eval_content,
    huge_header,
    npy_bytes,
    raw_set,
    reply_metadata,
    train_content,
)


def _train(content: RecordDict, codec: str = "none") -> TrainReply:
    return TrainReply.from_content(content, SPEC, codec, BLOCK)


# ----------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("codec", CODECS)
def test_valid_replies_of_every_codec_pass_the_gate(codec):
    reply = _train(train_content(codec), codec)
    tolerance = {"none": 0, "fp16": 1e-3, "int8": 2e-2, "int8-block": 2e-2}[codec]
    for name, value in delta().items():
        np.testing.assert_allclose(reply.delta[name], value, atol=tolerance)
        assert reply.delta[name].flags.writeable and reply.delta[name].dtype == np.float32
    assert reply.num_examples == 12 and reply.train_tokens == 300 and reply.site_id == 1


EXPECTED_ARRAY_ERRORS = {
    "empty-bytes": "not a .npy array",
    "truncated-bytes": "bytes, expected",
    "truncated-header": "truncated",
    "trailing-bytes": "bytes, expected",
    "pickled": ".npy dtype '|O'",
    "pickle-blob": "not a .npy array",
    "other-stype": "stype 'torch.Tensor', expected 'numpy.ndarray'",
    "other-dtype": "dtype 'float64', expected",
    "lying-dtype": ".npy dtype '<f8'",
    "wrong-shape-npy": ".npy shape (3, 3), expected (2, 4)",
    "wrong-shape-meta": "shape (3, 3), expected (2, 4)",
    "oversize-100x": ".npy shape (800,)",  # tiny: refused by shape; big: by length, see below
    "huge-header": ".npy shape (1073741824,), expected (2, 4)",
    "big-endian": ".npy dtype '>",
    "bad-magic": "not a .npy array",
}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("kind", sorted(ARRAY_MUTATIONS))
def test_each_malformed_array_is_a_protocol_error_naming_the_array(codec, kind):
    if kind == "big-endian" and codec.startswith("int8"):
        pytest.skip("int8 has no byte order: '|i1' is the valid layout")
    bad = corrupt_array(train_content(codec), kind, A)
    with pytest.raises(ProtocolError, match=f"array {A}: ") as info:
        _train(bad, codec)
    if codec == "none" or kind not in ("other-dtype", "lying-dtype", "big-endian", "pickled"):
        assert EXPECTED_ARRAY_ERRORS[kind] in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("codec", ["int8", "int8-block"])
@pytest.mark.parametrize("kind", ["truncated-bytes", "wrong-shape-npy", "other-stype"])
def test_malformed_scale_tensors_are_refused_too(codec, kind):
    bad = corrupt_array(train_content(codec), kind, B + SCALE_SUFFIX)
    with pytest.raises(ProtocolError, match=f"array {B + SCALE_SUFFIX}: "):
        _train(bad, codec)


def test_missing_and_unexpected_arrays_are_named():
    content = train_content()
    del content.array_records[ARRAYS][B]
    with pytest.raises(ProtocolError, match=rf"missing 1 arrays \(first: {B}\)"):
        _train(content)
    content = train_content("int8")
    with pytest.raises(ProtocolError, match="unexpected arrays"):
        _train(content, "none")


def test_a_record_of_the_wrong_kind_is_refused():
    content = train_content()
    content[ARRAYS] = MetricRecord({"x": 1})
    with pytest.raises(ProtocolError, match="record 'arrays' is a MetricRecord"):
        _train(content)
    content = train_content()
    raw_set(content.array_records[ARRAYS], A, "not an array")
    with pytest.raises(ProtocolError, match=f"array {A}: is a str"):
        _train(content)


def test_nan_in_an_int8_reply_after_scaling_is_refused():
    content = train_content("int8")
    scale = np.array([3.0e38], np.float32)
    content.array_records[ARRAYS][A + SCALE_SUFFIX] = _array(scale)
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        _train(content, "int8")


def _array(value: np.ndarray):
    from flwr.app import Array

    return Array(value)


def test_npy_header_parser_refuses_what_np_load_would_not_load_safely():
    assert npy_layout(npy_bytes(np.zeros((2, 4), np.float32)))[2] == (2, 4)
    bad_headers = [
        b"\x93NUMPY\x03\x00" + b"\x00" * 20,  # version 3.0
        b"\x93NUMPY\x01\x00\xff\xff" + b"{}",  # 65535-byte header
        b"\x93NUMPY\x01\x00\x05\x00{'a':",  # not a literal
        b"\x93NUMPY\x01\x00\x02\x00[]",  # not a dict
    ]
    for raw in bad_headers:
        with pytest.raises(ProtocolError):
            npy_layout(raw)


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("kind", ["oversize-100x", "huge-header"])
def test_oversized_replies_are_refused_without_allocating_their_size(kind):
    size = 256 * 1024  # a 1 MiB float32 adapter tensor
    spec = {A: type(SPEC[A])((size // 4, 4))}
    good = TrainReply(
        delta={A: np.ones((size // 4, 4), np.float32)}, num_examples=1, train_loss=1.0
    ).to_content()
    bad = corrupt_array(good, kind, A)
    adapter_bytes = size * 4
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            TrainReply.from_content(bad, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < adapter_bytes // 4, f"peak {peak} bytes while refusing {kind}"


def test_a_valid_reply_decodes_within_a_small_multiple_of_its_size():
    size = 256 * 1024
    spec = {A: type(SPEC[A])((size // 4, 4))}
    good = TrainReply(
        delta={A: np.ones((size // 4, 4), np.float32)}, num_examples=1, train_loss=1.0
    ).to_content()
    tracemalloc.start()
    try:
        TrainReply.from_content(good, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * size * 4


def test_huge_header_fixture_is_256_bytes_claiming_4_gib():
    raw = huge_header()
    assert len(raw) == 256
    descr, _, shape, _ = npy_layout(raw)
    assert descr == "<f4" and math.prod(shape) * 4 == 4 * 2**30


# ----------------------------------------------------------------------------- metrics


def test_the_metric_table_is_the_whitelists():
    assert set(METRIC_SPECS) == TRAIN_METRICS | EVAL_METRICS
    assert {"num-examples", "train-loss", "site-id", "dp-noised"} <= TRAIN_METRICS
    assert {"eval-loss", "eval-accuracy", "eval-tokens"} <= EVAL_METRICS
    assert "eval-accuracy" not in TRAIN_METRICS and "train-loss" not in EVAL_METRICS


@pytest.mark.parametrize("kind", sorted(METRIC_MUTATIONS))
def test_each_malformed_train_metric_is_named(kind):
    name, value = METRIC_MUTATIONS[kind]
    with pytest.raises(ProtocolError, match=f"metric {name}=.*: expected "):
        _train(corrupt_metric(train_content(), name, value))


@pytest.mark.parametrize("kind", sorted(EVAL_METRIC_MUTATIONS))
def test_each_malformed_eval_metric_is_named(kind):
    name, value = EVAL_METRIC_MUTATIONS[kind]
    with pytest.raises(ProtocolError, match=f"metric {name}=.*: expected "):
        EvalReply.from_content(corrupt_metric(eval_content(), name, value))


@pytest.mark.parametrize("value", ["1", None, True, np.float64("nan"), object()])
def test_metric_values_of_any_type_are_refused_not_crashed_on(value):
    with pytest.raises(ProtocolError, match="metric train-loss="):
        _train(corrupt_metric(train_content(), "train-loss", value))


def test_out_of_range_messages_say_what_was_expected():
    with pytest.raises(
        ProtocolError, match=r"eval-accuracy=7.0: expected a finite number in \[0, 1\]"
    ):
        EvalReply.from_content(corrupt_metric(eval_content(), "eval-accuracy", 7.0))
    with pytest.raises(ProtocolError, match="train-tokens=-5: expected an integer >= 0"):
        _train(corrupt_metric(train_content(), "train-tokens", -5))
    with pytest.raises(ProtocolError, match="metric train-loss missing"):
        content = train_content()
        del content.metric_records[METRICS]["train-loss"]
        _train(content)


def test_eval_replies_round_trip_and_accuracy_is_optional():
    assert EvalReply.from_content(eval_content(0.25)).accuracy == 0.25
    assert EvalReply.from_content(eval_content(None)).accuracy is None


# ----------------------------------------------------------------------------- round config


def _round_config(**changes) -> RecordDict:
    record = VALID_ROUND.to_record()
    for key, value in changes.items():
        record[key] = value
    return RecordDict({CONFIG: record})


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lr", float("nan"), "lr=nan: must be a finite number"),
        ("lr", 2.0, r"lr=2.0: must be a finite number in \(0, 1\)"),
        ("lr", 0.0, "lr=0.0: must be"),
        ("batch-size", 0, r"batch-size=0: must be an integer in \[1, 65536\]"),
        ("lora-r", 0, r"lora-r=0: must be an integer in \[1, 65536\]"),
        ("lora-dropout", 1.0, r"lora-dropout=1.0: must be a finite number in \[0, 1\)"),
        ("lora-dropout", -0.1, "lora-dropout=-0.1"),
        ("lora-alpha", float("inf"), "lora-alpha=inf: must be a finite number"),
        ("lora-alpha", 0.0, r"lora-alpha=0.0: must be a finite number in \(0, 1000000\]"),
        ("max-grad-norm", -1.0, "max-grad-norm=-1.0"),
        ("weight-decay", float("nan"), "weight-decay=nan"),
        ("grad-accum", 0, "grad-accum=0"),
        ("local-steps", -3, "local-steps=-3"),
        ("max-length", 0, "max-length=0"),
        ("codec-block", 0, "codec-block=0"),
        ("seed", -1, "seed=-1"),
        ("dp-noise-multiplier", float("nan"), "dp-noise-multiplier=nan"),
    ],
)
def test_out_of_range_round_config_is_refused_naming_the_key(key, value, expected):
    with pytest.raises(ProtocolError, match=f"round config {expected}"):
        RoundConfig.from_record(_round_config(**{key: value})[CONFIG])


def test_a_node_refuses_an_out_of_range_round_config_with_an_error_reply():
    from fedlora.client.app import REFUSED, RoundRefused, _answer, round_settings
    from fedlora.client.node import NodeSettings

    settings = NodeSettings(base_model="x", quantization="fp32", site="pain")
    with pytest.raises(RoundRefused, match="round config not accepted: round config lr=nan"):
        round_settings(_round_config(lr=float("nan")), settings)
    msg = Message(content=_round_config(lr=float("nan")), metadata=_meta(0))

    def work():
        return round_settings(msg.content, settings)

    reply = _answer(msg, work)
    assert reply.has_error() and reply.error.code == REFUSED
    assert "lr=nan" in reply.error.reason


# ----------------------------------------------------------------------------- strategy


_meta = reply_metadata


def _strategy(tmp_path: Path, aggregator=None, **settings) -> LoraFedAvg:
    zeros = {k: np.zeros(v.shape, np.float32) for k, v in SPEC.items()}
    settings = StrategySettings(history_file=tmp_path / "metrics.jsonl", **settings)
    return LoraFedAvg(spec=SPEC, global_adapter=zeros, aggregator=aggregator, settings=settings)


@pytest.mark.parametrize("aggregation", ["mean", "median"])
def test_strategy_drops_every_malformed_kind_names_the_node_and_counts_it(
    tmp_path, caplog, aggregation
):
    from fedlora.server.strategies import FedIT, make_reducer

    bad_kinds = [*sorted(ARRAY_MUTATIONS), *sorted(METRIC_MUTATIONS)]
    strategy = _strategy(tmp_path, aggregator=FedIT(make_reducer(aggregation, 0.1)))
    replies = [Message(content=train_content(seed=1), metadata=_meta(1))]
    replies.append(Message(content=train_content(seed=2), metadata=_meta(2)))
    replies.append(Message(content=train_content(seed=3), metadata=_meta(3)))
    for i, kind in enumerate(bad_kinds):
        content = (
            corrupt_array(train_content(), kind)
            if kind in ARRAY_MUTATIONS
            else corrupt_metric(train_content(), *METRIC_MUTATIONS[kind])
        )
        replies.append(Message(content=content, metadata=_meta(100 + i)))
    with caplog.at_level(logging.WARNING, logger="fedlora.server.strategy"):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["replies"] == 3 and record["dropped"] == len(bad_kinds)
    assert [r["node"] for r in record["rejected"]] == [100 + i for i in range(len(bad_kinds))]
    dropped_lines = [r.getMessage() for r in caplog.records if "dropped reply" in r.getMessage()]
    assert len(dropped_lines) == len(bad_kinds)
    assert all(f"node {100 + i}:" in line for i, line in enumerate(dropped_lines))
    reference = _strategy(tmp_path / "ref", aggregator=FedIT(make_reducer(aggregation, 0.1)))
    expected, _ = reference.aggregate_train(1, replies[:3])
    assert expected is not None
    for name in SPEC:
        np.testing.assert_array_equal(arrays[name].numpy(), expected[name].numpy())


def test_strategy_drops_malformed_eval_replies_and_counts_them(tmp_path, caplog):
    strategy = _strategy(tmp_path, evaluate_every=1, num_rounds=1)
    strategy.aggregate_train(1, [Message(content=train_content(), metadata=_meta(1))])
    replies = [Message(content=eval_content(0.5), metadata=_meta(1, "evaluate"))]
    for i, (name, value) in enumerate(EVAL_METRIC_MUTATIONS.values()):
        content = corrupt_metric(eval_content(), name, value)
        replies.append(Message(content=content, metadata=_meta(200 + i, "evaluate")))
    replies.append(Message(error=Error(code=1, reason="no data"), metadata=_meta(300)))
    with caplog.at_level(logging.WARNING, logger="fedlora.server.strategy"):
        metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and metrics["eval-accuracy"] == 0.5
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["eval-dropped"] == len(EVAL_METRIC_MUTATIONS) + 1
    assert record["eval-rejected"][-1] == {"node": 300, "error": "node error: no data"}
    assert sum("dropped eval reply" in r.getMessage() for r in caplog.records) == len(
        EVAL_METRIC_MUTATIONS
    )


def test_wire_errors_are_the_only_refusal_type():
    assert issubclass(ProtocolError, WireError)


# ----------------------------------------------------------------------------- a real federation

ROUNDS = 3
# Round r: the bad node's train reply gets TRAIN_KINDS[r-1], its eval reply EVAL_KINDS[r-1].
TRAIN_KINDS = ["truncated-bytes", "huge-header", "site-id-list"]
EVAL_KINDS = ["eval-accuracy-seven", "eval-tokens-inf", "eval-loss-nan"]
BAD_SITE = "pain"


def _corrupt_train(content: RecordDict, server_round: int) -> RecordDict:
    kind = TRAIN_KINDS[(server_round - 1) % len(TRAIN_KINDS)]
    if kind in ARRAY_MUTATIONS:
        return corrupt_array(content, kind, sorted(content.array_records[ARRAYS])[0])
    return corrupt_metric(content, *METRIC_MUTATIONS[kind])


def _corrupt_eval(content: RecordDict, server_round: int) -> RecordDict:
    kind = EVAL_KINDS[(server_round - 1) % len(EVAL_KINDS)]
    return corrupt_metric(content, *EVAL_METRIC_MUTATIONS[kind])


def _app(defaults: dict, honest: bool, node_file: Path) -> ClientApp:
    """fedlora's node, except that BAD_SITE corrupts its replies (or, honest, sends errors)."""
    from fedlora.client.app import run_evaluation, run_round
    from fedlora.client.node import NodeSettings

    app = ClientApp()

    def answer(msg: Message, context: Context, evaluate: bool) -> Message:
        merged = {**defaults, **context.run_config, **context.node_config}
        work = run_evaluation if evaluate else run_round
        content = work(msg.content, merged, context.state).to_content()
        if NodeSettings.from_config(merged).site != BAD_SITE:
            return Message(content=content, reply_to=msg)
        node_file.write_text(str(context.node_id))
        if honest:
            return Message(error=Error(code=4001, reason="honest drop"), reply_to=msg)
        server_round = int(msg.content[CONFIG]["server-round"])
        corrupt = _corrupt_eval if evaluate else _corrupt_train
        return Message(content=corrupt(content, server_round), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return answer(msg, context, evaluate=False)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return answer(msg, context, evaluate=True)

    return app


def _federation(model: Path, out: Path, honest: bool):
    from fedlora.config import RunConfig
    from fedlora.simulations.run import simulate

    cfg = RunConfig.from_mapping(
        {
            "base-model": str(model),
            "quantization": "fp32",
            "num-server-rounds": ROUNDS,
            "local-steps": 1,
            "batch-size": 2,
            "max-length": 64,
            "lr": 5e-3,
            "sites": "mental,pain,dermatology",
            "evaluate-every": 1,
            "output-dir": str(out),
        }
    )
    defaults = {
        "base-model": str(model),
        "quantization": "fp32",
        "sites": cfg.sites,
        "secagg-allow-unauthenticated": True,  # simulated nodes: no federation roster
    }
    return simulate(cfg, client_app=_app(defaults, honest, out / "bad-node.txt"))


@pytest.mark.integration
def test_a_node_sending_malformed_replies_changes_nothing_but_the_counts(
    tiny_model_dir, tmp_path, caplog
):
    from safetensors.numpy import load_file

    with caplog.at_level(logging.WARNING, logger="fedlora.server.strategy"):
        hostile = _federation(tiny_model_dir, tmp_path / "hostile", honest=False)
    honest = _federation(tiny_model_dir, tmp_path / "honest", honest=True)

    bad_node = int((tmp_path / "hostile" / "bad-node.txt").read_text())
    assert len(hostile.history) == ROUNDS and not any(r.get("skipped") for r in hostile.history)
    for r in hostile.history:
        assert r["replies"] == 2 and r["dropped"] == 1 and r["eval-dropped"] == 1
        assert [x["node"] for x in r["rejected"]] == [bad_node]
        assert [x["node"] for x in r["eval-rejected"]] == [bad_node]
        assert BAD_SITE not in r["sites"]
    reasons = [r["rejected"][0]["error"] for r in hostile.history]
    assert "bytes, expected" in reasons[0] and ".npy shape (1073741824,)" in reasons[1]
    assert "metric site-id=[1, 2]" in reasons[2]
    warned = [r.getMessage() for r in caplog.records if f"node {bad_node}:" in r.getMessage()]
    assert len(warned) == 2 * ROUNDS, warned

    a = load_file(str(hostile.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(honest.adapter_dir / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    for x, y in zip(hostile.history, honest.history, strict=True):
        assert x["train-loss"] == y["train-loss"] and x["eval-loss"] == y["eval-loss"]
