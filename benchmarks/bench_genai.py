"""onnxruntime-genai against fedlora's EdgeModel on an exported bundle: same tokens, and speed.

For each folder of the bundle that has a ``genai_config.json`` (``fedlora export`` writes one per
variant, :mod:`fedlora.export.genai`), both runtimes decode the same held-out drug reviews
(chat-templated by EdgeModel, the ids given to both) greedily up to eos or ``--new-tokens``:

- prompts whose greedy tokens are identical in both runtimes;
- time to first token (the prompt's forward pass) and decode tokens/s (the tokens after the
  first over their wall time, as many for EdgeModel as onnxruntime-genai decoded), median over
  prompts, for each runtime in the same process, one after the other.

Usage::

    .venv/bin/python benchmarks/bench_genai.py --bundle runs/edge --prompts 20 --new-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

PROMPTS = 20
NEW_TOKENS = 32


def _prompts(n: int) -> list[list[dict[str, str]]]:
    from fedlora.data.drugreview import load_split
    from fedlora.prompting import messages

    return [messages(r.text) for r in load_split("test")[:n]]


def _genai(model: Any, ids: list[int], new: int) -> tuple[list[int], float, float]:
    """Greedy tokens, seconds to the first, tokens/s after it."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)
    generator.generate_next_token()
    first = time.perf_counter() - start
    tokens = [int(generator.get_next_tokens()[0])]
    start = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    rest = time.perf_counter() - start
    return tokens, first, (len(tokens) - 1) / rest if rest > 0 else float("nan")


def _edge(model: Any, ids: list[int], new: int, timed: int) -> tuple[list[int], float, float]:
    """Greedy tokens (up to eos), and the timing of ``timed`` tokens (eos ignored), the number
    onnxruntime-genai decoded, so both runtimes are timed on the same count."""
    first, speed = model.decode_speed(ids, new_tokens=max(timed - 1, 1))
    return model.generate_ids(ids, new), first, speed


def bench_folder(folder: Path, prompts: list[Any], new: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    from fedlora.export.runtime import EdgeModel

    edge, genai = EdgeModel(folder), og.Model(str(folder))
    same = 0
    rows: dict[str, list[tuple[float, float]]] = {"genai": [], "edge": []}
    for messages in prompts:
        ids = edge.encode(edge.render(messages))
        g = _genai(genai, ids, new)
        e = _edge(edge, ids, new, len(g[0]))
        same += g[0] == e[0]
        rows["genai"].append(g[1:])
        rows["edge"].append(e[1:])
    out: dict[str, Any] = {"folder": folder.name, "same": same, "prompts": len(prompts)}
    for name, values in rows.items():
        out[f"{name}-first-ms"] = 1000 * statistics.median(v[0] for v in values)
        out[f"{name}-tokens-s"] = statistics.median(v[1] for v in values)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("runs/edge"))
    ap.add_argument("--prompts", type=int, default=PROMPTS)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    args = ap.parse_args(argv)
    prompts = _prompts(args.prompts)
    folders = sorted(p.parent for p in args.bundle.glob("*/genai_config.json"))
    if not folders:
        print(f"{args.bundle} has no folder with a genai_config.json: export it first")
        return 1
    print(
        "| folder | same greedy tokens | genai first token ms | EdgeModel first token ms "
        "| genai decode tokens/s | EdgeModel decode tokens/s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for folder in folders:
        r = bench_folder(folder, prompts, args.new_tokens)
        print(
            f"| {r['folder']} | {r['same']}/{r['prompts']} | {r['genai-first-ms']:.1f} | "
            f"{r['edge-first-ms']:.1f} | {r['genai-tokens-s']:.1f} | {r['edge-tokens-s']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
