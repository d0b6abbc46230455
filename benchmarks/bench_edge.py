"""Edge inference benchmark: PyTorch eager fp32 (the baseline) against ONNX fp32, int8 and int4.

ONNX fp32 is timed in both graph forms (optimum's traced graph and fedlora's fused decoder,
:mod:`fedlora.export.fused`, built from the bundle's merged model when the bundle holds the other
one); the quantized variants are built from the fused graph where the model has one, the form
``fedlora export`` ships.

Usage (``make bench-edge``, after ``make demo``)::

    .venv/bin/python benchmarks/bench_edge.py                         # runs/demo/export
    .venv/bin/python benchmarks/bench_edge.py --bundle runs/export --prompts 3 --new-tokens 32

For a bundle written by ``fedlora export`` (``merged/``, ``onnx/`` and ``onnx-int8/``; the
variants the bundle lacks, int4 by default, are quantized into ``bench-edge/`` beside it with the
same settings), every model decodes the same prompts (the first ``--prompts`` held-out drug
reviews, chat-templated) for exactly ``--new-tokens`` greedy tokens (eos ignored), each model in
its own process (its peak RSS is its own), with the same number of threads:

- time to first token: the prompt's forward pass (prefill), median over prompts;
- decode tokens/s: the tokens after the first over their wall time, median over prompts;
- peak RSS of the process, and the model's file size.

The baseline is what a user would run without fedlora's export: the merged model in PyTorch fp32
with ``transformers``' ``generate`` (KV cache, greedy). ONNX models run on
:class:`fedlora.export.runtime.EdgeModel` (onnxruntime, numpy; no torch). The task gates
(:mod:`fedlora.export.gates`: label accuracy on the held-out reviews, answer perplexity, greedy
agreement, degeneration) are measured in the same run for each quantized variant against ONNX
fp32. The int4 variant is the shipped one (the head and tied embedding at 8 bits, the rest at 4:
``QuantSettings.int4_head_bits``). With ``--adapter`` (default: the demo's global adapter), two
more rows time the adaptable int8 base (:mod:`fedlora.export.slots`) bare and with the adapter as
one file, and a line gives the file's size and switch time. The last two lines print
``int4 accuracy drop = X.X points`` and ``int8 / eager decode tokens/s = X.XX``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = 3
NEW_TOKENS = 32
GATE_SAMPLES = 150  # held-out reviews the gates score (the demo's fixed 150)
THREADS = 0  # 0 = every core (os.cpu_count())
VARIANTS = ("int8", "int4")


def _peak_mib() -> float:
    """This process's peak RSS: VmHWM (reset by exec), not ru_maxrss, which a child started by
    a large parent inherits as its floor on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompts(n: int) -> list[list[dict[str, str]]]:
    from fedlora.data.drugreview import load_split
    from fedlora.prompting import messages

    return [messages(r.text) for r in load_split("test")[:n]]


