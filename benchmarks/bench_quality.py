"""Quality benchmark: ``fedlora compare`` on the drug-review task at the default recipe.

Usage (``make bench-quality``)::

    .venv/bin/python benchmarks/bench_quality.py            # every method in quality.toml
    .venv/bin/python benchmarks/bench_quality.py --quick    # centralized, local, fedit only
    .venv/bin/python benchmarks/bench_quality.py --methods centralized,fedit

Centralized LoRA on the pooled training reviews, each site alone, and the federated methods of
``benchmarks/quality.toml``, at equal total client optimizer steps, scored by the server on all
379 test reviews (the demo's fixed 150 are the first). Prints the table
(``runs/bench-quality/compare.md``); the last line is ``federated / centralized accuracy =
X.XX`` for the default strategy (FedIT) with secure aggregation on, from the means over the
config's seeds (``--seeds N`` to change).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("centralized", "local", "fedit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--methods", help="comma-separated methods instead of the config's")
    ap.add_argument("--config", type=Path, default=ROOT / "benchmarks" / "quality.toml")
    ap.add_argument("--output", help="output folder (default: the config's)")
    ap.add_argument("--seeds", type=int, help="N seeds instead of the config's")
    args = ap.parse_args()
    from fedlora.console import configure
    from fedlora.simulations.compare import CompareConfig, run_compare, with_seeds
    from fedlora.simulations.run import offline_environment

    offline_environment()
    configure(verbose=False)
    cc = CompareConfig.from_toml(args.config)
    if args.quick:
        cc = replace(cc, methods=QUICK)
    if args.methods:  # CompareConfig refuses an unknown method, as bench_comm.py relies on
        cc = replace(cc, methods=tuple(m.strip() for m in args.methods.split(",")))
    if args.output:
        cc = replace(cc, output=args.output)
    if args.seeds:
        cc = with_seeds(cc, args.seeds)
    doc = run_compare(cc)
    print((Path(cc.output) / "compare.md").read_text())
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    fed = doc["methods"].get("fedit", {})
    if not fed.get("secure-aggregation"):
        print("federated / centralized accuracy = n/a (fedit did not run with secure aggregation)")
        sys.exit(1)
    if "of-centralized" not in fed:
        print("federated / centralized accuracy = n/a (no centralized row with an accuracy)")
        sys.exit(1)
    # of-centralized: against the best centralized row (compare.py); over seeds, of the means
    seeds = len(doc.get("seeds", [])) or 1
    print(f"(means over {seeds} seed{'s' if seeds > 1 else ''})")
    print(f"federated / centralized accuracy = {fed['of-centralized']:.2f}")


if __name__ == "__main__":
    main()
