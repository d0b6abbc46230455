"""Console output of the demo: sections, per-round tables, accuracies, the export check."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
MAX_SITE_COLUMNS = 8  # more sites: the table counts them instead of a column each


def section(title: str) -> None:
    console.rule(f"[bold]{title}")


def site_columns(history: list[dict[str, Any]]) -> list[str]:
    """The sites that get a column: those whose train loss the server saw (plain rounds), at
    most MAX_SITE_COLUMNS; none under secure aggregation, where it sees sums only."""
    sites = sorted({s for rec in history for s, v in rec["sites"].items() if "train-loss" in v})
    return sites if len(sites) <= MAX_SITE_COLUMNS else []


def rounds(history: list[dict[str, Any]]) -> None:
    sites = site_columns(history)
    per_site = bool(sites)
    central = any("central-eval-accuracy" in rec for rec in history)
    secure = [rec for rec in history if rec.get("secure-aggregation")]
    table = Table(
        title="Train loss per round (mean over local steps); evaluation accuracy"
        + ("; under secure aggregation the server sees the sum only" if secure else "")
    )
    table.add_column("round", justify="right")
    for s in sites if per_site else ():
        table.add_column(s, justify="right")
    if not per_site:
        table.add_column("nodes answered", justify="right")
    table.add_column("aggregate", justify="right", style="bold")
    table.add_column("eval acc.", justify="right")
    if central:
        table.add_column("central acc.", justify="right")
    for rec in history:
        cells = (
            [
                f"{rec['sites'][s]['train-loss']:.4f}"
                if "train-loss" in rec["sites"].get(s, {})
                else "-"
                for s in sites
            ]
            if per_site
            else [str(rec.get("replies", len(rec["sites"])))]
        )
        acc = f"{rec['eval-accuracy']:.1%}" if "eval-accuracy" in rec else "-"
        row = [str(rec["round"]), *cells, f"{rec.get('train-loss', float('nan')):.4f}", acc]
        if central:
            c = rec.get("central-eval-accuracy")
            row.append(f"{c:.1%}" if c is not None else "-")
        table.add_row(*row)
    console.print(table)
    if secure:
        seconds = [rec["secagg-seconds"]["total"] for rec in secure if "secagg-seconds" in rec]
        console.print(
            f"secure aggregation (SecAgg+): {len(secure)} rounds, the server saw sums "
            f"only; {sum(r.get('secagg-clipped', 0) for r in secure)} updates clipped; "
            f"{sum(seconds) / max(len(seconds), 1):.1f} s per round incl. training"
        )
    if "dp-epsilon" in history[-1]:
        console.print(
            f"differential privacy: epsilon {history[-1]['dp-epsilon']:.3f} at delta "
            f"{history[-1]['dp-delta']:g}"
        )


def accuracy(name: str, ev: dict[str, Any]) -> None:
    console.print(
        f"{name} accuracy: [bold]{ev['accuracy']:.1%}[/] on {ev['n']} held-out "
        f"reviews ({ev['seconds']:.0f} s); predicted {ev['predicted']}; always "
        f"'{ev['majority-label']}' would score {ev['majority-accuracy']:.1%}"
    )


def confusion(matrix: dict[str, dict[str, int]]) -> None:
    """Rows: the true label; columns: what the model answered."""
    labels = list(matrix)
    table = Table(title="Confusion matrix (rows: true label, columns: answer)")
    table.add_column("true \\ answer")
    for lab in labels:
        table.add_column(lab, justify="right")
    table.add_column("recall", justify="right")
    for row in _confusion_rows(matrix):
        table.add_row(*row)
    console.print(table)


def confusion_markdown(title: str, ev: dict[str, Any]) -> str:
    matrix = ev["confusion"]
    labels = list(matrix)
    lines = [
        "",
        f"## {title}: {ev['accuracy']:.1%} on {ev['n']} held-out reviews",
        "",
        "Confusion matrix (rows: true label, columns: the model's answer).",
        "",
        "| true \\ answer | " + " | ".join(labels) + " | recall |",
        "|---" * (len(labels) + 2) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _confusion_rows(matrix)]
    return "\n".join(lines) + "\n"


def _confusion_rows(matrix: dict[str, dict[str, int]]) -> list[list[str]]:
    """Per true label: the label, the count for each answer, and the recall."""
    rows = []
    for true, answers in matrix.items():
        total = sum(answers.values())
        recall = f"{answers[true] / total:.1%}" if total else "-"
        rows.append([true, *(str(answers[p]) for p in matrix), recall])
    return rows


def export(exp: Any, prompt: str, true_answer: str) -> dict[str, Any]:
    parity = exp.parity
    console.print(f"held-out prompt (true answer: {true_answer[:80]!r}): {prompt[:200]}...")
    console.print(f"ONNX Runtime answer: [bold]{exp.answer!r}[/]")
    console.print(
        f"max |logits(ONNX Runtime) - logits(merged PyTorch, fp64)| = "
        f"[bold]{parity.max_abs_logits_diff:.2e}[/] (tolerance {parity.tolerance:.2e}: the "
        f"larger of {parity.atol:.0e} and {parity.noise_factor:g} x PyTorch's fp32 noise) over "
        f"{parity.prompt_tokens} prompt tokens; same greedy tokens: {parity.same_tokens}"
    )
    console.print(
        f"  for scale: ONNX Runtime vs PyTorch fp32 {parity.vs_torch_fp32:.2e}; "
        f"PyTorch fp32 vs fp64 {parity.torch_fp32_vs_fp64:.2e} (fp32 rounding)"
    )
    console.print(
        f"  model.onnx: {exp.onnx_mib:.0f} MiB; "
        + ", ".join(f"{k} {v:.0f} s" for k, v in exp.seconds.items())
    )
    if exp.gates:
        from fedlora.export.gates import describe

        console.print(f"task gates on {exp.reference.n} held-out examples, against fp32 ONNX:")
        console.print(describe(exp.reference, exp.gates), markup=False)
        for v in exp.variants:
            console.print(
                f"  {v.folder}: {v.size_mib:.0f} MiB, greedy decode "
                f"{v.decode_tokens_per_s:.1f} tokens/s"
            )
    return {
        "answer": exp.answer,
        "true-answer": true_answer,
        "max-abs-logits-diff": parity.max_abs_logits_diff,
        "atol": parity.atol,
        "noise-factor": parity.noise_factor,
        "tolerance": parity.tolerance,
        "vs-torch-fp32": parity.vs_torch_fp32,
        "torch-fp32-vs-fp64": parity.torch_fp32_vs_fp64,
        "same-greedy-tokens": parity.same_tokens,
        "onnx-dir": str(exp.onnx_dir),
        "variants": [
            {"name": v.name, "folder": v.folder, "size-mib": v.size_mib, "gates": v.gates}
            for v in exp.variants
        ],
    }