def eager_worker(merged: Path, prompts: int, new_tokens: int, threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    firsts, speeds = [], []
    with torch.inference_mode():
        for k, msgs in enumerate(_prompts(prompts + 1)):
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            first = time.perf_counter() - start
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            if k:  # the first prompt warms up
                firsts.append(first)
                speeds.append(new_tokens / (time.perf_counter() - start))
    return {"first": statistics.median(firsts), "speed": statistics.median(speeds)}


def onnx_worker(folder: Path, prompts: int, new_tokens: int, threads: int) -> dict[str, Any]:
    from fedlora.export.runtime import EdgeModel

    return onnx_worker_on(EdgeModel(folder, num_threads=threads), prompts, new_tokens)


def _graph_form(folder: Path) -> str:
    """``fused`` (GroupQueryAttention inside) or ``traced`` (optimum's export)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    fused = any(node.op_type == "GroupQueryAttention" for node in model.graph.node)
    return "fused" if fused else "traced"


def adapter_worker(
    base: Path, adapter: Path, prompts: int, new_tokens: int, threads: int
) -> dict[str, Any]:
    """An adaptable base with an adapter file (fedlora.export.slots): the switch (median over
    switches between the file and none), time to first token and decode speed with it on."""
    from fedlora.export.runtime import EdgeModel

    model = EdgeModel(base, num_threads=threads)
    switches = []
    for _ in range(5):
        switches.append(model.set_adapter(adapter))
        model.set_adapter(None)
    model.set_adapter(adapter)
    result = onnx_worker_on(model, prompts, new_tokens)
    return {**result, "switch": statistics.median(switches)}


def onnx_worker_on(model: Any, prompts: int, new_tokens: int) -> dict[str, Any]:
    firsts, speeds = [], []
    for k, msgs in enumerate(_prompts(prompts + 1)):
        first, speed = model.decode_speed(model.encode(model.render(msgs)), new_tokens)
        if k:
            firsts.append(first)
            speeds.append(speed)
    return {"first": statistics.median(firsts), "speed": statistics.median(speeds)}


def gates_worker(reference: Path, folders: dict[str, str], samples: int) -> dict[str, Any]:
    """Task figures of the ONNX fp32 ``reference`` and each variant on the held-out reviews."""
    from fedlora.export.gates import DEFAULT_THRESHOLDS, gate
    from fedlora.export.runtime import EdgeModel
    from fedlora.server.central import central_examples

    examples, labels = central_examples("drugreview", samples, ())
    variants = {name: EdgeModel(Path(folder)) for name, folder in folders.items()}
    ref, results = gate(EdgeModel(reference), variants, examples, labels, DEFAULT_THRESHOLDS)
    return {"fp32": ref.summary(), **{r.variant: r.as_card() for r in results}}


def _run(kind: str, *args: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps([kind, *args])]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed (exit {proc.returncode}): {tail[:300]}"}
    return dict(json.loads(lines[-1]))


def _worker(spec: str) -> None:
    kind, *args = json.loads(spec)
    if kind == "eager":
        result = eager_worker(Path(args[0]), *args[1:])
    elif kind == "onnx":
        result = onnx_worker(Path(args[0]), *args[1:])
    elif kind == "adapter":
        result = adapter_worker(Path(args[0]), Path(args[1]), *args[2:])
    else:
        result = gates_worker(Path(args[0]), args[1], args[2])
    result["peak_mib"] = _peak_mib()
    print(json.dumps(result))


def _size_mib(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20


def _adapter_rows(
    args: argparse.Namespace,
    work: Path,
    threads: int,
    rows: list[tuple[str, dict[str, Any], float]],
) -> dict[str, Any]:
    """The adaptable int8 base (fedlora.export.slots) bare and with ``args.adapter`` as one file:
    rows appended to ``rows``; returns the file's size and switch time ({} when skipped)."""
    if not (args.adapter / "adapter_config.json").is_file():
        print(f"  no adapter rows: {args.adapter} is not a PEFT adapter", file=sys.stderr)
        return {}
    from fedlora.basemodel import resolve_base_model
    from fedlora.export.fused import export_fused
    from fedlora.export.onnx import onnx_size_mib
    from fedlora.export.quantize import quantize_variant
    from fedlora.export.slots import base_id, write_adapter_file

    base = resolve_base_model(args.base_model)
    fp32 = export_fused(base, work / "adaptable-fp32", base_id=base_id(base))
    int8 = quantize_variant(fp32, work / "adaptable-int8", "int8")
    file = work / "adapter" / "adapter.onnx_adapter"
    info = write_adapter_file(args.adapter, fp32 / "model.onnx", file)
    for label, job in (
        ("ONNX fused int8, adaptable base, no adapter", ("onnx", str(int8))),
        ("ONNX fused int8, adaptable base + adapter file", ("adapter", str(int8), str(file))),
    ):
        res = _run(*job, args.prompts, args.new_tokens, threads)
        rows.append((label, res, onnx_size_mib(int8)))
        print(f"  {label}: {res}", file=sys.stderr, flush=True)
    return {"file": file.name, "mib": info["size_mib"], "switch": rows[-1][1].get("switch", 0.0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("runs/demo/export"))
    ap.add_argument("--prompts", type=int, default=PROMPTS)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--gate-samples", type=int, default=GATE_SAMPLES)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument(
        "--graphs",
        default="fused,traced",
        help="ONNX graph forms to time in fp32 (the bundle's own is always timed); the "
        "quantized rows use the fused graph where there is one",
    )
    ap.add_argument(
        "--adapter",
        type=Path,
        default=Path("runs/demo/global-adapter"),
        help="a PEFT adapter for the on-device adapter rows (skipped when absent)",
    )
    ap.add_argument("--base-model", default="default", help="the adapter's base model")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0

    from fedlora.export.onnx import export_onnx, onnx_size_mib
    from fedlora.export.quantize import quantize_variant

    bundle = args.bundle
    if not (bundle / "merged").is_dir() or not (bundle / "onnx" / "model.onnx").is_file():
        print(f"{bundle}: no merged/ and onnx/ folders; run `make demo` (or fedlora export) first")
        return 2
    threads = args.threads or os.cpu_count() or 1
    args.graphs = {g.strip() for g in args.graphs.split(",") if g.strip()}
    work = bundle.parent / "bench-edge"
    # Both ONNX graph forms of the same merged model: the bundle's own, the other one built here.
    graphs = {_graph_form(bundle / "onnx"): bundle / "onnx"}
    for form in ("fused", "traced"):
        if form not in graphs and form in args.graphs:
            graphs[form] = export_onnx(bundle / "merged", work / f"{form}-fp32", graph=form)
    shipped_form = "fused" if "fused" in graphs else "traced"  # what fedlora ships where it can
    shipped = graphs[shipped_form]
    folders = {}
    for name in VARIANTS:
        folder = bundle / f"onnx-{name}"
        if shipped != bundle / "onnx" or not (folder / "model.onnx").is_file():
            folder = quantize_variant(shipped, work / f"{shipped_form}-{name}", name)
        folders[name] = str(folder)
    load = os.getloadavg()[0]
    print(
        f"Edge decode: {args.prompts} held-out reviews (after one warm-up prompt), "
        f"{args.new_tokens} greedy tokens each (eos ignored), {threads} threads, each model in "
        f"its own process; bundle {bundle}.",
        flush=True,
    )
    start = time.perf_counter()
    rows: list[tuple[str, dict[str, Any], float]] = []
    jobs = [("PyTorch eager fp32", "eager", str(bundle / "merged"))]
    jobs += [(f"ONNX {form} fp32", "onnx", str(folder)) for form, folder in sorted(graphs.items(),
             key=lambda kv: kv[0] != "traced")]  # fmt: skip
    jobs += [(f"ONNX {shipped_form} {n}", "onnx", f) for n, f in folders.items()]
    for label, kind, path in jobs:
        res = _run(kind, path, args.prompts, args.new_tokens, threads)
        size = _size_mib(Path(path)) if kind == "eager" else onnx_size_mib(Path(path))
        rows.append((label, res, size))
        print(f"  {label}: {res}", file=sys.stderr, flush=True)
    adapter = _adapter_rows(args, work, threads, rows)
    gates = _run("gates", str(shipped), folders, args.gate_samples)
    eager = rows[0][1]
    print("\n| model | file MiB | time to first token ms | decode tok/s | x eager | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, res, size in rows:
        if "error" in res:
            print(f"| {label} | {size:.0f} | - | - | - | {res['error']} |")
            continue
        ratio = res["speed"] / eager["speed"] if "speed" in eager else float("nan")
        print(
            f"| {label} | {size:.0f} | {1000 * res['first']:.0f} | {res['speed']:.1f} | "
            f"{ratio:.2f}x | {res['peak_mib']:.0f} |"
        )
    if "error" in gates:
        print(f"\ngates: {gates['error']}")
    else:
        ref = gates["fp32"]
        print(
            f"\nTask gates on the first {ref['n']} held-out reviews, against ONNX "
            f"{shipped_form} fp32 "
            f"({ref['metric']} {100 * ref['accuracy']:.1f}%, answer perplexity "
            f"{ref['answer_perplexity']:.4f}):\n"
        )
        print(
            "| variant | accuracy | points vs fp32 | perplexity x fp32 | greedy agreement | "
            "degenerate | gate |"
        )
        print("|---|---:|---:|---:|---:|---:|---|")
        for name in folders:
            g = gates[name]
            f = g["figures"]
            print(
                f"| {name} | {100 * f['accuracy']:.1f}% | "
                f"{-f['accuracy-drop-points-vs-fp32']:+.1f} | "
                f"{f['perplexity-ratio-vs-fp32']:.3f} | {f['greedy-agreement-vs-fp32']:.0%} | "
                f"{f['degenerate-outputs']} | {'passed' if g['passed'] else 'FAILED'} |"
            )
    if adapter:
        print(
            f"\nOn-device adapter: {adapter['file']}, {adapter['mib']:.2f} MiB; switching it on "
            f"(file read, checked against the base, activated) "
            f"{1000 * adapter['switch']:.1f} ms, median of 5; the base is not reloaded."
        )
    print(
        f"\nTotal {time.perf_counter() - start:.0f} s; 1-minute load average {load:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end."
    )
    int4 = gates.get("int4", {}).get("figures", {}).get("accuracy-drop-points-vs-fp32")
    drop = f"{int4:.1f} points" if isinstance(int4, int | float) else "not measured"
    print(f"int4 accuracy drop = {drop}")
    int8 = next(res for label, res, _ in rows if label.endswith(" int8"))
    value = (
        f"{int8['speed'] / eager['speed']:.2f}"
        if "speed" in int8 and "speed" in eager
        else "not measured"
    )
    print(f"int8 / eager decode tokens/s = {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
