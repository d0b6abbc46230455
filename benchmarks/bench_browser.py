"""The bundle in a browser: the page's answers against EdgeModel's, and its speed.

Usage (``make bench-browser``, after ``make edge-web``, Debian's chromium and an export)::

    .venv/bin/python benchmarks/bench_browser.py                      # runs/demo/export, int8
    .venv/bin/python benchmarks/bench_browser.py --bundle runs/edge --variants int8,int4 \\
        --prompts 10 --new-tokens 32

For each variant, ``fedlora-edge serve`` serves it with the built page and headless Chromium
(``/usr/bin/chromium``, driven by Playwright) loads the page; onnxruntime-web runs on
WebAssembly with one thread. On the first ``--prompts`` held-out drug reviews (chat-templated):

- answers equal: the page's greedy answer (up to eos, at most ``--answer-tokens``) has the same
  tokens as :class:`fedlora.export.runtime.EdgeModel`'s on native onnxruntime;
- page first token s and decode tokens/s: exactly ``--new-tokens`` greedy tokens (eos ignored) on
  the page's own model, medians over the prompts;
- EdgeModel decode tokens/s: the same on native onnxruntime with one thread
  (``EdgeModel.decode_speed``), for scale.

Timings depend on the machine's load: the last line prints the CPU and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _serve(bundle: Path, variant: str) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "fedlora.edge_cli", "serve", str(bundle), "--port", "0"]
    server = subprocess.Popen([*command, "--variant", variant], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    line = server.stdout.readline()
    if " on http://" not in line:
        server.wait(timeout=10)
        raise SystemExit(f"fedlora-edge serve {bundle} --variant {variant} failed")
    return server, line.split(" on ", 1)[1].split()[0]


def _row(browser: Any, bundle: Path, variant: str, args: argparse.Namespace) -> list[str]:
    from fedlora.data.drugreview import load_split
    from fedlora.export.runtime import EdgeModel
    from fedlora.export.serve import variant_dir
    from fedlora.prompting import messages

    edge = EdgeModel(variant_dir(bundle, variant), num_threads=1)
    server, url = _serve(bundle, variant)
    try:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#status[data-state=ready]", timeout=600_000)
        equal, firsts, rates, native = 0, [], [], []
        for review in load_split("test")[: args.prompts]:
            turns = messages(review.text)
            ids = edge.encode(edge.render(turns))
            answer = page.evaluate(
                "([turns, n]) => window.fedloraModel.generate(turns, n)",
                [turns, args.answer_tokens],
            )
            equal += answer["tokens"] == edge.generate_ids(ids, args.answer_tokens)
            timed = page.evaluate(
                "([ids, n]) => window.fedloraModel.generateIds(ids, n, null, true)",
                [ids, args.new_tokens],
            )
            firsts.append(timed["firstTokenSeconds"])
            rates.append(timed["decodeTokensPerSecond"])
            native.append(edge.decode_speed(ids, args.new_tokens)[1])
        page.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    return [
        variant,
        f"{equal}/{args.prompts}",
        f"{statistics.median(firsts):.2f}",
        f"{statistics.median(rates):.1f}",
        f"{statistics.median(native):.1f}",
    ]


def _machine() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in flags.splitlines() if "model name" in line),
        "unknown CPU",
    )
    extras = [f for f in ("amx_tile", "avx512_bf16") if f in flags]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {'/'.join(extras) or 'no AMX/AVX512-BF16'}; load {load}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("runs/demo/export"))
    ap.add_argument("--variants", default="int8", help="comma-separated: int8, int4, fp32")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--answer-tokens", type=int, default=16)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for variant in args.variants.split(","):
            rows.append(_row(browser, args.bundle, variant.strip(), args))
        browser.close()
    header = [
        "variant",
        "answers equal",
        "page first token s",
        "page decode tok/s",
        "EdgeModel 1-thread decode tok/s",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"bundle {args.bundle}; {_machine()}")


if __name__ == "__main__":
    main()
