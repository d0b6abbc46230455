"""Secure aggregation benchmark: round time and bytes per client, plain vs SecAgg+, at 10 clients.

Usage (``make bench-secagg``)::

    .venv/bin/python benchmarks/bench_secagg.py            # 10 clients, demo settings
    .venv/bin/python benchmarks/bench_secagg.py --quick    # 4 clients, 1 local step, 1 run
    .venv/bin/python benchmarks/bench_secagg.py --rounds 2 # two plain/secure pairs
    .venv/bin/python benchmarks/bench_secagg.py --wire-bits 64,32,16  # narrow wires in (2), (3)

Three measurements, on the default model's adapter (SmolLM2-135M, LoRA r=8 on all linear
layers: 2,442,240 float32; FFA-LoRA sends the B half, 1,244,160):

1. **Round wall time with training** (demo settings: nf4 base, 5 local steps of batch 4, FedIT,
   default SecAgg+ settings). One Ray simulation runs the real ClientApp and, as its
   ServerApp, ``fedlora.server.app.run_federation`` once per round: a warm-up round (one step
   of batch 1) loads the base model once per Ray actor, then one plain and one secure round
   (alternating order when ``--rounds`` > 1). One simulation instead of two ``simulate`` calls
   halves the model loads and Ray starts and times both rounds warm. Every round is round 1
   of a fresh run: same initial adapter, same seeded batches, so plain and secure rounds do the
   same training. "round s" is the run's own round timer (history ``seconds``: from sending
   the train messages to having the replies, or the secure sum); "call s" is the whole
   ``run_federation`` call (setup, round, aggregation, checkpoint and report).
2. **The aggregation step alone**: nodes reply fixed updates (no training) and the server
   averages them, the plain way (train replies, ``TrainReply.from_content``, the strategy's
   ``aggregate``) and the secure way (``secure_weighted_sum`` + the same strategy on its
   mean), for all factors (FedIT) and for B only (FFA-LoRA). Median of ``--reps`` runs after
   one warm-up, plain and secure alternating. One secure row per ``--wire-bits`` (default 64;
   16 and 32 are the narrow wires, weights capped at the largest node's examples).
3. **Bytes per client per round**, against sending the full fp32 model each way. Plain rows are
   the codec payloads (``fedlora.protocol.compression``); secure rows are what the SecAgg+
   stages of (2) carried (public keys, encrypted shares, uint64 / uint32 / uint16 masked
   vectors, lists). Rounds in (1) use the run config's wire (64 bits).

Ray runs as many nodes at once as the machine has CPUs (one CPU each). Round times follow the
machine's load: on a shared machine the measured ratio (the last line) moves with whatever else
runs, so the report also gives the secure protocol's cost apart from training and a
load-independent estimate (plain round + the secure - plain cost of the aggregation step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.data.drugreview import SITES

DEMO = {"quantization": "nf4", "local-steps": 5, "batch-size": 4, "strategy": "fedit"}
CODEC_ROWS = ("none", "fp16", "int8", "int8-block")
DELTA_STD = 1e-3  # fixed updates of (2): L2 norm about 1.6, below the default clip of 10
MB = 1e6
GOAL_TIME_RATIO = 1.1
GOAL_BYTES_RATIO = 400.0
TIMEOUT_S = 600.0


def note(msg: str) -> None:
    print(f"[bench-secagg] {msg}", file=sys.stderr, flush=True)


def weight_of(pid: int) -> int:
    """Fixed number of examples of node ``pid`` in (2)."""
    return (29, 81, 133, 138, 159)[pid % 5] + pid


# ---- the default adapter and the full model -------------------------------------------


def default_model() -> tuple[dict[str, tuple[int, ...]], int]:
    """``(adapter shapes, full model parameters)`` of the default model.

    The full model is what its safetensors files hold (tied embeddings stored once): what a
    federation without LoRA would send each way every round.
    """
    import math

    from safetensors import safe_open

    from fedlora.basemodel import resolve_base_model
    from fedlora.lora import LoraSettings, adapter_shapes

    base = resolve_base_model("default")
    params = 0
    for path in sorted(base.glob("*.safetensors")):
        with safe_open(str(path), "np") as fh:
            params += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118 - safe_open is not iterable
    return adapter_shapes(base, LoraSettings()), params


def sent_shapes(shapes: Mapping[str, tuple[int, ...]], factors: str) -> dict[str, tuple[int, ...]]:
    from fedlora.protocol.adapter import factor_of

    return {k: tuple(v) for k, v in sorted(shapes.items()) if factor_of(k) in factors}


def simulation_backend() -> dict[str, Any]:
    """What ``fedlora.simulations.run.simulate`` gives Ray (one CPU per node, all CPUs), with
    the nodes' logs kept out of the report."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(os.cpu_count() or 1, 1),
            "include_dashboard": False,
            "log_to_driver": False,
        },
    }


