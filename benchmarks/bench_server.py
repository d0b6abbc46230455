"""Server aggregation benchmark: time and peak memory of one round, per strategy and client count.

Usage (``make bench-server``)::

    .venv/bin/python benchmarks/bench_server.py                  # 10, 100, 1000 clients
    .venv/bin/python benchmarks/bench_server.py --quick          # 10, 100 clients
    .venv/bin/python benchmarks/bench_server.py --from-model DIR # shapes of another model

The default adapter is the default model's (SmolLM2-135M: Llama, 30 layers, hidden 576,
intermediate 1536, 3 KV heads of 64) with LoRA r=8 on all seven linear layers of each block:
420 tensors, 2,442,240 parameters, 9.3 MiB in float32. Its shapes are written down here, so no
model is loaded. Each row times ``LoraAggregator.aggregate`` (validation, combination,
``apply_delta``) as the median of 1 to 3 runs without tracemalloc (see :func:`measure`), and
the peak memory it allocates beyond its inputs from one run under ``tracemalloc`` (numpy
reports its buffers to it). Client deltas are random, drawn once into a pool of distinct deltas
(20 by default) that the clients cycle through: 1000 clients are 1000 updates to aggregate but
only 20 deltas in memory. The robust rows are FedIT with its mean replaced by the
coordinate-wise median or trimmed mean (fedlora.server.strategies.robust). A step whose time,
projected linearly from the previous client count, exceeds ``--max-seconds`` is skipped and the
projection reported.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlora.server.strategies import STRATEGIES, ClientUpdate, FedIT, LoraAggregator
from fedlora.server.strategies.base import Arrays, LayerPair, layer_pairs
from fedlora.server.strategies.robust import Reducer

MIB = 2.0**20
# SmolLM2-135M: (module, in_features, out_features) of the seven linear layers in each block.
SMOLLM2_LAYERS = 30
SMOLLM2_MODULES = (
    ("self_attn.q_proj", 576, 576),
    ("self_attn.k_proj", 576, 192),
    ("self_attn.v_proj", 576, 192),
    ("self_attn.o_proj", 576, 576),
    ("mlp.gate_proj", 576, 1536),
    ("mlp.up_proj", 576, 1536),
    ("mlp.down_proj", 1536, 576),
)
MAX_REPEATS = {10: 3, 100: 3}  # timed runs per step; 1 at larger client counts
REPEAT_BUDGET_S = 5.0  # stop repeating a step once its runs took this long
LONG_STEP_S = 20.0  # a step slower than this under tracemalloc is not run again


class RobustFedIT(FedIT):
    """FedIT with the example-weighted mean replaced by a robust reducer."""

    def __init__(self, reducer: Reducer) -> None:
        self.reducer = reducer

    def combine(
        self,
        global_adapter: Mapping[str, np.ndarray],
        pairs: Mapping[str, LayerPair],
        updates: Sequence[ClientUpdate],
        scale: float,
    ) -> tuple[Arrays, Arrays]:
        return self.reducer(updates, global_adapter), {}


def default_shapes(rank: int = 8) -> dict[str, tuple[int, int]]:
    """PEFT names and shapes of the default adapter (SmolLM2-135M, all linear layers)."""
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(SMOLLM2_LAYERS):
        for module, n_in, n_out in SMOLLM2_MODULES:
            prefix = f"base_model.model.model.layers.{i}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, n_in)
            shapes[f"{prefix}.lora_B.weight"] = (n_out, rank)
    return shapes


def model_shapes(model_dir: Path, rank: int) -> dict[str, tuple[int, int]]:
    """The adapter shapes of the model in ``model_dir`` (config only, meta device)."""
    from fedlora.lora import LoraSettings, adapter_shapes

    shapes = adapter_shapes(model_dir, LoraSettings(r=rank))
    return {k: (int(v[0]), int(v[1])) for k, v in shapes.items()}


def random_adapter(
    shapes: Mapping[str, tuple[int, int]], rng: np.random.Generator, std: float
) -> Arrays:
    return {k: rng.normal(0.0, std, v).astype(np.float32) for k, v in sorted(shapes.items())}


def mib(arrays: Mapping[str, np.ndarray]) -> float:
    return sum(a.nbytes for a in arrays.values()) / MIB


@dataclass
class Row:
    strategy: str
    clients: int
    input_mib: float
    seconds: float | None = None  # None: skipped
    runs: int = 0
    peak_mib: float | None = None
    note: str = ""


def measure(step: Callable[[], object], max_repeats: int) -> tuple[float, int, float]:
    """``(median seconds, timed runs, peak MiB)``: one run under tracemalloc, then timed ones.

    tracemalloc slows steps that make many small allocations (FedIT's mean: about 2x at 1000
    clients), so times come from runs without it: at least one, up to ``max_repeats`` while
    all runs together took less than ``REPEAT_BUDGET_S``. A step whose traced run took over
    ``LONG_STEP_S`` (few, large allocations: little overhead) is not run again: its traced time
    is returned with 0 timed runs.
    """
    tracemalloc.start()
    start = time.perf_counter()
    result = step()
    traced_s = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    if traced_s > LONG_STEP_S:
        return traced_s, 0, peak / MIB
    times: list[float] = []
    while not times or (len(times) < max_repeats and traced_s + sum(times) < REPEAT_BUDGET_S):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times), len(times), peak / MIB


def aggregators() -> dict[str, LoraAggregator]:
    out: dict[str, LoraAggregator] = {name: cls() for name, cls in STRATEGIES.items()}
    for reducer in (Reducer("median"), Reducer("trimmed-mean", 0.1)):
        out[f"fedit+{reducer.kind}"] = RobustFedIT(reducer)
    return out


def sent_names(agg: LoraAggregator, glob: Arrays) -> list[str]:
    names = []
    for a_name, b_name in layer_pairs(glob).values():
        names += [a_name] if agg.sends_a else []
        names += [b_name] if agg.sends_b else []
    return names


def run(
    shapes: Mapping[str, tuple[int, int]],
    client_counts: Sequence[int],
    pool_size: int,
    max_seconds: float,
    only: Sequence[str] | None,
) -> list[Row]:
    rng = np.random.default_rng(0)
    glob = random_adapter(shapes, rng, 0.02)
    pool = [random_adapter(shapes, rng, 1e-3) for _ in range(pool_size)]
    scale = 2.0  # lora_alpha 16 / r 8
    rows: list[Row] = []
    last: dict[str, tuple[int, float]] = {}  # strategy -> (clients, seconds) last measured
    for name, agg in aggregators().items():
        if only and name not in only:
            continue
        names = sent_names(agg, glob)
        views = [{n: d[n] for n in names} for d in pool]  # the factors this strategy receives
        for n in client_counts:
            updates = [ClientUpdate(views[i % pool_size], 1 + i % 7) for i in range(n)]
            row = Row(name, n, n * mib(views[0]))
            if name in last:
                seen_n, seen_s = last[name]
                projected = seen_s * n / seen_n
                if projected > max_seconds:
                    row.note = (
                        f"skipped: projected {projected:.0f} s from {seen_n} clients "
                        f"(> --max-seconds {max_seconds:.0f})"
                    )
                    rows.append(row)
                    print(f"  {name:<18} {n:>5} clients: {row.note}", file=sys.stderr)
                    continue
            row.seconds, row.runs, row.peak_mib = measure(
                lambda u=updates, a=agg: a.aggregate(glob, u, scale),  # type: ignore[misc]
                MAX_REPEATS.get(n, 1),
            )
            last[name] = (n, row.seconds)
            if row.runs == 0:
                row.note = "1 run, under tracemalloc"
            if isinstance(agg, RobustFedIT) and agg.reducer.kind == "trimmed-mean":
                k = math.floor(agg.reducer.trim_fraction * n)
                row.note = "; ".join(filter(None, [row.note, f"trim {k} per end"]))
            rows.append(row)
            print(
                f"  {name:<18} {n:>5} clients: {row.seconds:.3f} s "
                f"({row.runs or 'traced'} runs), peak {row.peak_mib:.0f} MiB",
                file=sys.stderr,
            )
    return rows


def table(rows: Sequence[Row]) -> str:
    base = {r.clients: r.seconds for r in rows if r.strategy == "fedit" and r.seconds}
    order = {name: k for k, name in enumerate(dict.fromkeys(r.strategy for r in rows))}
    head = (
        f"{'strategy':<18} {'clients':>7} {'input MiB':>10} {'seconds':>9} {'runs':>4} "
        f"{'x fedit':>8} {'MiB/s':>8} {'peak MiB':>9}  note"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r.clients, order[r.strategy])):
        if r.seconds is None:
            lines.append(
                f"{r.strategy:<18} {r.clients:>7} {r.input_mib:>10.1f} {'-':>9} "
                f"{'-':>4} {'-':>8} {'-':>8} {'-':>9}  {r.note}"
            )
            continue
        ratio = f"{r.seconds / base[r.clients]:.2f}" if r.clients in base else "-"
        lines.append(
            f"{r.strategy:<18} {r.clients:>7} {r.input_mib:>10.1f} {r.seconds:>9.3f} "
            f"{r.runs or 1:>4} {ratio:>8} {r.input_mib / r.seconds:>8.0f} "
            f"{r.peak_mib:>9.1f}  {r.note}"
        )
    return "\n".join(lines)


def summary(rows: Sequence[Row], elapsed: float) -> str:
    top = max(r.clients for r in rows)
    done = [r for r in rows if r.clients == top and r.seconds is not None]
    skipped = [f"{r.strategy}@{r.clients}" for r in rows if r.seconds is None]
    parts = [
        f"at {top} clients: "
        + ", ".join(f"{r.strategy} {r.seconds:.2f} s / {r.peak_mib:.0f} MiB" for r in done)
    ]
    if skipped:
        parts.append("skipped " + ", ".join(skipped))
    return f"Summary: {'; '.join(parts)}; total {elapsed:.0f} s."


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--clients",
        default="10,100,1000",
        help="comma-separated client counts (default 10,100,1000)",
    )
    parser.add_argument("--quick", action="store_true", help="10 and 100 clients only")
    parser.add_argument(
        "--strategies", default="", help="comma-separated subset of the rows (default: all)"
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=20,
        help="distinct random deltas the clients cycle through (default 20)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="skip a step whose projected time exceeds this (default 120)",
    )
    parser.add_argument(
        "--from-model",
        type=Path,
        default=None,
        metavar="DIR",
        help="take the adapter shapes from this model's config (needs torch, "
        "transformers, peft) instead of the default model's",
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    args = parser.parse_args(argv)
    counts = [10, 100] if args.quick else [int(c) for c in args.clients.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.pool < 1:
        parser.error("--clients needs positive counts and --pool a positive size")
    only = [s.strip() for s in args.strategies.split(",") if s.strip()] or None

    shapes = (
        model_shapes(args.from_model, args.rank) if args.from_model else default_shapes(args.rank)
    )
    params = sum(a * b for a, b in shapes.values())
    source = args.from_model or "SmolLM2-135M (default, shapes built in)"
    print(
        f"Adapter: {source}, r={args.rank}: {len(shapes)} tensors, {params:,} parameters, "
        f"{params * 4 / MIB:.2f} MiB fp32"
    )
    print(
        f"Clients cycle through a pool of {args.pool} distinct random deltas (every update is "
        f"aggregated; only {args.pool} are held in memory)."
    )
    print(
        f"Time: median of 1-{max(MAX_REPEATS.values())} runs without tracemalloc (more while "
        f"under {REPEAT_BUDGET_S:.0f} s, 1 above {max(MAX_REPEATS)} clients; a step over "
        f"{LONG_STEP_S:.0f} s under tracemalloc is timed by that run). Peak MiB: tracemalloc, "
        f"allocated by the step beyond its inputs. x fedit: time over FedIT's, same run."
    )
    start = time.perf_counter()
    rows = run(shapes, counts, args.pool, args.max_seconds, only)
    elapsed = time.perf_counter() - start
    print(table(rows))
    print(summary(rows, elapsed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
