"""Baselines side by side: centralized LoRA, local-only and federated strategies on one split.

``fedlora compare --config FILE`` reads a TOML file::

    [compare]
    data = "drugreview"            # a file/folder check-data accepts, or a packaged task
    partition = "column:site"      # as fedlora simulate --partition
    num-clients = 0                # 0 with column:NAME (one client per value)
    test = ""                      # held-out test data, or test-fraction = 0.1
    prompt-column = "prompt"       # optional: how --data and test are read (as simulate's
    response-column = "response"   # options: format, prompt-, response-, system-, text-column,
                                   # on-bad-record, encoding)
    methods = ["centralized", "local", "fedit", "ffa-lora", "fedex-lora", "fedsa-lora",
               "fedit+adam"]
    output = "runs/compare"
    seeds = [0, 1, 2]              # optional: every method on each seed (or --seeds N)

    [run]                          # the recipe: run-config keys every method shares
    num-server-rounds = 3
    local-steps = 10

    [methods.fedit-dp]             # optional: a named method = run-config overrides
    dp-noise-multiplier = 0.5

    [methods.centralized-lr1e-3]   # a baseline variant: method = "centralized" or "local"
    method = "centralized"
    lr = 0.001

Every method trains on the same pool, split and test set, at equal total client optimizer steps
of the same batch size: a federated round trains K sampled clients for S steps each, so R rounds
are R x K x S steps. ``centralized`` trains one adapter on the pooled training data for that many
steps (one run, one round); ``local`` trains each client alone for R x S steps (what it would
have trained had it joined every round) and reports the mean (and range) of their test
accuracies. Federated methods are run-config overrides: a strategy name sets ``strategy``,
``NAME+OPT`` also sets ``server-optimizer`` (e.g. ``fedit+adam``). The server scores every
method's final adapter on the same test set (central evaluation). "% of centralized" is measured
against the best centralized row, so a federated recipe with its own learning rate is compared
with centralized training at its own best, not at the federated one.

Writes ``compare.json``, ``compare.md`` and ``compare.png`` (accuracy per method) to ``output``.
With several seeds (the split, the initial adapter, client sampling, batches and stochastic
rounding all follow the run's ``seed``), each seed's comparison goes to ``output/seed-S/`` and
the top-level files give each method's mean accuracy with its 95% confidence interval, the
per-seed values, and the paired difference against the first federated method
(:mod:`fedlora.simulations.stats`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.choices import SERVER_OPTIMIZERS, STRATEGIES
from fedlora.config import RunConfig, read_toml
from fedlora.data import partitioned
from fedlora.data.formats import DataSpec
from fedlora.errors import ConfigError
from fedlora.server.tracking import log_method
from fedlora.simulations.partition import Partition, PartitionSpec, prepare
from fedlora.simulations.run import partitioned_config, simulate
from fedlora.simulations.stats import Interval, mean_ci, paired_diff

log = logging.getLogger(__name__)

DEFAULT_METHODS = (
    "centralized",
    "local",
    "fedit",
    "ffa-lora",
    "fedex-lora",
    "fedsa-lora",
    "fedit+adam",
)
BASELINES = ("centralized", "local")
COMPARE_KEYS = {
    "data",
    "partition",
    "num-clients",
    "test",
    "test-fraction",
    "methods",
    "output",
    "seeds",
}
# the data description: fedlora.data.formats.DataSpec's fields but the path, dashed as options
DATA_KEYS = {f.name.replace("_", "-") for f in dataclasses.fields(DataSpec) if f.name != "path"}
MAX_SEEDS = 50


@dataclass(frozen=True)
class CompareConfig:
    data: str = "drugreview"
    partition: str = "column:site"
    num_clients: int = 0
    test: str = ""
    test_fraction: float = 0.0
    methods: tuple[str, ...] = DEFAULT_METHODS
    output: str = "runs/compare"
    seeds: tuple[int, ...] = ()  # every method on each; () = the [run] seed only
    data_description: dict[str, str] = field(default_factory=dict)  # format, columns (DATA_KEYS)
    run: dict[str, Any] = field(default_factory=dict)  # run-config keys shared by every method
    custom: dict[str, dict[str, Any]] = field(default_factory=dict)  # [methods.NAME] overrides

    def __post_init__(self) -> None:
        PartitionSpec.parse(self.partition)
        if not self.methods:
            raise ConfigError("[compare] methods: list at least one method")
        for m in self.methods:
            method_overrides(m, self.custom)  # an unknown method fails here, before any run
            method_kind(m, self.custom)
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"[compare] methods: {list(self.methods)} lists a method twice")
        seeds = self.seeds
        if not isinstance(seeds, tuple) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31 for x in seeds
        ):
            raise ConfigError(f"[compare] seeds={seeds!r}: give a list of integers in [0, 2^31)")
        if len(set(seeds)) != len(seeds) or len(seeds) > MAX_SEEDS:
            raise ConfigError(
                f"[compare] seeds={list(seeds)}: give at most {MAX_SEEDS} distinct seeds"
            )
        base = RunConfig.from_mapping(self.run, source="[run]")
        for m in self.methods:
            self._check_budget(m, base)

    def _check_budget(self, method: str, base: RunConfig) -> None:
        """A method's overrides must be a valid run config that keeps the comparison's budget:
        the same rounds x local steps x fraction of clients, and the same batch size."""
        values = method_overrides(method, self.custom)
        if not values:
            return
        cfg = RunConfig.from_mapping(base.to_mapping() | values, source=f"[methods.{method}]")

        def budget(c: RunConfig) -> float:
            return c.num_server_rounds * c.local_steps * c.fraction_train

        if budget(cfg) != budget(base) or cfg.batch_size != base.batch_size:
            raise ConfigError(
                f"[methods.{method}]: num-server-rounds x local-steps x fraction-train = "
                f"{budget(cfg):g} with batch-size {cfg.batch_size}, but [run] has "
                f"{budget(base):g} with batch-size {base.batch_size}; every method gets the "
                f"same total client steps and examples, so change them together (e.g. twice "
                f"the rounds, half the local steps)"
            )

    @classmethod
    def from_toml(cls, path: Path) -> CompareConfig:
        raw = read_toml(path)
        unknown = set(raw) - {"compare", "run", "methods"}
        if unknown:
            raise ConfigError(
                f"{path}: unknown tables {sorted(unknown)}; use compare, run, methods"
            )
        compare = dict(raw.get("compare", {}))
        bad = set(compare) - COMPARE_KEYS - DATA_KEYS
        if bad:
            raise ConfigError(
                f"{path}: [compare] unknown keys {sorted(bad)}; known: "
                f"{sorted(COMPARE_KEYS | DATA_KEYS)}"
            )
        description = {
            key.replace("-", "_"): str(compare.pop(key)) for key in DATA_KEYS if key in compare
        }
        for key in ("methods", "seeds"):
            if isinstance(compare.get(key), list):
                compare[key] = tuple(compare[key])
        try:
            return cls(
                **{k.replace("-", "_"): v for k, v in compare.items()},
                data_description=description,
                run=dict(raw.get("run", {})),
                custom={k: dict(v) for k, v in raw.get("methods", {}).items()},
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def method_kind(name: str, custom: dict[str, dict[str, Any]]) -> str:
    """``centralized``, ``local`` or ``federated``: what a method runs. A ``[methods.NAME]``
    table is federated unless its ``method`` key names a baseline (a baseline variant, e.g. the
    centralized run at another learning rate)."""
    if name in BASELINES:
        return name
    kind = str(custom.get(name, {}).get("method", "federated"))
    if kind not in (*BASELINES, "federated"):
        raise ConfigError(
            f"[methods.{name}] method = {kind!r}: use centralized, local or federated"
        )
    return kind


def method_overrides(name: str, custom: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run-config keys a method sets ({} for the plain baselines)."""
    if name in BASELINES:
        return {}
    if name in custom:
        return {k: v for k, v in custom[name].items() if k != "method"}
    strategy, _, optimizer = name.partition("+")
    if strategy in STRATEGIES and (not optimizer or optimizer in SERVER_OPTIMIZERS):
        return {"strategy": strategy} | ({"server-optimizer": optimizer} if optimizer else {})
    raise ConfigError(
        f"[compare] methods: unknown method {name!r}; use centralized, local, a strategy "
        f"({', '.join(STRATEGIES)}), STRATEGY+OPTIMIZER ({', '.join(SERVER_OPTIMIZERS)}), or "
        f"define [methods.{name}]"
    )