def wait_for_nodes(grid: Any, n: int) -> list[int]:
    deadline = time.monotonic() + TIMEOUT_S
    while len(list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} nodes connected")
        time.sleep(0.2)
    return sorted(grid.get_node_ids())


# ---- (2) the aggregation step alone -----------------------------------------------------


@dataclass
class AggRow:
    factors: str  # "AB" (FedIT) or "B" (FFA-LoRA)
    mode: str  # "plain" or "secure"
    values: int  # float32 values each node sends
    wire_bits: int = 0  # secure: the masked vectors' width (64, 32 or 16); plain: 0
    seconds: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)  # secure: per stage, per run
    up: float = 0.0  # payload bytes per node, node -> server
    down: float = 0.0  # server -> node
    max_diff: float = float("nan")  # secure: max |new global - plain new global|
    tolerance: float = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def fixed_update_app(shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """A ClientApp whose 'training' returns a fixed random delta per partition, plain or secure."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedlora.client.secagg import handle_secagg
    from fedlora.protocol.messages import TrainReply

    app = ClientApp()
    cache: dict[tuple[int, str], dict[str, np.ndarray]] = {}

    def update(pid: int, content: Any) -> dict[str, np.ndarray]:
        factors = str(content.config_records["config"]["bench-factors"])
        if (pid, factors) not in cache:
            rng = np.random.default_rng(1000 + pid)
            full = {
                k: rng.normal(0.0, DELTA_STD, s).astype(np.float32)
                for k, s in sorted(shapes.items())
            }
            cache[(pid, factors)] = {k: full[k] for k in sent_shapes(shapes, factors)}
        return cache[(pid, factors)]

    @app.train()
    def plain(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        reply = TrainReply(
            delta=update(pid, msg.content), num_examples=weight_of(pid), train_loss=0.0
        )
        return Message(content=reply.to_content(), reply_to=msg)

    @app.train("secagg")
    def secure(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return handle_secagg(
            msg, context, lambda content: (update(pid, content), weight_of(pid), {})
        )

    return app


def bench_settings(n: int, wire_bits: int) -> Any:
    """The run defaults (clip 10, 5 shares) on a ``wire_bits`` wire; a narrow wire caps weights at
    the largest of (2)'s fixed example counts (no node's weight is capped)."""
    import dataclasses

    from fedlora.config import RunConfig
    from fedlora.protocol.secagg import SecAggSettings
    from fedlora.server.app import secagg_settings

    wide = secagg_settings(RunConfig(), n)
    if wire_bits == 64:
        return wide
    fields = dataclasses.asdict(wide)
    for key in ("clip_norm", "quantization_bits", "modulus_bits", "max_weight", "wire_bits"):
        del fields[key]
    most = max(weight_of(pid) for pid in range(n))
    return SecAggSettings.for_nodes(
        wide.clip_norm, n, wire_bits=wire_bits, max_weight=most, **fields
    )


def aggregation_runs(
    grid: Any,
    n: int,
    shapes: Mapping[str, tuple[int, ...]],
    reps: int,
    wire_bits: Sequence[int] = (64,),
) -> list[AggRow]:
    """The ServerApp body of (2): plain and secure aggregation (one per wire width),
    alternating, per factor set."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedlora.lora import LoraSettings, initial_adapter
    from fedlora.protocol.adapter import restrict, spec_of
    from fedlora.protocol.messages import TrainReply, to_array_record
    from fedlora.server.secagg import as_client_update, secure_weighted_sum
    from fedlora.server.secagg_stages import record_bytes
    from fedlora.server.strategies import ClientUpdate, FedIT, FFALoRA

    nodes = wait_for_nodes(grid, n)
    glob = initial_adapter(dict(shapes), seed=0)
    scale = LoraSettings().scaling
    settings = {bits: bench_settings(len(nodes), bits) for bits in wire_bits}
    rows: list[AggRow] = []
    for factors, agg in (("AB", FedIT()), ("B", FFALoRA())):
        spec = restrict(spec_of(glob), factors)
        values = sum(int(np.prod(s.shape)) for s in spec.values())
        plain = AggRow(factors, "plain", values)
        secures = {bits: AggRow(factors, "secure", values, bits) for bits in wire_bits}
        modes = ["plain", *(f"secure-{bits}" for bits in wire_bits)]
        for rep in range(reps + 1):  # run 0 warms up: fills every node's cached update
            content = RecordDict(
                {
                    "arrays": to_array_record(glob),
                    "config": ConfigRecord({"server-round": rep + 1, "bench-factors": factors}),
                }
            )
            new: dict[str, dict[str, np.ndarray]] = {}
            for mode in modes if rep % 2 == 0 else modes[::-1]:
                start = time.perf_counter()
                if mode == "plain":
                    msgs = [
                        Message(
                            content=RecordDict(dict(content)),
                            dst_node_id=node,
                            message_type="train",
                        )
                        for node in nodes
                    ]
                    replies = list(grid.send_and_receive(msgs, timeout=TIMEOUT_S))
                    bad = [r.error.reason for r in replies if r.has_error()]
                    if bad or len(replies) != len(nodes):
                        raise RuntimeError(
                            f"plain aggregation: {len(replies)} replies, errors {bad[:2]}"
                        )
                    ups = [TrainReply.from_content(r.content, spec) for r in replies]
                    new[mode] = agg.aggregate(
                        glob, [ClientUpdate(u.delta, u.num_examples) for u in ups], scale
                    ).new_global
                    seconds = time.perf_counter() - start
                    plain.up = statistics.fmean(record_bytes(r.content) for r in replies)
                    plain.down = record_bytes(msgs[0].content)
                    row = plain
                else:
                    secure = secures[int(mode.removeprefix("secure-"))]
                    res = secure_weighted_sum(
                        grid,
                        nodes,
                        content,
                        settings[secure.wire_bits],
                        {k: v.shape for k, v in spec.items()},
                        timeout=TIMEOUT_S,
                    )
                    new[mode] = agg.aggregate(glob, [as_client_update(res, glob)], scale).new_global
                    seconds = time.perf_counter() - start
                    if len(res.contributors) != len(nodes):
                        raise RuntimeError(
                            f"secure aggregation: {len(res.contributors)} of "
                            f"{len(nodes)} nodes in the sum"
                        )
                    secure.up = sum(res.bytes_received.values()) / len(nodes)
                    secure.down = sum(res.bytes_sent.values()) / len(nodes)
                    secure.tolerance = res.tolerance
                    if rep:
                        secure.stages.append(res.seconds)
                    row = secure
                if rep:
                    row.seconds.append(seconds)
                warm = " (warm-up)" if not rep else ""
                note(f"aggregation {factors:>2} {mode:<9} run {rep}{warm}: {seconds:.2f} s")
            for bits, secure in secures.items():
                secure.max_diff = max(
                    float(
                        np.abs(new[f"secure-{bits}"][k].astype(np.float64) - new["plain"][k]).max()
                    )
                    for k in glob
                )
        rows += [plain, *secures.values()]
    return rows


