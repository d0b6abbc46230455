"""Replies right in form and hostile in value cannot stop, poison or outweigh a round (issue 32).

Unit tests of the bounds (server/aggregate.py, server/bounds.py) on four-number arrays, and of
the strategy's round boundary: a hostile reply among honest ones (3e+38 deltas with every down
codec, a pair of them, num-examples = 2^53, a train loss or eval loss beyond any real one)
leaves a finite global adapter within a stated bound of the honest-only one, names the node in
the round record, and any exception while aggregating, encoding the downlink, evaluating or
saving fails only its round. The federation-level tests: tests/test_poisoned_federation.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from fedlora.clipping import global_norm
from fedlora.protocol.messages import TrainReply, to_array_record
from fedlora.server.aggregate import (
    AggregationError,
    cap_weights,
    check_bounded,
    median_low,
    norm_bound,
)
from fedlora.server.bounds import EXAMPLES_FACTOR, ReplyBounds, bound_secure_mean
from fedlora.server.build import compose
from fedlora.server.downlink import Downlink
from fedlora.server.settings import StrategySettings
from fedlora.server.strategies import ClientUpdate, get_strategy
from fedlora.server.strategy import LoraFedAvg
from hostile import (
    BLOCK,
    CODECS,
    SPEC,
    corrupt_metric,
    delta,
    eval_content,
    reply_metadata,
    train_content,
)

HUGE = 3e38  # a valid float32


# ----------------------------------------------------------------------------- pure bounds


def test_median_low_is_the_smaller_middle_value():
    assert median_low([4.0, 1.0, 3.0]) == 3.0
    assert median_low([4.0, 1.0, 3.0, 2.0]) == 2.0
    assert median_low([5.0, 1e38]) == 5.0  # one hostile node of two cannot raise it


def test_weights_are_capped_at_a_multiple_of_the_lower_median_or_the_setting():
    weights, cap = cap_weights([10, 12, 2**53, 8], factor=4.0)
    assert cap == 40 and weights == [10, 12, 40, 8]
    assert cap_weights([10, 12, 2**53], max_examples=11) == ([10, 11, 11], 11)


def test_the_norm_bound_follows_the_lower_median_norm_and_is_off_at_zero():
    assert norm_bound([1.0, 2.0, 1e38, 3.0], 3.0) == 6.0
    assert norm_bound([1.0, 2.0], 0.0) == math.inf
    assert norm_bound([0.0, 0.0, 5.0], 3.0) == math.inf  # no scale to set a bound from


@pytest.mark.parametrize(
    "values, problem",
    [([0.0, np.inf, 1.0, 2.0], "NaN or Inf"), ([0.0, 2e4, 1.0, 2.0], r"\|value\| 2e\+04")],
)
def test_check_bounded_names_the_tensor(values, problem):
    check_bounded({"x": np.array([0.0, 1e4, -1e4, 2.0])}, 1e4)
    with pytest.raises(AggregationError, match=f"{problem}.* in x"):
        check_bounded({"x": np.array(values)}, 1e4)


def test_a_secure_mean_beyond_the_clip_is_projected_back():
    inside = ClientUpdate({"x": np.array([3.0, 4.0, 0.0, 0.0])}, 7)
    same, fields = bound_secure_mean(inside, 5.0, 1e-9)
    assert same is inside and "secagg-mean-clipped" not in fields
    outside = ClientUpdate({"x": np.array([5.0, 5.0, 5.0, 5.0])}, 7)  # every coordinate at +C
    projected, fields = bound_secure_mean(outside, 5.0, 1e-9)
    assert fields["secagg-mean-clipped"] and fields["secagg-mean-norm"] == 10.0
    assert global_norm(projected.delta) <= 5.0 and projected.num_examples == 7


def test_reply_bounds_refuse_negative_settings():
    with pytest.raises(ValueError, match="max-examples-per-node=-1"):
        ReplyBounds(max_examples=-1)
    with pytest.raises(ValueError, match="norm-bound-factor=nan"):
        ReplyBounds(norm_factor=float("nan"))


# ----------------------------------------------------------------------------- the strategy


def _strategy(path: Path, aggregator=None, secagg=None, **settings) -> Any:
    start = {k: np.full(v.shape, 0.1, np.float32) for k, v in SPEC.items()}
    settings.setdefault("codec_block", BLOCK)
    settings = StrategySettings(history_file=path / "metrics.jsonl", **settings)
    plain = LoraFedAvg(spec=SPEC, global_adapter=start, aggregator=aggregator, settings=settings)
    return compose(plain, secagg=secagg)


def _reply(node: int, values: dict[str, np.ndarray], examples: int = 12) -> Message:
    reply = TrainReply(delta=values, num_examples=examples, train_loss=1.5, site_id=-1)
    return Message(content=reply.to_content(), metadata=reply_metadata(node))


def _huge(sign: float = 1.0) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, sign * HUGE, np.float32) for k, v in SPEC.items()}


HONEST = [(1, delta(1)), (2, delta(2))]


def _strict(constant: str) -> float:
    raise AssertionError(f"metrics.jsonl holds {constant}: figures must be finite")


def _records(path: Path) -> list[dict]:
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=_strict) for line in lines]


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return global_norm({k: a[k].astype(np.float64) - b[k] for k in a})


def _honest_only(path: Path, **kwargs) -> dict[str, np.ndarray]:
    reference = _strategy(path, **kwargs)
    reference.aggregate_train(1, [_reply(n, d) for n, d in HONEST])
    return reference.global_adapter


def _stated_bound(record: dict, hostile: list[int], honest_examples: int) -> float:
    """How far the hostile replies can move the mean (server/bounds.py): their weight share
    times (the norm bound + the largest honest norm)."""
    capped = {e["node"] for e in record["weight-capped"]}
    weight = sum(record["max-examples"] if n in capped else 12 for n in hostile)
    share = weight / (weight + honest_examples)
    largest = max(global_norm(d) for _, d in HONEST)
    return share * (record["norm-bound"] + largest)


@pytest.mark.parametrize("down_codec", CODECS)
def test_a_3e38_delta_is_clipped_with_every_down_codec(tmp_path, down_codec):
    strategy = _strategy(tmp_path, down_codec=down_codec)
    replies = [_reply(n, d) for n, d in HONEST] + [_reply(9, _huge())]
    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    record = _records(tmp_path)[0]
    assert [e["node"] for e in record["norm-clipped"]] == [9] and not record.get("failed")
    reference = _honest_only(tmp_path / "ref", down_codec=down_codec)
    moved = _distance(strategy.global_adapter, reference)
    assert all(np.isfinite(v).all() for v in strategy.global_adapter.values())
    assert moved <= _stated_bound(record, [9], 24) * (1 + 1e-3) + 0.05  # + the codec's error


@pytest.mark.parametrize("down_codec", CODECS)
def test_without_the_norm_bound_a_3e38_round_fails_and_the_next_one_runs(tmp_path, down_codec):
    strategy = _strategy(tmp_path, down_codec=down_codec, bounds=ReplyBounds(norm_factor=0.0))
    before = dict(strategy.global_adapter)
    replies = [_reply(n, d) for n, d in HONEST] + [_reply(9, _huge())]
    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is None and strategy.global_adapter == before
    assert strategy.downlink.version == 0
    arrays, _ = strategy.aggregate_train(2, [_reply(n, d) for n, d in HONEST])
    assert arrays is not None and strategy.downlink.version == 1
    first, second = _records(tmp_path)
    assert first["failed"] and first["failure"].startswith("AggregationError: the global adapter")
    assert first["sites"]["node-9"]["delta-norm"] > 1e38  # the failed round keeps its record
    assert "beyond the bound" in first["failure"]
    assert not second.get("failed")


def test_a_pair_of_deltas_whose_product_is_not_finite_fails_only_its_round(tmp_path):
    # FedEx-LoRA's residual averages B_i @ A_i: 3e38 x 3e38 is beyond float32.
    strategy = _strategy(
        tmp_path, aggregator=get_strategy("fedex-lora"), bounds=ReplyBounds(norm_factor=0.0)
    )
    before = dict(strategy.global_adapter)
    pair = [_reply(8, _huge()), _reply(9, _huge(-1.0))]
    arrays, _ = strategy.aggregate_train(1, [_reply(n, d) for n, d in HONEST] + pair)
    assert arrays is None and strategy.global_adapter == before and strategy.residuals == {}
    assert _records(tmp_path)[0]["failed"]


def test_a_pair_of_hostile_deltas_among_two_honest_is_clipped(tmp_path):
    strategy = _strategy(tmp_path)
    pair = [_reply(8, _huge()), _reply(9, _huge())]
    arrays, _ = strategy.aggregate_train(1, [_reply(n, d) for n, d in HONEST] + pair)

    assert arrays is not None
    record = _records(tmp_path)[0]
    assert sorted(e["node"] for e in record["norm-clipped"]) == [8, 9]
    moved = _distance(strategy.global_adapter, _honest_only(tmp_path / "ref"))
    assert moved <= _stated_bound(record, [8, 9], 24) * (1 + 1e-3)


def test_a_claim_of_2_pow_53_examples_is_weighed_as_the_cap(tmp_path):
    strategy = _strategy(tmp_path)
    replies = [_reply(n, d) for n, d in HONEST] + [_reply(9, delta(3), examples=2**53)]
    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    record = _records(tmp_path)[0]
    assert record["weight-capped"] == [{"node": 9, "claimed": 2**53}]
    assert record["max-examples"] == EXAMPLES_FACTOR * 12 and record["num-examples"] == 72
    expected = _strategy(tmp_path / "ref")
    expected.aggregate_train(
        1, [_reply(n, d) for n, d in HONEST] + [_reply(9, delta(3), examples=48)]
    )
    for name in SPEC:
        np.testing.assert_array_equal(strategy.global_adapter[name], expected.global_adapter[name])


@pytest.mark.parametrize("value", [float("inf"), 1e308, 10**18])
def test_a_train_loss_beyond_any_real_one_is_dropped_naming_the_node(tmp_path, value):
    strategy = _strategy(tmp_path)
    hostile = corrupt_metric(train_content(seed=3), "train-loss", value)
    replies = [_reply(n, d) for n, d in HONEST] + [
        Message(content=hostile, metadata=reply_metadata(9))
    ]
    strategy.aggregate_train(1, replies)

    record = _records(tmp_path)[0]
    assert [r["node"] for r in record["rejected"]] == [9]
    assert "metric train-loss=" in record["rejected"][0]["error"]
    assert record["train-loss"] == 1.5
    for name in SPEC:
        np.testing.assert_array_equal(
            strategy.global_adapter[name], _honest_only(tmp_path / "ref")[name]
        )


@pytest.mark.parametrize(
    "metric, value", [("eval-loss", float("nan")), ("eval-loss", 1e308), ("eval-perplexity", 1e300)]
)
def test_a_non_finite_or_huge_eval_figure_is_dropped_naming_the_node(tmp_path, metric, value):
    strategy = _strategy(tmp_path, evaluate_every=1, num_rounds=1)
    strategy.aggregate_train(1, [_reply(n, d) for n, d in HONEST])
    replies = [Message(content=eval_content(0.5), metadata=reply_metadata(1, "evaluate"))]
    hostile = corrupt_metric(eval_content(0.5), metric, value)
    replies.append(Message(content=hostile, metadata=reply_metadata(9, "evaluate")))
    strategy.aggregate_evaluate(1, replies)

    record = _records(tmp_path)[0]
    assert [r["node"] for r in record["eval-rejected"]] == [9]
    assert record["eval-loss"] == pytest.approx(1.2)


# ----------------------------------------------------------------------------- the boundary


def _evaluation(node: int) -> Message:
    return Message(content=eval_content(), metadata=reply_metadata(node, "evaluate"))


def _failing(*_args, **_kwargs):
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("where", ["aggregate", "downlink", "save", "central-eval"])
def test_an_exception_anywhere_in_the_round_fails_only_that_round(tmp_path, where, monkeypatch):
    strategy = _strategy(tmp_path, down_codec="fp16", evaluate_every=1, num_rounds=2)
    saved: list[int] = []
    strategy.on_round = lambda r, *_: saved.append(r)
    strategy.central_eval = lambda r, arrays: {"loss": 1.0}
    before = dict(strategy.global_adapter)
    if where == "aggregate":
        monkeypatch.setattr(strategy.aggregator, "aggregate", _failing)
    elif where == "downlink":
        monkeypatch.setattr(Downlink, "publish", _failing)
    elif where == "save":
        strategy.on_round = lambda r, *_: _failing() if r == 1 else saved.append(r)
    else:
        strategy.central_eval = lambda r, arrays: _failing() if r == 1 else {"loss": 1.0}

    strategy.aggregate_train(1, [_reply(n, d) for n, d in HONEST])
    strategy.aggregate_evaluate(1, [_evaluation(1)])
    monkeypatch.undo()
    if where == "save":
        strategy.on_round = lambda r, *_: saved.append(r)
    assert strategy.global_adapter == before and strategy.downlink.version == 0
    strategy.aggregate_train(2, [_reply(n, d) for n, d in HONEST])
    strategy.aggregate_evaluate(2, [_evaluation(1)])

    first, second = _records(tmp_path)
    assert (
        first["round"] == 1
        and first["failed"]
        and "RuntimeError: disk on fire" in (first["failure"])
    )
    assert second["round"] == 2 and not second.get("failed") and second["eval-loss"] > 0
    assert strategy.downlink.version == 1 and [r["round"] for r in strategy.history] == [1, 2]
    assert saved[-1] == 2


def test_a_record_figure_that_is_not_finite_is_written_as_null(tmp_path):
    strategy = _strategy(tmp_path, min_train_nodes=3)
    strategy.aggregate_train(1, [])  # no replies: the train loss is NaN in memory
    record = _records(tmp_path)[0]
    assert record["skipped"] and record["train-loss"] is None
    assert math.isnan(strategy.history[0]["train-loss"])


def test_the_global_adapter_sent_is_the_kept_one_after_a_failed_round(tmp_path):
    strategy = _strategy(tmp_path, bounds=ReplyBounds(norm_factor=0.0))
    strategy.aggregate_train(1, [_reply(n, d) for n, d in HONEST] + [_reply(9, _huge())])
    payload, _ = strategy.downlink.payload(1)
    expected = to_array_record(strategy.global_adapter)
    for name, value in payload.items():
        np.testing.assert_array_equal(value, expected[name].numpy())


def test_the_report_lists_failed_rounds_and_the_replies_a_bound_acted_on():
    from fedlora.server.report import summary_markdown

    history = [
        {"round": 1, "sites": {}, "skipped": True, "failed": True, "failure": "ValueError: x"},
        {
            "round": 2,
            "sites": {},
            "max-examples": 48,
            "weight-capped": [{"node": 9, "claimed": 2**53}],
            "norm-bound": 6.0,
            "norm-clipped": [{"node": 8, "norm": 3e38}],
        },
    ]
    page = summary_markdown(history, {})
    assert "| 1 | failed |" in page
    assert "- round 1 failed, global adapter kept: ValueError: x" in page
    assert f"- round 2: node 9 weighed as 48, claimed {2**53}" in page
    assert "- round 2: node 8 L2 norm 3e+38 clipped to 6" in page


def test_an_eval_reply_claiming_2_pow_53_tokens_weighs_at_most_the_cap(tmp_path):
    strategy = _strategy(tmp_path, evaluate_every=1, num_rounds=1)
    strategy.aggregate_train(1, [_reply(n, d) for n, d in HONEST])
    hostile = corrupt_metric(
        corrupt_metric(eval_content(), "eval-loss", 9999.0), "eval-tokens", 2**53
    )
    replies = [
        _evaluation(1),
        _evaluation(2),
        Message(content=hostile, metadata=reply_metadata(9, "evaluate")),
    ]
    strategy.aggregate_evaluate(1, replies)
    record = _records(tmp_path)[0]
    assert record["eval-loss"] == pytest.approx((1.2 * 80 + 9999.0 * 160) / 240)


def test_a_secure_sum_whose_mean_leaves_the_clip_ball_is_projected_in_the_round(
    tmp_path, monkeypatch
):
    # A node that skips its clip puts every coordinate at +C: each passes the decoder's
    # per-coordinate range check, their L2 norm does not.
    from fedlora.protocol.secagg import SecAggSettings
    from fedlora.server import secure as module
    from fedlora.server.secagg import SecAggResult

    clip = 5.0
    result = SecAggResult(
        weighted_sum={k: np.full(v.shape, clip * 36.0) for k, v in SPEC.items()},
        total_weight=36,
        contributors=(1, 2, 3),
        dropped=(),
        metrics={},
        seconds={"total": 0.0},
        tolerance=1e-9,
        scalars={"num-examples": 36.0},
    )
    monkeypatch.setattr(module, "secure_weighted_sum", lambda *args, **kwargs: result)
    strategy = _strategy(tmp_path, secagg=lambda n: SecAggSettings(clip_norm=clip))
    start = dict(strategy.global_adapter)
    strategy._secure_round = (object(), [1, 2, 3], {})
    arrays, _ = strategy.aggregate_train(1, [])

    assert arrays is not None
    record = _records(tmp_path)[0]
    assert record["secagg-mean-clipped"] and record["secagg-mean-norm"] == pytest.approx(20.0)
    assert _distance(strategy.global_adapter, start) <= clip


def test_max_examples_per_node_also_caps_the_secure_encoders_weight():
    from fedlora.config import RunConfig
    from fedlora.server.app import capped_secagg_settings, secagg_settings

    secure = {"secure_aggregation": True, "min_nodes": 2}
    assert capped_secagg_settings(RunConfig(**secure), 5) == secagg_settings(RunConfig(**secure), 5)
    for bits in (64, 32):
        cfg = RunConfig(**secure, secagg_wire_bits=bits, max_examples_per_node=100)
        assert capped_secagg_settings(cfg, 5).max_weight == 100
    cfg = RunConfig(**secure, secagg_wire_bits=32, max_examples_per_node=10**6)
    assert capped_secagg_settings(cfg, 5).max_weight == 2**12  # never above the wire's cap


@pytest.mark.parametrize("key", ["max-examples-per-node", "norm-bound-factor"])
def test_the_reply_bounds_settings_refuse_negative_values(key):
    from fedlora.config import RunConfig
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{key}=-1"):
        RunConfig.from_mapping({key: -1})
