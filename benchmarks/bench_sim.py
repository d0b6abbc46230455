"""Simulation scale benchmark: rounds at 10, 100 and 1000 virtual clients on Flower's simulation
engine (Ray), round time, engine overhead and peak memory per row.

Usage (``make bench-sim``)::

    .venv/bin/python benchmarks/bench_sim.py            # tiny model 10/100/1000, default 10/100
    .venv/bin/python benchmarks/bench_sim.py --quick    # tiny model only

Each row is one ``fedlora simulate --data ... --num-clients N --partition iid`` run in a fresh
process, 10% of the clients sampled per round (``fraction-train = 0.1``), plain aggregation,
2 rounds of 2 local steps of batch 4. The tiny model is a config-built 2-layer Llama (hidden
64) on a generated chat task of 4000 examples; the default model (SmolLM2-135M, "auto" base:
bf16 where native, else fp32) trains on the packaged drug reviews (600 training reviews).

- round s: the second round (warm nodes), from ``metrics.jsonl``;
- slowest client s: the longest client training in that round;
- engine overhead s = round s - slowest client s (the issue's definition; with many clients per
  Ray actor it also counts the clients trained one after another on each actor);
- engine share s = round s - (sum of the clients' training s) / actors: what the engine, the
  server's aggregation and the messages add beyond training;
- peak RSS: the largest sum of resident memory over the run's whole process tree (the driver,
  Ray's processes and actors), sampled every 0.2 s.

Last line: ``peak RSS 1000 / 10 clients = X.XX`` (tiny model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
ACTORS = max(os.cpu_count() or 1, 1)  # one CPU per simulated node (Ray actor)


def write_task(path: Path, n: int = 4000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            answer = "bigger" if a > b else "smaller" if a < b else "same"
            messages = [
                {"role": "user", "content": f"Is {a} bigger or smaller than {b}?"},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process that just ended
            total += p.memory_info().rss
    return total


def run_row(
    label: str, base: str, quant: str, data: str, clients: int, work: Path
) -> dict[str, object]:
    out = work / f"{label}-{clients}"
    cfg = work / "bench.toml"
    cfg.write_text(
        "fraction-train = 0.1\nlocal-steps = 2\nbatch-size = 4\nsecure-aggregation = false\n"
        f'quantization = "{quant}"\nmin-nodes = 1\ncentral-eval-samples = 50\n'
    )
    test = ["--test-fraction", "0.05"] if data != "drugreview" else []
    cmd = [
        str(ROOT / ".venv/bin/fedlora"),
        "simulate",
        "--config",
        str(cfg),
        "--data",
        data,
        "--num-clients",
        str(clients),
        "--partition",
        "iid",
        *test,
        "--base-model",
        base,
        "--rounds",
        "2",
        "-o",
        str(out),
    ]
    start = time.perf_counter()
    log = (work / f"{label}-{clients}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    ps, peak, done = psutil.Process(proc.pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    if rc != 0:
        return {"model": label, "clients": clients, "error": f"exit {rc}: see {log.name}"}
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rec = history[-1]
    train = [s["train-seconds"] for s in rec["sites"].values()]
    return {
        "model": label,
        "clients": clients,
        "per-round": len(train),
        "round-s": rec["seconds"],
        "slowest-s": max(train),
        "overhead-s": rec["seconds"] - max(train),
        "engine-s": rec["seconds"] - sum(train) / ACTORS,
        "wall-s": wall,
        "peak-rss-mib": peak[0] / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model rows only")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    from fedlora.basemodel import resolve_base_model
    from tiny import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        work = Path(tmp)
        tiny = str(make_tiny_model(work / "tiny"))
        task = str(write_task(work / "task.jsonl"))
        plan = [("tiny", tiny, "fp32", task, n) for n in (10, 100, 1000)]
        if not args.quick:
            default = str(resolve_base_model("default"))
            plan += [("default", default, "auto", "drugreview", n) for n in (10, 100)]
        for label, base, quant, data, n in plan:
            row = run_row(label, base, quant, data, n, work)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}; {ACTORS} Ray actors")
    head = (
        "| model | clients | per round | round s | slowest client s | engine overhead s "
        "| engine share s | peak RSS MiB |"
    )
    print(head)
    print("|" + "---|" * 8)
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['clients']} | {r['error']} |")
            continue
        print(
            f"| {r['model']} | {r['clients']} | {r['per-round']} | {r['round-s']:.1f} "
            f"| {r['slowest-s']:.2f} | {r['overhead-s']:.1f} | {r['engine-s']:.1f} "
            f"| {r['peak-rss-mib']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    tiny = {r["clients"]: r for r in rows if r["model"] == "tiny" and "error" not in r}
    if 10 in tiny and 1000 in tiny:
        ratio = tiny[1000]["peak-rss-mib"] / tiny[10]["peak-rss-mib"]
        print(f"peak RSS 1000 / 10 clients = {ratio:.2f}")
    else:
        print("peak RSS 1000 / 10 clients = n/a (a row failed)")


if __name__ == "__main__":
    main()