def run_aggregation(
    n: int, shapes: Mapping[str, tuple[int, ...]], reps: int, wire_bits: Sequence[int] = (64,)
) -> list[AggRow]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    out: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            out["rows"] = aggregation_runs(grid, n, shapes, reps, wire_bits)
        except BaseException:  # noqa: BLE001 - reported below, not lost in Flower's thread
            out["error"] = traceback.format_exc()

    run_simulation(
        server_app=app,
        client_app=fixed_update_app(shapes),
        num_supernodes=n,
        backend_name="ray",
        backend_config=simulation_backend(),
    )
    if "error" in out or "rows" not in out:
        raise RuntimeError(f"aggregation simulation failed:\n{out.get('error', 'no result')}")
    return out["rows"]


# ---- (1) whole rounds with training ------------------------------------------------------


@dataclass
class RoundRow:
    mode: str  # "warm-up", "plain" or "secure"
    round_s: float  # the run's round timer (history "seconds")
    call_s: float  # the whole run_federation call
    train_s: float  # mean per-client train seconds over the sites the history keeps
    up: float  # payload bytes per client, client -> server
    down: float  # server -> client
    stages: dict[str, float] = field(default_factory=dict)  # secure: per stage
    clipped: int = 0
    load: float = field(default_factory=lambda: os.getloadavg()[0])  # 1-min load at the end


