"""Communication benchmark: bytes per node per round, both ways, plain and secure, and accuracy.

Usage (``make bench-comm``)::

    .venv/bin/python benchmarks/bench_comm.py            # every method in comm.toml
    .venv/bin/python benchmarks/bench_comm.py --bytes-only   # table (1) only: no training

Against full-model FedAvg, which sends the whole fp32 model down and up every round:

1. **Payload bytes from the wire formats** (no training), for each strategy and encoding on the
   default model's adapter: what one node sends up (its encoded delta, or its masked vector of
   16/32/64-bit integers under SecAgg+) and receives down (the factors it sends back, exact
   float32 or, once it holds a version, the fp16 / int8 change since). SecAgg+'s keys and
   shares are not in this table; the measured rows below include them.
2. **Measured**: ``fedlora compare`` on the drug reviews (five sites, the recipe of
   ``benchmarks/comm.toml``, secure aggregation on), one short federated run per method at
   equal total client steps, scored on the test reviews (all 379 in ``comm.toml``). Bytes are
   what the rounds' records counted (every SecAgg+ stage message, both ways), per node and
   round, averaged over the run (with a down codec, round 1 sends nothing: every node derives
   the seeded initial adapter itself; without one, every round's downlink is exact float32).

The last line is ``full model / fedlora bytes per node per round (up + down, secure) = X`` for the
measured method with the most reduction whose accuracy is within 1 point of FedIT's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STRATEGY_ROWS = (("fedit", 8), ("ffa-lora", 8), ("fedsa-lora", 8), ("fed-sb", 24), ("fed-sb", 40))
ENCODINGS = (  # label, up (codec or secure wire bits), down codec (steady state)
    ("plain none", "none", "none"),
    ("plain fp16", "fp16", "fp16"),
    ("plain int8-block", "int8-block", "int8-block"),
    ("secure 64-bit, down none", 64, "none"),
    ("secure 32-bit, down fp16", 32, "fp16"),
    ("secure 16-bit, down fp16", 16, "fp16"),
    ("secure 16-bit, down int8-block", 16, "int8-block"),
)
ACCURACY_SLACK = 0.01  # 1 point


def full_model_bytes(base_dir: Path) -> int:
    """fp32 bytes of every parameter of the base model (tied weights once)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    model.tie_weights()  # the embedding and lm_head are one tensor (SmolLM2 ties them)
    return 4 * sum(p.numel() for p in model.parameters())


