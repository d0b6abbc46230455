"""Fuzzing replies that are right in form and hostile in value (issue 32): one round of the real
strategy per input, honest replies plus fewer or as many hostile ones, every strategy, reducer,
server optimizer, up codec and down codec.

Hostile replies pass the gate: huge or tiny deltas (up to 3e+38, sent through the up codec's
own wire form: fp16 values up to 65504, int8 scales up to 3e+38), example counts up to 2^53 and
every metric at the edge of its range; their eval replies likewise. Each input must end without
an exception leaving the strategy (harness: tests/fuzzing.py) and the round must not be
poisoned: it completes (no failed round), its global adapter is finite and within
``max_global_value``, and it lies no further than the stated bound from the round run on the
honest replies alone: for the weighted mean with FedAvg's server step,
``s * (b + M)`` (``s``: the hostile share of the capped weight, ``b``: the round's norm bound,
``M``: the largest honest norm; server/bounds.py), else what the reducer and optimizer allow
(``sqrt(n) * max(b, M)`` for a coordinate-wise reducer, ``lr * sqrt(D)`` per adaptive step),
plus the down codec's rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from fedlora.clipping import global_norm
from fedlora.protocol.compression import encode
from fedlora.protocol.gate import MAX_INT, MAX_LOSS, MAX_PERPLEXITY, MAX_SECONDS
from fedlora.protocol.messages import ARRAYS, METRICS, TrainReply
from fedlora.server.bounds import MAX_GLOBAL_VALUE
from fedlora.server.settings import StrategySettings
from fedlora.server.strategies import ServerOptimizer, get_strategy, make_reducer
from fedlora.server.strategy import LoraFedAvg
from fuzzing import hostile_round, outcome
from hostile import BLOCK, CODECS, SPEC, delta, eval_content, raw_set, reply_metadata

# (strategy, reducer): every pair the run config accepts on this two-factor adapter
AGGREGATIONS = [
    *((s, r) for s in ("fedit", "ffa-lora", "fedsa-lora") for r in ("mean", "median", "trimmed")),
    ("fedex-lora", "mean"),
]
OPTIMIZERS = ("sgd", "avgm", "adam", "yogi")
DOWN_ERROR = {"none": 0.0, "fp16": 2.0**-10, "int8": 1 / 127, "int8-block": 1 / 127}

magnitudes = st.sampled_from([0.0, 1e-38, 1e-3, 1.0, 1e4, 65504.0, 1e10, 1e30, 3e38])
signs = st.sampled_from([-1.0, 1.0])
shapes_of = st.sampled_from(["fill", "one", "random"])
examples = st.one_of(st.sampled_from([1, 12, 2**31, 2**53]), st.integers(1, MAX_INT))
losses = st.one_of(st.sampled_from([0.0, MAX_LOSS, 1e-300]), st.floats(0.0, MAX_LOSS))
seconds = st.one_of(st.sampled_from([0.0, MAX_SECONDS]), st.floats(0.0, MAX_SECONDS))
counts = st.one_of(st.sampled_from([0, MAX_INT]), st.integers(0, MAX_INT))


@st.composite
def hostile_values(draw: st.DrawFn, shape: tuple[int, ...], codec: str) -> np.ndarray:
    """A float32 tensor the codec can carry: hostile in size, sign or pattern."""
    top = 65504.0 if codec == "fp16" else 3e38
    size = min(draw(magnitudes), top) * draw(signs)
    kind = draw(shapes_of)
    seed = draw(st.integers(0, 2**16))
    if kind == "fill":
        return np.full(shape, size, np.float32)
    out = np.zeros(shape, np.float32)
    if kind == "one":
        out.flat[seed % out.size] = size
        return out
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1.0, 1.0, shape) * size).astype(np.float32)


def _wire(values: dict[str, np.ndarray], codec: str, scale: float) -> dict[str, np.ndarray]:
    """The hostile wire form: scaled codes (int8: a hostile scale) or the values as they are."""
    if codec in ("none", "fp16"):
        return encode(values, codec, BLOCK)
    wire = encode({k: np.sign(v) for k, v in values.items()}, codec, BLOCK)
    return {k: (np.full_like(v, scale) if k.endswith("::scale") else v) for k, v in wire.items()}


@st.composite
def hostile_train(draw: st.DrawFn, names: tuple[str, ...], codec: str) -> RecordDict:
    values = {n: draw(hostile_values(SPEC[n].shape, codec)) for n in names}
    scale = min(draw(magnitudes), 3e38)
    metrics = {
        "num-examples": draw(examples),
        "train-loss": draw(losses),
        "train-seconds": draw(seconds),
        "load-seconds": draw(seconds),
        "train-tokens": draw(counts),
        "scored-tokens": draw(counts),
        "bytes-sent": draw(counts),
        "bytes-received": draw(counts),
    }
    reply = TrainReply(delta=delta(0), num_examples=1, train_loss=0.0)
    content = reply.to_content()
    wire = _wire(values, codec, scale)
    content[ARRAYS] = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in sorted(wire.items())}
    )
    for key, value in metrics.items():
        raw_set(content.metric_records[METRICS], key, value)
    return content


@st.composite
def hostile_eval(draw: st.DrawFn) -> RecordDict:
    content = eval_content(draw(st.sampled_from([None, 0.0, 1.0])))
    metrics = content.metric_records[METRICS]
    for key, value in {
        "num-examples": draw(examples),
        "eval-loss": draw(losses),
        "eval-perplexity": draw(st.sampled_from([1.0, MAX_PERPLEXITY])),
        "eval-tokens": draw(counts),
        "eval-seconds": draw(seconds),
    }.items():
        raw_set(metrics, key, value)
    return content


def _strategy(name: str, reducer: str, optimizer: str, down: str, up: str) -> LoraFedAvg:
    start = {k: np.full(v.shape, 0.1, np.float32) for k, v in SPEC.items()}
    return LoraFedAvg(
        spec=SPEC,
        global_adapter=start,
        aggregator=get_strategy(name, make_reducer(reducer.replace("trimmed", "trimmed-mean"))),
        optimizer=ServerOptimizer(kind=optimizer),
        settings=StrategySettings(
            codec=up,
            codec_block=BLOCK,
            down_codec=down,
            evaluate_every=1,
            num_rounds=1,
            min_train_nodes=1,
        ),
    )


def _honest(names: tuple[str, ...], seed: int, codec: str) -> Message:
    values = {n: v for n, v in delta(seed).items() if n in names}
    reply = TrainReply(values, 10 + seed, 1.0, codec=codec, codec_block=BLOCK)
    return Message(content=reply.to_content(), metadata=reply_metadata(seed))


def _touched(record: dict, hostile: set[int]) -> bool:
    """Whether the round capped the weight or clipped the norm of an honest reply."""
    acted = [e["node"] for e in record.get("weight-capped", []) + record.get("norm-clipped", [])]
    return any(node not in hostile for node in acted)


def _allowed(strategy: LoraFedAvg, reference: LoraFedAvg, hostile: set[int]) -> float:
    """The stated bound on how far the hostile replies moved the round's global adapter from the
    honest-only one (server/bounds.py)."""
    record = strategy.history[-1]
    sites = {int(n.split("-")[1]): s for n, s in record["sites"].items() if "delta-norm" in s}
    bound = record["norm-bound"] or max(s["delta-norm"] for s in sites.values())
    largest = max((s["delta-norm"] for n, s in sites.items() if n not in hostile), default=0.0)
    size = math.sqrt(sum(v.size for v in strategy.global_adapter.values()))
    if strategy.optimizer.kind in ("adam", "yogi"):  # each first step moves a value <= lr
        return 2 * strategy.optimizer.server_lr * size
    if strategy.aggregator.reducer.kind != "mean":  # a coordinate-wise median or trimmed mean
        return 2 * math.sqrt(len(sites)) * max(bound, largest)
    if _touched(record, hostile) or _touched(reference.history[-1], set()):
        return max(bound, largest) + largest  # both means lie in the ball of the clipped norms
    weights = {n: s["num-examples"] for n, s in sites.items()}
    share = sum(w for n, w in weights.items() if n in hostile) / sum(weights.values())
    return share * (bound + largest)


def _poisoned(strategy: LoraFedAvg, reference: LoraFedAvg, start: dict, hostile: set[int]) -> str:
    """Why the round counts as poisoned; "" when it is not."""
    record = strategy.history[-1]
    if record.get("failed"):
        return f"the round failed: {record['failure']}"
    new, ref = strategy.global_adapter, reference.global_adapter
    if not all(np.isfinite(v).all() for v in new.values()):
        return "the global adapter is not finite"
    if max(float(np.max(np.abs(v))) for v in new.values()) > MAX_GLOBAL_VALUE:
        return "the global adapter is beyond its bound"
    if strategy.optimizer.kind in ("adam", "yogi"):
        ref = start  # the adaptive step is bounded by itself
    moved = global_norm({k: new[k] - ref[k] for k in new})
    changes = [np.max(np.abs(new[k] - start[k])) for k in new]
    changes += [np.max(np.abs(reference.global_adapter[k] - start[k])) for k in new]
    size = math.sqrt(sum(v.size for v in new.values()))
    rounding = 2 * DOWN_ERROR[strategy.downlink.codec] * size * float(max(changes))
    allowed = _allowed(strategy, reference, hostile) * (1 + 1e-5) + rounding + 1e-6
    return "" if moved <= allowed else f"moved {moved:.4g}, the stated bound {allowed:.4g}"


settings = st.tuples(
    st.sampled_from(AGGREGATIONS),
    st.sampled_from(OPTIMIZERS),
    st.sampled_from(CODECS),
    st.sampled_from(CODECS),
)
honest_counts = st.integers(1, 4)


@pytest.mark.fuzz
@given(data=st.data(), setting=settings, n_honest=honest_counts)
def test_fuzz_hostile_values_cannot_poison_a_round(data, setting, n_honest):
    (name, reducer), optimizer, down, up = setting
    if optimizer != "sgd" and name == "fedex-lora":
        optimizer = "sgd"  # FedEx-LoRA's residual is exact only for FedAvg's step
    strategy = _strategy(name, reducer, optimizer, down, up)
    reference = _strategy(name, reducer, optimizer, down, up)
    names = tuple(sorted(strategy.reply_spec))
    start = dict(strategy.global_adapter)
    honest = [_honest(names, seed, up) for seed in range(1, n_honest + 1)]
    n_hostile = data.draw(st.integers(1, n_honest))
    hostile = {100 + i for i in range(n_hostile)}
    replies = honest + [
        Message(content=data.draw(hostile_train(names, up)), metadata=reply_metadata(node))
        for node in sorted(hostile)
    ]
    evals = [Message(content=eval_content(), metadata=reply_metadata(1, "evaluate"))]
    evals += [
        Message(content=data.draw(hostile_eval()), metadata=reply_metadata(n, "evaluate"))
        for n in sorted(hostile)
    ]
    entry = f"round values ({up} up, every down codec)"
    with outcome(entry):
        strategy.aggregate_train(1, replies)
        strategy.aggregate_evaluate(1, evals)
        reference.aggregate_train(1, honest)
        reference.aggregate_evaluate(1, [])
    hostile_round(entry, _poisoned(strategy, reference, start, hostile))
