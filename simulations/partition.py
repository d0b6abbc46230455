"""Split a data set across N simulated clients with flwr-datasets' partitioners.

``--partition`` forms (:meth:`PartitionSpec.parse`):

- ``iid``: uniform random split (``IidPartitioner``);
- ``dirichlet:ALPHA[:COLUMN]``: label skew drawn from Dir(ALPHA) over COLUMN's values
  (``DirichletPartitioner``; COLUMN defaults to ``label``, the example's final answer);
- ``column:NAME``: the natural split, one client per distinct value of NAME
  (``NaturalIdPartitioner``); the drug reviews' ``site`` column gives the five packaged sites;
- ``shards:K``: sort by label, cut into shards, K shards per client (``ShardPartitioner``).

Columns are ``label`` plus each record's other scalar fields (JSON keys, CSV columns). The
partition is seeded; :func:`prepare` writes it, the training pool, the test split and their
statistics (JSON and a PNG) to a folder that nodes read (:mod:`fedlora.data.partitioned`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.data import partitioned
from fedlora.data.records import Example
from fedlora.errors import ConfigError, DataError

log = logging.getLogger(__name__)

KINDS = ("iid", "dirichlet", "column", "shards")
USAGE = "use iid, dirichlet:ALPHA[:COLUMN], column:NAME or shards:K"
PACKAGED = ("drugreview",)
MAX_ALPHA = 1e4  # beyond, a Dirichlet draw is an IID split
MAX_SHARDS = 10_000  # shards per client
MAX_LABELS = 20  # more distinct answers than this: not a label task
MAX_LABEL_CHARS = 40


@dataclass(frozen=True)
class PartitionSpec:
    kind: str  # one of KINDS
    alpha: float = 0.0  # dirichlet concentration (> 0; small = skewed)
    column: str = "label"  # dirichlet / column / shards: the column to split by
    shards: int = 0  # shards per client

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"--partition {self.kind!r}: {USAGE}")
        if self.kind == "dirichlet" and not 0 < self.alpha <= MAX_ALPHA:
            raise ConfigError(
                f"--partition dirichlet:{self.alpha}: alpha must be > 0 and at most {MAX_ALPHA:g}"
                f" (0.1: each client holds mostly one label; 100: near IID); for an even split "
                f"use --partition iid"
            )
        if self.kind == "shards" and not 1 <= self.shards <= MAX_SHARDS:
            raise ConfigError(
                f"--partition shards:{self.shards}: K must be >= 1 and at most {MAX_SHARDS}, e.g. 2"
            )
        if not self.column:
            raise ConfigError(f"--partition {self.kind}: name a column, e.g. column:site")

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        parts = [p.strip() for p in text.strip().split(":")]
        kind, args = parts[0].lower(), parts[1:]
        try:
            if kind == "iid" and not args:
                return cls("iid")
            if kind == "dirichlet" and 1 <= len(args) <= 2:
                return cls("dirichlet", alpha=float(args[0]), column=(args[1:] or ["label"])[0])
            if kind == "column" and len(args) == 1:
                return cls("column", column=args[0])
            if kind == "shards" and len(args) == 1:
                return cls("shards", shards=int(args[0]))
        except ValueError:
            raise ConfigError(
                f"--partition {text!r}: {args[0]!r} is not a number; {USAGE}"
            ) from None
        if kind in KINDS:
            raise ConfigError(f"--partition {text!r}: wrong number of ':' parts; {USAGE}")
        raise ConfigError(f"--partition {text!r}: unknown kind {kind!r}; {USAGE}")

    def __str__(self) -> str:
        return {
            "iid": "iid",
            "dirichlet": f"dirichlet:{self.alpha:g}:{self.column}",
            "column": f"column:{self.column}",
            "shards": f"shards:{self.shards}",
        }[self.kind]


@dataclass(frozen=True)
class Partition:
    """What :func:`prepare` wrote: where, how many clients, the test split and the labels."""

    folder: Path
    num_clients: int
    test: str  # central test data: a file, or "drugreview" (the packaged test split)
    test_examples: int
    labels: tuple[str, ...]  # answers scored for accuracy ("" task: none)
    stats: dict[str, Any]


def label_of(ex: Example) -> str:
    """An example's ``label`` column: its final answer (stripped); '' for plain text."""
    return ex.turns[-1].content.strip() if ex.turns else ""


def columns(examples: list[Example]) -> dict[str, list[str]]:
    """Every column present in all examples: ``label`` and the records' common scalar fields."""
    out = {"label": [label_of(ex) for ex in examples]}
    common = set.intersection(*(set(dict(ex.fields)) for ex in examples)) if examples else set()
    for name in sorted(common - {"label"}):
        out[name] = [dict(ex.fields)[name] for ex in examples]
    return out