def sent_shapes(base_dir: Path, strategy: str, r: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the factors a node of ``strategy`` sends (and receives)."""
    from fedlora.config import RunConfig
    from fedlora.lora import adapter_shapes
    from fedlora.protocol.adapter import factor_of
    from fedlora.server.strategies import get_strategy

    lora = RunConfig(strategy=strategy, lora_r=r).lora
    send = get_strategy(strategy).factors()[1]
    return {k: s for k, s in adapter_shapes(base_dir, lora).items() if factor_of(k) in send}


def wire_bytes(shapes: dict[str, tuple[int, ...]], codec: str, block: int = 64) -> int:
    from fedlora.protocol.compression import wire_spec

    spec = wire_spec(codec, shapes, block)
    return sum(np.dtype(d).itemsize * math.prod(s) for d, s in spec.values())


def payload_rows(base_dir: Path, full: int) -> list[dict[str, Any]]:
    rows = []
    for strategy, r in STRATEGY_ROWS:
        shapes = sent_shapes(base_dir, strategy, r)
        values = sum(math.prod(s) for s in shapes.values())
        for label, up, down in ENCODINGS:
            up_b = (values + 1) * up // 8 if isinstance(up, int) else wire_bytes(shapes, up)
            down_b = wire_bytes(shapes, down)
            rows.append(
                {
                    "strategy": f"{strategy} r={r}",
                    "values": values,
                    "encoding": label,
                    "up": up_b,
                    "down": down_b,
                    "ratio": 2 * full / (up_b + down_b),
                }
            )
    return rows


def print_payloads(rows: list[dict[str, Any]], full: int) -> None:
    print(
        f"(1) Payload bytes per node per round, from the wire formats (full fp32 model: "
        f"{full:,} bytes each way)\n"
    )
    print("| strategy | values sent | encoding | up | down | full model / (up + down) |")
    print("|---|---:|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['strategy']} | {row['values']:,} | {row['encoding']} | {row['up']:,} | "
            f"{row['down']:,} | {row['ratio']:,.0f}x |"
        )
    print()


def measured(cc: Any, full: int) -> list[dict[str, Any]]:
    from fedlora.simulations.compare import run_compare

    doc = run_compare(cc)
    rows = []
    for name, res in doc["methods"].items():
        up, down = (
            res.get("bytes-up-per-client-round", 0),
            res.get("bytes-down-per-client-round", 0),
        )
        rows.append(
            {
                "method": name,
                "secure": bool(res.get("secure-aggregation")),
                "accuracy": res.get("accuracy", float("nan")),
                "up": up,
                "down": down,
                "ratio": 2 * full / (up + down) if up + down else float("nan"),
                "seconds": res.get("seconds", float("nan")),
            }
        )
    return rows


def print_measured(
    rows: list[dict[str, Any]], reference: float, cfg_path: Path, scored: int
) -> None:
    print(
        f"(2) Measured: fedlora compare --config {cfg_path.relative_to(ROOT)} (bytes averaged "
        f"over the rounds; accuracy on {scored} held-out reviews, the mean over the config's "
        f"seeds: intervals in compare.md)\n"
    )
    print(
        "| method | secure | accuracy | vs FedIT | up | down | full model / (up + down) "
        "| wall s, all seeds |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {'yes' if r['secure'] else 'no'} | {r['accuracy']:.1%} | "
            f"{100 * (r['accuracy'] - reference):+.1f} pts | {r['up']:,.0f} | {r['down']:,.0f} | "
            f"{r['ratio']:,.0f}x | {r['seconds']:.0f} |"
        )
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "benchmarks" / "comm.toml")
    ap.add_argument("--methods", help="comma-separated subset of the config's methods")
    ap.add_argument("--output", help="output folder (default: the config's)")
    ap.add_argument("--bytes-only", action="store_true", help="table (1) only, no training")
    ap.add_argument("--seeds", type=int, help="N seeds instead of the config's")
    args = ap.parse_args()
    from fedlora.basemodel import resolve_base_model
    from fedlora.console import configure
    from fedlora.simulations.compare import CompareConfig, with_seeds
    from fedlora.simulations.run import offline_environment

    offline_environment()
    configure(verbose=False)
    base_dir = resolve_base_model("default")
    full = full_model_bytes(base_dir)
    print_payloads(payload_rows(base_dir, full), full)
    if args.bytes_only:
        return
    cc = CompareConfig.from_toml(args.config)
    if args.methods:
        cc = replace(cc, methods=tuple(m.strip() for m in args.methods.split(",")))
    if args.output:
        cc = replace(cc, output=args.output)
    if args.seeds:
        cc = with_seeds(cc, args.seeds)
    rows = measured(cc, full)
    out = Path(cc.output)
    (out / "bench-comm.json").write_text(json.dumps({"full-model-bytes": full, "rows": rows}))
    fedit = next((r for r in rows if r["method"] == "fedit"), None)
    if fedit is None or not fedit["secure"]:
        print(
            "full model / fedlora bytes per node per round (up + down, secure) = n/a "
            "(no secure fedit row to compare accuracy with)"
        )
        sys.exit(1)
    scored = int(cc.run.get("central-eval-samples", 150))
    print_measured(rows, fedit["accuracy"], args.config.resolve(), scored)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    ok = [r for r in rows if r["secure"] and r["accuracy"] >= fedit["accuracy"] - ACCURACY_SLACK]
    best = max(ok, key=lambda r: r["ratio"])
    print(
        f"best within 1 point of FedIT ({fedit['accuracy']:.1%}): {best['method']} "
        f"({best['accuracy']:.1%})"
    )
    print(
        f"full model / fedlora bytes per node per round (up + down, secure) = {best['ratio']:.0f}"
    )


if __name__ == "__main__":
    main()
