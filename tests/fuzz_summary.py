"""Print ``make fuzz``'s table from the reports the fuzz sessions wrote; the last line is
``crashes: C of N inputs``, then ``poisoned rounds: P of M hostile rounds`` (the value-level
targets: rounds played with a hostile node, and those it poisoned). Exits 1 when any input
crashed, any round was poisoned or a report is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> int:
    rows: dict[str, dict[str, int]] = {}
    for path in paths:
        report = Path(path)
        if not report.is_file():
            print(f"{path}: no fuzz report (the fuzz session did not finish)")
            return 1
        rows.update(json.loads(report.read_text()))
    width = max((len(name) for name in rows), default=10)
    print(f"{'entry point':<{width}}  {'inputs':>8}  {'refused':>8}  {'crashes':>8}")
    for name, row in rows.items():
        print(f"{name:<{width}}  {row['inputs']:>8}  {row['refused']:>8}  {row['crashes']:>8}")
    inputs = sum(row["inputs"] for row in rows.values())
    crashes = sum(row["crashes"] for row in rows.values())
    print(f"crashes: {crashes} of {inputs} inputs")
    hostile = sum(row.get("hostile-rounds", 0) for row in rows.values())
    poisoned = sum(row.get("poisoned", 0) for row in rows.values())
    print(f"poisoned rounds: {poisoned} of {hostile} hostile rounds")
    return 1 if crashes or poisoned else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