def merged_partition(part: Partition, clients: list[int], folder: Path) -> Partition:
    """A one-client partition holding the examples of ``clients`` (the pooled data, or one)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(part.folder / partitioned.POOL, folder / partitioned.POOL)
    idx = np.concatenate([np.asarray(partitioned.client_indices(part.folder, c)) for c in clients])
    partitioned.write_indices(folder, [np.sort(idx)])
    return Partition(
        folder=folder,
        num_clients=1,
        test=part.test,
        test_examples=part.test_examples,
        labels=part.labels,
        stats={"clients": clients, "examples": len(idx)},
    )


def with_seeds(cc: CompareConfig, count: int) -> CompareConfig:
    """``--seeds N``: the [run] seed and the next N - 1."""
    if not 1 <= count <= MAX_SEEDS:
        raise ConfigError(f"--seeds {count}: use 1..{MAX_SEEDS}")
    first = RunConfig.from_mapping(cc.run, source="[run]").seed
    return dataclasses.replace(cc, seeds=tuple(range(first, first + count)))


def run_compare(cc: CompareConfig) -> dict[str, Any]:
    """Run every method (on each seed) and write the comparison; returns what compare.json
    holds."""
    out = Path(cc.output)
    out.mkdir(parents=True, exist_ok=True)
    base = RunConfig.from_mapping(cc.run, source="[run]")
    if len(cc.seeds) <= 1:
        if cc.seeds:
            base = RunConfig.from_mapping(base.to_mapping() | {"seed": cc.seeds[0]}, source="[run]")
        run_seed(cc, base, out, set(cc.run) | ({"seed"} if cc.seeds else set()))
        return json.loads((out / "compare.json").read_text())
    docs: list[dict[str, Any]] = []
    for seed in cc.seeds:
        seeded = RunConfig.from_mapping(base.to_mapping() | {"seed": seed}, source="[run]")
        log.info("compare: seed %d (%d of %d)", seed, len(docs) + 1, len(cc.seeds))
        docs.append(run_seed(cc, seeded, out / f"seed-{seed}", set(cc.run) | {"seed"}))
    write_seeds(out, cc, docs)
    return json.loads((out / "compare.json").read_text())


def run_seed(cc: CompareConfig, base: RunConfig, out: Path, given: set[str]) -> dict[str, Any]:
    """Every method on one seed (``base.seed``: split, initialisation, sampling); writes and
    returns that seed's comparison."""
    out.mkdir(parents=True, exist_ok=True)
    part = prepare(
        cc.data,
        out / "partition",
        cc.num_clients,
        PartitionSpec.parse(cc.partition),
        seed=base.seed,
        test=cc.test,
        test_fraction=cc.test_fraction,
        spec_kwargs=dict(cc.data_description) or None,
    )
    per_round = max(1, round(base.fraction_train * part.num_clients))
    rounds, steps = base.num_server_rounds, base.local_steps
    total = rounds * per_round * steps
    cpus = float(os.cpu_count() or 1)
    results: dict[str, dict[str, Any]] = {}
    for method in cc.methods:
        start = time.perf_counter()
        kind = method_kind(method, cc.custom)
        own = RunConfig.from_mapping(  # tracked once per method below, not per simulation
            base.to_mapping() | method_overrides(method, cc.custom) | {"tracking": "none"},
            source=f"method {method}",
        )
        if kind == "centralized":
            one = merged_partition(part, list(range(part.num_clients)), out / "pooled")
            cfg = single_client(own, one, out / method, rounds=1, steps=total, given=given)
            res = metrics_of(simulate(cfg, client_cpus=cpus, partition=one).history)
            res["steps"] = total
        elif kind == "local":
            accs, losses = [], []
            for c in range(part.num_clients):
                one = merged_partition(part, [c], out / method / f"client-{c}" / "partition")
                cfg = single_client(
                    own,
                    one,
                    out / method / f"client-{c}",
                    rounds=1,
                    steps=rounds * steps,
                    given=given,
                )
                m = metrics_of(simulate(cfg, client_cpus=cpus, partition=one).history)
                accs.append(m.get("accuracy", float("nan")))
                losses.append(m["loss"])
            res = {
                "accuracy": float(np.mean(accs)),
                "accuracy-min": float(np.min(accs)),
                "accuracy-max": float(np.max(accs)),
                "loss": float(np.mean(losses)),
                "steps": rounds * steps * part.num_clients,
            }
        else:
            values = own.to_mapping() | {"output-dir": str(out / method)}
            cfg = partitioned_config(
                RunConfig.from_mapping(values, source=f"method {method}"), part, given
            )
            res = metrics_of(simulate(cfg, partition=part).history)
            res["steps"] = total
            res["secure-aggregation"] = cfg.secure_aggregation
            if "dp-epsilon" in res:
                res["dp"] = f"epsilon {res['dp-epsilon']:.2f}"
        if kind in BASELINES:  # one process holds its data: no adapter crosses a network
            res = {k: v for k, v in res.items() if not k.startswith("bytes-")}
            res["bytes-per-client-round"] = 0.0
        res["seconds"] = time.perf_counter() - start
        res["method"] = kind
        res["lr"] = own.lr
        results[method] = res
        log_method(base.tracking, Path(cc.output), method, own.to_mapping(), res, out / method)
        log.info("compare: %s done: %s", method, _brief(res))
        write(out, cc, part, results, total)
    return dict(json.loads((out / "compare.json").read_text()))