def infer_labels(values: list[str]) -> tuple[str, ...]:
    """The label set when the answers look like one (few, short, repeated), else ()."""
    counts = Counter(values)
    if not values or len(counts) > MAX_LABELS or len(counts) < 2:
        return ()
    if any(n < 2 or not v or "\n" in v or len(v) > MAX_LABEL_CHARS for v, n in counts.items()):
        return ()
    return tuple(sorted(counts))


def split(
    examples: list[Example], spec: PartitionSpec, num_clients: int, seed: int
) -> list[np.ndarray]:
    """Each client's indices into ``examples`` (sorted), computed by flwr-datasets."""
    import datasets
    from flwr_datasets import partitioner as fp

    datasets.disable_progress_bars()

    n = len(examples)
    cols = columns(examples)
    if spec.kind != "iid" and spec.column not in cols:
        raise ConfigError(
            f"--partition {spec}: no column {spec.column!r} in the data (columns in every "
            f"record: {', '.join(cols)}); name one of them"
        )
    if spec.kind == "column":
        distinct = len(set(cols[spec.column]))
        if num_clients and num_clients != distinct:
            raise ConfigError(
                f"--partition {spec} gives one client per value: {distinct} clients, not "
                f"--num-clients {num_clients}; drop --num-clients or set it to {distinct}"
            )
        num_clients = distinct
    if num_clients < 1:
        raise ConfigError(f"--num-clients {num_clients}: must be >= 1")
    if num_clients > n:
        raise ConfigError(
            f"--num-clients {num_clients}: the training data has only {n} examples; "
            f"use at most {n} clients"
        )
    table: dict[str, Any] = {"idx": list(range(n))}
    if spec.kind != "iid":
        table[spec.column] = cols[spec.column]
    dataset = datasets.Dataset.from_dict(table)
    if spec.kind in ("dirichlet", "shards"):
        dataset = dataset.class_encode_column(spec.column)  # integer classes, sorted by value
    part: Any
    if spec.kind == "iid":
        part = fp.IidPartitioner(num_clients)
        dataset = dataset.shuffle(seed=seed)  # IidPartitioner takes contiguous slices
    elif spec.kind == "dirichlet":
        part = fp.DirichletPartitioner(
            num_clients, spec.column, spec.alpha, min_partition_size=1, seed=seed
        )
    elif spec.kind == "column":
        part = fp.NaturalIdPartitioner(spec.column)
    else:
        if spec.shards * num_clients > n:
            raise ConfigError(
                f"--partition {spec} with {num_clients} clients needs "
                f"{spec.shards * num_clients} shards of at least one example; the data has {n}: "
                f"lower K or --num-clients"
            )
        part = fp.ShardPartitioner(
            num_clients, spec.column, num_shards_per_partition=spec.shards, seed=seed
        )
    part.dataset = dataset
    try:
        # Dirichlet retries warn (the error below says it); NaturalIdPartitioner draws a tqdm
        # bar on stderr that no option turns off.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            parts = [
                np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64))
                for i in range(num_clients)
            ]
    except ValueError as exc:
        if spec.kind == "dirichlet":
            raise ConfigError(
                f"--partition {spec}: with {num_clients} clients some client got no example "
                f"in 10 Dirichlet draws; raise alpha or lower --num-clients"
            ) from None
        raise ConfigError(f"--partition {spec}: {exc}") from None
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(
            f"--partition {spec}: {len(empty)} of {num_clients} clients get no example "
            f"(first: {empty[0]}); lower --num-clients or choose another partition"
        )
    return parts


