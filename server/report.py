"""Run reports from the metrics history: loss and accuracy plots (PNG) and a markdown summary.

Written after every round, so a crashed or interrupted run still has an up-to-date report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_LISTED_SITES = 10  # more sites per round: min / median / max train loss instead


def plot_loss(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Aggregate train loss per round (bold) and each site's (thin), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for site in sorted({s for r in history for s in r["sites"]}):
        pts = [
            (r["round"], r["sites"][site]["train-loss"])
            for r in history
            if "train-loss" in r["sites"].get(site, {})
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", linewidth=1, alpha=0.7, label=site)
    ax.plot(
        rounds,
        [r.get("train-loss", math.nan) for r in history],
        marker="o",
        linewidth=2.5,
        color="black",
        label="aggregate (train)",
    )
    _line(ax, history, "eval-loss", "federated eval", "tab:blue")
    _line(ax, history, "central-eval-loss", "central eval", "tab:red")
    ax.set_ylabel("loss per answer token")
    return _save(fig, ax, rounds, path)


def plot_accuracy(history: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Label accuracy per round: federated (bold), each site's (thin), central; None if none."""
    if not any("eval-accuracy" in r or "central-eval-accuracy" in r for r in history):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for site in sorted({s for r in history for s in r["sites"]}):
        pts = [
            (r["round"], r["sites"][site]["eval-accuracy"])
            for r in history
            if "eval-accuracy" in r["sites"].get(site, {})
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", linewidth=1, alpha=0.7, label=site)
    _line(ax, history, "eval-accuracy", "federated eval", "black", width=2.5)
    _line(ax, history, "central-eval-accuracy", "central eval", "tab:red", width=2.0)
    ax.set_ylabel("label accuracy")
    ax.set_ylim(0, 1)
    return _save(fig, ax, [r["round"] for r in history], path)


def _save(fig: Any, ax: Any, rounds: list[int], path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel("round")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _line(
    ax: Any,
    history: Sequence[Mapping[str, Any]],
    key: str,
    label: str,
    color: str,
    width: float = 2.0,
) -> None:
    pts = [(r["round"], r[key]) for r in history if key in r]
    if pts:
        ax.plot(
            *zip(*pts, strict=True),
            marker="s",
            linewidth=width,
            linestyle="--",
            color=color,
            label=label,
        )


def _bounded_lines(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Rounds that failed (and why) and the replies a bound acted on (server/bounds.py)."""
    lines = []
    for r in history:
        if r.get("failed"):
            lines.append(f"- round {r['round']} failed, global adapter kept: {r.get('failure')}")
        acted = [
            (f"node {e['node']}", f"weighed as {r.get('max-examples')}, claimed {e['claimed']}")
            for e in r.get("weight-capped", [])
        ]
        acted += [
            (f"node {e['node']}", f"L2 norm {e['norm']:.4g} clipped to {r.get('norm-bound'):.4g}")
            for e in r.get("norm-clipped", [])
        ]
        lines += [f"- round {r['round']}: {who} {what}" for who, what in acted]
    return ["", "Failed rounds and bounded replies:", "", *lines] if lines else []


def summary_markdown(history: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """A markdown page: the settings, then one row per round."""
    lines = ["# fedlora run", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(settings.items())]
    lines += [
        "",
        "| round | train loss | eval loss | eval accuracy | central accuracy | examples "
        "| replies | dropped | seconds | sites (train loss) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in history:
        loss = "failed" if r.get("failed") else "skipped" if r.get("skipped") else None
        loss = loss or _num(r.get("train-loss", nan))
        losses = [v["train-loss"] for v in r["sites"].values() if "train-loss" in v]
        sites = (
            ", ".join(
                f"{s} {_num(v['train-loss'])}" if "train-loss" in v else s
                for s, v in sorted(r["sites"].items())
            )
            if len(r["sites"]) <= MAX_LISTED_SITES
            else f"{len(losses)} sites: min {_num(min(losses, default=nan))}, "
            f"median {_num(float(np.median(losses)) if losses else nan)}, "
            f"max {_num(max(losses, default=nan))}"
        )
        lines.append(
            f"| {r['round']} | {loss} | {_num(r.get('eval-loss', nan))} | "
            f"{_num(r.get('eval-accuracy', nan))} | "
            f"{_num(r.get('central-eval-accuracy', nan))} | {r.get('num-examples', 0)} | "
            f"{r.get('replies', 0)} | {r.get('dropped', 0)} | "
            f"{_num(r.get('seconds', nan), 1)} | {sites} |"
        )
    lines += _bounded_lines(history)
    load = [
        v["load-seconds"] for r in history for v in r["sites"].values() if v.get("load-seconds")
    ]
    train = [
        v["train-seconds"] for r in history for v in r["sites"].values() if "train-seconds" in v
    ]
    # Secure rounds reveal only the sum of the nodes' seconds: each counts at the round's mean.
    for r in history:
        if r.get("replies") and "train-seconds-sum" in r:
            train += [r["train-seconds-sum"] / r["replies"]] * int(r["replies"])
    if load and train:
        lines += [
            "",
            f"Warm model: the base model loaded {len(load)} times, "
            f"{sum(load) / len(load):.1f} s on average; a node's round of training took "
            f"{sum(train) / len(train):.1f} s on average ({len(train)} rounds).",
        ]
    dp = [r for r in history if "dp-epsilon" in r]
    if dp:
        last = dp[-1]
        lines += [
            "",
            f"Differential privacy (client-level, {len(dp)} rounds): epsilon "
            f"{last['dp-epsilon']:.3f} at delta {last['dp-delta']:g}, noise multiplier "
            f"{last['dp-noise-multiplier']:.3f}, sampling rate "
            f"{last['dp-sampling-rate']:g}. A guarantee for any one node's whole data: "
            f"see the README's privacy section for what it means.",
        ]
    lines += ["", "![loss per round](loss.png)", ""]
    if any("eval-accuracy" in r or "central-eval-accuracy" in r for r in history):
        lines += ["![accuracy per round](accuracy.png)", ""]
    return "\n".join(lines)


def write_report(
    out_dir: Path, history: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]
) -> Path:
    """Write ``report.md``, ``loss.png`` (and ``accuracy.png``) into ``out_dir``."""
    if history:
        plot_loss(history, out_dir / "loss.png")
        plot_accuracy(history, out_dir / "accuracy.png")
    path = out_dir / "report.md"
    path.write_text(summary_markdown(history, settings))
    return path


def _num(x: float, digits: int = 4) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"