def single_client(
    base: RunConfig, part: Partition, out: Path, rounds: int, steps: int, given: set[str]
) -> RunConfig:
    values = base.to_mapping() | {
        "num-server-rounds": rounds,
        "local-steps": steps,
        "local-epochs": 0.0,
        "output-dir": str(out),
        "secure-aggregation": False,  # one node: no sum to hide it in
        "min-nodes": 1,
        "fraction-train": 1.0,
        "strategy": "fedit",
        "server-optimizer": "sgd",
        "server-lr": 0.0,
        "dp-noise-multiplier": 0.0,
        "codec": "none",
    }
    return partitioned_config(RunConfig.from_mapping(values, source="baseline"), part, given)


def metrics_of(history: list[dict[str, Any]]) -> dict[str, Any]:
    last = history[-1]
    replies = sum(r.get("replies", 0) for r in history) or 1
    up = sum(_up_down(r)[0] for r in history)
    down = sum(_up_down(r)[1] for r in history)
    res: dict[str, Any] = {
        "loss": last.get("central-eval-loss", float("nan")),
        "bytes-per-client-round": (up + down) / replies,
        "bytes-up-per-client-round": up / replies,
        "bytes-down-per-client-round": down / replies,
    }
    if "central-eval-accuracy" in last:
        res["accuracy"] = last["central-eval-accuracy"]
    if "dp-epsilon" in last:
        res["dp-epsilon"] = last["dp-epsilon"]
    return res


