"""Run reports from the metrics history: a loss plot (PNG) and a short markdown summary.

Written after every round, so a crashed or interrupted run still has an up-to-date report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_loss(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Aggregate train loss per round (bold) and each site's (thin), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for site in sorted({s for r in history for s in r["sites"]}):
        xs = [r["round"] for r in history if site in r["sites"]]
        ys = [r["sites"][site]["train-loss"] for r in history if site in r["sites"]]
        ax.plot(xs, ys, marker=".", linewidth=1, alpha=0.7, label=site)
    ax.plot(rounds, [r["train-loss"] for r in history], marker="o", linewidth=2.5,
            color="black", label="aggregate")
    ax.set_xlabel("round")
    ax.set_ylabel("train loss (mean over local steps)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_markdown(history: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """A markdown page: the settings, then one row per round."""
    lines = ["# fedlora run", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(settings.items())]
    lines += ["", "| round | train loss | examples | replies | dropped | seconds | sites |",
              "|---|---|---|---|---|---|---|"]
    for r in history:
        loss = "skipped" if r.get("skipped") else _num(r["train-loss"])
        sites = ", ".join(f"{s} {_num(v['train-loss'])}" for s, v in sorted(r["sites"].items()))
        lines.append(f"| {r['round']} | {loss} | {r['num-examples']} | {r['replies']} | "
                     f"{r['dropped']} | {_num(r.get('seconds', float('nan')), 1)} | {sites} |")
    lines += ["", "![train loss per round](loss.png)", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, history: Sequence[Mapping[str, Any]],
                 settings: Mapping[str, Any]) -> Path:
    """Write ``report.md`` and ``loss.png`` into ``out_dir``; return the markdown path."""
    if history:
        plot_loss(history, out_dir / "loss.png")
    path = out_dir / "report.md"
    path.write_text(summary_markdown(history, settings))
    return path


def _num(x: float, digits: int = 4) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"