def round_row(mode: str, call_s: float, rec: Mapping[str, Any]) -> RoundRow:
    sites = rec.get("sites", {})
    train = [s["train-seconds"] for s in sites.values() if "train-seconds" in s]
    if not train and rec.get("replies") and "train-seconds-sum" in rec:  # secure: a sum only
        train = [rec["train-seconds-sum"] / rec["replies"]]
    if rec.get("secure-aggregation"):  # server-side totals: it sent the downloads
        asked = max(int(rec.get("asked", 1)), 1)
        up, down = rec["bytes-received"] / asked, rec["bytes-sent"] / asked
    else:  # sums of what each client reported
        replies = max(int(rec.get("replies", 1)), 1)
        up, down = rec["bytes-sent"] / replies, rec["bytes-received"] / replies
    return RoundRow(
        mode,
        float(rec["seconds"]),
        call_s,
        statistics.fmean(train) if train else float("nan"),
        up,
        down,
        dict(rec.get("secagg-seconds", {})),
        int(rec.get("secagg-clipped", 0)),
    )


def run_rounds(n: int, steps: int, pairs: int, workdir: Path) -> list[RoundRow]:
    """(1): a warm-up round, then ``pairs`` plain/secure rounds in one simulation."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedlora.basemodel import resolve_base_model
    from fedlora.client.app import make_client_app
    from fedlora.config import RunConfig
    from fedlora.server.app import run_federation

    sites = ",".join((SITES * (n // len(SITES) + 1))[:n])

    def cfg(label: str, secure: bool, local_steps: int, batch_size: int) -> RunConfig:
        return RunConfig.from_mapping(
            {
                **DEMO,
                "local-steps": local_steps,
                "batch-size": batch_size,
                "num-server-rounds": 1,
                "sites": sites,
                "min-nodes": 2,
                "min-available-nodes": n,
                "evaluate-every": 0,
                "secure-aggregation": secure,
                "output-dir": str(workdir / label),
            }
        )

    plan = [("warm-up", cfg("warm-up", False, 1, 1))]  # loads the model, tokenizes the data
    for i in range(pairs):
        order = ("plain", "secure") if i % 2 == 0 else ("secure", "plain")
        plan += [
            (mode, cfg(f"{mode}-{i}", mode == "secure", steps, DEMO["batch-size"]))
            for mode in order
        ]
    resolve_base_model(plan[0][1].base_model)  # prepared once, before any node starts
    out: dict[str, Any] = {"rows": []}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            for mode, c in plan:
                start = time.perf_counter()
                run_federation(grid, c)
                call_s = time.perf_counter() - start
                rec = json.loads((Path(c.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
                if rec.get("skipped") or rec.get("replies") != n:
                    raise RuntimeError(
                        f"{mode} round: {rec.get('replies')} of {n} replies "
                        f"({rec.get('secagg-error', 'see the log')})"
                    )
                out["rows"].append(round_row(mode, call_s, rec))
                note(f"{mode} round: {rec['seconds']:.1f} s (call {call_s:.1f} s)")
        except BaseException:  # noqa: BLE001 - reported below, not lost in Flower's thread
            out["error"] = traceback.format_exc()

    node_defaults = {
        "base-model": "default",
        "quantization": DEMO["quantization"],
        "sites": sites,
        "secagg-allow-unauthenticated": True,  # one machine: no federation roster
    }
    run_simulation(
        server_app=app,
        client_app=make_client_app(node_defaults),
        num_supernodes=n,
        backend_name="ray",
        backend_config=simulation_backend(),
    )
    if "error" in out:
        raise RuntimeError(f"round simulation failed:\n{out['error']}")
    return out["rows"]


# ---- (3) bytes ---------------------------------------------------------------------------


@dataclass
class BytesRow:
    label: str
    up: float
    down: float


def bytes_rows(
    shapes: Mapping[str, tuple[int, ...]], full_params: int, agg: Sequence[AggRow]
) -> list[BytesRow]:
    from fedlora.protocol.compression import encode, nbytes

    rng = np.random.default_rng(0)
    delta = {k: rng.normal(0.0, DELTA_STD, s).astype(np.float32) for k, s in shapes.items()}
    down = nbytes(delta)  # every round the server sends the whole global adapter, fp32
    b_only = {k: delta[k] for k in sent_shapes(shapes, "B")}
    rows = [
        BytesRow("full model, fp32 (baseline)", 4 * full_params, 4 * full_params),
        BytesRow("FedIT A+B, fp32", nbytes(encode(delta, "none")), down),
    ]
    rows += [
        BytesRow(f"FFA-LoRA B, {codec}", nbytes(encode(b_only, codec)), down)
        for codec in CODEC_ROWS
    ]
    for r in agg:
        if r.mode == "secure":
            name = "FedIT A+B" if r.factors == "AB" else "FFA-LoRA B"
            rows.append(BytesRow(f"secure {name}, uint{r.wire_bits} (SecAgg+)", r.up, r.down))
    return rows


# ---- report ------------------------------------------------------------------------------


def fmt_stages(stages: Mapping[str, float]) -> str:
    short = {
        "setup": "setup",
        "share-keys": "keys",
        "collect-masked-vectors": "collect",
        "unmask": "unmask",
        "reconstruct": "(reconstruct",
    }
    parts = [f"{short[k]} {stages[k]:.2f}" for k in short if k in stages]
    return ", ".join(parts) + (")" if "reconstruct" in stages else "")


def median_stages(stages: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = [k for k in stages[0] if k != "total"] if stages else []
    return {k: statistics.median(s[k] for s in stages if k in s) for k in keys}


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def report_rounds(
    n: int, steps: int, rounds: Sequence[RoundRow], agg_overhead: float
) -> tuple[float, float]:
    """Table (1); return ``(measured ratio, load-independent estimate)`` of secure / plain."""
    warm = [r for r in rounds if r.mode == "warm-up"]
    timed = {m: [r for r in rounds if r.mode == m] for m in ("plain", "secure")}
    print(
        f"\n1. Round wall time, {n} clients, training included: nf4 base, {steps} local "
        f"steps x batch {DEMO['batch-size']}, FedIT (A+B), default SecAgg+ settings"
    )
    if warm:
        print(
            f"   (a warm-up round of 1 step of batch 1 came first, not counted: "
            f"{warm[0].round_s:.1f} s; it loads the base model once per Ray actor)"
        )
    head = (
        f"{'mode':<7} {'round s':>8} {'call s':>7} {'x plain':>8} {'train s/client':>15} "
        f"{'load':>5} {'up MB/client':>13} {'down MB/client':>15}  secure stages (s)"
    )
    print(head + "\n" + "-" * len(head))
    plain_s = statistics.median(r.round_s for r in timed["plain"])
    secure_s = statistics.median(r.round_s for r in timed["secure"])
    for r in timed["plain"] + timed["secure"]:
        print(
            f"{r.mode:<7} {r.round_s:>8.1f} {r.call_s:>7.1f} {r.round_s / plain_s:>8.3f} "
            f"{r.train_s:>15.1f} {r.load:>5.1f} {r.up / MB:>13.2f} {r.down / MB:>15.2f}  "
            f"{fmt_stages(r.stages) if r.stages else '-'}"
        )
    print(
        f"round s: the run's round timer (send -> all replies, or -> the secure sum); call s: "
        f"the whole run_federation call; train s/client: mean of the per-site entries the "
        f"history keeps (it keys sites by name: {min(n, len(SITES))} of the {n} clients "
        f"here); load: 1-min load average when the round ended."
    )
    train = {m: statistics.median(r.train_s for r in timed[m]) for m in timed}
    print(
        f"Both rounds do the same training (round 1 of a fresh run: same adapter, same seeded "
        f"batches): train s/client plain {train['plain']:.1f}, secure {train['secure']:.1f}; "
        f"a difference there is the machine's load, not SecAgg."
    )
    beyond = statistics.median(
        r.stages.get("total", 0.0) - r.stages.get("setup", 0.0) for r in timed["secure"]
    )
    print(
        f"Secure protocol after the training stage (keys, collect, unmask, reconstruct, "
        f"decode): {beyond:.2f} s = {100 * beyond / plain_s:.1f}% of the plain round."
    )
    estimate = (plain_s + agg_overhead) / plain_s
    print(
        f"Load-independent estimate: plain round + the secure - plain cost of the aggregation "
        f"step in (2) ({agg_overhead:+.2f} s, A+B) = {estimate:.3f}x."
    )
    call_ratio = statistics.median(r.call_s for r in timed["secure"]) / statistics.median(
        r.call_s for r in timed["plain"]
    )
    print(
        f"Measured, median of {len(timed['plain'])} round(s) each: plain {plain_s:.1f} s, "
        f"secure {secure_s:.1f} s, ratio {secure_s / plain_s:.3f} (whole calls: "
        f"{call_ratio:.3f})."
    )
    return secure_s / plain_s, estimate


def report_aggregation(n: int, agg: Sequence[AggRow]) -> None:
    print(
        f"\n2. The aggregation step alone ({n} clients, fixed updates, no training): send, "
        f"collect, average, apply"
    )
    head = (
        f"{'factors':<8} {'mode':<7} {'wire':>4} {'values/client':>13} {'median s':>9} "
        f"{'runs':>4} {'x plain':>8} {'up MB/client':>13} {'down MB/client':>15}  "
        f"secure stages (s)"
    )
    print(head + "\n" + "-" * len(head))
    for r in agg:
        base = next(p for p in agg if p.factors == r.factors and p.mode == "plain")
        stages = fmt_stages(median_stages(r.stages)) if r.stages else "-"
        label = "A+B" if r.factors == "AB" else "B only"
        wire = str(r.wire_bits) if r.wire_bits else "-"
        print(
            f"{label:<8} {r.mode:<7} {wire:>4} {r.values:>13,} {r.median:>9.2f} "
            f"{len(r.seconds):>4} {r.median / base.median:>8.2f} {r.up / MB:>13.2f} "
            f"{r.down / MB:>15.2f}  {stages}"
        )
    for r in agg:
        if r.mode == "secure":
            print(
                f"secure {'A+B' if r.factors == 'AB' else 'B only'} ({r.wire_bits}-bit wire): "
                f"new global adapter within {r.max_diff:.2e} of the plain one (SecAgg tolerance "
                f"{r.tolerance:.2e}, plus float32 rounding)"
            )


def report_bytes(byt: Sequence[BytesRow], b_values: int) -> tuple[float, float]:
    """Table (3); return FFA-LoRA + int8's ``(upload, round-trip)`` x fewer bytes."""
    print("\n3. Communication per client per round vs sending the full fp32 model each way")
    head = (
        f"{'what travels':<36} {'up bytes':>13} {'down bytes':>13} {'up x fewer':>11} "
        f"{'up+down x fewer':>16}"
    )
    print(head + "\n" + "-" * len(head))
    full = byt[0]
    for r in byt:
        print(
            f"{r.label:<36} {r.up:>13,.0f} {r.down:>13,.0f} {full.up / r.up:>11.1f} "
            f"{(full.up + full.down) / (r.up + r.down):>16.1f}"
        )
    print(
        "Plain rows: codec payloads (what nodes report as bytes-sent; int8 adds one float32 "
        "scale per tensor, int8-block one per 64 values). Download: the global adapter, A "
        "and B in fp32, for every strategy and codec (codecs compress uploads only). Secure "
        "rows: measured in (2), all four stages (masked vectors are uint64, uint32 or uint16 "
        "of 1 + values)."
    )
    int8 = next(r for r in byt if r.label == "FFA-LoRA B, int8")
    print(
        f"If the server sent FFA-LoRA nodes B only (A is frozen and seeded), int8 B both ways "
        f"would be {(full.up + full.down) / (2 * int8.up):.0f}x fewer round-trip bytes, fp32 B "
        f"down + int8 B up {(full.up + full.down) / (int8.up + 4 * b_values):.0f}x "
        f"(what-if: not implemented)."
    )
    return full.up / int8.up, (full.up + full.down) / (int8.up + int8.down)


