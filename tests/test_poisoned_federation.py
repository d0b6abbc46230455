"""A real federation (tiny model, Ray simulation) with a hostile node sending replies that are
right in form and wrong in value (issue 32): a 3e+38 delta with each down codec, a pair of
them, num-examples = 2^53, train-loss inf / 1e308 and eval-loss NaN / 1e308.

In each the run completes all its rounds, no round fails, the record names the hostile node,
and the global adapter is within a stated bound of the run in which the hostile nodes are
absent (they answer with an error): equal for replies the gate drops, and for replies the
bounds clip (server/bounds.py) within

    2 * sum over rounds of  s_r * (b_r + M_r)

where ``s_r`` is the hostile nodes' share of the round's (capped) weight, ``b_r`` the round's
norm bound and ``M_r`` the largest honest delta norm: the most the clipped replies can move a
round's mean, doubled for the honest nodes' own drift (they train from a different global).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.protocol.messages import ARRAYS, CONFIG
from hostile import CODECS, corrupt_metric

pytestmark = pytest.mark.integration

ROUNDS = 2
SITES = "mental,pain,dermatology"
HUGE = 3e38  # a valid float32
# (content, evaluate, round) -> the hostile reply's content
Poison = Callable[[RecordDict, bool, int], RecordDict]


def _huge_delta(content: RecordDict, evaluate: bool, server_round: int) -> RecordDict:
    if evaluate:
        return content
    arrays = content.array_records[ARRAYS]
    for name in list(arrays):
        shape = tuple(arrays[name].shape)
        arrays[name] = Array(np.full(shape, HUGE, np.float32))
    return content


def _examples(content: RecordDict, evaluate: bool, server_round: int) -> RecordDict:
    return content if evaluate else corrupt_metric(content, "num-examples", 2**53)


def _figures(content: RecordDict, evaluate: bool, server_round: int) -> RecordDict:
    if evaluate:
        return corrupt_metric(content, "eval-loss", [1e308, float("nan")][server_round - 1])
    return corrupt_metric(content, "train-loss", [1e308, float("inf")][server_round - 1])


def _app(defaults: dict, hostile: set[str], poison: Poison | None, nodes: Path) -> ClientApp:
    """fedlora's node, except that the ``hostile`` sites poison their replies (or, with no
    poison, answer with an error: the run without them)."""
    from fedlora.client.app import run_evaluation, run_round
    from fedlora.client.node import NodeSettings

    app = ClientApp()

    def answer(msg: Message, context: Context, evaluate: bool) -> Message:
        merged = {**defaults, **context.run_config, **context.node_config}
        work = run_evaluation if evaluate else run_round
        content = work(msg.content, merged, context.state).to_content()
        site = NodeSettings.from_config(merged).site
        if site not in hostile:
            return Message(content=content, reply_to=msg)
        (nodes / site).write_text(str(context.node_id))
        if poison is None:
            return Message(error=Error(code=4001, reason="absent"), reply_to=msg)
        server_round = int(msg.content[CONFIG]["server-round"])
        return Message(content=poison(content, evaluate, server_round), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return answer(msg, context, evaluate=False)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return answer(msg, context, evaluate=True)

    return app


def _federation(model: Path, out: Path, hostile: set[str], poison: Poison | None, **settings):
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
            "sites": SITES,
            "evaluate-every": 1,
            "output-dir": str(out),
            **settings,
        }
    )
    defaults = {"base-model": str(model), "quantization": "fp32", "sites": cfg.sites}
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    result = simulate(cfg, client_app=_app(defaults, hostile, poison, out / "nodes"))
    ids = {site: int((out / "nodes" / site).read_text()) for site in hostile}
    return result, ids


def _adapter(result) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(result.adapter_dir / "adapter_model.safetensors"))


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(
        np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)),
    )


def _stated_bound(history: list[dict], hostile: set[str]) -> float:
    total = 0.0
    for record in history:
        sites = record["sites"]
        weight = {name: site["num-examples"] for name, site in sites.items()}
        share = sum(weight[s] for s in hostile) / sum(weight.values())
        honest = max(site["delta-norm"] for name, site in sites.items() if name not in hostile)
        total += share * (record["norm-bound"] + honest)
    return 2 * total


def _completed(history: list[dict]) -> None:
    assert len(history) == ROUNDS
    assert not any(r.get("failed") or r.get("skipped") for r in history), history


_ABSENT: dict[tuple, tuple] = {}  # (sites, down codec) -> the run without the hostile nodes


def _absent(model: Path, tmp: Path, hostile: set[str], **settings):
    key = (tuple(sorted(hostile)), tuple(sorted(settings.items())))
    if key not in _ABSENT:
        _ABSENT[key] = _federation(model, tmp / f"absent-{len(_ABSENT)}", hostile, None, **settings)
    return _ABSENT[key][0]


@pytest.fixture(scope="module")
def absent_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("absent")


@pytest.mark.parametrize("down_codec", CODECS)
def test_a_3e38_delta_is_clipped_with_every_down_codec(
    tiny_model_dir, tmp_path, absent_dir, down_codec
):
    run, ids = _federation(
        tiny_model_dir, tmp_path, {"pain"}, _huge_delta, **{"down-codec": down_codec}
    )
    absent = _absent(tiny_model_dir, absent_dir, {"pain"}, **{"down-codec": down_codec})

    _completed(run.history)
    for record in run.history:
        assert [e["node"] for e in record["norm-clipped"]] == [ids["pain"]]
    moved = _distance(_adapter(run), _adapter(absent))
    assert np.isfinite(moved) and moved <= _stated_bound(run.history, {"pain"}), moved


def test_a_pair_of_3e38_deltas_among_two_honest_nodes_is_clipped(tiny_model_dir, tmp_path):
    sites = {"sites": "mental,pain,dermatology,reproductive"}
    pair = {"pain", "dermatology"}
    run, ids = _federation(tiny_model_dir, tmp_path / "run", pair, _huge_delta, **sites)
    absent, _ = _federation(tiny_model_dir, tmp_path / "absent", pair, None, **sites)

    _completed(run.history)
    for record in run.history:
        assert sorted(e["node"] for e in record["norm-clipped"]) == sorted(ids.values())
    moved = _distance(_adapter(run), _adapter(absent))
    assert np.isfinite(moved) and moved <= _stated_bound(run.history, pair), moved


def test_a_claim_of_2_pow_53_examples_weighs_at_most_the_cap(tiny_model_dir, tmp_path, absent_dir):
    run, ids = _federation(tiny_model_dir, tmp_path, {"pain"}, _examples)
    absent = _absent(tiny_model_dir, absent_dir, {"pain"})

    _completed(run.history)
    for record in run.history:
        assert record["weight-capped"] == [{"node": ids["pain"], "claimed": 2**53}]
        assert record["sites"]["pain"]["num-examples"] == record["max-examples"]
    moved = _distance(_adapter(run), _adapter(absent))
    assert moved <= _stated_bound(run.history, {"pain"}), moved


def test_train_and_eval_losses_beyond_any_real_one_are_dropped(
    tiny_model_dir, tmp_path, absent_dir
):
    run, ids = _federation(tiny_model_dir, tmp_path, {"pain"}, _figures)
    absent = _absent(tiny_model_dir, absent_dir, {"pain"})

    _completed(run.history)
    for record in run.history:
        assert [e["node"] for e in record["rejected"]] == [ids["pain"]]
        assert [e["node"] for e in record["eval-rejected"]] == [ids["pain"]]
        assert "metric train-loss=" in record["rejected"][0]["error"]
        assert "metric eval-loss=" in record["eval-rejected"][0]["error"]
        assert np.isfinite(record["train-loss"]) and np.isfinite(record["eval-loss"])
    a, b = _adapter(run), _adapter(absent)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])  # the stated bound here: 0
    for x, y in zip(run.history, absent.history, strict=True):
        assert x["train-loss"] == y["train-loss"] and x["eval-loss"] == y["eval-loss"]


def test_without_the_norm_bound_3e38_deltas_fail_their_rounds_and_the_run_completes(
    tiny_model_dir, tmp_path
):
    # Before the round boundary this run ended in round 1: the fp16 downlink could not encode
    # the new global adapter (CodecError inside aggregate_train).
    settings = {"down-codec": "fp16", "norm-bound-factor": 0.0}
    run, _ = _federation(tiny_model_dir, tmp_path, {"pain"}, _huge_delta, **settings)

    assert len(run.history) == ROUNDS
    for record in run.history:
        assert record["failed"] and record["failure"].startswith("AggregationError:")
        assert record["sites"]["pain"]["delta-norm"] > 1e38  # the record shows whose reply
        assert record["norm-bound"] is None and record["norm-clipped"] == []
    from fedlora.config import RunConfig
    from fedlora.lora import adapter_shapes, initial_adapter

    start = initial_adapter(adapter_shapes(tiny_model_dir, RunConfig().lora), 0)
    final = _adapter(run)  # every round failed: the seeded start, kept
    assert set(final) == set(start) and _distance(final, start) == 0.0