def _up_down(record: dict[str, Any]) -> tuple[int, int]:
    """Bytes nodes sent and received in a round record. A plain record counts what nodes report
    (their encoded delta out, the downlink payload in); a secure record counts what the SecAgg+
    stages carried, seen from the server (``bytes-sent`` went down to the nodes)."""
    if record.get("secure-aggregation"):
        return record.get("bytes-received", 0), record.get("bytes-sent", 0)
    return record.get("bytes-sent", 0), record.get("bytes-received", 0)


def write(
    out: Path, cc: CompareConfig, part: Partition, results: dict[str, Any], total: int
) -> None:
    central = max(
        (
            r["accuracy"]
            for r in results.values()
            if r["method"] == "centralized" and "accuracy" in r
        ),
        default=None,
    )
    for res in results.values():
        if central and "accuracy" in res:
            res["of-centralized"] = res["accuracy"] / central
    doc = {
        "data": cc.data,
        "partition": part.stats.get("partition", cc.partition),
        "clients": part.num_clients,
        "test": part.test,
        "test-examples": part.test_examples,
        "total-client-steps": total,
        "centralized-accuracy": central,
        "run": cc.run,
        "methods": results,
    }
    (out / "compare.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# fedlora compare: {cc.data}, {doc['partition']}, {part.num_clients} clients",
        "",
        f"Test: {part.test} ({part.test_examples} examples; `central-eval-samples` in [run] "
        f"scores only the first N). Every method: {total} client optimizer steps in total "
        f"(local: {total // max(part.num_clients, 1)} per client x {part.num_clients}). "
        f"% of centralized: against the best centralized row.",
        "",
        "| method | accuracy | % of centralized | loss | client lr | bytes / client / round "
        "| secure agg. | privacy | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        acc = f"{r['accuracy']:.1%}" if "accuracy" in r else "-"
        if r["method"] == "local" and "accuracy-min" in r:
            acc += f" ({r['accuracy-min']:.1%}-{r['accuracy-max']:.1%})"
        pct = f"{r['of-centralized']:.1%}" if "of-centralized" in r else "-"
        sent = "-" if r["method"] in BASELINES else f"{r['bytes-per-client-round']:,.0f}"
        lines.append(
            f"| {name} | {acc} | {pct} | {r['loss']:.4f} | {r['lr']:g} | {sent} "
            f"| {'on' if r.get('secure-aggregation') else 'off'} | {r.get('dp', '-')} "
            f"| {r['seconds']:.0f} |"
        )
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    _plot(results, out / "compare.png")


def write_seeds(out: Path, cc: CompareConfig, docs: list[dict[str, Any]]) -> None:
    """The comparison over seeds: per method the mean accuracy with its 95% interval, the
    per-seed values, and the paired difference against the first federated method."""
    seeds = list(cc.seeds)
    names = list(docs[0]["methods"])
    ref = next((m for m in names if docs[0]["methods"][m]["method"] not in BASELINES), None)

    def accs(name: str) -> list[float] | None:
        values = [d["methods"][name].get("accuracy") for d in docs]
        return None if any(v is None for v in values) else [float(v) for v in values]

    methods: dict[str, Any] = {}
    intervals: dict[str, tuple[Interval, Interval | None]] = {}  # name -> (accuracy, vs ref)
    for name in names:
        rows = [d["methods"][name] for d in docs]
        entry: dict[str, Any] = {
            "method": rows[0]["method"],
            "lr": rows[0]["lr"],
            "loss": float(np.mean([r["loss"] for r in rows])),
            "bytes-per-client-round": float(np.mean([r["bytes-per-client-round"] for r in rows])),
            "secure-aggregation": bool(rows[0].get("secure-aggregation", False)),
            "seconds": float(sum(r["seconds"] for r in rows)),
            "per-seed": {str(s): r for s, r in zip(seeds, rows, strict=True)},
        }
        mine = accs(name)
        if mine is not None:
            theirs = accs(ref) if ref and name != ref else None
            acc, vs = mean_ci(mine), (paired_diff(mine, theirs) if theirs is not None else None)
            intervals[name] = (acc, vs)
            entry["accuracy"] = float(np.mean(mine))  # the mean, as a one-seed row has it
            entry["accuracy-ci"] = acc.to_json()
            entry["accuracy-per-seed"] = mine
            if vs is not None:
                entry["vs-reference"] = vs.to_json()
        for key in ("bytes-up-per-client-round", "bytes-down-per-client-round"):
            entry[key] = float(np.mean([r.get(key, 0.0) for r in rows]))
        methods[name] = entry
    central = max(
        (
            r["accuracy"]
            for r in methods.values()
            if r["method"] == "centralized" and "accuracy" in r
        ),
        default=None,
    )
    for entry in methods.values():
        if central and "accuracy" in entry:
            entry["of-centralized"] = entry["accuracy"] / central
    doc = {
        "data": cc.data,
        "centralized-accuracy": central,
        "partition": docs[0]["partition"],
        "clients": docs[0]["clients"],
        "test": docs[0]["test"],
        "test-examples": docs[0]["test-examples"],
        "total-client-steps": docs[0]["total-client-steps"],
        "seeds": seeds,
        "reference": ref,
        "run": cc.run,
        "methods": methods,
    }
    (out / "compare.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# fedlora compare: {cc.data}, {doc['partition']}, {doc['clients']} clients, "
        f"{len(seeds)} seeds",
        "",
        f"Seeds {seeds} (each: its own split, initial adapter, sampling and batches; per-seed "
        f"tables in `seed-S/`). Accuracy in percentage points: mean +- the half-width of its "
        f"95% Student-t interval over the seeds; the difference to `{ref}` is paired by seed. "
        f"Every method: {doc['total-client-steps']} client optimizer steps per seed.",
        "",
        f"| method | accuracy (mean +- 95% CI) | per seed | vs {ref} (paired, 95% CI) | loss "
        f"| bytes / client / round | secure agg. | wall s (all seeds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in methods.items():
        ci, d = intervals.get(name) or (None, None)
        per = ", ".join(f"{a:.1%}" for a in r.get("accuracy-per-seed", []))
        diff = "-" if d is None else f"{d.text()} [{d.low * 100:+.1f}, {d.high * 100:+.1f}]"
        sent = "-" if r["method"] in BASELINES else f"{r['bytes-per-client-round']:,.0f}"
        lines.append(
            f"| {name} | {ci.text() if ci else '-'} | {per or '-'} | {diff} | {r['loss']:.4f} "
            f"| {sent} | {'on' if r['secure-aggregation'] else 'off'} | {r['seconds']:.0f} |"
        )
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    _plot(
        {
            n: {"accuracy": r["accuracy"], "ci": r["accuracy-ci"]}
            for n, r in methods.items()
            if "accuracy" in r
        },
        out / "compare.png",
    )


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if "accuracy" in r]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names)), 3.5))
    means = [results[n]["accuracy"] for n in names]
    cis = [results[n].get("ci") for n in names]
    errors = None
    if all(c and c.get("ci-low") is not None for c in cis):  # 95% intervals over seeds
        errors = [
            [m - c["ci-low"] for m, c in zip(means, cis, strict=True)],
            [c["ci-high"] - m for m, c in zip(means, cis, strict=True)],
        ]
    ax.bar(names, means, color="tab:blue", yerr=errors, capsize=4 if errors else 0)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _brief(res: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