def report(
    n: int,
    steps: int,
    rounds: Sequence[RoundRow],
    agg: Sequence[AggRow],
    byt: Sequence[BytesRow],
    shapes: Mapping[str, tuple[int, ...]],
    full_params: int,
    elapsed: float,
    loads: Sequence[str],
) -> float:
    """Print the three tables and the goals; return the measured secure / plain ratio."""
    all_values = sum(int(np.prod(s)) for s in shapes.values())
    b_values = sum(int(np.prod(s)) for s in sent_shapes(shapes, "B").values())
    print(
        f"Adapter: SmolLM2-135M (default), LoRA r=8 on all linear layers: {len(shapes)} "
        f"tensors, {all_values:,} float32 ({b_values:,} in B); full model {full_params:,} "
        f"parameters = {4 * full_params / MB:.1f} MB fp32."
    )
    print(
        f"{n} clients; Ray runs {min(n, os.cpu_count() or 1)} at a time (1 CPU each). "
        f"Load average: {'; '.join(loads)}."
    )
    # (1) runs the 64-bit wire: its estimate uses the widest secure row of (2)
    first = max(r.wire_bits for r in agg)
    by = {(r.factors, r.mode): r.median for r in agg if r.mode == "plain" or r.wire_bits == first}
    ratio, estimate = report_rounds(n, steps, rounds, by[("AB", "secure")] - by[("AB", "plain")])
    report_aggregation(n, agg)
    up_x, rt_x = report_bytes(byt, b_values)
    ok = {True: "met", False: "MISSED"}
    print("\nGoals")
    print(
        f"- secure <= {GOAL_TIME_RATIO}x plain round time: measured {ratio:.3f}x -> "
        f"{ok[ratio <= GOAL_TIME_RATIO]}; load-independent estimate {estimate:.3f}x -> "
        f"{ok[estimate <= GOAL_TIME_RATIO]}"
    )
    print(
        f"- >= {GOAL_BYTES_RATIO:.0f}x fewer bytes than the full fp32 model (FFA-LoRA + int8): "
        f"upload {up_x:.0f}x -> {ok[up_x >= GOAL_BYTES_RATIO]}; upload + download {rt_x:.0f}x "
        f"-> {ok[rt_x >= GOAL_BYTES_RATIO]} (the download is the fp32 A+B adapter)"
    )
    print(f"Total {elapsed:.0f} s.")
    return ratio


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 clients, 1 local step, 1 aggregation run: a fast check",
    )
    parser.add_argument("--clients", type=int, default=10, help="simulated clients (default 10)")
    parser.add_argument(
        "--local-steps",
        type=int,
        default=DEMO["local-steps"],
        help="local steps per round in (1) (default 5, the demo's)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="plain/secure round pairs in (1), alternating order (default 1)",
    )
    parser.add_argument(
        "--wire-bits",
        default="64",
        help="comma-separated widths of the masked vectors in (2) and (3): 64, 32, 16 (default 64)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=3,
        help="timed runs per row in (2), after one warm-up (default 3)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.local_steps, args.reps = 4, 1, 1
    try:
        wire_bits = [int(b) for b in args.wire_bits.split(",") if b.strip()]
    except ValueError:
        wire_bits = []
    if not wire_bits or set(wire_bits) - {16, 32, 64} or len(set(wire_bits)) != len(wire_bits):
        parser.error(f"--wire-bits {args.wire_bits!r}: distinct values from 64, 32, 16")
    if args.clients < 3 or args.local_steps < 1 or args.rounds < 1 or args.reps < 1:
        parser.error(
            "need --clients >= 3 (SecAgg+ threshold) and positive --local-steps, --rounds, --reps"
        )

    from fedlora.simulations.run import offline_environment

    offline_environment()
    start = time.perf_counter()
    loads = [f"start {load_average()}"]
    shapes, full_params = default_model()
    note(f"(2) aggregation alone: {args.clients} clients, {args.reps} timed runs per row")
    agg = run_aggregation(args.clients, shapes, args.reps, wire_bits)
    loads.append(f"after (2) {load_average()}")
    note(
        f"(1) rounds with training: {args.clients} clients, {args.local_steps} local steps, "
        f"{args.rounds} plain/secure pair(s)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        rounds = run_rounds(args.clients, args.local_steps, args.rounds, Path(tmp))
    loads.append(f"end {load_average()}")
    ratio = report(
        args.clients,
        args.local_steps,
        rounds,
        agg,
        bytes_rows(shapes, full_params, agg),
        shapes,
        full_params,
        time.perf_counter() - start,
        loads,
    )
    print(
        f"secure / plain round time ({args.clients} clients, training included): {ratio:.2f}x",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