def statistics(
    examples: list[Example], parts: list[np.ndarray], labels: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Per client: examples, and the label histogram when the task has labels."""
    values = [label_of(ex) for ex in examples]
    out = []
    for i, idx in enumerate(parts):
        row: dict[str, Any] = {"client": i, "examples": len(idx)}
        if labels:
            counts = Counter(values[j] for j in idx)
            row["labels"] = {lab: counts.get(lab, 0) for lab in labels}
        out.append(row)
    return out


def plot(stats: dict[str, Any], path: Path) -> None:
    """Examples per client, stacked by label when there are labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = stats["clients"]
    x = np.arange(len(clients))
    fig, ax = plt.subplots(figsize=(max(6.0, min(20.0, 0.25 * len(clients))), 3.5))
    width = 0.8 if len(clients) <= 200 else 1.0
    if stats["labels"]:
        bottom = np.zeros(len(clients))
        for lab in stats["labels"]:
            h = np.array([c["labels"][lab] for c in clients], dtype=float)
            ax.bar(x, h, width, bottom=bottom, label=lab)
            bottom += h
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.bar(x, [c["examples"] for c in clients], width)
    ax.set_xlabel("client")
    ax.set_ylabel("training examples")
    ax.set_title(f"{stats['partition']}: {len(clients)} clients, seed {stats['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_pool(data: str, spec_kwargs: dict[str, Any] | None = None) -> list[Example]:
    """The examples of ``data``: a packaged task by name, or any file/folder check-data reads."""
    if data == "drugreview":
        from fedlora.data.drugreview import load_split, site_of
        from fedlora.prompting import review_example

        return [
            replace(
                review_example(r.text, r.label, f"drugreview:train:{i}"),
                fields=(
                    ("condition", r.condition),
                    ("drug", r.drug),
                    ("site", site_of(r.condition)),
                ),
            )
            for i, r in enumerate(load_split("train"))
        ]
    from fedlora.data.formats import DataSpec, describe, load_examples

    if not Path(data).exists():
        raise ConfigError(
            f"--data {data!r}: no such file or folder, and not a packaged task ({PACKAGED})"
        )
    result = load_examples(DataSpec(path=data, **(spec_kwargs or {})))
    log.info("Data: %s", describe(result))
    return result.examples


def prepare(
    data: str,
    folder: Path,
    num_clients: int,
    spec: PartitionSpec,
    seed: int = 0,
    test: str = "",
    test_fraction: float = 0.0,
    spec_kwargs: dict[str, Any] | None = None,
) -> Partition:
    """Read ``data``, hold out the test split, partition the rest, write it all to ``folder``."""
    from fedlora.data.formats import train_eval_split

    if not 0 <= test_fraction < 1:
        raise ConfigError(f"--test-fraction {test_fraction}: must be in [0, 1), e.g. 0.1")
    if test and test_fraction:
        raise ConfigError("give --test PATH or --test-fraction F, not both")
    pool = load_pool(data, spec_kwargs)
    if not pool:
        raise DataError(f"--data {data}: no examples")
    held_out: list[Example] = []
    if test_fraction:
        pool, held_out = train_eval_split(pool, test_fraction, seed)
        test_source = str(folder / partitioned.TEST)
    elif test and test != "drugreview":
        # read with the same data description as --data, once: the server (central evaluation)
        # then reads the normalized copy, whatever columns or format the user's file has
        held_out = load_pool(test, spec_kwargs)
        if not held_out:
            raise DataError(f"--test {test}: no examples")
        test_source = str(folder / partitioned.TEST)
    elif test or data == "drugreview":
        test_source = "drugreview"  # the packaged task brings its own test split
    else:
        raise ConfigError(
            f"--data {data}: say where the held-out test data is: --test PATH or "
            f"--test-fraction F (e.g. 0.1)"
        )
    n_test = len(held_out) if held_out else _test_size(test_source, spec_kwargs)
    parts = split(pool, spec, num_clients, seed)  # every check before anything is written
    labels = infer_labels([label_of(ex) for ex in pool])
    folder.mkdir(parents=True, exist_ok=True)
    if held_out:
        partitioned.write_examples(Path(test_source), held_out)
    partitioned.write_examples(folder / partitioned.POOL, pool)
    partitioned.write_indices(folder, parts)
    sizes = [len(p) for p in parts]
    stats: dict[str, Any] = {
        "data": data,
        "partition": str(spec),
        "num-clients": len(parts),
        "seed": seed,
        "train-examples": len(pool),
        "test": test_source,
        "test-examples": n_test,
        "labels": list(labels),
        "examples-per-client": {
            "min": min(sizes),
            "median": float(np.median(sizes)),
            "max": max(sizes),
        },
        "clients": statistics(pool, parts, labels),
    }
    (folder / partitioned.STATS).write_text(json.dumps(stats, indent=1))
    plot(stats, folder / "partition.png")
    log.info(
        "Partition %s: %d clients, %d-%d training examples each (median %.0f); test: %s "
        "(%d examples); written to %s",
        spec,
        len(parts),
        min(sizes),
        max(sizes),
        float(np.median(sizes)),
        test_source,
        n_test,
        folder,
    )
    return Partition(
        folder=folder,
        num_clients=len(parts),
        test=test_source,
        test_examples=n_test,
        labels=labels,
        stats=stats,
    )


def _test_size(source: str, spec_kwargs: dict[str, Any] | None) -> int:
    """Examples in a test source: the packaged test split, or a file/folder."""
    if source == "drugreview":
        from fedlora.data.drugreview import load_split

        return len(load_split("test"))
    return len(load_pool(source, spec_kwargs))
